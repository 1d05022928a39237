"""What the installed PyTorch has, for the parts of qat that depend on it, and PyTorch's
own deprecation notes passed on once.

qat runs on PyTorch 1.13 through the newest release. Since then PyTorch has deprecated
TorchScript and the lite interpreter (2.10), left XNNPACK out of its official builds (2.13:
``optimize_for_mobile`` asserts without it) and deprecated quantized tensors (2.13). qat
checks for each where it is used, with a message that names what to do instead, rather
than on the version number."""

import contextlib
import sys
import threading
import warnings
from typing import Callable, Iterator, Set, Tuple

import torch

__all__ = ["compiling", "eager_under_compile", "has_lite_interpreter", "has_torchscript",
           "require_lite_interpreter", "require_torchscript", "torch_deprecations_once",
           "uncompiled", "warn_once", "xnnpack_available"]


def xnnpack_available() -> bool:
    """Whether this PyTorch was built with XNNPACK, which ``optimize_for_mobile`` needs."""
    check = getattr(torch._C, "_is_xnnpack_enabled", None)
    return bool(check()) if check is not None else False


def has_torchscript() -> bool:
    """Whether ``torch.jit.script`` / ``freeze`` / ``save`` exist (``.pt`` and ``.ptl``)."""
    return all(callable(getattr(torch.jit, name, None))
               for name in ("script", "trace", "freeze", "save", "load"))


def has_lite_interpreter() -> bool:
    """Whether this PyTorch can write and run lite-interpreter (``.ptl``) files."""
    if not has_torchscript():
        return False
    try:
        from torch.jit.mobile import _load_for_lite_interpreter  # noqa: F401
    except ImportError:
        return False
    return hasattr(torch.jit.ScriptModule, "_save_for_lite_interpreter")


def compiling() -> bool:
    """Whether torch.compile (PyTorch 2) is tracing the code that asks."""
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(is_compiling()) if is_compiling is not None else False


def eager_under_compile(fn: Callable) -> Callable:
    """``fn``, run by Python rather than traced when torch.compile (PyTorch 2) meets it: the
    model's other ops are compiled around it. qat's operators are C++ kernels with their
    own autograd and no fake-tensor implementation, which torch.compile's tracing needs;
    each call of ``fn`` is a graph break. ``fn`` itself on a PyTorch without torch.compile.
    Not for functions TorchScript compiles: call them from a ``torch.jit.is_scripting()``
    branch."""
    disable = getattr(getattr(torch, "compiler", None), "disable", None)
    return disable(fn) if disable is not None else fn


def uncompiled(model: torch.nn.Module) -> torch.nn.Module:
    """The module ``torch.compile(module)`` wraps (its ``_orig_mod``, which shares the
    parameters and state), or ``model`` itself when it is not such a wrapper."""
    # An OptimizedModule exists only once torch.compile has imported its module.
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    optimized = getattr(eval_frame, "OptimizedModule", None)
    return model._orig_mod if optimized is not None and isinstance(model, optimized) else model


def require_torchscript(caller: str) -> None:
    """Raises a RuntimeError naming ``caller`` when this PyTorch has no TorchScript."""
    if not has_torchscript():
        raise RuntimeError(
            f"{caller}: this PyTorch ({torch.__version__}) has no TorchScript, which .pt and "
            f".ptl files need; use a PyTorch that has it (1.13 to 2.15 do)")


def require_lite_interpreter(caller: str) -> None:
    """Raises a RuntimeError naming ``caller`` when this PyTorch has no lite interpreter."""
    require_torchscript(caller)
    if not has_lite_interpreter():
        raise RuntimeError(
            f"{caller}: this PyTorch ({torch.__version__}) has no lite interpreter, so no "
            f".ptl file can be written or run; export with mobile=False for a full "
            f"TorchScript .pt file")


# Messages already passed on in this process, by (category, text).
_SHOWN: Set[Tuple[type, str]] = set()
_LOCK = threading.Lock()
_DEPTH = threading.local()


def _first_time(category: type, message: str) -> bool:
    with _LOCK:
        if (category, message) in _SHOWN:
            return False
        _SHOWN.add((category, message))
        return True


def warn_once(message: str, category: type = UserWarning, stacklevel: int = 2) -> None:
    """``warnings.warn``, the first time this message comes in the process only."""
    if _first_time(category, message):
        warnings.warn(message, category, stacklevel=stacklevel + 1)


def _is_deprecation(caught: warnings.WarningMessage) -> bool:
    # PyTorch says "deprecated" in its TorchScript, lite-interpreter, torch.ao and
    # quantized-tensor notes, with FutureWarning, DeprecationWarning or UserWarning.
    return (issubclass(caught.category, (DeprecationWarning, FutureWarning))
            or "deprecated" in str(caught.message).lower())


@contextlib.contextmanager
def torch_deprecations_once() -> Iterator[None]:
    """Runs the body with the warnings it raises held back, then passes them on, PyTorch's
    deprecation notes only the first time each comes in the process.

    qat calls deprecated PyTorch APIs on the user's behalf (TorchScript, the lite
    interpreter) on every export; the user is told once, not on every call. Other warnings
    are passed on as they came. Nested uses collect in the outermost one only."""
    depth = getattr(_DEPTH, "value", 0)
    if depth:
        yield
        return
    _DEPTH.value = 1
    held = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                yield
            finally:
                held = list(caught)
    finally:
        _DEPTH.value = 0
        # Also when the body raised: what it said before may explain the error.
        for item in held:
            if _is_deprecation(item) and not _first_time(item.category, str(item.message)):
                continue
            warnings.warn_explicit(item.message, item.category, item.filename, item.lineno,
                                   source=item.source)
