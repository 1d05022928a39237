"""The registry of QAT modules: which QAT class replaces which float class."""

from typing import Dict, Optional, Type, Union

from torch import nn

__all__ = ["lookup", "register_module"]

_REGISTRY: Dict[type, type] = {}


def register_module(float_cls: Type[nn.Module], qat_cls: Type[nn.Module], *,
                    replace: bool = False) -> None:
    """Makes ``qat_cls`` the QAT version of ``float_cls``.

    ``qat_cls.from_float(float_module, weight_spec)`` builds it from a float module.
    Registering the same pair again does nothing; a different ``qat_cls`` for a registered
    ``float_cls`` needs ``replace=True`` (as C++'s ``qat::register_module``).

    Raises:
        TypeError: naming the argument, when one is not an ``nn.Module`` subclass or
            ``qat_cls`` has no ``from_float``.
        ValueError: when ``float_cls`` has another QAT class and ``replace`` is False.
    """
    for name, cls in (("float_cls", float_cls), ("qat_cls", qat_cls)):
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise TypeError(
                f"qat.register_module: {name} must be an nn.Module subclass, got {cls!r}")
    if not callable(getattr(qat_cls, "from_float", None)):
        raise TypeError(
            f"qat.register_module: qat_cls {qat_cls.__name__} must have a classmethod "
            f"from_float(float_module, weight_spec)")
    registered = _REGISTRY.get(float_cls)
    # A second registration is more often a name clash between two libraries than an
    # intended replacement; the same pair again (a re-run notebook cell) is harmless.
    if registered is not None and registered is not qat_cls and not replace:
        raise ValueError(
            f"qat.register_module: {_qualname(float_cls)} is registered already, with "
            f"{_qualname(registered)}; pass replace=True to replace it with "
            f"{_qualname(qat_cls)}")
    _REGISTRY[float_cls] = qat_cls


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def lookup(float_module: Union[nn.Module, type]) -> Optional[type]:
    """The QAT class registered for the exact type of ``float_module`` (a module or a
    class), or None. Subclasses are not matched: their forward may differ."""
    cls = float_module if isinstance(float_module, type) else type(float_module)
    return _REGISTRY.get(cls)
