"""qat's ONNX models (QAT, then ``qat.export`` to a QDQ ``.onnx``) side by side with ONNX
Runtime's own post-training quantizer (``onnxruntime.quantization.quantize_static``, QDQ
format, per-channel weights, MinMax calibration on the same calibration batches) applied to
the float model, all run in ONNX Runtime in one run.

    PYTHONPATH=python python benchmarks/bench_onnx.py [--threads 2] [--iterations 200]
        [--models fashion_cnn resnet18 mobilenet_v2] [--out-dir DIR]

- ``fashion_cnn``: the Fashion-MNIST CNN of the parity tests, trained with their recipe
  (``tests/python/conftest.py``: 300 float SGD steps at batch 128, then 150 QAT steps at
  int8 and at w4a8 from the same float weights); ORT's quantizer gets the float model and
  the four calibration batches qat's QAT starts from. Accuracy on the 10,000 test images,
  file size, and latency at batch 1 (median, round-robin: every file once, repeat).
- ``resnet18``, ``mobilenet_v2`` (224x224, random weights with the calibration batches'
  batch-norm statistics: nothing can be downloaded here, so no accuracy): size against the
  float ``.onnx``, convs / linears on ONNX Runtime's integer kernels, latency at batch 1.

The float ``.onnx`` is written by PyTorch's TorchScript-based ONNX exporter (opset 17, the
batch dimension free: ``qat.mobile.save_for_onnx``). Targets (issue 18): qat's int8 at least as accurate as ORT's int8
PTQ and clearly more at w4a8 (ORT's 4-bit weights, ``QuantType.QInt4``); int8 ``.onnx`` <=
0.27x the float ``.onnx`` for resnet18 and mobilenet_v2. The script reports; it does not
assert.
"""

import argparse
import os
import sys
import tempfile
import traceback
import warnings

import numpy as np
import torch
import torchvision

import qat
from qat.mobile import round_robin_ms, save_for_onnx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "python"))
# The parity tests' model and training loop, not copies.
from helpers import fashion_float_model, fashion_qat_fine_tune  # noqa: E402

MODELS = ("fashion_cnn", "resnet18", "mobilenet_v2")


def _session(path: str, threads: int):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def write_ort_ptq(float_path: str, batches, path: str, weight_bits: int) -> None:
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod,
                                          QuantFormat, QuantType, quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([{"input_0": b.numpy()} for b in batches])

        def get_next(self):
            return next(self.feeds, None)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_static(float_path, path, Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8 if weight_bits == 8 else QuantType.QInt4,
                        per_channel=True, calibrate_method=CalibrationMethod.MinMax)


def integer_layers(path: str, folder: str) -> str:
    """How many convs / linears ONNX Runtime's optimizer puts on integer kernels."""
    import onnx
    import onnxruntime

    optimized = os.path.join(folder, "optimized.onnx")
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = optimized
    onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    kinds = [n.op_type for n in onnx.load(optimized).graph.node]
    integer = sum(k in ("QLinearConv", "QGemm", "QLinearMatMul", "MatMulInteger",
                        "ConvInteger") for k in kinds)
    floats = sum(k in ("Conv", "Gemm", "MatMul", "FusedConv", "FusedGemm") for k in kinds)
    return f"{integer}/{integer + floats}"


def report(name: str, paths: dict, failed: dict, example, args, folder: str,
           accuracy=None) -> None:
    sessions = {v: _session(p, args.threads) for v, p in paths.items()}
    feed = {v: {s.get_inputs()[0].name: example.numpy()} for v, s in sessions.items()}
    latency = {v: median for v, (median, _) in round_robin_ms(
        {v: (lambda s=s, f=feed[v]: s.run(None, f)) for v, s in sessions.items()},
        args.iterations, warmup=10).items()}
    float_size = os.path.getsize(paths["float"])
    print(f"\n{name} (batch 1, {args.threads} threads, median of {args.iterations}, "
          f"onnxruntime CPU)")
    head = f"{'file':<14} {'kB':>9} {'size/float':>10} {'integer layers':>15} {'ms':>8} " \
           f"{'ms/float':>9}"
    print(head + (f" {'accuracy':>9}" if accuracy else ""))
    for variant in list(paths) + list(failed):
        if variant in failed:
            print(f"{variant:<14} failed: {failed[variant]}")
            continue
        size = os.path.getsize(paths[variant])
        line = (f"{variant:<14} {size / 1e3:9.1f} {size / float_size:10.3f} "
                f"{integer_layers(paths[variant], folder):>15} {latency[variant]:8.3f} "
                f"{latency[variant] / latency['float']:9.2f}")
        if accuracy:
            line += f" {accuracy(sessions[variant]):9.4f}"
        print(line)


def write_all(model, qat_models, batches, example, folder, name):
    """Every variant's file: the float model, qat's (``qat_models``: variant -> QAT model)
    and ORT's PTQ at 8 and 4 bits; and the failures by variant."""
    paths, failed = {}, {}
    writers = {"float": lambda p: save_for_onnx(model, p, example)}
    writers.update({v: (lambda p, q=q: qat.export(q, p, example))
                    for v, q in qat_models.items()})
    writers["ort ptq int8"] = lambda p: write_ort_ptq(paths["float"], batches, p, 8)
    writers["ort ptq w4a8"] = lambda p: write_ort_ptq(paths["float"], batches, p, 4)
    for variant, write in writers.items():
        path = os.path.join(folder, f"{name}-{variant.replace(' ', '-')}.onnx")
        try:
            write(path)
            paths[variant] = path
        except Exception as error:  # noqa: BLE001 - reported, the others still measured
            failed[variant] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
            traceback.print_exc()
    return paths, failed


def run_fashion(args, folder: str) -> None:
    model, train_x, train_y, test_x, test_y = fashion_float_model(
        torch.Generator().manual_seed(0))
    model.eval()
    batches = [train_x[i:i + 128] for i in range(0, 512, 128)]
    qat_models = {
        f"qat {preset}": fashion_qat_fine_tune(model, train_x, train_y,
                                               torch.Generator().manual_seed(1),
                                               getattr(qat.presets, preset)(), batches)
        for preset in ("int8", "w4a8")}
    paths, failed = write_all(model, qat_models, batches, test_x[:1], folder, "fashion_cnn")

    def accuracy(session) -> float:
        name = session.get_inputs()[0].name
        predictions = np.concatenate([session.run(None, {name: test_x[i:i + 500].numpy()})[0]
                                      for i in range(0, len(test_x), 500)]).argmax(1)
        return float((predictions == test_y.numpy()).mean())

    report("fashion_cnn (1x28x28)", paths, failed, test_x[:1], args, folder, accuracy)


def run_torchvision(name: str, args, folder: str) -> None:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)()
    example = torch.rand(1, 3, 224, 224)
    batches = [torch.rand(4, 3, 224, 224) for _ in range(4)]
    # Batch-norm statistics of these inputs: with the initial ones, random weights make
    # activations shrink layer by layer until their ranges collapse to the qparams' floor.
    with torch.no_grad():
        for batch in batches:
            model(batch)
    model.eval()
    qat_models = {}
    for preset in ("int8", "w4a8"):
        qmodel = qat.prepare(model, getattr(qat.presets, preset)())
        qat.calibrate(qmodel, batches, progress=False)
        qat_models[f"qat {preset}"] = qmodel.eval()
    paths, failed = write_all(model, qat_models, batches, example, folder, name)
    report(f"{name} (3x224x224)", paths, failed, example, args, folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-dir")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as temporary:
        folder = args.out_dir or temporary
        for name in args.models:
            if name == "fashion_cnn":
                run_fashion(args, folder)
            else:
                run_torchvision(name, args, folder)


if __name__ == "__main__":
    main()
