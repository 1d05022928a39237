"""Ready-made :class:`qat.Config`\\ s for the common precision choices."""

from .config import Config, QuantSpec

__all__ = ["int8", "w4a4", "w4a8", "w8a8_dynamic"]


def _weight(bits: int, estimator: str = "ste") -> QuantSpec:
    return QuantSpec(bits=bits, symmetric=True, per_channel=True, axis=0, observer="minmax",
                     estimator=estimator)


def _activation(bits: int, estimator: str = "ste") -> QuantSpec:
    return QuantSpec(bits=bits, symmetric=False, per_channel=False,
                     observer="moving_average", estimator=estimator)


def int8(backend: str = "qnnpack") -> Config:
    """The default: int8 symmetric per-channel weights, uint8 affine per-tensor activations."""
    return Config(backend=backend)


def w4a8(backend: str = "qnnpack") -> Config:
    """4-bit symmetric per-channel weights, 8-bit activations."""
    return Config(weight=_weight(4), activation=_activation(8), backend=backend)


def w4a4(backend: str = "qnnpack") -> Config:
    """4-bit weights and activations with learned step sizes (LSQ, Esser et al. 2020):
    at 4 bits a range chosen by an observer alone loses too much accuracy."""
    return Config(weight=_weight(4, "lsq"), activation=_activation(4, "lsq"), backend=backend)


def w8a8_dynamic(backend: str = "qnnpack") -> Config:
    """int8 weights; activations quantized at run time from their own range (dynamic
    quantization, for Linear- and LSTM-heavy models)."""
    return Config(weight=_weight(8), activation=_activation(8), backend=backend, dynamic=True)
