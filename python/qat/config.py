"""How one tensor is quantized (:class:`QuantSpec`) and how a model is (:class:`Config`),
both validated when they are built."""

import fnmatch
from dataclasses import asdict, dataclass, field, fields
from typing import Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from . import estimators

__all__ = ["BACKENDS", "Config", "MAX_BINS", "OBSERVERS", "QuantSpec"]

#: The most histogram bins a QuantSpec accepts: a histogram observer keeps this many
#: counts per channel, and 2**16 already resolves a range far finer than 8-bit steps.
MAX_BINS = 65536

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
        bins: histogram bins of the histogram observers, 1 to ``MAX_BINS`` (65536).

    Fields are validated when the spec is built and whenever one is assigned afterwards
    (a failed assignment leaves the spec as it was).

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
        self._validate()

    def __setattr__(self, name: str, value) -> None:
        # A field changed after construction is validated as the constructor would: an
        # unknown observer must fail here, not as a KeyError when a FakeQuantize is built.
        # (While __init__ assigns the fields one by one, the spec is not complete yet.)
        if not all(f.name in self.__dict__ for f in fields(self)) or name not in self.__dict__:
            object.__setattr__(self, name, value)
            return
        old = self.__dict__[name]
        object.__setattr__(self, name, value)
        try:
            self._validate()
        except ValueError:
            object.__setattr__(self, name, old)
            raise

    def _validate(self) -> None:
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
        if not _is_int(self.bins) or not 1 <= self.bins <= MAX_BINS:
            raise ValueError(
                f"QuantSpec.bins must be an integer in 1..{MAX_BINS}, got {self.bins!r}")

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


#: Target backends a Config accepts: the integer kernels the converted model will run on.
BACKENDS = ("qnnpack", "fbgemm")

def check_backend(where: str, backend: str) -> None:
    """Fails, naming this PyTorch's quantized engines, when ``backend`` is not one of them
    (Debian's PyTorch 1.13 has no fbgemm)."""
    engines = torch.backends.quantized.supported_engines
    if backend not in engines:
        raise ValueError(
            f"{where}: {backend!r} is not a quantized engine of this PyTorch "
            f"({torch.__version__}); it has {', '.join(e for e in engines if e != 'none')}, "
            f"and qat converts for {' or '.join(BACKENDS)}")


_Key = Union[str, type]
_SpecPair = Tuple[QuantSpec, QuantSpec]


def _default_weight() -> QuantSpec:
    return QuantSpec(bits=8, symmetric=True, per_channel=True, axis=0, observer="minmax")


def _default_activation() -> QuantSpec:
    # qnnpack's quantized kernels take uint8 activations with one scale per tensor.
    return QuantSpec(bits=8, symmetric=False, per_channel=False, observer="moving_average")


def _is_pattern(key: str) -> bool:
    return any(c in key for c in "*?[")


def _check_key(field_name: str, key) -> None:
    if isinstance(key, str):
        if not key:
            raise ValueError(f"Config.{field_name}: a module name must not be empty")
        return
    if isinstance(key, type) and issubclass(key, nn.Module):
        return
    raise ValueError(
        f"Config.{field_name}: keys must be module names, fnmatch-style name patterns or "
        f"nn.Module subclasses, got {key!r}")


@dataclass
class Config:
    """How a model is quantized: the default weight and activation specs, per-layer
    overrides, the layers left in float and the target backend.

    Args:
        weight: spec of the weights (default: int8 symmetric, per channel along axis 0,
            ``minmax`` observer).
        activation: spec of the activations (default: uint8 affine per tensor,
            ``moving_average`` observer, as qnnpack's kernels require).
        overrides: module name, fnmatch-style name pattern (``"features.*"``) or module
            type -> ``(weight_spec, activation_spec)`` or a dict with ``"weight"`` and/or
            ``"activation"`` keys; a missing entry (or None) keeps the default. An exact
            name wins over a pattern, a pattern over a type; among patterns the first
            given wins, among types the most derived class.
        skip: module names, patterns or types left in float. Skip wins over overrides.
        backend: the quantized engine :func:`qat.convert` builds the integer model for:
            ``qnnpack`` (PyTorch Mobile's; the default, and the one whose integer model
            matches the simulation bit for bit) or ``fbgemm`` (x86 servers; within one
            quantization step of it), where this PyTorch has the engine.
        dynamic: activations are quantized at run time (dynamic quantization) instead of
            with qparams learned in training; the activation spec gives their range.

    Raises:
        ValueError: naming the field, when one is invalid.
    """

    weight: QuantSpec = field(default_factory=_default_weight)
    activation: QuantSpec = field(default_factory=_default_activation)
    overrides: Mapping[_Key, object] = field(default_factory=dict)
    skip: Sequence[_Key] = ()
    backend: str = "qnnpack"
    dynamic: bool = False

    def __post_init__(self):
        for name in ("weight", "activation"):
            if not isinstance(getattr(self, name), QuantSpec):
                raise ValueError(
                    f"Config.{name} must be a QuantSpec, got {type(getattr(self, name)).__name__}")
        if not isinstance(self.backend, str) or self.backend not in BACKENDS:
            raise ValueError(
                f"Config.backend must be one of {', '.join(BACKENDS)}; got {self.backend!r}")
        check_backend("Config.backend", self.backend)
        if not isinstance(self.dynamic, bool):
            raise ValueError(f"Config.dynamic must be True or False, got {self.dynamic!r}")
        if not isinstance(self.overrides, Mapping):
            raise ValueError(
                f"Config.overrides must be a mapping, got {type(self.overrides).__name__}")
        self.overrides = {key: self._normalize(key, value)
                          for key, value in self.overrides.items()}
        if isinstance(self.skip, (str, type)):
            self.skip = (self.skip,)
        try:
            self.skip = tuple(self.skip)
        except TypeError:
            raise ValueError(
                f"Config.skip must be a sequence of module names, patterns or types, "
                f"got {self.skip!r}") from None
        for key in self.skip:
            _check_key("skip", key)

    def _normalize(self, key, value) -> Tuple[Optional[QuantSpec], Optional[QuantSpec]]:
        """An override as ``(weight or None, activation or None)``; None keeps the default."""
        _check_key("overrides", key)
        if isinstance(value, Mapping):
            unknown = set(value) - {"weight", "activation"}
            if unknown:
                raise ValueError(
                    f"Config.overrides[{key!r}]: unknown keys {sorted(map(str, unknown))}; "
                    f"allowed: 'weight', 'activation'")
            pair = (value.get("weight"), value.get("activation"))
        elif isinstance(value, (tuple, list)) and len(value) == 2:
            pair = tuple(value)
        else:
            raise ValueError(
                f"Config.overrides[{key!r}] must be a (weight, activation) pair of QuantSpecs "
                f"or a dict with 'weight' / 'activation' keys, got {value!r}")
        for role, spec in zip(("weight", "activation"), pair):
            if spec is not None and not isinstance(spec, QuantSpec):
                raise ValueError(
                    f"Config.overrides[{key!r}]: the {role} spec must be a QuantSpec or None, "
                    f"got {type(spec).__name__}")
        return pair

    @staticmethod
    def _match(keys, name: str, module: nn.Module):
        """The first key that matches: exact name, then pattern (first given), then type
        (most derived class first); None if none does."""
        if name in keys:
            return name
        for key in keys:
            if isinstance(key, str) and _is_pattern(key) and fnmatch.fnmatchcase(name, key):
                return key
        for cls in type(module).__mro__:
            if cls in keys:
                return cls
        return None

    def is_skipped(self, name: str, module: nn.Module) -> bool:
        """Whether the module called ``name`` stays in float."""
        return self._match(self.skip, name, module) is not None

    def spec_for(self, name: str, module: nn.Module) -> Optional[_SpecPair]:
        """``(weight_spec, activation_spec)`` of the module called ``name``, or None when it
        stays in float (``skip``)."""
        if self.is_skipped(name, module):
            return None
        key = self._match(self.overrides, name, module)
        if key is None:
            return self.weight, self.activation
        weight, activation = self.overrides[key]
        return (self.weight if weight is None else weight,
                self.activation if activation is None else activation)

    def to_dict(self) -> dict:
        """The config as plain data, ready for JSON: specs as dicts of their fields,
        override and skip keys as strings (a module type by its qualified name)."""

        def key(k) -> str:
            return f"{k.__module__}.{k.__qualname__}" if isinstance(k, type) else k

        def spec(s: Optional[QuantSpec]):
            return None if s is None else asdict(s)

        return {
            "weight": spec(self.weight),
            "activation": spec(self.activation),
            "overrides": {key(k): {"weight": spec(w), "activation": spec(a)}
                          for k, (w, a) in self.overrides.items()},
            "skip": [key(k) for k in self.skip],
            "backend": self.backend,
            "dynamic": self.dynamic,
        }
