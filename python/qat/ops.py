"""Tensor operators of qat, the same as ``torch.ops.qat.*``."""

from typing import Optional, Union

import torch

__all__ = ["fake_quantize"]

_Qparam = Union[torch.Tensor, float, int]


def _as_tensor(value: _Qparam, like: torch.Tensor) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    # A Python float stays float (the op rounds it half to even); an int stays integral.
    dtype = torch.int32 if isinstance(value, int) else torch.float32
    return torch.tensor(value, dtype=dtype, device=like.device)


def fake_quantize(
    input: torch.Tensor,
    scale: _Qparam,
    zero_point: _Qparam,
    quant_min: int,
    quant_max: int,
    axis: Optional[int] = None,
    estimator: str = "ste",
    grad_scale: Optional[float] = None,
    ewgs_delta: float = 1e-3,
) -> torch.Tensor:
    """Simulate integer quantization of ``input`` in floating point.

    The forward equals ``dequantize(quantize(input))`` bit for bit, rounding half to even
    as ``torch.quantize_per_tensor`` does::

        (clamp(nearbyint(x / scale) + zero_point, quant_min, quant_max) - zero_point) * scale

    so it matches ``torch.fake_quantize_per_tensor_affine`` and
    ``torch.fake_quantize_per_channel_affine``; NaN propagates and +/-inf saturate, with
    every estimator (they share this forward and differ only in the backward).

    Args:
        input: float32, float64, float16 or bfloat16 tensor, any layout. Math is in float32
            (float64 for float64 input); the result has the input's dtype and layout.
        scale: positive finite step size: one value, or one per channel of ``axis``.
        zero_point: integer offset in ``[quant_min, quant_max]`` shaped like ``scale``; a
            floating-point zero point (LSQ+) is rounded half to even.
        quant_min, quant_max: integer range, e.g. ``-128, 127`` or ``0, 255``; 2 to 16 bits.
        axis: channel axis for per-channel quantization (negative counts from the end);
            ``None`` for per-tensor.
        estimator: name of the straight-through estimator that defines the backward; see
            :func:`qat.estimators.available`.
        grad_scale: factor on scale / zero-point gradients; ``None`` uses the estimator's
            default (``1/sqrt(N * quant_max)`` for ``lsq`` and ``lsq_plus``, 1 otherwise).
        ewgs_delta: the delta of the ``ewgs`` estimator.

    Returns:
        The fake-quantized tensor.
    """
    scale_t = _as_tensor(float(scale) if isinstance(scale, int) else scale, input)
    zero_point_t = _as_tensor(zero_point, input)
    return torch.ops.qat.fake_quantize(
        input, scale_t, zero_point_t, quant_min, quant_max, axis, estimator, grad_scale, ewgs_delta
    )
