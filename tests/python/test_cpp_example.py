"""The C++ LibTorch trainer examples/cpp/fashion_mnist (built into the build folder by
scripts/build.sh), run on a small subset of Fashion-MNIST: it trains in float, fine-tunes with
QAT, exports the integer model and evaluates the exported file in C++; Python then loads the
same file and gets exactly the accuracy that C++ printed on the same test images."""

import gzip
import subprocess

import pytest
import torch

from qat.datasets import load_fashion_mnist

from helpers import BUILD_DIR

EXAMPLE = BUILD_DIR / "fashion_mnist"

TRAIN, TEST, BATCH = 2000, 500, 64
FIGURES = ("float_accuracy", "qat_accuracy", "exported_bytes", "integer_accuracy")


def _require_example():
    assert EXAMPLE.is_file(), (
        f"{EXAMPLE} is missing: scripts/build.sh builds it from examples/cpp/fashion_mnist.cpp "
        "(or set QAT_BUILD_DIR)")


def _run(*args):
    return subprocess.run([str(EXAMPLE), *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def _figures(stdout):
    """The "name value" lines the example prints for machine readers."""
    figures = {}
    for line in stdout.splitlines():
        name, _, value = line.partition(" ")
        if name in FIGURES:
            figures[name] = float(value)
    assert set(figures) == set(FIGURES), stdout
    return figures


def _load(path, mobile):
    if mobile:
        from torch.jit.mobile import _load_for_lite_interpreter
        return _load_for_lite_interpreter(str(path))
    model = torch.jit.load(str(path))
    model.eval()
    return model


def _accuracy(model, images, labels):
    """As the example measures it: batches of BATCH in order, argmax of the logits."""
    correct = 0
    with torch.no_grad():
        for start in range(0, len(images), BATCH):
            logits = model(images[start:start + BATCH])
            correct += int((logits.argmax(1) == labels[start:start + BATCH]).sum())
    return correct / len(images)


@pytest.mark.parametrize("mobile", [True, False], ids=["ptl", "pt"])
def test_cpp_example_exports_a_model_python_evaluates_the_same(tmp_path, mobile):
    _require_example()
    path = tmp_path / ("model.ptl" if mobile else "model.pt")
    run = _run("--train", TRAIN, "--test", TEST, "--float-epochs", 1, "--qat-epochs", 1,
               "--batch", BATCH, "--out", path, "--mobile" if mobile else "--no-mobile")
    assert run.returncode == 0, run.stdout + run.stderr
    figures = _figures(run.stdout)

    # 2,000 images and one epoch of each are plenty for a small CNN to beat chance (0.1).
    assert figures["float_accuracy"] > 0.5, run.stdout
    assert figures["qat_accuracy"] > 0.5, run.stdout
    assert figures["exported_bytes"] == path.stat().st_size
    # The integer model runs what QAT simulated: at most a few of the 500 images (rounding
    # ties, requantized biases) change class. 1e-9: the difference of two printed decimals.
    assert abs(figures["integer_accuracy"] - figures["qat_accuracy"]) <= 0.01 + 1e-9, run.stdout

    images, labels = load_fashion_mnist(train=False)
    previous_engine = torch.backends.quantized.engine
    torch.backends.quantized.engine = "qnnpack"
    try:
        python_accuracy = _accuracy(_load(path, mobile), images[:TEST], labels[:TEST])
    finally:
        torch.backends.quantized.engine = previous_engine
    # The same file on the same inputs (the example scales images as qat.datasets does):
    # the same integer kernels give the same classes, so the fractions are equal.
    assert python_accuracy == figures["integer_accuracy"], run.stdout


def _write_gzip(path, data):
    with gzip.open(path, "wb") as f:
        f.write(data)


def _one_line_error(run):
    assert run.returncode == 1, run.stdout + run.stderr
    assert run.stderr.startswith("fashion_mnist: ") and run.stderr.count("\n") == 1, run.stderr
    return run.stderr


def test_cpp_example_reports_a_missing_dataset_in_one_line(tmp_path):
    _require_example()
    missing = tmp_path / "nowhere"
    stderr = _one_line_error(_run("--data", missing, "--out", tmp_path / "model.ptl"))
    assert str(missing / "train-images-idx3-ubyte.gz") in stderr
    assert "dataset-fashion-mnist" in stderr
    assert not (tmp_path / "model.ptl").exists()


def test_cpp_example_reports_a_file_that_is_not_idx_in_one_line(tmp_path):
    _require_example()
    # An IDX header of 2 dimensions where the images need 3.
    _write_gzip(tmp_path / "train-images-idx3-ubyte.gz", bytes([0, 0, 8, 2]) + bytes(12))
    stderr = _one_line_error(_run("--data", tmp_path, "--out", tmp_path / "model.ptl"))
    assert (f"'{tmp_path / 'train-images-idx3-ubyte.gz'}' is not an IDX file of unsigned bytes "
            "in 3 dimensions") in stderr


def test_cpp_example_reports_truncated_data_in_one_line(tmp_path):
    _require_example()
    # The header announces 2 images of 28x28; only 100 bytes follow.
    header = bytes([0, 0, 8, 3]) + (2).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    _write_gzip(tmp_path / "train-images-idx3-ubyte.gz", header + bytes(100))
    stderr = _one_line_error(_run("--data", tmp_path, "--out", tmp_path / "model.ptl"))
    assert "holds 100 bytes of data, its header announces 1568" in stderr


def test_cpp_example_reports_an_unwritable_output_in_one_line(tmp_path):
    _require_example()
    out = tmp_path / "no_such_folder" / "model.ptl"
    stderr = _one_line_error(_run("--out", out))
    assert f"cannot write the output file '{out}'" in stderr


@pytest.mark.parametrize("args, message", [
    (["--train", "3x"], "--train expects a whole number, got '3x'"),
    (["--batch", "0"], "--batch must be at least 1, got 0"),
    (["--test", str(10**6)], "--test 1000000 exceeds the 10000 samples of "),
    (["--epochs", "2"], "unknown argument '--epochs'; usage: fashion_mnist "),
])
def test_cpp_example_reports_bad_arguments_in_one_line(tmp_path, args, message):
    _require_example()
    stderr = _one_line_error(_run(*args, "--out", tmp_path / "model.ptl"))
    assert message in stderr
