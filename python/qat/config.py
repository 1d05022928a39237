"""How one tensor is quantized: :class:`QuantSpec`, validated when it is built."""

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from . import estimators

__all__ = ["OBSERVERS", "QuantSpec"]

#: Observer names a QuantSpec accepts (see :mod:`qat.observers`).
OBSERVERS = ("minmax", "moving_average", "percentile", "mse", "entropy")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class QuantSpec:
    """Quantization of one tensor (a weight or an activation).

    Args:
        bits: integer width, 2 to 16.
        symmetric: symmetric range around 0 (zero point 0 when signed) instead of affine.
        signed: signed integer range; ``None`` means signed iff ``symmetric``.
        per_channel: one scale / zero point per channel of ``axis`` instead of one in all.
        axis: channel axis when ``per_channel`` (negative counts from the end).
        narrow_range: drop the most negative level (``[-127, 127]`` at 8 bits) or,
            unsigned, the top one.
        observer: how the range is estimated: ``minmax``, ``moving_average`` (EMA of the
            batch min/max), or from a histogram: ``percentile``, ``mse``, ``entropy``.
        estimator: registered straight-through estimator (:func:`qat.estimators.available`).
        averaging_constant: EMA weight of a new batch for ``moving_average``, in (0, 1].
        percentile: the ``percentile`` observer's clipping percentile, in (0, 100].
        bins: histogram bins of the histogram observers, at least 1.

    Raises:
        ValueError: naming the field and its allowed values, when one is out of range.
    """

    bits: int = 8
    symmetric: bool = False
    signed: Optional[bool] = None
    per_channel: bool = False
    axis: int = 0
    narrow_range: bool = False
    observer: str = "moving_average"
    estimator: str = "ste"
    averaging_constant: float = 0.01
    percentile: float = 99.99
    bins: int = 2048

    def __post_init__(self):
        if not _is_int(self.bits) or not 2 <= self.bits <= 16:
            raise ValueError(f"QuantSpec.bits must be an integer in 2..16, got {self.bits!r}")
        for name in ("symmetric", "per_channel", "narrow_range"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(
                    f"QuantSpec.{name} must be True or False, got {getattr(self, name)!r}")
        if self.signed is not None and not isinstance(self.signed, bool):
            raise ValueError(
                f"QuantSpec.signed must be True, False or None (signed iff symmetric), "
                f"got {self.signed!r}")
        if not _is_int(self.axis):
            raise ValueError(f"QuantSpec.axis must be an integer, got {self.axis!r}")
        if self.observer not in OBSERVERS:
            raise ValueError(
                f"QuantSpec.observer must be one of {', '.join(OBSERVERS)}; "
                f"got {self.observer!r}")
        known = estimators.available()
        if self.estimator not in known:
            raise ValueError(
                f"QuantSpec.estimator must be one of the registered estimators "
                f"{', '.join(known)}; got {self.estimator!r}")
        if not _is_number(self.averaging_constant) or not 0 < self.averaging_constant <= 1:
            raise ValueError(
                f"QuantSpec.averaging_constant must be in (0, 1], "
                f"got {self.averaging_constant!r}")
        if not _is_number(self.percentile) or not 0 < self.percentile <= 100:
            raise ValueError(
                f"QuantSpec.percentile must be in (0, 100], got {self.percentile!r}")
        if not _is_int(self.bins) or self.bins < 1:
            raise ValueError(f"QuantSpec.bins must be an integer >= 1, got {self.bins!r}")

    @property
    def is_signed(self) -> bool:
        """Whether the integer range is signed (``signed``, or ``symmetric`` when None)."""
        return self.symmetric if self.signed is None else self.signed

    @property
    def quant_range(self) -> Tuple[int, int]:
        """``(quant_min, quant_max)``, e.g. ``(0, 255)`` or ``(-128, 127)``."""
        quant_min, quant_max = torch.ops.qat.quant_range(
            self.bits, self.is_signed, self.narrow_range)
        return int(quant_min), int(quant_max)

    @property
    def quant_min(self) -> int:
        return self.quant_range[0]

    @property
    def quant_max(self) -> int:
        return self.quant_range[1]
