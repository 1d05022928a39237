"""The main job (``scripts/run.sh``): quantization-aware training on Fashion-MNIST, end to
end, against PyTorch's own QAT.

A small CNN (conv-bn-relu blocks, a residual add, a linear head) is trained in float, then
fine-tuned with QAT at int8, at 4-bit weights (w4a8) and at per-layer bits chosen by
``qat.auto_precision`` under the w4a8 model's weight size; each is converted and exported
in every mobile format this installation runs: a lite-interpreter ``.ptl`` where this
PyTorch still has the lite interpreter, an ExecuTorch ``.pte`` (XNNPACK) where ExecuTorch is
installed and a QDQ ``.onnx`` (ONNX Runtime) where onnx and onnxruntime are (the PyPI
PyTorch: ``scripts/run_pypi.sh``), each beside the float model in the same format. PyTorch's own QAT (``prepare_qat_fx`` / ``convert_fx``, qnnpack) is fine-tuned
on the same schedule from the same float weights (``.ptl`` only). One table per format
shows, per model: the test accuracy of its file in its runtime (and of the QAT simulation),
the file's size, its latency at batch 1 in that runtime, and the parity of the file with
the simulation (top-1 agreement, SQNR). An ExecuTorch program runs the input shape it was
exported with (batch 1 here), so its accuracy is measured one image at a time. Plots of
accuracy against size and of per-layer sensitivity are written next to the files.

    .venv/bin/python examples/python/fashion_mnist_demo.py [--data DIR] [--out DIR]
        [--epochs 3] [--qat-epochs 1] [--train-limit N] [--test-limit N]
"""

import argparse
import copy
import json
import os
import time
import warnings
import zipfile

# Set before torch loads libgomp (see benchmarks/bench_export.py): spinning OpenMP threads
# would take the cores from the runtimes' thread pools in the latency figures.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

import qat  # noqa: E402
from qat.datasets import DEFAULT_FASHION_MNIST, load_fashion_mnist  # noqa: E402
from qat.export import load  # noqa: E402
from qat.mobile import (executorch_latency_ms, lite_latency_ms, mobile_formats,  # noqa: E402
                        onnx_latency_ms, save_for_executorch, save_for_lite_interpreter,
                        save_for_onnx)
from qat.precision import model_size, weight_bits  # noqa: E402

BATCH = 128
CLASSES = 10
# Per mobile format: its runtime, the batch its files run (a .pte runs the shape it was
# exported with), the float baseline's writer, and the latency timer.
RUNTIMES = {
    "ptl": ("lite interpreter, qnnpack", BATCH,
            lambda model, path, x: save_for_lite_interpreter(model, path), lite_latency_ms),
    "pte": ("ExecuTorch, XNNPACK", 1, save_for_executorch, executorch_latency_ms),
    "onnx": ("ONNX Runtime, CPU", BATCH, save_for_onnx, onnx_latency_ms),
}


class DemoNet(nn.Module):
    """28x28 grey images -> 10 classes: a conv-bn-relu stem, a residual block, a strided
    conv-bn-relu and a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = _conv_bn(1, 16, relu=True)
        self.pool = nn.MaxPool2d(2)
        self.block1 = _conv_bn(16, 16, relu=True)
        self.block2 = _conv_bn(16, 16, relu=False)
        self.relu = nn.ReLU()
        self.down = _conv_bn(16, 32, relu=True, stride=2)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 7 * 7, CLASSES))

    def forward(self, x):
        x = self.pool(self.stem(x))
        x = self.relu(self.block2(self.block1(x)) + x)
        return self.head(self.down(x))


def _conv_bn(cin: int, cout: int, relu: bool, stride: int = 1) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
              nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU()) if relu else nn.Sequential(*layers)


def batches(images, labels, generator=None):
    order = (torch.randperm(len(images), generator=generator) if generator is not None
             else torch.arange(len(images)))
    for start in range(0, len(images), BATCH):
        idx = order[start:start + BATCH]
        yield images[idx], labels[idx]


def train(model, images, labels, epochs: int, lr: float, seed: int, desc: str) -> None:
    """Adam on shuffled batches, the same order for every model given the same seed."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    steps = (len(images) + BATCH - 1) // BATCH
    for epoch in range(epochs):
        bar = tqdm(batches(images, labels, generator), total=steps,
                   desc=f"{desc} epoch {epoch + 1}/{epochs}", leave=False)
        for x, y in bar:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")


def accuracy(model, images, labels, batch: int = BATCH) -> float:
    correct = 0
    with torch.no_grad():
        for i in range(0, len(images), batch):
            correct += (model(images[i:i + batch]).argmax(1) == labels[i:i + batch]).sum().item()
    return correct / len(images)


def run_qat(name, float_model, config, data, args, formats):
    """Prepares, calibrates, fine-tunes and exports one qat model in each format; its rows
    of figures, by format."""
    train_x, train_y, test_x, test_y = data
    qmodel = qat.prepare(copy.deepcopy(float_model), config)
    qat.calibrate(qmodel, [x for x, _ in batches(train_x[:2048], train_y[:2048])])
    train(qmodel, train_x, train_y, args.qat_epochs, args.qat_lr, seed=1, desc=name)
    qat.disable_observer(qmodel)
    qmodel.eval()
    simulation_accuracy = accuracy(qmodel, test_x, test_y)
    rows = {}
    for fmt in formats:
        path = os.path.join(args.out, f"{name.replace(' ', '_')}.{fmt}")
        qat.export(qmodel, path, test_x[:1])
        batch = RUNTIMES[fmt][1]
        parity = qat.compare(qmodel, path, [test_x[i:i + batch]
                                            for i in range(0, len(test_x), batch)])
        rows[fmt] = {"simulation_accuracy": simulation_accuracy, "path": path,
                     "top1_agreement": parity["top1_agreement"], "sqnr_db": parity["sqnr_db"]}
    return rows


def run_torch_qat(float_model, data, args):
    """PyTorch's own QAT on the same schedule: prepare_qat_fx with the qnnpack default
    qconfig mapping, the same Adam fine-tuning, convert_fx. None where this PyTorch no longer
    has that flow."""
    try:
        from torch.ao.quantization import get_default_qat_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_qat_fx
    except ImportError as error:
        print(f"PyTorch's FX QAT is not in this PyTorch ({error}): no torch int8 row")
        return None
    train_x, train_y, test_x, test_y = data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notes on its own API
        prepared = prepare_qat_fx(copy.deepcopy(float_model).train(),
                                  get_default_qat_qconfig_mapping("qnnpack"), (test_x[:1],))
        train(prepared, train_x, train_y, args.qat_epochs, args.qat_lr, seed=1,
              desc="torch int8")
        prepared.eval()
        simulation_accuracy = accuracy(prepared, test_x, test_y)
        int_model = convert_fx(copy.deepcopy(prepared))
    path = os.path.join(args.out, "torch_int8.ptl")
    save_for_lite_interpreter(int_model, path)
    with torch.no_grad():
        sim = torch.cat([prepared(x) for x, _ in batches(test_x, test_y)])
        got = torch.cat([int_model(x) for x, _ in batches(test_x, test_y)])
    sqnr = 10 * torch.log10(sim.pow(2).sum() / (sim - got).pow(2).sum().clamp_min(1e-30))
    return {"simulation_accuracy": simulation_accuracy, "path": path,
            "top1_agreement": (sim.argmax(1) == got.argmax(1)).float().mean().item(),
            "sqnr_db": sqnr.item()}


def tensor_bytes(path: str) -> int:
    """The bytes of the tensors a TorchScript archive holds (its data/ entries): the model's
    size without the code, the metadata and the zip's headers, whose lengths depend on
    names (the archive's folder is the file's name)."""
    with zipfile.ZipFile(path) as archive:
        return sum(info.file_size for info in archive.infolist()
                   if "/data/" in info.filename or "/constants/" in info.filename)


def plot_accuracy_vs_size(rows, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    points = {}  # models landing on the same point share one label
    for fmt, table in rows.items():
        for name, row in table.items():
            points.setdefault((round(row["bytes"] / 1e3), 100 * row["accuracy"]),
                              []).append(f"{name} .{fmt}")
    for (kb, acc), names in points.items():
        ax.scatter(kb, acc, s=40)
        ax.annotate(" = ".join(names), (kb, acc), textcoords="offset points", xytext=(5, 3),
                    fontsize=8)
    ax.set_xlabel("file size (kB)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Fashion-MNIST: accuracy against model size")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(rows) -> None:
    """One format's rows; a .pte has no zip of tensors, so no tensor column."""
    header = (f"{'model':<12} {'accuracy':>9} {'simulated':>9} {'file kB':>8} {'x float':>7} "
              f"{'tensors kB':>10} {'latency ms':>10} {'agreement':>9} {'SQNR dB':>8}")
    print(header)
    print("-" * len(header))
    float_bytes = rows["float"]["bytes"]
    for name, row in rows.items():
        simulated = row.get("simulation_accuracy")
        agreement = row.get("top1_agreement")
        sqnr = row.get("sqnr_db")
        tensors = row.get("tensor_bytes")
        print(f"{name:<12} {100 * row['accuracy']:>8.2f}% "
              f"{'' if simulated is None else f'{100 * simulated:.2f}%':>9} "
              f"{row['bytes'] / 1e3:>8.1f} {row['bytes'] / float_bytes:>7.3f} "
              f"{'' if tensors is None else f'{tensors / 1e3:.1f}':>10} {row['latency_ms']:>10.3f} "
              f"{'' if agreement is None else f'{100 * agreement:.2f}%':>9} "
              f"{'' if sqnr is None else f'{sqnr:.1f}':>8}")


def print_targets(rows) -> None:
    """Issue 7's targets on one format's rows, reported (the demo does not stop on a
    miss)."""
    base = rows["float"]["accuracy"]

    def weights(name):
        return rows[name].get("tensor_bytes", rows[name]["bytes"])

    checks = [
        ("qat int8 within 0.3 points of float",
         rows["qat int8"]["accuracy"] >= base - 0.003),
        ("qat w4a8 within 1 point of float", rows["qat w4a8"]["accuracy"] >= base - 0.01),
        ("qat auto (mixed precision) at least as accurate as w4a8, its weights no larger",
         rows["qat auto"]["accuracy"] >= rows["qat w4a8"]["accuracy"]
         and weights("qat auto") <= weights("qat w4a8")),
        ("every integer model's top-1 agreement >= 99%",
         all(row["top1_agreement"] >= 0.99 for name, row in rows.items() if name != "float")),
    ]
    if "torch int8" in rows:
        checks.append(("qat int8 at least as accurate as torch int8",
                       rows["qat int8"]["accuracy"] >= rows["torch int8"]["accuracy"]))
    for text, held in checks:
        print(f"  [{'ok' if held else 'MISSED'}] {text}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=DEFAULT_FASHION_MNIST,
                        help="folder with the Fashion-MNIST IDX files (default: %(default)s)")
    parser.add_argument("--out", default="outputs/fashion_mnist",
                        help="where the .ptl / .pte files, plots and results.json go")
    parser.add_argument("--epochs", type=int, default=3, help="float training epochs")
    parser.add_argument("--qat-epochs", type=int, default=1, help="QAT fine-tuning epochs")
    parser.add_argument("--lr", type=float, default=1e-3, help="float Adam learning rate")
    parser.add_argument("--qat-lr", type=float, default=1e-4, help="QAT Adam learning rate")
    parser.add_argument("--train-limit", type=int, default=None,
                        help="use only the first N training images")
    parser.add_argument("--test-limit", type=int, default=None,
                        help="use only the first N test images")
    parser.add_argument("--latency-iterations", type=int, default=200)
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="threads for training and for the runtimes (default: the "
                             "machine's cores, %(default)s)")
    args = parser.parse_args(argv)
    for flag in ("epochs", "qat_epochs", "train_limit", "test_limit", "latency_iterations",
                 "threads"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    formats = mobile_formats()
    if not formats:
        parser.error(f"this installation (PyTorch {torch.__version__}) has neither the lite "
                     f"interpreter nor ExecuTorch: no mobile file could be run")

    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    torch.backends.quantized.engine = "qnnpack"
    os.makedirs(args.out, exist_ok=True)
    train_x, train_y = load_fashion_mnist(args.data, train=True)
    test_x, test_y = load_fashion_mnist(args.data, train=False)
    train_x, train_y = train_x[:args.train_limit], train_y[:args.train_limit]
    test_x, test_y = test_x[:args.test_limit], test_y[:args.test_limit]
    data = (train_x, train_y, test_x, test_y)
    print(f"Fashion-MNIST from {args.data}: {len(train_x)} training, {len(test_x)} test images; "
          f"mobile formats: {', '.join('.' + fmt for fmt in formats)}")

    float_model = DemoNet()
    train(float_model, train_x, train_y, args.epochs, args.lr, seed=0, desc="float")
    float_model.eval()
    rows = {fmt: {"float": {"path": os.path.join(args.out, f"float.{fmt}")}} for fmt in formats}
    for fmt in formats:
        RUNTIMES[fmt][2](copy.deepcopy(float_model), rows[fmt]["float"]["path"], test_x[:1])

    calibration = [x for x, _ in batches(train_x[:1024], train_y[:1024])]
    sensitivity = qat.sensitivity(float_model, calibration, candidate_bits=(8, 4, 2))
    sensitivity.plot(os.path.join(args.out, "sensitivity.png"))
    print(sensitivity)
    w4a8 = qat.presets.w4a8()
    mixed = qat.auto_precision(float_model, calibration, model_size(w4a8, float_model),
                               candidate_bits=(8, 4, 2), base_config=w4a8,
                               sensitivity=sensitivity)
    print("auto_precision, weight bits per layer:", weight_bits(mixed, float_model))

    for name, config in (("qat int8", qat.presets.int8()), ("qat w4a8", w4a8),
                         ("qat auto", mixed)):
        for fmt, row in run_qat(name, float_model, config, data, args, formats).items():
            rows[fmt][name] = row
    if "ptl" in formats:
        torch_row = run_torch_qat(float_model, data, args)
        if torch_row is not None:
            rows["ptl"]["torch int8"] = torch_row

    for fmt, table in rows.items():
        runtime, batch, _, latency_ms = RUNTIMES[fmt]
        for row in table.values():
            row["accuracy"] = accuracy(load(row["path"])[0], test_x, test_y, batch)
            row["bytes"] = os.path.getsize(row["path"])
            if fmt == "ptl":
                row["tensor_bytes"] = tensor_bytes(row["path"])
        latency = latency_ms({name: row["path"] for name, row in table.items()}, test_x[:1],
                             args.latency_iterations, warmup=10)
        for name, row in table.items():
            row["latency_ms"] = latency[name][0]

    plot_accuracy_vs_size(rows, os.path.join(args.out, "accuracy_vs_size.png"))
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(rows, f, indent=2)
    for fmt, table in rows.items():
        print(f"\n.{fmt}: Fashion-MNIST test set ({len(test_x)} images), {args.epochs} float + "
              f"{args.qat_epochs} QAT epochs; accuracy of each file in its runtime "
              f"({RUNTIMES[fmt][0]}), latency at batch 1 (median, {torch.get_num_threads()} "
              f"threads):\n")
        print_table(table)
        print("\ntargets:")
        print_targets(table)
    print(f"\nfiles and plots in {args.out}; {time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()
