"""``python -m qat``: tools for exported models.

    python -m qat inspect FILE    layers, bits, qparams and size of a file from qat.export
    python -m qat bench FILE      latency of a .ptl (lite interpreter), .pt (TorchScript),
                                  .pte (ExecuTorch) or .onnx (ONNX Runtime) file
    python -m qat compare FLOAT_FILE INT_FILE [--data DIR]
                                  accuracy and agreement of two files on Fashion-MNIST
"""

import argparse
import math
import os
import statistics
import sys
import time
from typing import List, Optional, Tuple

import torch

from .datasets import DEFAULT_FASHION_MNIST, load_fashion_mnist
from .export import _cause, describe, load, read_metadata


class CommandError(Exception):
    """A bad argument or file: printed as one line, exit status 1."""


def _metadata(path: str) -> Optional[dict]:
    """qat.export's metadata of ``path``, or None for a file written otherwise."""
    try:
        return read_metadata(path)
    except ValueError:
        return None


def _load(path: str) -> Tuple[object, str]:
    """(callable model, how it runs) of a ``.ptl``, ``.pt``, ``.pte`` or ``.onnx`` file."""
    try:
        return load(path)
    except (OSError, RuntimeError, ValueError) as error:
        raise CommandError(str(error)) from None


def _describe_input(x: torch.Tensor) -> str:
    return f"{'x'.join(map(str, x.shape))} {str(x.dtype).replace('torch.', '')}"


def _run(model, path: str, x: torch.Tensor) -> torch.Tensor:
    try:
        with torch.no_grad():
            out = model(x)
    except RuntimeError as error:
        raise CommandError(f"{path}: the model fails on a {_describe_input(x)} input: "
                           f"{_cause(error)}") from None
    except ValueError as error:  # an input a .pte program does not take, named
        raise CommandError(str(error)) from None
    if not isinstance(out, torch.Tensor):
        raise CommandError(f"{path}: the model returns {type(out).__name__}, not a tensor")
    return out.dequantize() if out.is_quantized else out


def _parse_shape(text: str) -> List[int]:
    try:
        shape = [int(part) for part in text.split(",")]
    except ValueError:
        shape = []
    if not shape or any(size < 1 for size in shape):
        raise CommandError(f"--input-shape: expected positive integers separated by commas "
                           f"such as 1,28,28 (one sample, no batch size), got {text!r}")
    return shape


def _check_positive(args, *names: str) -> None:
    for name in names:
        if getattr(args, name) < 1:
            raise CommandError(f"--{name}: must be at least 1, got {getattr(args, name)}")


def _bench_input(args, inputs: List[dict]) -> torch.Tensor:
    """A batch of ``args.batch`` samples of the shape given, or of ``inputs`` (the
    ``example_inputs`` qat.export stored)."""
    if args.input_shape is not None:
        return torch.rand(args.batch, *_parse_shape(args.input_shape))
    if not inputs:
        raise CommandError(f"{args.file}: the file records no input shape (only qat.export "
                           f"writes one); pass --input-shape, e.g. 1,28,28")
    if len(inputs) != 1:
        raise CommandError(f"{args.file}: the model takes {len(inputs)} inputs; bench feeds "
                           f"one tensor")
    shape = [args.batch] + inputs[0]["shape"][1:]
    dtype = getattr(torch, inputs[0]["dtype"].replace("torch.", ""))
    if dtype.is_floating_point:
        return torch.rand(shape, dtype=dtype)
    # Integer inputs are indices (token ids): 0 is valid for any embedding.
    return torch.zeros(shape, dtype=dtype)


def _bench(args) -> None:
    if args.warmup < 0:
        raise CommandError(f"--warmup: must be at least 0, got {args.warmup}")
    _check_positive(args, "iterations", "threads")
    # Before loading: ONNX Runtime sizes a session's thread pool when it is made.
    torch.set_num_threads(args.threads)
    model, kind = _load(args.file)
    inputs = (_metadata(args.file) or {}).get("example_inputs", [])
    recorded = [i["shape"] for i in inputs]
    if args.batch is None:
        # An ExecuTorch program runs only the batch it was exported with.
        args.batch = recorded[0][0] if kind == "ExecuTorch" and recorded else 1
    _check_positive(args, "batch")
    x = _bench_input(args, inputs)
    if kind == "ExecuTorch":
        if recorded and list(x.shape) != recorded[0]:
            raise CommandError(
                f"{args.file}: an ExecuTorch program runs the input shape it was exported "
                f"with, {'x'.join(map(str, recorded[0]))}; pass --batch {recorded[0][0]} "
                f"(and no other --input-shape)")
        # ExecuTorch's kernels run on a thread pool of its own.
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

        _unsafe_reset_threadpool(args.threads)
    for _ in range(args.warmup):
        _run(model, args.file, x)
    times = []
    for _ in range(args.iterations):
        start = time.perf_counter()
        _run(model, args.file, x)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    p90 = sorted(times)[math.ceil(0.9 * len(times)) - 1]  # nearest rank
    engine = {"ExecuTorch": "XNNPACK", "ONNX Runtime": "CPUExecutionProvider"}.get(
        kind, torch.backends.quantized.engine)
    print(f"{args.file}: {kind}, engine {engine}, threads {args.threads}, input "
          f"{_describe_input(x)}")
    print(f"{args.iterations} runs after {args.warmup} warm-up: median {median * 1e3:.3f} ms, "
          f"p90 {p90 * 1e3:.3f} ms, throughput {args.batch / median:.1f} samples/s")


def _outputs(path: str, images: torch.Tensor, batch: int) -> torch.Tensor:
    model, _ = _load(path)
    out = torch.cat([_run(model, path, images[i:i + batch]).float()
                     for i in range(0, len(images), batch)])
    if out.dim() != 2:
        raise CommandError(f"{path}: outputs of shape {list(out.shape)}; compare expects "
                           f"class scores [N, classes]")
    return out


def _compare(args) -> None:
    _check_positive(args, "batch")
    if args.limit is not None and args.limit < 1:
        raise CommandError(f"--limit: must be at least 1, got {args.limit}")
    if not os.path.isdir(args.data):
        raise CommandError(f"--data: {args.data} is not a folder")
    try:
        images, labels = load_fashion_mnist(args.data, train=False)
    except (OSError, ValueError) as error:
        raise CommandError(f"--data: {error}") from None
    images, labels = images[:args.limit], labels[:args.limit]
    outputs = {role: _outputs(path, images, args.batch)
               for role, path in (("float", args.float_file), ("int", args.int_file))}
    if outputs["float"].shape != outputs["int"].shape:
        raise CommandError(f"{args.int_file}: outputs of shape {list(outputs['int'].shape)}, "
                           f"but {args.float_file} gives {list(outputs['float'].shape)}")
    n = len(labels)
    for role, path in (("float", args.float_file), ("int", args.int_file)):
        correct = int((outputs[role].argmax(1) == labels).sum())
        print(f"{role} {path}: accuracy {correct / n:.4f} ({correct}/{n})")
    agree = int((outputs["float"].argmax(1) == outputs["int"].argmax(1)).sum())
    difference = (outputs["float"] - outputs["int"]).abs()
    print(f"top-1 agreement {agree / n:.4f} ({agree}/{n})")
    print(f"output difference: max {difference.max().item():.4g}, "
          f"mean {difference.mean().item():.4g}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m qat", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser(
        "inspect", help="layers, bits, qparams and size of a file written by qat.export")
    inspect.add_argument("file", metavar="FILE")

    bench = commands.add_parser(
        "bench", help="latency of a .ptl / .pt / .pte / .onnx file",
        description="Times a .ptl file in the lite interpreter, a .pt file with "
                    "torch.jit.load, a .pte file in ExecuTorch's runtime or an .onnx file in "
                    "ONNX Runtime, on random inputs, "
                    "with the quantized engine the file was converted for (qnnpack, PyTorch "
                    "Mobile's, when the file does not say).")
    bench.add_argument("file", metavar="FILE")
    bench.add_argument("--batch", type=int, metavar="B",
                       help="samples per call (default 1; for a .pte, the batch it was "
                            "exported with, the only one it runs)")
    bench.add_argument("--input-shape", metavar="C,H,W",
                       help="shape of one sample; default: the example input qat.export "
                            "recorded (required for other files)")
    bench.add_argument("--iterations", type=int, default=100, metavar="N",
                       help="timed calls (default 100)")
    bench.add_argument("--warmup", type=int, default=10, metavar="N",
                       help="untimed calls first (default 10)")
    bench.add_argument("--threads", type=int, default=torch.get_num_threads(), metavar="T",
                       help="intra-op threads (default: torch's, here %(default)s)")

    compare = commands.add_parser(
        "compare", help="accuracy and agreement of a float and an integer file on "
                        "Fashion-MNIST",
        description="Runs both files on the Fashion-MNIST test split (images [N, 1, 28, 28], "
                    "floats in [0, 1], as qat.datasets.load_fashion_mnist gives them) and "
                    "prints each accuracy, their top-1 agreement and the largest and mean "
                    "difference of their outputs. Only models that take such images and "
                    "return class scores [N, 10] can be compared; others are out of scope.")
    compare.add_argument("float_file", metavar="FLOAT_FILE", help="the float model")
    compare.add_argument("int_file", metavar="INT_FILE", help="its integer model")
    compare.add_argument("--data", metavar="DIR", default=DEFAULT_FASHION_MNIST,
                         help="folder of the Fashion-MNIST IDX files (default %(default)s)")
    compare.add_argument("--limit", type=int, metavar="N",
                         help="first N test images only (default: all)")
    compare.add_argument("--batch", type=int, default=256, metavar="B",
                         help="images per call (default 256)")
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    # bench and compare select threads and the quantized engine; a caller of main() in the
    # same process gets its own back.
    engine, threads = torch.backends.quantized.engine, torch.get_num_threads()
    try:
        if args.command == "inspect":
            try:
                print(describe(args.file))
            except (OSError, ValueError) as error:
                raise CommandError(str(error)) from None
        elif args.command == "bench":
            _bench(args)
        else:
            _compare(args)
    except CommandError as error:
        print(f"python -m qat {args.command}: {error}", file=sys.stderr)
        return 1
    finally:
        torch.backends.quantized.engine = engine
        torch.set_num_threads(threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
