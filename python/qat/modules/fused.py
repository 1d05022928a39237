"""Float containers of a conv followed by its batch norm (and a ReLU), which
:func:`qat.prepare` builds when it fuses them, before swapping them for their QAT versions
(:mod:`qat.modules.conv_bn`).

qat keeps its own instead of using ``torch.ao.nn.intrinsic``'s, so that prepare needs
nothing from PyTorch's deprecated quantization package. A model fused by PyTorch
(``torch.ao.quantization.fuse_modules``) is still matched, by :data:`TORCH_EQUIVALENTS`
where that package can be imported."""

from typing import Dict, Optional

from torch import nn

from .registry import registered_base

__all__ = ["FusedConvBn1d", "FusedConvBn2d", "FusedConvBn3d", "FusedConvBnReLU1d",
           "FusedConvBnReLU2d", "FusedConvBnReLU3d", "TORCH_EQUIVALENTS"]


class _Fused(nn.Sequential):
    """``conv``, ``bn`` (and ``relu``) as items 0, 1 (and 2), as PyTorch's fused modules
    hold them, so that a state dict keeps the same keys either way."""

    _CONV: type
    _BN: type

    def __init__(self, conv: nn.Module, bn: nn.Module, relu: Optional[nn.Module] = None):
        if registered_base(type(conv)) is not self._CONV or type(bn) is not self._BN:
            raise TypeError(
                f"{type(self).__name__}: expected a {self._CONV.__name__} and a "
                f"{self._BN.__name__}, got {type(conv).__name__} and {type(bn).__name__}")
        if relu is None:
            super().__init__(conv, bn)
        else:
            super().__init__(conv, bn, relu)


class FusedConvBn1d(_Fused):
    _CONV, _BN = nn.Conv1d, nn.BatchNorm1d


class FusedConvBn2d(_Fused):
    _CONV, _BN = nn.Conv2d, nn.BatchNorm2d


class FusedConvBn3d(_Fused):
    _CONV, _BN = nn.Conv3d, nn.BatchNorm3d


class FusedConvBnReLU1d(FusedConvBn1d):
    pass


class FusedConvBnReLU2d(FusedConvBn2d):
    pass


class FusedConvBnReLU3d(FusedConvBn3d):
    pass


def _torch_equivalents() -> Dict[type, type]:
    """PyTorch's fused class -> qat's, for the ones this PyTorch still has."""
    try:
        from torch.ao.nn import intrinsic
    except ImportError:
        try:  # torch 1.13 keeps them under torch.nn too
            from torch.nn import intrinsic
        except ImportError:
            return {}
    ours = {"ConvBn1d": FusedConvBn1d, "ConvBn2d": FusedConvBn2d, "ConvBn3d": FusedConvBn3d,
            "ConvBnReLU1d": FusedConvBnReLU1d, "ConvBnReLU2d": FusedConvBnReLU2d,
            "ConvBnReLU3d": FusedConvBnReLU3d}
    return {getattr(intrinsic, name): cls for name, cls in ours.items()
            if hasattr(intrinsic, name)}


# torch.ao.nn.intrinsic.ConvBn2d -> FusedConvBn2d, ... (empty where torch has none).
TORCH_EQUIVALENTS: Dict[type, type] = _torch_equivalents()
