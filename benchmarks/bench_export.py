"""Compares, for torchvision's resnet18 and mobilenet_v2, four PyTorch Mobile files of the
same model, written and measured in one run: the float model, our int8 model
(``qat.prepare``, ``qat.calibrate`` on a few random batches, ``qat.export``), ours with
4-bit weights (``qat.presets.w4a8()``, stored two to a byte) and PyTorch's
own int8 model from the same kind of flow (``prepare_qat_fx`` with the qnnpack default QAT
qconfig mapping, calibrated in eval with observers on, ``convert_fx``). Each file is
scripted, frozen, passed through ``optimize_for_mobile`` and saved for the lite
interpreter (``.ptl``).

    PYTHONPATH=python /usr/bin/python3 benchmarks/bench_export.py \\
        [--models resnet18 mobilenet_v2] [--size 224] [--num-classes 1000]
        [--iterations 50] [--warmup 5] [--threads 2] [--calibration-batches 4]
        [--out-dir DIR]

It prints, per model, the size of each file (MB, 10^6 bytes, and the ratio to the float
file) and its latency at batch 1 in the lite interpreter (``_load_for_lite_interpreter``
on the file written, qnnpack engine): the median of ``--iterations`` calls, timed
round-robin (float, ours, PyTorch's, repeat) after warm-up so that a change in the
machine's load touches every file alike. OpenMP threads wait passively (see below) unless
OMP_WAIT_POLICY is set. Files go to a temporary folder, removed at the end, unless
``--out-dir`` is given. When PyTorch's flow fails on a model, the reason is printed and its
column is left empty.

The int8 files differ in weight granularity: ours is per channel (qat's default config),
PyTorch 1.13's qnnpack default is per tensor; per-channel qparams add their scales and zero
points to the file. The line under each table names the ops ours runs in float.

Targets: our int8 file <= 0.27x the float file, our w4a8 file <= 0.16x. The script
reports; it does not assert.
Latency on x86 is not latency on a phone: float runs on XNNPACK's AVX kernels, int8 on
qnnpack's SSE2 ones, so the int8/float ratio is the figure to read with care.

Weights are random (no pretrained weights here) and batch norm keeps its initial
statistics, so activations shrink layer by layer and the int8 models output zeros; sizes do
not depend on the values, and the kernels' times should hardly.
"""

import argparse
import copy
import os
import tempfile
import time
import traceback

# Set before torch loads libgomp, which reads it once. ATen's OpenMP threads otherwise spin
# for a while after each parallel op and take the cores from the pthreadpool that qnnpack
# and XNNPACK run on; on 2 cores that made calls 10-60x slower (mobile builds of PyTorch
# have no OpenMP). Set OMP_WAIT_POLICY=ACTIVE to see it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torchvision  # noqa: E402
# The same names and signatures in torch 1.13 and 2.x.
from torch.ao.quantization import (disable_fake_quant, enable_fake_quant,  # noqa: E402
                                   get_default_qat_qconfig_mapping)
from torch.ao.quantization.quantize_fx import convert_fx, prepare_qat_fx  # noqa: E402

import qat  # noqa: E402
from qat.mobile import lite_latency_ms, save_for_lite_interpreter  # noqa: E402

MODELS = ("resnet18", "mobilenet_v2")
VARIANTS = ("float", "ours int8", "ours w4a8", "torch int8")
# Issue 5's size targets, per variant: the .ptl against the float .ptl.
SIZE_TARGETS = {"ours int8": 0.27, "ours w4a8": 0.16}


def write_ours(model: torch.nn.Module, batches, example: torch.Tensor, path: str,
               config=None) -> str:
    """Writes our file (int8 unless ``config`` says otherwise); returns a line on how many
    ops run on integer kernels."""
    qmodel = qat.prepare(model, config)
    qat.calibrate(qmodel, batches, progress=False)
    # The report is only printed; qat.export converts on its own.
    _, report = qat.convert(qmodel, return_report=True)
    qat.export(qmodel, path, example, mobile=True)
    return str(report)


def write_torch(model: torch.nn.Module, batches, example: torch.Tensor, path: str) -> None:
    prepared = prepare_qat_fx(model.train(), get_default_qat_qconfig_mapping("qnnpack"),
                              (example,))
    # Observers on and fake quantization off, as qat.calibrate does, so that both int8
    # models are calibrated on the float activations.
    prepared.eval().apply(disable_fake_quant)
    with torch.no_grad():
        for batch in batches:
            prepared(batch)
    prepared.apply(enable_fake_quant)
    save_for_lite_interpreter(convert_fx(prepared), path)


def measure(name: str, args, folder: str) -> dict:
    """Writes the three files of one model and times them; returns the figures."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None, num_classes=args.num_classes).eval()
    example = torch.randn(1, 3, args.size, args.size)
    batches = [torch.randn(args.calibration_batch, 3, args.size, args.size)
               for _ in range(args.calibration_batches)]
    paths = {variant: os.path.join(folder, f"{name}_{variant.replace(' ', '_')}.ptl")
             for variant in VARIANTS}
    seconds, notes = {}, []

    start = time.perf_counter()
    save_for_lite_interpreter(copy.deepcopy(model), paths["float"])
    seconds["float"] = time.perf_counter() - start

    start = time.perf_counter()
    notes.append("ours: " + write_ours(copy.deepcopy(model), batches, example,
                                       paths["ours int8"]))
    seconds["ours int8"] = time.perf_counter() - start

    start = time.perf_counter()
    write_ours(copy.deepcopy(model), batches, example, paths["ours w4a8"], qat.presets.w4a8())
    seconds["ours w4a8"] = time.perf_counter() - start

    start = time.perf_counter()
    try:
        write_torch(copy.deepcopy(model), batches, example, paths["torch int8"])
        seconds["torch int8"] = time.perf_counter() - start
    except Exception as error:  # noqa: BLE001 - reported, and the other two still run
        notes.append(f"torch int8 failed: {type(error).__name__}: {error}".strip())
        notes.append(traceback.format_exc().rstrip())
        del paths["torch int8"]

    sizes = {variant: os.path.getsize(path) / 1e6 for variant, path in paths.items()}
    timed = lite_latency_ms(paths, example, args.iterations, args.warmup)
    return {"sizes": sizes, "ms": {v: median for v, (median, _) in timed.items()},
            "min_ms": {v: fastest for v, (_, fastest) in timed.items()}, "seconds": seconds,
            "notes": notes}


def print_model(name: str, result: dict) -> None:
    sizes, ms, seconds = result["sizes"], result["ms"], result["seconds"]
    print(f"\n{name}")
    print(f"{'file':<12}{'MB':>9}{'/ float':>9}{'median ms':>11}{'/ float':>9}{'min ms':>9}"
          f"{'written in s':>14}")
    for variant in VARIANTS:
        if variant not in sizes:
            print(f"{variant:<12}" + "".join(f"{'-':>{w}}" for w in (9, 9, 11, 9, 9, 14)))
            continue
        print(f"{variant:<12}{sizes[variant]:>9.2f}{sizes[variant] / sizes['float']:>9.3f}"
              f"{ms[variant]:>11.2f}{ms[variant] / ms['float']:>9.2f}"
              f"{result['min_ms'][variant]:>9.2f}{seconds[variant]:>14.1f}")
    line = f"median latency: ours / float {ms['ours int8'] / ms['float']:.2f}x"
    if "torch int8" in ms:
        line += (f", ours / torch int8 {ms['ours int8'] / ms['torch int8']:.2f}x; size: ours / "
                 f"torch int8 {sizes['ours int8'] / sizes['torch int8']:.3f}x")
    print(line)
    for note in result["notes"]:
        print(note)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--iterations", type=int, default=50, help="timed calls per file")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls per file")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calibration-batches", type=int, default=4)
    parser.add_argument("--calibration-batch", type=int, default=2,
                        help="images per calibration batch")
    parser.add_argument("--out-dir", help="keep the files here (default: a temporary folder)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    # The int8 weights are packed for, and run on, PyTorch Mobile's engine.
    torch.backends.quantized.engine = "qnnpack"
    print(f"qat {qat.__version__}, torch {torch.__version__}, torchvision "
          f"{torchvision.__version__}, input [1, 3, {args.size}, {args.size}], "
          f"{args.num_classes} classes, {args.threads} threads, qnnpack, lite interpreter, "
          f"median of {args.iterations} calls after {args.warmup} warm-up, calibration on "
          f"{args.calibration_batches}x{args.calibration_batch} random images, "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, load average "
          f"{os.getloadavg()[0]:.2f}")
    # Their weight granularity differs from ours by default, which shows in the sizes.
    ours_weights = "per channel" if qat.Config().weight.per_channel else "per tensor"
    theirs = get_default_qat_qconfig_mapping("qnnpack").global_qconfig.weight().qscheme
    print(f"weights: ours {ours_weights} (qat's default config), torch int8 {theirs} "
          f"(torch's qnnpack default)")

    results = {}
    with tempfile.TemporaryDirectory() as temporary:
        folder = temporary
        if args.out_dir:
            os.makedirs(args.out_dir, exist_ok=True)
            folder = args.out_dir
        for name in args.models:
            results[name] = measure(name, args, folder)
            print_model(name, results[name])
    if args.out_dir:
        print(f"\nfiles in {args.out_dir}")
    print(f"\nload average at the end {os.getloadavg()[0]:.2f} (other work on the machine "
          f"slows the timings)")

    print()
    for variant, target in SIZE_TARGETS.items():
        verdicts = {name: r["sizes"][variant] / r["sizes"]["float"]
                    for name, r in results.items()}
        print(f"target ({variant} <= {target}x float): " + "; ".join(
            f"{name}: {ratio:.3f}x" for name, ratio in verdicts.items())
            + (" -> holds" if all(r <= target for r in verdicts.values())
               else " -> does not hold"))


if __name__ == "__main__":
    main()
