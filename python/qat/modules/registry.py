"""The registry of QAT modules: which QAT class replaces which float class."""

from typing import Dict, Optional, Type, Union

from torch import nn

__all__ = ["lookup", "register_module", "registered_base"]

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


def _overrides(klass: type, base: type) -> bool:
    """Whether ``klass``'s body replaces a method (or property) of ``base``: a constructor
    with other defaults, methods of its own, and data (``__doc__``, the ``__slotnames__``
    that copying an instance caches on its class) leave its computation as ``base``'s."""
    return any(name != "__init__" and hasattr(base, name) and (
        callable(value) or isinstance(value, (property, staticmethod, classmethod)))
        for name, value in vars(klass).items())


def registered_base(cls: type) -> Optional[type]:
    """The registered float class whose computation ``cls`` runs: ``cls`` itself, or, for a
    subclass defined outside torch that overrides nothing of it (only an ``__init__`` with
    other defaults, or methods of its own: torchvision's ``Conv3DSimple``), its nearest
    registered base; None otherwise. A subclass that overrides a method (``forward``,
    ``_conv_forward``, ...) may compute something else, and torch's own subclasses
    (``NonDynamicallyQuantizableLinear``) mark layers that must stay as they are."""
    if cls in _REGISTRY:
        return cls
    if cls.__module__.split(".")[0] == "torch" or cls in _REGISTRY.values():
        return None
    for depth, base in enumerate(cls.__mro__):
        if base in _REGISTRY:
            overrides = any(_overrides(klass, base) for klass in cls.__mro__[:depth])
            return None if overrides else base
    return None


def lookup(float_module: Union[nn.Module, type]) -> Optional[type]:
    """The QAT class registered for the type of ``float_module`` (a module or a class) or
    for the registered base it computes as (:func:`registered_base`), or None."""
    cls = float_module if isinstance(float_module, type) else type(float_module)
    base = registered_base(cls)
    return None if base is None else _REGISTRY[base]
