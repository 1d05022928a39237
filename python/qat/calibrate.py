"""Calibration: running data through a model to set its observers' ranges, and the
switches that freeze and re-enable observation and fake quantization."""

import inspect
import itertools
from typing import Iterable, Optional

import torch
from torch import nn
from tqdm import tqdm

from .fake_quant import FakeQuantize

__all__ = [
    "calibrate",
    "disable_fake_quant",
    "disable_observer",
    "enable_fake_quant",
    "enable_observer",
]


def _fake_quantizers(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, FakeQuantize)]


def _set(model: nn.Module, switch: str, enabled: bool) -> nn.Module:
    for m in _fake_quantizers(model):
        getattr(m, switch)(enabled)
    return model


def enable_observer(model: nn.Module) -> nn.Module:
    """Turns observation on in every FakeQuantize of ``model`` (learned qparams are then
    re-initialized from the next batch); returns ``model``."""
    return _set(model, "enable_observer", True)


def disable_observer(model: nn.Module) -> nn.Module:
    """Freezes the ranges and qparams of every FakeQuantize of ``model``; returns ``model``."""
    return _set(model, "enable_observer", False)


def enable_fake_quant(model: nn.Module) -> nn.Module:
    """Turns fake quantization on in every FakeQuantize of ``model``; returns ``model``."""
    return _set(model, "enable_fake_quant", True)


def disable_fake_quant(model: nn.Module) -> nn.Module:
    """Lets every FakeQuantize of ``model`` pass its input through; returns ``model``."""
    return _set(model, "enable_fake_quant", False)


def run_batch(where: str, model: nn.Module, batch):
    """``model`` on a batch's input: the batch itself, or its first element when it is a
    tuple or list (the rest are targets); an input that is a tuple or dict gives the
    arguments. ``where`` names the caller in the error of a model that takes more than that
    first element."""
    inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    try:
        return model(inputs)
    except TypeError as error:
        if inputs is batch or len(batch) < 2:
            raise
        # (a, b) for a model of two inputs reads as (input, target): where the model's
        # signature does not take the input alone, say how the batch was read (and only
        # then: a TypeError from inside the model is its own). Read after a failed call
        # only, so that a working loop does not pay for it on every batch.
        try:
            inspect.signature(getattr(model, "forward", model)).bind(inputs)
        except TypeError as mismatch:
            raise TypeError(
                f"{where}: a batch that is a {type(batch).__name__} of {len(batch)} is taken "
                f"as (inputs, *targets), so the model was called with its first element only, "
                f"which its forward does not take ({mismatch}). Give a model of several inputs "
                f"batches of the form ((input_1, input_2, ...), *targets), or a dict of "
                f"keyword inputs") from error
        except ValueError:
            pass  # no signature to read: the call's own error says what it takes
        raise


def calibrate(model: nn.Module, batches: Iterable, num_batches: Optional[int] = None,
              progress: bool = True) -> nn.Module:
    """Runs ``batches`` through ``model`` with its observers on and fake quantization off,
    so that the observers see the float activations; then turns fake quantization back on
    (in each module where it was on before).

    The model runs in eval mode (batch norm uses its running statistics, no dropout) and
    without gradients; each module's training flag is restored afterwards, and the
    observers stay on. The scales and zero points (learned ones too) are set from the
    observers once, at the end.

    Args:
        model: a module holding :class:`qat.FakeQuantize` modules.
        batches: an iterable of batches. A tensor is called as ``model(batch)``; a tuple or
            list is ``(inputs, *rest)`` as a DataLoader yields it (``inputs``: a tensor, a
            tuple of positional inputs or a dict of keyword inputs); a dict is called as
            ``model(**batch)``.
        num_batches: stop after this many batches (default: all of them).
        progress: show a tqdm progress bar.

    Returns:
        ``model``.

    Raises:
        TypeError: ``batches`` is one tensor (not an iterable of batches).
        ValueError: ``batches`` gives no batch (and ``num_batches`` is not 0), or
            ``num_batches`` is not None or an integer >= 0.
    """
    if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(
            num_batches, int) or num_batches < 0):
        raise ValueError(f"qat.calibrate: num_batches must be None or an integer >= 0, "
                         f"got {num_batches!r}")
    if isinstance(batches, torch.Tensor):
        # Iterating it would feed the model one sample at a time, without its batch axis.
        raise TypeError("qat.calibrate: batches must be an iterable of batches (a DataLoader, "
                        "a list of tensors), got one Tensor; pass [x] or x.split(batch_size)")
    total = len(batches) if hasattr(batches, "__len__") else None
    if num_batches is not None:
        total = num_batches if total is None else min(total, num_batches)
        batches = itertools.islice(batches, num_batches)
    training = {m: m.training for m in model.modules()}
    quantizing = {m: bool(m.fake_quant_enabled[0]) for m in _fake_quantizers(model)}
    enable_observer(model)
    disable_fake_quant(model)
    model.eval()
    for m in quantizing:
        m._defer_qparams = True
    seen = 0
    try:
        with torch.no_grad():
            for batch in tqdm(batches, total=total, desc="qat.calibrate", disable=not progress):
                run_batch("qat.calibrate", model, batch)
                seen += 1
        if seen == 0 and num_batches != 0:
            raise ValueError("qat.calibrate: batches gave no batch, so nothing was observed "
                             "(an empty list or DataLoader?)")
    finally:
        for m, quantize in quantizing.items():
            m._defer_qparams = False
            m.update_qparams()
            m.enable_fake_quant(quantize)
        for m, mode in training.items():
            m.training = mode
    return model
