"""Compares, for torchvision's resnet18 and mobilenet_v2, ExecuTorch programs (.pte, XNNPACK)
of the same model, written and measured in one run: the float model (``torch.export`` and
XNNPACK's partitioner), our int8 and w4a8 models (``qat.prepare``, ``qat.calibrate`` on a
few random batches, ``qat.export`` to ``.pte``), and PyTorch's own int8 model from its PT2E
flow (``prepare_qat_pt2e`` with ExecuTorch's ``XNNPACKQuantizer``, calibrated the same way,
``convert_pt2e``, then the same lowering as the float model).

    PYTHONPATH=python python benchmarks/bench_executorch.py \\
        [--models resnet18 mobilenet_v2] [--size 224] [--iterations 30] [--warmup 5]
        [--threads 2] [--calibration-batches 4] [--out-dir DIR]

It prints, per model, each file's size (MB, 10^6 bytes, and the ratio to the float file),
how many of its convs / linears XNNPACK runs, and its latency at batch 1 in ExecuTorch's
runtime with ``--threads`` threads: the median of ``--iterations`` calls, timed
round-robin (every file once, repeat) after warm-up so that a change in the machine's load
touches every file alike.

Targets (issue 17): our int8 file <= 0.27x the float file; our int8 file faster than the
float file. The script reports; it does not assert. Weights are random (no pretrained
weights here; batch-norm statistics are those of the calibration batches), so accuracy is
not measured here: the parity tests do that.
"""

import argparse
import os
import tempfile
import traceback
import warnings

import torch
import torchvision

import qat
from qat.mobile import executorch_latency_ms, save_for_executorch

MODELS = ("resnet18", "mobilenet_v2")
VARIANTS = ("float", "ours int8", "ours w4a8", "pt2e int8")


def write_ours(model, batches, example, path, config) -> dict:
    qmodel = qat.prepare(model, config)
    qat.calibrate(qmodel, batches, progress=False)
    qat.export(qmodel, path, example)
    return qat.read_metadata(path)["executorch"]


def write_pt2e(model, batches, example, path) -> dict:
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer, get_symmetric_quantization_config)
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e

    quantizer = XNNPACKQuantizer().set_global(
        get_symmetric_quantization_config(is_per_channel=True, is_qat=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = torch.export.export(model.train(), (example,), strict=False).module()
        prepared = prepare_qat_pt2e(graph, quantizer)
        move_exported_model_to_eval(prepared)
        with torch.no_grad():
            for batch in batches:
                prepared(batch)
        converted = convert_pt2e(prepared)
    return save_for_executorch(converted, path, example)


def run_model(name: str, args, folder: str) -> None:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)()
    example = torch.rand(1, 3, args.size, args.size)
    batches = [torch.rand(4, 3, args.size, args.size) for _ in range(args.calibration_batches)]
    # Batch-norm statistics of these inputs: with the initial ones, random weights make
    # activations shrink layer by layer until their ranges collapse to the qparams' floor,
    # and XNNPACK refuses the requantization scales that gives (no trained model does that).
    with torch.no_grad():
        for batch in batches:
            model(batch)
    model.eval()
    paths, delegation, failed = {}, {}, {}
    writers = {
        "float": lambda p: save_for_executorch(model, p, example),
        "ours int8": lambda p: write_ours(model, batches, example, p, qat.presets.int8()),
        "ours w4a8": lambda p: write_ours(model, batches, example, p, qat.presets.w4a8()),
        "pt2e int8": lambda p: write_pt2e(model, batches, example, p),
    }
    for variant in VARIANTS:
        path = os.path.join(folder, f"{name}-{variant.replace(' ', '-')}.pte")
        try:
            delegation[variant] = writers[variant](path)
            paths[variant] = path
        except Exception as error:  # noqa: BLE001 - reported, the others still measured
            failed[variant] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
            traceback.print_exc()
    latency = {variant: median for variant, (median, _) in executorch_latency_ms(
        paths, example, args.iterations, args.warmup).items()}
    float_size = os.path.getsize(paths["float"])
    print(f"\n{name} ({args.size}x{args.size}, batch 1, {args.threads} threads, "
          f"median of {args.iterations})")
    print(f"{'file':<10} {'MB':>8} {'size/float':>10} {'XNNPACK layers':>15} {'ms':>9} "
          f"{'ms/float':>9}")
    for variant in VARIANTS:
        if variant in failed:
            print(f"{variant:<10} failed: {failed[variant]}")
            continue
        size = os.path.getsize(paths[variant])
        d = delegation[variant]
        print(f"{variant:<10} {size / 1e6:8.2f} {size / float_size:10.3f} "
              f"{d['layers_delegated']:>7}/{d['layers']:<7} {latency[variant]:9.2f} "
              f"{latency[variant] / latency['float']:9.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calibration-batches", type=int, default=4)
    parser.add_argument("--out-dir")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # ExecuTorch's pool too (executorch_latency_ms)
    with tempfile.TemporaryDirectory() as temporary:
        folder = args.out_dir or temporary
        for name in args.models:
            run_model(name, args, folder)


if __name__ == "__main__":
    main()
