"""Mobile-runtime helpers shared by the benchmarks, the CLI and the main job: saving any
(float or integer) model for the lite interpreter, for ExecuTorch or for ONNX Runtime, and
timing files in them."""

import inspect
import statistics
import time
import warnings
from typing import Callable, Dict, List, Tuple

import torch
from torch import nn

from . import _onnx, _pte
from ._torch_support import (has_lite_interpreter, require_lite_interpreter,
                             torch_deprecations_once)
from .export import optimize_for_mobile, require_executorch, require_onnx

__all__ = ["executorch_latency_ms", "lite_latency_ms", "mobile_formats", "onnx_latency_ms",
           "round_robin_ms", "round_robin_samples", "save_for_executorch",
           "save_for_lite_interpreter", "save_for_onnx"]


def mobile_formats() -> List[str]:
    """The mobile file kinds this installation can write and run: ``"ptl"`` where this
    PyTorch has the lite interpreter, ``"pte"`` where ExecuTorch is installed, ``"onnx"``
    where onnx and ONNX Runtime are."""
    return ([name for name, present in (("ptl", has_lite_interpreter()),
                                         ("pte", _pte.available() is None),
                                         ("onnx", _onnx.available() is None)) if present])


def save_for_lite_interpreter(model: nn.Module, path: str) -> None:
    """Scripts, freezes, optimizes for mobile (where this PyTorch has XNNPACK) and saves
    ``model`` for the lite interpreter (what :func:`qat.export` does for qat's own models,
    for any model: a float baseline, PyTorch's ``convert_fx`` output).

    Raises:
        RuntimeError: this PyTorch has no lite interpreter.
    """
    require_lite_interpreter("qat.mobile.save_for_lite_interpreter")
    with torch_deprecations_once():
        with warnings.catch_warnings():
            # torch.fx's GraphModule annotates an attribute in a way torch.jit warns about.
            warnings.filterwarnings("ignore", message="The TorchScript type system")
            scripted = torch.jit.script(model.eval())
        optimize_for_mobile(torch.jit.freeze(scripted))._save_for_lite_interpreter(path)


def save_for_executorch(model: nn.Module, path: str, example_inputs) -> dict:
    """Writes ``model`` in eval mode (any float model: a baseline for :func:`qat.export`'s
    integer ``.pte``; or another flow's quantize / dequantize graph) as an ExecuTorch
    program lowered with XNNPACK's partitioner, as :func:`qat.export` lowers its own; it
    runs the shapes of ``example_inputs`` (a tensor or a tuple of them). Returns the
    delegation report (``layers``, ``layers_delegated``, ``not_delegated``).

    Raises:
        RuntimeError: ExecuTorch is not installed, or cannot lower ``model``.
    """
    require_executorch("qat.mobile.save_for_executorch")
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(
        example_inputs)
    program, report = _pte.lower(model, inputs)
    with open(path, "wb") as f:
        f.write(program)
    return report


def save_for_onnx(model: nn.Module, path: str, example_inputs) -> None:
    """Writes ``model`` in eval mode (a float baseline for :func:`qat.export`'s integer
    ``.onnx``) with PyTorch's TorchScript-based ONNX exporter, opset 17 as qat's, the batch
    dimension of every input and output free.

    Raises:
        RuntimeError: onnx or ONNX Runtime is not installed.
    """
    require_onnx("qat.mobile.save_for_onnx")
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(
        example_inputs)
    names = [f"input_{i}" for i in range(len(inputs))]
    # PyTorch 2.9 made the torch.export-based exporter (which needs onnxscript) the
    # default; the TorchScript-based one needs only onnx.
    legacy = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters \
        else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation note
        torch.onnx.export(model.eval(), inputs, path, opset_version=_onnx.OPSET,
                          input_names=names, output_names=["output"],
                          dynamic_axes={name: {0: "batch"} for name in names + ["output"]},
                          **legacy)


def round_robin_samples(calls: Dict[str, Callable[[], object]], iterations: int,
                        warmup: int = 3) -> Dict[str, List[float]]:
    """Milliseconds of every timed call of each callable, timed round-robin (one call of
    each, repeat) so that a change in the machine's load touches every one alike (the
    latency helpers here and the benchmarks share it)."""
    for _ in range(warmup):
        for call in calls.values():
            call()
    times: Dict[str, List[float]] = {name: [] for name in calls}
    for _ in range(iterations):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def round_robin_ms(calls: Dict[str, Callable[[], object]], iterations: int,
                   warmup: int = 3) -> Dict[str, Tuple[float, float]]:
    """``(median, min)`` milliseconds per call of each callable (:func:`round_robin_samples`)."""
    return {name: (statistics.median(values), min(values))
            for name, values in round_robin_samples(calls, iterations, warmup).items()}


def lite_latency_ms(paths: Dict[str, str], x: torch.Tensor, iterations: int,
                    warmup: int) -> Dict[str, Tuple[float, float]]:
    """``(median, min)`` milliseconds per call of each lite-interpreter file on ``x``, timed
    round-robin (one call of each file, repeat), so that a change in the machine's load
    touches every file alike."""
    require_lite_interpreter("qat.mobile.lite_latency_ms")
    from torch.jit.mobile import _load_for_lite_interpreter

    with torch_deprecations_once():
        modules = {name: _load_for_lite_interpreter(path) for name, path in paths.items()}
    return round_robin_ms({name: (lambda m=m: m(x)) for name, m in modules.items()},
                           iterations, warmup)


def executorch_latency_ms(paths: Dict[str, str], x: torch.Tensor, iterations: int,
                          warmup: int) -> Dict[str, Tuple[float, float]]:
    """``(median, min)`` milliseconds per call of each ``.pte`` file on ``x`` in ExecuTorch's
    runtime, round-robin as :func:`lite_latency_ms`. ExecuTorch's kernels run on a thread
    pool of their own, set here to ``torch.get_num_threads()`` threads so that both
    runtimes are timed with the same number."""
    require_executorch("qat.mobile.executorch_latency_ms")
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

    _unsafe_reset_threadpool(torch.get_num_threads())
    programs = {name: _pte.load(path) for name, path in paths.items()}
    for name, program in programs.items():
        _pte.check_inputs(paths[name], _pte.input_signature(program), [x])
    return round_robin_ms({name: (lambda p=p: p.forward([x])) for name, p in programs.items()},
                           iterations, warmup)


def onnx_latency_ms(paths: Dict[str, str], x: torch.Tensor, iterations: int,
                    warmup: int) -> Dict[str, Tuple[float, float]]:
    """``(median, min)`` milliseconds per call of each ``.onnx`` file on ``x`` in ONNX
    Runtime (CPU provider, ``torch.get_num_threads()`` threads), round-robin as
    :func:`lite_latency_ms`."""
    require_onnx("qat.mobile.onnx_latency_ms")
    sessions = {name: _onnx.load(path) for name, path in paths.items()}
    feeds = {name: {s.get_inputs()[0].name: x.numpy()} for name, s in sessions.items()}
    return round_robin_ms({name: (lambda s=s, f=feeds[name]: s.run(None, f))
                           for name, s in sessions.items()}, iterations, warmup)
