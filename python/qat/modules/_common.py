"""What the QAT modules share: the weight spec they quantize with."""

import dataclasses
from typing import Optional

from ..config import Config, QuantSpec


def weight_spec_for(spec: Optional[QuantSpec], axis: int) -> QuantSpec:
    """``spec`` (default: the default Config's weight spec) with its per-channel axis set
    to the output-channel axis of the weight, ``axis``: the integer kernels keep one scale
    per output channel, whatever axis a shared spec names."""
    if spec is None:
        spec = Config().weight
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"weight_spec must be a QuantSpec or None, got {type(spec).__name__}")
    if spec.per_channel and spec.axis != axis:
        spec = dataclasses.replace(spec, axis=axis)
    return spec


def check_float(cls, mod, float_cls) -> None:
    if type(mod) is not float_cls:
        raise TypeError(
            f"{cls.__module__}.{cls.__name__}.from_float: expected a "
            f"{float_cls.__module__}.{float_cls.__name__}, got {type(mod).__name__}")
