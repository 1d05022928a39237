"""``python -m qat bench`` and ``compare`` on small exported files, run both as a process
and through ``qat.__main__.main``: the printed figures against the test's own evaluation of
the same files, and the one-line errors."""

import re
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.jit.mobile import _load_for_lite_interpreter

import qat
import qat.mobile
from qat.__main__ import main
from qat.datasets import load_fashion_mnist

from conftest import SUBPROCESS_ENV as _ENV


def _tiny_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 7 * 7, 10))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A float .ptl, and the int8 .ptl and .pt qat.export makes of it, of a tiny CNN trained
    for a few steps (so that accuracy and agreement mean something) and calibrated on a few
    Fashion-MNIST images."""
    torch.manual_seed(0)
    images, labels = load_fashion_mnist(train=True)
    model = _tiny_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for i in range(0, 40 * 64, 64):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(images[i:i + 64]), labels[i:i + 64]).backward()
        optimizer.step()
    model.eval()
    folder = tmp_path_factory.mktemp("cli")
    paths = {name.replace(".", "_"): str(folder / name)
             for name in ("float.ptl", "int.ptl", "int.pt")}
    qat.mobile.save_for_lite_interpreter(model, paths["float_ptl"])
    qmodel = qat.prepare(model)
    qat.calibrate(qmodel, [images[i:i + 32] for i in range(0, 128, 32)], progress=False)
    qat.export(qmodel, paths["int_ptl"], images[:1])
    qat.export(qmodel, paths["int_pt"], images[:1], mobile=False)
    return paths


@pytest.fixture(params=["process", "main"])
def cli(request):
    """Runs ``python -m qat ARGS`` as a process or ``main(ARGS)`` in this one; returns
    ``(exit status, stdout, stderr)``."""
    if request.param == "process":
        def run(*args):
            result = subprocess.run([sys.executable, "-m", "qat", *args], env=_ENV,
                                    capture_output=True, text=True)
            return result.returncode, result.stdout, result.stderr
        return run

    capsys = request.getfixturevalue("capsys")

    def run(*args):
        engine, threads = torch.backends.quantized.engine, torch.get_num_threads()
        status = main(list(args))
        # main gives its caller the engine and thread count it found.
        assert (torch.backends.quantized.engine, torch.get_num_threads()) == (engine, threads)
        out, err = capsys.readouterr()
        return status, out, err
    return run


_BENCH = re.compile(r"(\d+) runs after (\d+) warm-up: median ([\d.]+) ms, p90 ([\d.]+) ms, "
                    r"throughput ([\d.]+) samples/s")


def _bench_figures(out: str):
    match = _BENCH.search(out)
    assert match, out
    runs, warmup = int(match[1]), int(match[2])
    median, p90, throughput = (float(g) for g in match.groups()[2:])
    return runs, warmup, median, p90, throughput


def test_bench_takes_the_input_shape_qat_export_recorded(cli, files):
    status, out, err = cli("bench", files["int_ptl"], "--iterations", "7", "--warmup", "2")
    assert status == 0, err
    assert f"{files['int_ptl']}: lite interpreter, engine qnnpack" in out
    assert "input 1x1x28x28 float32" in out
    runs, warmup, median, p90, throughput = _bench_figures(out)
    assert (runs, warmup) == (7, 2)
    assert 0 < median <= p90
    assert throughput == pytest.approx(1e3 / median, rel=0.01)


def test_bench_batch_threads_and_given_shape(cli, files):
    status, out, err = cli("bench", files["int_pt"], "--batch", "4", "--threads", "1",
                           "--iterations", "3")
    assert status == 0, err
    assert "TorchScript, engine qnnpack, threads 1, input 4x1x28x28 float32" in out
    _, _, median, _, throughput = _bench_figures(out)
    assert throughput == pytest.approx(4e3 / median, rel=0.01)
    # A file not from qat.export records no input shape: it is given.
    status, out, err = cli("bench", files["float_ptl"], "--input-shape", "1,28,28",
                           "--batch", "2", "--iterations", "3")
    assert status == 0, err
    assert "input 2x1x28x28 float32" in out and _bench_figures(out)[2] > 0


def _evaluate(path: str, images: torch.Tensor, batch: int) -> torch.Tensor:
    """Outputs of the lite-interpreter file at ``path``, as on the phone (qnnpack)."""
    engine = torch.backends.quantized.engine
    torch.backends.quantized.engine = "qnnpack"
    try:
        model = _load_for_lite_interpreter(path)
        return torch.cat([model(images[i:i + batch]) for i in range(0, len(images), batch)])
    finally:
        torch.backends.quantized.engine = engine


def test_compare_prints_what_the_files_compute(cli, files):
    limit, batch = 300, 64
    status, out, err = cli("compare", files["float_ptl"], files["int_ptl"], "--limit",
                           str(limit), "--batch", str(batch))
    assert status == 0, err
    images, labels = load_fashion_mnist(train=False)
    images, labels = images[:limit], labels[:limit]
    float_out = _evaluate(files["float_ptl"], images, batch)
    int_out = _evaluate(files["int_ptl"], images, batch)
    for role, outputs in (("float", float_out), ("int", int_out)):
        correct = int((outputs.argmax(1) == labels).sum())
        assert f"{role} {files[role + '_ptl']}: accuracy {correct / limit:.4f} " \
               f"({correct}/{limit})" in out
        assert correct > 0.5 * limit  # trained well above chance (10%)
    agree = int((float_out.argmax(1) == int_out.argmax(1)).sum())
    assert f"top-1 agreement {agree / limit:.4f} ({agree}/{limit})" in out
    assert agree >= 0.95 * limit
    match = re.search(r"output difference: max ([\d.e+-]+), mean ([\d.e+-]+)", out)
    assert match, out
    difference = (float_out - int_out).abs()
    assert float(match[1]) == pytest.approx(difference.max().item(), rel=1e-3)
    assert float(match[2]) == pytest.approx(difference.mean().item(), rel=1e-3)


def test_compare_takes_full_torchscript_files_too(cli, files):
    status, out, err = cli("compare", files["int_ptl"], files["int_pt"], "--limit", "50")
    assert status == 0, err
    # The same integer model in both formats: the same outputs.
    assert "top-1 agreement 1.0000 (50/50)" in out
    assert "output difference: max 0, mean 0" in out


@pytest.mark.parametrize("args, named", [
    (["bench", "{missing}"], "{missing}: no such file"),
    (["bench", "{text}", "--input-shape", "1,28,28"], "{text}: not a TorchScript file"),
    (["bench", "{float_ptl}"], "{float_ptl}: the file records no input shape"),
    (["bench", "{float_ptl}", "--input-shape", "1,x,28"], "--input-shape: expected positive"),
    (["bench", "{float_ptl}", "--input-shape", "0,28,28"], "--input-shape: expected positive"),
    (["bench", "{int_ptl}", "--input-shape", "3,28,28"],
     "{int_ptl}: the model fails on a 1x3x28x28 float32 input"),
    (["bench", "{int_ptl}", "--iterations", "0"], "--iterations: must be at least 1"),
    # It reached torch.set_num_threads, whose RuntimeError came with a traceback.
    (["bench", "{int_ptl}", "--threads", "0"], "--threads: must be at least 1"),
    (["compare", "{float_ptl}", "{missing}", "--limit", "10"], "{missing}: no such file"),
    (["compare", "{text}", "{int_ptl}", "--limit", "10"], "{text}: not a TorchScript file"),
    (["compare", "{float_ptl}", "{int_ptl}", "--data", "{missing}"],
     "--data: {missing} is not a folder"),
    (["compare", "{float_ptl}", "{int_ptl}", "--data", "{folder}"],
     "--data: qat.datasets: {folder}/t10k-images-idx3-ubyte.gz not found"),
])
def test_errors_are_one_line_naming_the_file_or_argument(cli, files, tmp_path, args, named):
    text = tmp_path / "notes.ptl"
    text.write_text("not an archive")
    names = dict(files, missing=str(tmp_path / "missing.ptl"), text=str(text),
                 folder=str(tmp_path))
    status, out, err = cli(*(arg.format(**names) for arg in args))
    assert status == 1 and out == ""
    # Lines of PyTorch's own C++ log (its deprecation note on quantized tensors, 2.13+,
    # printed once per process where no Python warning handler is active) are not ours.
    err = "".join(line for line in err.splitlines(keepends=True)
                  if not re.match(r"\[W\d+ [\d:.]+ \S+:\d+\] Warning: .*deprecated", line))
    assert err.count("\n") == 1 and err.startswith(f"python -m qat {args[0]}: "), err
    assert named.format(**names) in err
