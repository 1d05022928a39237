"""The registry of straight-through estimators that define fake quantization's backward.

Built in: ``ste``, ``lsq``, ``lsq_plus``, ``pact``, ``ewgs`` (see :func:`describe`). New
ones can be added from C++ (``QAT_REGISTER_ESTIMATOR``) or from Python with
:func:`register`; either kind is then usable by name from ``qat.ops.fake_quantize``,
``torch.ops.qat.fake_quantize`` and TorchScript in this process.
"""

import inspect
from typing import Callable, Dict, List, Optional, Union

import torch

from . import _C

__all__ = ["available", "describe", "register", "unregister"]

EstimatorFn = Callable[..., torch.Tensor]


def available() -> List[str]:
    """Names of the registered estimators, sorted."""
    return list(_C.estimator_names())


def describe(name: str) -> Dict[str, object]:
    """``{"name", "description", "learns_scale", "learns_zero_point"}`` of an estimator.

    Raises RuntimeError naming the known estimators when ``name`` is unknown.
    """
    return dict(_C.estimator_info(name))


def register(
    name: str,
    fn: Optional[Union[EstimatorFn, type]] = None,
    *,
    description: str = "",
    learns_scale: bool = False,
    learns_zero_point: bool = False,
    replace: bool = False,
):
    """Register a Python estimator under ``name``; usable as a decorator.

    ``fn`` is called as ``fn(input, scale, zero_point, quant_min, quant_max, axis,
    grad_scale, ewgs_delta)`` and returns the fake-quantized tensor, recording its own
    backward with autograd. A ``torch.autograd.Function`` subclass may be given directly:
    its ``apply`` is called with those arguments.

    Raises RuntimeError if ``name`` is taken (unless ``replace``), TypeError if ``fn`` is
    not callable.
    """

    def add(target: Union[EstimatorFn, type]):
        if inspect.isclass(target) and issubclass(target, torch.autograd.Function):
            call = target.apply
        elif callable(target):
            call = target
        else:
            raise TypeError(
                f"qat.estimators.register: fn must be callable or a torch.autograd.Function "
                f"subclass, got {type(target).__name__}"
            )
        if not isinstance(name, str) or not name:
            raise ValueError("qat.estimators.register: name must be a non-empty string")
        doc = description or (inspect.getdoc(target) or "").split("\n")[0]
        _C.register_estimator(name, call, doc, learns_scale, learns_zero_point, replace)
        return target

    if fn is None:
        return add
    return add(fn)


def unregister(name: str) -> bool:
    """Remove ``name`` from the registry; returns whether it was registered."""
    return bool(_C.unregister_estimator(name))
