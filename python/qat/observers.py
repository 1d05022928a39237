"""Observers: modules that watch the tensors flowing through them and choose a scale and
zero point for them.

Every observer keeps its whole state in buffers, so it lives in ``state_dict()``, moves
with ``.to()`` and is broadcast by DistributedDataParallel. Per-tensor buffers start with
one element (``min_val = +inf``, ``max_val = -inf``: nothing seen yet); per-channel ones
start empty (shape [0]) and take the channel count of the first batch. The numerics are the
``torch.ops.qat`` operators (``aminmax``, ``choose_qparams``, ``histogram``, ...), shared
with the C++ front end.

- :class:`MinMaxObserver`: the running minimum and maximum.
- :class:`MovingAverageObserver`: an exponential moving average of the batch min / max.
- :class:`PercentileObserver`, :class:`MSEObserver`, :class:`EntropyObserver`: a histogram
  of everything seen, from which the clipping range is chosen by percentile, by the least
  squared quantization error, or by the least KL divergence (TensorRT's calibration).

NaN and +/-inf are left out of the statistics and counted in ``nonfinite_count``. When
``torch.distributed`` is initialized, each batch's statistics are reduced across ranks
before the state is updated (min/max all-reduce, histogram sum), so every rank holds the
same state: that of one process that saw all ranks' batches.
"""

import dataclasses
import itertools
import math
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from .config import QuantSpec

__all__ = [
    "EntropyObserver",
    "MSEObserver",
    "MinMaxObserver",
    "MovingAverageObserver",
    "ObserverBase",
    "PercentileObserver",
    "build",
    "distributed_active",
]

_INF = math.inf


def distributed_active() -> bool:
    """Whether statistics are reduced across ranks: torch.distributed is initialized."""
    return dist.is_available() and dist.is_initialized()


def _format(t: torch.Tensor) -> str:
    """A tensor as ``0.125`` (one element) or ``[0.1, 0.2, 0.3, 0.4, ...] (16)``."""
    values = t.detach().reshape(-1).cpu().tolist()
    if len(values) == 1:
        return f"{values[0]:.6g}"
    shown = ", ".join(f"{v:.6g}" for v in values[:4])
    return f"[{shown}, ...] ({len(values)})" if len(values) > 4 else f"[{shown}]"


def _resize_(t: torch.Tensor, shape) -> None:
    """Gives a buffer or parameter fresh storage of ``shape``, keeping the object (DDP and
    optimizers hold references to it). Not ``resize_``: a tensor loaded from a checkpoint
    lives in the file's storage, which cannot be resized."""
    if isinstance(t, nn.Parameter):
        t.data = t.data.new_empty(shape)
    else:
        t.set_(t.new_empty(shape))


class _QuantState(nn.Module):
    """What observers and FakeQuantize share: the spec as extra state, checkpoint checks,
    per-channel state sized by the first batch, and qparam dtypes that ``.half()`` and
    ``.double()`` leave alone (the operators want float32 scales and int32 zero points)."""

    spec: QuantSpec
    # name -> (fill value, trailing shape) of the per-channel tensors sized on first use.
    _channel_state: Dict[str, Tuple[float, Tuple[int, ...]]]
    # torch.jit.script compiles forward from plain attributes (per_channel, ch_axis, ...);
    # the spec dataclass and the Python-side bookkeeping stay out of the scripted module.
    __jit_ignored_attributes__ = ["spec", "_channel_state"]

    def _set_spec(self, spec: QuantSpec) -> None:
        self.spec = spec
        self.quant_min, self.quant_max = spec.quant_range
        self.per_channel = spec.per_channel
        self.ch_axis = spec.axis

    def _config(self) -> Dict[str, object]:
        s = self.spec
        return {
            "observer": s.observer,
            "bits": s.bits,
            "signed": s.is_signed,
            "symmetric": s.symmetric,
            "per_channel": s.per_channel,
            "axis": s.axis if s.per_channel else None,
            "narrow_range": s.narrow_range,
        }

    def _describe_spec(self) -> str:
        s = self.spec
        parts = [
            f"bits={s.bits}",
            "signed" if s.is_signed else "unsigned",
            "symmetric" if s.symmetric else "affine",
            f"per_channel(axis={s.axis})" if s.per_channel else "per_tensor",
        ]
        if s.narrow_range:
            parts.append("narrow_range")
        return ", ".join(parts)

    def _axis(self, x: torch.Tensor) -> Optional[int]:
        """The channel axis of ``x`` (non-negative), or None per tensor."""
        if not self.per_channel:
            return None
        axis = self.ch_axis
        if x.dim() == 0 or not -x.dim() <= axis < x.dim():
            raise IndexError(
                f"qat: channel axis {axis} is out of range for an input of shape "
                f"{list(x.shape)}")
        return axis % x.dim()

    def _ensure_channels(self, channels: int) -> None:
        """Sizes the per-channel state for ``channels`` on the first batch; afterwards
        checks that the batch has as many channels as the state."""
        for name, (fill, trailing) in self._channel_state.items():
            t = getattr(self, name)
            shape = (channels,) + tuple(trailing)
            if t.shape == shape:
                continue
            if t.shape != (0,):
                raise RuntimeError(
                    f"{type(self).__name__}: the input has {channels} channels along axis "
                    f"{self.spec.axis}, but the observed state ('{name}') has {t.shape[0]}")
            with torch.no_grad():
                _resize_(t, shape)
                t.fill_(fill)

    # -- checkpoints --------------------------------------------------------------------

    def get_extra_state(self):
        return self._config()

    def set_extra_state(self, state) -> None:
        self._check_config(state, "extra state")

    def _check_config(self, state, key: str) -> None:
        name = type(self).__name__
        if not isinstance(state, dict):
            raise RuntimeError(
                f"{name}: cannot load '{key}': expected a dict of the quantization config, "
                f"got {type(state).__name__}")
        for field, value in self._config().items():
            given = state.get(field, "<missing>")
            if given != value:
                raise RuntimeError(
                    f"{name}: cannot load '{key}': the checkpoint was saved with "
                    f"{field}={given!r}, this module has {field}={value!r}")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "_extra_state"
        if key in state_dict:
            self._check_config(state_dict[key], key)
        # Check every tensor before resizing any, so that a failed load changes nothing.
        resize = []
        for name, t in itertools.chain(self._parameters.items(), self._buffers.items()):
            key = prefix + name
            given = state_dict.get(key)
            if t is None or not isinstance(given, torch.Tensor) or given.shape == t.shape:
                continue
            if self.spec.per_channel and name in self._channel_state:
                # Per-channel state whose channel count is not known yet (shape [0]) on
                # either side: take the checkpoint's.
                trailing = tuple(self._channel_state[name][1])
                sized = tuple(given.shape[1:]) == trailing and given.dim() == 1 + len(trailing)
                if (t.shape == (0,) and sized) or given.shape == (0,):
                    resize.append((t, given.shape))
                    continue
            raise RuntimeError(
                f"{type(self).__name__}: cannot load '{key}': expected shape "
                f"{list(t.shape)}, the checkpoint has {list(given.shape)}")
        with torch.no_grad():
            for t, shape in resize:
                _resize_(t, shape)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    # -- device and dtype moves ---------------------------------------------------------

    def _apply(self, fn, *args, **kwargs):
        buffers = {n: b for n, b in self._buffers.items() if b is not None}
        params = {n: p.data for n, p in self._parameters.items() if p is not None}
        result = super()._apply(fn, *args, **kwargs)
        # Converting a float64 histogram to float16 would lose counts: redo those moves
        # from the original tensor with the device change only.
        for name, old in buffers.items():
            new = self._buffers[name]
            if new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(device=new.device)
        for name, old in params.items():
            p = self._parameters[name]
            if p is not None and p.dtype != old.dtype:
                p.data = old.to(device=p.device)
                if p.grad is not None:
                    p.grad = p.grad.to(old.dtype)
        return result


class ObserverBase(_QuantState):
    """Common state and behaviour of the observers.

    Args:
        spec: the quantization spec; its ``observer`` field is set to this class's name.
        **overrides: QuantSpec fields to set (on ``spec``, or on the default spec).

    Buffers: ``min_val`` / ``max_val`` (float32, the finite extremes seen; +inf / -inf
    before any), ``nonfinite_count`` (int64 [1], NaN and +/-inf values skipped).
    """

    observer_name = ""

    def __init__(self, spec: Optional[QuantSpec] = None, **overrides):
        super().__init__()
        spec = QuantSpec() if spec is None else spec
        self._set_spec(dataclasses.replace(spec, observer=self.observer_name, **overrides))
        shape = (0,) if self.spec.per_channel else (1,)
        self.register_buffer("min_val", torch.full(shape, _INF))
        self.register_buffer("max_val", torch.full(shape, -_INF))
        self.register_buffer("nonfinite_count", torch.zeros(1, dtype=torch.int64))
        self._channel_state = {"min_val": (_INF, ()), "max_val": (-_INF, ())}

    @torch.jit.unused
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Observes ``x`` and returns it unchanged. (Python only: in a scripted model the
        fused operator of :class:`qat.FakeQuantize` observes.)"""
        # Under torch.distributed every rank takes part in the reduction, even with an
        # empty batch (whose statistics are the identities), or the others would wait.
        if x.numel() == 0 and not distributed_active():
            return x
        with torch.no_grad():
            self._observe(x.detach())
        return x

    def _batch_range(self, x: torch.Tensor) -> Tuple[Optional[int], torch.Tensor, torch.Tensor]:
        """(axis, min, max) of the finite values of this batch (over all ranks); counts the
        non-finite ones."""
        axis = self._axis(x)
        if axis is not None:
            self._ensure_channels(x.shape[axis])
        batch_min, batch_max, nonfinite = torch.ops.qat.aminmax(x, axis)
        nonfinite = nonfinite.sum().reshape(1)
        if distributed_active():
            # One MIN reduction for both ends: max(x) = -min(-x).
            both = torch.cat([batch_min, -batch_max])
            dist.all_reduce(both, op=dist.ReduceOp.MIN)
            batch_min, batch_max = both[: batch_min.numel()], -both[batch_min.numel():]
            dist.all_reduce(nonfinite, op=dist.ReduceOp.SUM)
        self.nonfinite_count += nonfinite
        return axis, batch_min, batch_max

    def _merge_range(self, batch_min: torch.Tensor, batch_max: torch.Tensor,
                     averaging_constant: Optional[float] = None) -> None:
        # The update the C++ observers and the fused operator run too.
        torch.ops.qat.merge_range(self.min_val, self.max_val, batch_min, batch_max,
                                  averaging_constant)

    def _observe(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def calculate_range(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The (min, max) range that the qparams quantize; min > max where nothing was seen."""
        return self.min_val, self.max_val

    @torch.no_grad()
    def calculate_qparams(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(scale float32, zero_point int32), one element or one per channel; scale 1 and
        the default zero point where nothing was seen yet."""
        lo, hi = self.calculate_range()
        return torch.ops.qat.choose_qparams(
            lo, hi, self.quant_min, self.quant_max, self.spec.symmetric)

    def extra_repr(self) -> str:
        lo, hi = self.calculate_range()
        scale, zero_point = self.calculate_qparams()
        return (
            f"{self._describe_spec()}, min={_format(self.min_val)}, "
            f"max={_format(self.max_val)}, range=({_format(lo)}, {_format(hi)}), "
            f"scale={_format(scale)}, zero_point={_format(zero_point)}, "
            f"nonfinite_count={int(self.nonfinite_count.sum())}"
        )


class MinMaxObserver(ObserverBase):
    """The running minimum and maximum of everything observed."""

    observer_name = "minmax"

    def _observe(self, x):
        _, batch_min, batch_max = self._batch_range(x)
        self._merge_range(batch_min, batch_max)


class MovingAverageObserver(ObserverBase):
    """Exponential moving average of the batch minimum and maximum:
    ``running += averaging_constant * (batch - running)``; the first batch (of a channel)
    sets the running value, and a batch with no finite value (in a channel) leaves it."""

    observer_name = "moving_average"

    def _observe(self, x):
        _, batch_min, batch_max = self._batch_range(x)
        self._merge_range(batch_min, batch_max, self.spec.averaging_constant)


class _HistogramObserver(ObserverBase):
    """A histogram of everything observed (``histogram``, float64 counts, [bins] or
    [C, bins], over [``hist_min``, ``hist_max``]); the range is chosen from it by
    ``torch.ops.qat.histogram_range`` with the method named ``method``.

    The histogram's range is the range of all data seen: when a batch goes beyond it, the
    old counts are re-binned onto the wider range (spread in proportion to the overlap)."""

    method = ""

    def __init__(self, spec: Optional[QuantSpec] = None, **overrides):
        super().__init__(spec, **overrides)
        bins = self.spec.bins
        # Per channel, every buffer starts as shape [0] ([0, bins] would trip DDP's
        # coalesced broadcast in torch 1.13), then becomes [C, bins] on the first batch.
        shape = (0,) if self.spec.per_channel else (bins,)
        edge = (0,) if self.spec.per_channel else (1,)
        self.register_buffer("histogram", torch.zeros(shape, dtype=torch.float64))
        self.register_buffer("hist_min", torch.full(edge, _INF))
        self.register_buffer("hist_max", torch.full(edge, -_INF))
        self._channel_state.update(
            histogram=(0.0, (bins,)), hist_min=(_INF, ()), hist_max=(-_INF, ()))

    def _observe(self, x):
        axis, batch_min, batch_max = self._batch_range(x)
        self._merge_range(batch_min, batch_max)
        lo = torch.minimum(self.hist_min, batch_min)
        hi = torch.maximum(self.hist_max, batch_max)
        grown = (lo != self.hist_min) | (hi != self.hist_max)
        if bool(grown.any()):
            # Rows that saw nothing yet (+inf, -inf) hold no counts; the operators let
            # them be. Rows that did not grow keep their counts as they are.
            rebinned = torch.ops.qat.histogram_rebin(
                self.histogram, self.hist_min, self.hist_max, lo, hi)
            rows = grown.view(-1, 1) if self.spec.per_channel else grown
            self.histogram.copy_(torch.where(rows, rebinned, self.histogram))
            self.hist_min.copy_(lo)
            self.hist_max.copy_(hi)
        batch = torch.ops.qat.histogram(x, self.hist_min, self.hist_max, self.spec.bins, axis)
        if distributed_active():
            dist.all_reduce(batch, op=dist.ReduceOp.SUM)
        self.histogram += batch

    @torch.no_grad()
    def calculate_range(self):
        """The clipping range chosen from the histogram; +inf / -inf where nothing was seen."""
        if self.histogram.dim() == 1 and self.spec.per_channel:
            return self.hist_min.clone(), self.hist_max.clone()  # no channels yet
        lo, hi = torch.ops.qat.histogram_range(
            self.histogram, self.hist_min, self.hist_max, self.method, float(self.spec.percentile),
            self.quant_min, self.quant_max, self.spec.symmetric)
        seen = self.hist_min <= self.hist_max
        return (torch.where(seen, lo, torch.full_like(lo, _INF)),
                torch.where(seen, hi, torch.full_like(hi, -_INF)))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bins={self.spec.bins}"


class PercentileObserver(_HistogramObserver):
    """Clips at the ``percentile``-th percentile of |x| (symmetric) or at the
    (100 - p)/2-th and (100 + p)/2-th percentiles (affine)."""

    observer_name = "percentile"
    method = "percentile"


class MSEObserver(_HistogramObserver):
    """The range that minimizes the squared fake-quantization error over the histogram."""

    observer_name = "mse"
    method = "mse"


class EntropyObserver(_HistogramObserver):
    """The range that minimizes the KL divergence between the clipped and the quantized
    distributions (TensorRT's entropy calibration)."""

    observer_name = "entropy"
    method = "entropy"


_OBSERVERS = {
    cls.observer_name: cls
    for cls in (MinMaxObserver, MovingAverageObserver, PercentileObserver, MSEObserver,
                EntropyObserver)
}


def build(spec: QuantSpec) -> ObserverBase:
    """The observer named by ``spec.observer``, configured by ``spec``."""
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"qat.observers.build: spec must be a QuantSpec, got {type(spec).__name__}")
    return _OBSERVERS[spec.observer](spec)
