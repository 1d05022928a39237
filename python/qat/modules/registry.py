"""The registry of QAT modules: which QAT class replaces which float class."""

from typing import Dict, Optional, Type, Union

from torch import nn

__all__ = ["lookup", "register_module"]

_REGISTRY: Dict[type, type] = {}


def register_module(float_cls: Type[nn.Module], qat_cls: Type[nn.Module]) -> None:
    """Makes ``qat_cls`` the QAT version of ``float_cls`` (replacing any earlier one).

    ``qat_cls.from_float(float_module, weight_spec)`` builds it from a float module.

    Raises:
        TypeError: naming the argument, when one is not an ``nn.Module`` subclass or
            ``qat_cls`` has no ``from_float``.
    """
    for name, cls in (("float_cls", float_cls), ("qat_cls", qat_cls)):
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise TypeError(
                f"qat.register_module: {name} must be an nn.Module subclass, got {cls!r}")
    if not callable(getattr(qat_cls, "from_float", None)):
        raise TypeError(
            f"qat.register_module: qat_cls {qat_cls.__name__} must have a classmethod "
            f"from_float(float_module, weight_spec)")
    _REGISTRY[float_cls] = qat_cls


def lookup(float_module: Union[nn.Module, type]) -> Optional[type]:
    """The QAT class registered for the exact type of ``float_module`` (a module or a
    class), or None. Subclasses are not matched: their forward may differ."""
    cls = float_module if isinstance(float_module, type) else type(float_module)
    return _REGISTRY.get(cls)
