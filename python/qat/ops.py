"""Tensor operators of qat, the same as ``torch.ops.qat.*``."""

from typing import Dict, Optional, Union

import torch

__all__ = ["buffer_pool_stats", "fake_quantize", "release_buffers", "set_buffer_pool_limit"]

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


def buffer_pool_stats() -> Dict[str, int]:
    """What the CPU kernels' buffer pool holds.

    The CPU kernels write their outputs (fake-quantized tensors, the codes their backward
    reads, input gradients) into blocks they keep between training steps: a step asks for
    the same sizes every time, and memory fresh from the OS costs a page fault per 4 KiB on
    its first write, more than the fake-quantize itself. A block is reused only once no
    tensor holds it, so the pool never adds to a step's peak memory; it keeps at most
    ``limit`` bytes (2 GiB by default, or ``QAT_BUFFER_POOL_BYTES`` from the environment)
    and drops blocks that no call has wanted for a few thousand calls.

    Returns:
        ``blocks`` and ``bytes`` held (in use or free), ``free_bytes`` (held by nothing
        else), ``limit``, and since the process started ``hits`` (requests served from the
        pool) and ``misses`` (requests of a poolable size, 64 KiB and up, that allocated).
    """
    names = ("blocks", "bytes", "free_bytes", "limit", "hits", "misses")
    return dict(zip(names, torch.ops.qat.buffer_pool_stats()))


def set_buffer_pool_limit(limit_bytes: int) -> int:
    """Sets the most bytes the CPU kernels' buffer pool keeps (0: no pooling, every output
    freshly allocated) and returns the previous limit. Free blocks beyond the new limit are
    released at once; blocks in use, at the first request of 64 KiB or more after they are
    freed."""
    if isinstance(limit_bytes, bool) or not isinstance(limit_bytes, int):
        raise TypeError(f"qat.ops.set_buffer_pool_limit: limit_bytes must be an int (bytes), "
                        f"got {type(limit_bytes).__name__}")
    return torch.ops.qat.set_buffer_pool_limit(limit_bytes)


def release_buffers() -> None:
    """Returns every free block of the buffer pool to the allocator (after training, or
    before a phase that needs the memory); the pool refills on the next steps."""
    torch.ops.qat.release_buffers()
