"""PyTorch Mobile helpers shared by the benchmarks, the CLI and the main job: saving any
(float or integer) model for the lite interpreter, and timing files in it."""

import statistics
import time
import warnings
from typing import Dict, Tuple

import torch
from torch import nn

from ._torch_support import require_lite_interpreter, torch_deprecations_once
from .export import optimize_for_mobile

__all__ = ["lite_latency_ms", "save_for_lite_interpreter"]


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


def lite_latency_ms(paths: Dict[str, str], x: torch.Tensor, iterations: int,
                    warmup: int) -> Dict[str, Tuple[float, float]]:
    """``(median, min)`` milliseconds per call of each lite-interpreter file on ``x``, timed
    round-robin (one call of each file, repeat), so that a change in the machine's load
    touches every file alike."""
    require_lite_interpreter("qat.mobile.lite_latency_ms")
    from torch.jit.mobile import _load_for_lite_interpreter

    with torch_deprecations_once():
        modules = {name: _load_for_lite_interpreter(path) for name, path in paths.items()}
    times = {name: [] for name in modules}
    with torch.no_grad():
        for _ in range(warmup):
            for module in modules.values():
                module(x)
        for _ in range(iterations):
            for name, module in modules.items():
                start = time.perf_counter()
                module(x)
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: (statistics.median(values), min(values)) for name, values in times.items()}
