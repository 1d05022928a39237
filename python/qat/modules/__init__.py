"""QAT versions of PyTorch modules, built with ``QatCls.from_float(float_module,
weight_spec)``, and the registry that maps float classes to them
(:func:`qat.register_module`, :func:`lookup`)."""

from .conv import Conv1d, Conv2d, Conv3d
from .conv_transpose import ConvTranspose1d, ConvTranspose2d, ConvTranspose3d
from .conv_bn import ConvBn1d, ConvBn2d, ConvBn3d, ConvBnReLU1d, ConvBnReLU2d, ConvBnReLU3d
from .embedding import Embedding, EmbeddingBag
from . import fused
from .linear import Linear
from .rnn import GRU, LSTM
from .registry import lookup, register_module

__all__ = [
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "ConvBn1d",
    "ConvBn2d",
    "ConvBn3d",
    "ConvBnReLU1d",
    "ConvBnReLU2d",
    "ConvBnReLU3d",
    "ConvTranspose1d",
    "ConvTranspose2d",
    "ConvTranspose3d",
    "Embedding",
    "EmbeddingBag",
    "GRU",
    "LSTM",
    "Linear",
    "lookup",
    "register_module",
]

for _qat_cls in (Linear, Conv1d, Conv2d, Conv3d, ConvTranspose1d, ConvTranspose2d,
                 ConvTranspose3d, ConvBn1d, ConvBn2d, ConvBn3d, ConvBnReLU1d, ConvBnReLU2d,
                 ConvBnReLU3d, Embedding, EmbeddingBag, LSTM, GRU):
    register_module(_qat_cls._FLOAT_MODULE, _qat_cls)
del _qat_cls


def _register_torch_fused() -> None:
    """A model fused by PyTorch's own fuse_modules, where this PyTorch has its fused
    classes, gets the same QAT modules as qat's own fusion."""
    for torch_cls, fused_cls in fused.TORCH_EQUIVALENTS.items():
        register_module(torch_cls, lookup(fused_cls))


_register_torch_fused()
