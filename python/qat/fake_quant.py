"""``qat.FakeQuantize``: an observer, the qparams it chooses, and the estimator that
fake-quantizes with them. (Not ``fake_quantize.py``: that name would hide the function
``qat.fake_quantize`` behind a submodule.)"""

import dataclasses
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import _C, estimators, observers
from ._torch_support import eager_under_compile
from .config import QuantSpec
from .observers import _QuantState, _format, distributed_active

__all__ = ["FakeQuantize", "FixedQParamsFakeQuantize"]

# Observers whose update the fused operator performs itself.
_FUSED_OBSERVERS = ("minmax", "moving_average")


class FakeQuantize(_QuantState):
    """Observes its input, chooses a scale and zero point from what it saw, and
    fake-quantizes the input with them (gradients as the spec's estimator defines).

    Args:
        spec: the quantization spec (default ``QuantSpec()``).
        **overrides: QuantSpec fields to set on ``spec``.

    State:
        ``scale`` (float32) and ``zero_point`` (int32): buffers, one element or one per
        channel (empty until the first batch sizes them). When the estimator learns them
        (``lsq``, ``pact``: the scale; ``lsq_plus``: scale and a float zero point) they are
        ``nn.Parameter``\\ s instead: the observer initializes them on every batch it
        observes while fake quantization is off (:func:`qat.calibrate`: once, at the end),
        and on the first batch it observes with fake quantization on, after which it is
        switched off and the parameters are trained (the scale kept at or above float32
        eps). Re-enable the observer to re-initialize them.
        ``observer_enabled``, ``fake_quant_enabled``: uint8 [1] switches, buffers so that
        they are saved with the model and broadcast by DDP.
        ``observer``: the :mod:`qat.observers` module that tracks the range.

    For the ``minmax`` and ``moving_average`` observers with an estimator that learns
    nothing, and outside ``torch.distributed``, one fused operator
    (``torch.ops.qat.fused_observe_fake_quantize``) observes, updates the qparams and
    fake-quantizes, counting NaN / inf values into the observer's ``nonfinite_count``;
    everywhere else the observer runs as a module first.

    Per-channel parameters (learned scales) get their size on the first batch: run one
    batch (or :func:`qat.calibrate`) before wrapping the model in DDP, whose gradient
    buckets are laid out when it is built.
    """

    averaging_constant: Optional[float]

    def __init__(self, spec: Optional[QuantSpec] = None, **overrides):
        super().__init__()
        spec = QuantSpec() if spec is None else spec
        self._set_spec(dataclasses.replace(spec, **overrides) if overrides else spec)
        info = estimators.describe(self.spec.estimator)
        self.learns_scale = bool(info["learns_scale"])
        self.learns_zero_point = bool(info["learns_zero_point"])
        self.learns_qparams = self.learns_scale or self.learns_zero_point
        self.estimator = self.spec.estimator
        self.symmetric = self.spec.symmetric
        # The fused operator's EMA weight; None: plain running min / max.
        self.averaging_constant = (
            self.spec.averaging_constant if self.spec.observer == "moving_average" else None)
        self.fused = self.spec.observer in _FUSED_OBSERVERS and not self.learns_qparams
        self.observer = observers.build(self.spec)

        shape = (0,) if self.spec.per_channel else (1,)
        scale = torch.ones(shape)
        if self.learns_scale:
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)
        if self.learns_zero_point:
            self.zero_point = nn.Parameter(torch.zeros(shape))
        else:
            self.register_buffer("zero_point", torch.zeros(shape, dtype=torch.int32))
        self.register_buffer("observer_enabled", torch.ones(1, dtype=torch.uint8))
        self.register_buffer("fake_quant_enabled", torch.ones(1, dtype=torch.uint8))
        self._channel_state = {"scale": (1.0, ()), "zero_point": (0, ())}
        # The qparams come from the observer, not from a fixed output range.
        self.fixed_qparams = False
        # Its path in the model (set by qat.prepare), so that an error names it.
        self.qualified_name = ""
        # Set by qat.calibrate: choosing a histogram observer's range costs milliseconds per
        # channel, so while it runs the qparams are set once, at the end.
        self._defer_qparams = False
        # Whether the input is first clamped to clamp_range (FixedQParamsFakeQuantize).
        self.clamps_input = False
        self.clamp_range = (0.0, 0.0)
        # Whether the input is first put through a ReLU (set by qat.prepare on the quantizer
        # of a conv + batch norm + ReLU, which then leaves its ReLU to it: can_take_relu).
        self.relu_input = False
        self._spec_takes_relu = bool(_C.takes_relu(dataclasses.asdict(self.spec)))

    def can_take_relu(self) -> bool:
        """Whether :attr:`relu_input` makes one operator of the ReLU and this quantizer
        (``torch.ops.qat.observe_fake_quantize_relu``): a per-tensor quantizer of the 'ste'
        estimator whose qparams its minmax or moving_average observer chooses (the C++ rule
        ``qat::takes_relu``, which the C++ FakeQuantize calls too)."""
        return self._spec_takes_relu and not self.fixed_qparams

    def _config(self):
        return dict(super()._config(), estimator=self.spec.estimator)

    # -- switches -----------------------------------------------------------------------

    def enable_observer(self, enabled: bool = True) -> "FakeQuantize":
        self.observer_enabled.fill_(int(enabled))
        return self

    def disable_observer(self) -> "FakeQuantize":
        return self.enable_observer(False)

    def enable_fake_quant(self, enabled: bool = True) -> "FakeQuantize":
        self.fake_quant_enabled.fill_(int(enabled))
        return self

    def disable_fake_quant(self) -> "FakeQuantize":
        return self.enable_fake_quant(False)

    # -- forward ------------------------------------------------------------------------

    @torch.no_grad()
    def update_qparams(self) -> None:
        """Sets ``scale`` and ``zero_point`` (learned ones too) from the observer's state."""
        scale, zero_point = self.observer.calculate_qparams()
        self.scale.copy_(scale)
        self.zero_point.copy_(zero_point)

    def _uses_fused_op(self) -> bool:
        return self.fused and not distributed_active()

    def _observe(self, x: torch.Tensor, axis: Optional[int], quantize: bool) -> None:
        """The observer runs as a module (Python only), then sets the qparams."""
        self.observer(x.detach())
        if not self._defer_qparams:
            self.update_qparams()
        if self.learns_qparams and quantize and x.numel() > 0:
            self.disable_observer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._forward(x)
        return self._forward_named(x)

    @torch.jit.unused
    @eager_under_compile
    def _forward_named(self, x: torch.Tensor) -> torch.Tensor:
        """``_forward``, with this module's path in the model before the operators'
        errors (a NaN scale deep in a network is found by its name)."""
        try:
            return self._forward(x)
        except RuntimeError as error:
            raise self._named(error) from error

    def _named(self, error: RuntimeError) -> RuntimeError:
        if not self.qualified_name:
            return error
        return RuntimeError(f"{self.qualified_name} (qat.FakeQuantize): {error}")

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        # Written for torch.jit.script too, so that a scripted QAT model keeps training
        # (from Python or a C++ trainer): scripted, the fused operator observes, and the
        # Python-only paths (other observers, the first batch of learned qparams,
        # torch.distributed) raise or are left out.
        quantize = bool(self.fake_quant_enabled)
        if self.clamps_input:
            lo, hi = self.clamp_range
            if not quantize:
                return F.hardtanh(x, lo, hi)
            return torch.ops.qat.fake_quantize_clamped(x, self.scale, self.zero_point,
                                                       self.quant_min, self.quant_max, lo, hi)
        observe = bool(self.observer_enabled)
        if self.relu_input:
            fused_relu = self.can_take_relu()
            if not torch.jit.is_scripting():
                fused_relu = fused_relu and self._uses_fused_op()
            if fused_relu:
                observer = self.observer
                return torch.ops.qat.observe_fake_quantize_relu(
                    x, observer.min_val, observer.max_val, self.scale, self.zero_point,
                    self.quant_min, self.quant_max, self.averaging_constant, self.symmetric,
                    observe, quantize, observer.nonfinite_count, not self.fixed_qparams)
            x = F.relu(x)
        if not observe and not quantize:
            return x
        axis = self._axis(x)
        if observe:
            if torch.jit.is_scripting():
                if not self.fused:
                    raise RuntimeError(
                        "qat.FakeQuantize: in TorchScript only the minmax and moving_average "
                        "observers of an estimator that learns nothing can observe; calibrate "
                        "or train one batch in Python before scripting, or disable the "
                        "observer")
            else:
                if axis is not None:
                    self.observer._ensure_channels(x.shape[axis])
                    self._ensure_channels(x.shape[axis])
                if not self._uses_fused_op():
                    self._observe(x, axis, quantize)
                    observe = False
        # The rest of the state machine (observe, clamp a learned scale, refuse a scale never
        # observed, fake-quantize) is the C++ operator's, which the C++ FakeQuantize runs too.
        observer = self.observer
        return torch.ops.qat.fused_observe_fake_quantize(
            x, observer.min_val, observer.max_val, self.scale, self.zero_point,
            self.quant_min, self.quant_max, axis, self.averaging_constant, self.symmetric,
            observe, quantize, self.estimator, observer.nonfinite_count,
            self.learns_scale, not self.fixed_qparams)

    def fake_quantize_folded(self, weight: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        """``self(weight * f) / f`` with one factor ``f`` per output channel (axis 0): the
        fake-quantized folded weight of a conv + batch norm, folded back, so that
        ``conv(x, result) == conv(x, self(weight * f)) / f``.

        The qparams are those of ``weight * f`` (what the integer model stores), but for
        the minmax and moving-average observers per channel along axis 0 the scaled weight
        is never built: its range per channel is ``f`` times that of ``weight``, and
        quantizing ``weight * f`` with scale ``S`` and zero point ``Z`` equals ``f`` times
        quantizing ``weight`` with scale ``S / |f|`` and zero point ``Z`` (``f > 0``) or
        ``quant_min + quant_max - Z`` (``f < 0``: the range flips): one operator,
        ``torch.ops.qat.fake_quantize_folded``, saves a multiply, a divide and their
        backward passes over the weight every step. Its gradient
        treats the rounding error of the folded weight as constant with respect to ``f``
        (the straight-through estimator of the unfolded formula differentiates it).
        """
        if torch.jit.is_scripting():
            return self._fake_quantize_folded(weight, factor)
        return self._folded_named(weight, factor)

    @torch.jit.unused
    @eager_under_compile
    def _folded_named(self, weight: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        try:
            return self._fake_quantize_folded(weight, factor)
        except RuntimeError as error:
            raise self._named(error) from error

    def _fake_quantize_folded(self, weight: torch.Tensor,
                              factor: torch.Tensor) -> torch.Tensor:
        shape = [-1] + [1] * (weight.dim() - 1)
        observe = bool(self.observer_enabled)
        quantize = bool(self.fake_quant_enabled)
        folds = self.per_channel and self.ch_axis == 0 and (
            (self.fused and not self.learns_qparams) or (self.learns_qparams and not observe))
        if not torch.jit.is_scripting():
            folds = folds and not distributed_active()
        if not folds:
            f = factor.reshape(shape)
            return self(weight * f) / f
        observer = self.observer
        return torch.ops.qat.fake_quantize_folded(
            weight, factor, observer.min_val, observer.max_val, self.scale,
            self.zero_point, self.quant_min, self.quant_max, self.averaging_constant,
            self.symmetric, observe, quantize, self.estimator, observer.nonfinite_count,
            self.learns_scale)

    def linear(self, input: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``F.linear(input, self(weight))`` (no bias) for a Linear's weight quantizer.

        For the minmax and moving-average observers per channel along axis 0 (the default
        weight spec), one operator, ``torch.ops.qat.fake_quantized_linear``, multiplies the
        input with each block of output channels as soon as it is fake-quantized, while
        the block is still in cache: a training batch of a few rows otherwise reads the
        whole quantized weight back from memory after writing it.
        """
        if torch.jit.is_scripting():
            return self._linear(input, weight)
        return self._linear_named(input, weight)

    @torch.jit.unused
    @eager_under_compile
    def _linear_named(self, input: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        try:
            return self._linear(input, weight)
        except RuntimeError as error:
            raise self._named(error) from error

    def _linear(self, input: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        blocks = self.fused and self.per_channel and self.ch_axis == 0
        if not torch.jit.is_scripting():
            blocks = blocks and not distributed_active()
        if not blocks:
            return F.linear(input, self(weight))
        observe = bool(self.observer_enabled)
        if not torch.jit.is_scripting():
            if observe:
                self.observer._ensure_channels(weight.shape[0])
                self._ensure_channels(weight.shape[0])
        return torch.ops.qat.fake_quantized_linear(
            input, weight, self.observer.min_val, self.observer.max_val, self.scale,
            self.zero_point, self.quant_min, self.quant_max, self.averaging_constant,
            self.symmetric, observe, bool(self.fake_quant_enabled), self.estimator,
            self.observer.nonfinite_count)

    def calculate_qparams(self):
        """The observer's (scale, zero_point) for what it has seen."""
        return self.observer.calculate_qparams()

    def extra_repr(self) -> str:
        return (
            f"{self._describe_spec()}, scale={_format(self.scale)}, "
            f"zero_point={_format(self.zero_point)}, estimator={self.spec.estimator}, "
            f"observer_enabled={int(self.observer_enabled[0])}, "
            f"fake_quant_enabled={int(self.fake_quant_enabled[0])}"
            + (f", clamps_input={self.clamp_range}" if self.clamps_input else "")
            + (", relu_input=True" if self.relu_input else "")
        )


class FixedQParamsFakeQuantize(FakeQuantize):
    """A :class:`FakeQuantize` whose qparams are fixed by the op before it, whose output
    range is known: the integer kernels of sigmoid, hardsigmoid ([0, 1)) and tanh
    ([-1, 1)) write their output with fixed qparams, so the simulation uses the same; a
    ReLU6 after a conv or linear runs in the integer model as the fused ReLU kernel whose
    output scale 6/255 saturates at exactly 6 ([0, 6], ``inclusive``). The observer stays
    off (``enable_observer`` leaves it so).

    Args:
        spec: the activation spec; its integer range sets the qparams.
        output_range: ``(lo, hi)`` of the op's output, e.g. (0, 1), (-1, 1), (0, 6).
        inclusive: ``hi`` is the top level (scale ``(hi - lo) / (levels - 1)``) instead of
            one step above it (``(hi - lo) / levels``, PyTorch's sigmoid and tanh).
        clamps_input: the quantizer also does the clamp ``hardtanh(x, lo, hi)`` of the op
            before it (a ReLU6, which :func:`qat.prepare` then removes from the graph): the
            output is ``fake_quantize(hardtanh(x, lo, hi))`` with the gradient of both
            (exactly 0 outside ``(lo, hi)``), in one pass over the activation
            (``torch.ops.qat.fake_quantize_clamped``) instead of one for each op, and
            ``hardtanh(x, lo, hi)`` while fake quantization is disabled. Needs the ``ste``
            estimator (the op's gradient is the straight-through one).
    """

    def __init__(self, spec: Optional[QuantSpec], output_range, inclusive: bool = False,
                 clamps_input: bool = False):
        super().__init__(spec)
        if clamps_input and not self.can_clamp_input(self.spec):
            raise ValueError(
                f"qat.FixedQParamsFakeQuantize: clamps_input needs the 'ste' estimator (its "
                f"gradient is the straight-through one), got {self.spec.estimator!r}")
        if self.learns_qparams or self.spec.per_channel:
            raise ValueError(
                f"qat.FixedQParamsFakeQuantize: spec must be per tensor with an estimator "
                f"that learns nothing, got per_channel={self.spec.per_channel}, "
                f"estimator={self.spec.estimator!r}")
        try:
            lo, hi = (float(v) for v in output_range)
        except (TypeError, ValueError):
            raise ValueError(f"qat.FixedQParamsFakeQuantize: output_range must be a pair of "
                             f"numbers (lo, hi), got {output_range!r}") from None
        if not (math.isfinite(lo) and math.isfinite(hi) and lo <= 0 < hi):
            raise ValueError(
                f"qat.FixedQParamsFakeQuantize: output_range must be finite with "
                f"lo <= 0 < hi (a range that holds zero), got ({lo}, {hi})")
        self.fixed_qparams = True
        self.clamps_input = clamps_input
        self.clamp_range = (lo, hi)
        # The low end on quant_min (sigmoid on quint8: scale 1/256, zero point 0; tanh:
        # 2/256, 128; ReLU6: 6/255, 0).
        scale, zero_point = torch.ops.qat.fixed_qparams(lo, hi, self.quant_min,
                                                        self.quant_max, inclusive)
        with torch.no_grad():
            self.scale.fill_(scale)
            self.zero_point.fill_(zero_point)
        self.observer_enabled.fill_(0)

    @staticmethod
    def can_clamp_input(spec: QuantSpec) -> bool:
        """Whether a quantizer of ``spec`` can take ``clamps_input``."""
        return spec.estimator == "ste"

    def enable_observer(self, enabled: bool = True) -> "FakeQuantize":
        return self

    def update_qparams(self) -> None:
        pass


def holds_fake_quantize(model: nn.Module) -> bool:
    """Whether ``model`` is a QAT model: one holding :class:`FakeQuantize` modules (a
    converted, integer model holds none)."""
    return any(isinstance(m, FakeQuantize) for m in model.modules())
