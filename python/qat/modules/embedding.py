"""QAT ``nn.Embedding`` / ``nn.EmbeddingBag``: weight-only quantization, the table is
fake-quantized in every forward and the looked-up rows are not quantized again.

The integer model stores the table as one 8-bit row per embedding with its own scale and
offset (``quantized::embedding_byte`` / ``embedding_bag_byte``), so the default weight spec
is per row (per channel along axis 0), affine and unsigned.

``max_norm``: ``F.embedding`` renormalizes the rows it looks up, in place, in the tensor it
is given. Here that tensor would be the fake-quantized copy, so the change would be lost
and the float table would drift from what the model computes with. Instead the float
``weight`` is renormalized in place first (as ``nn.Embedding`` does, without gradient),
then fake-quantized and looked up. A looked-up row's norm may so exceed ``max_norm`` by up
to its quantization error. ``qat.convert`` renormalizes every row of the table as a lookup
would, then quantizes it: the converted table is read as it is (no in-place change at run
time, which an integer table cannot take), and each row is what the simulation looks up.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import QuantSpec
from ..fake_quant import FakeQuantize
from ._common import check_float, weight_spec_for

__all__ = ["Embedding", "EmbeddingBag", "default_weight_spec"]


def default_weight_spec() -> QuantSpec:
    """Per-row (axis 0) affine uint8 with the table's min / max per row: the format that
    ``quantized::embedding_byte`` stores."""
    return QuantSpec(bits=8, symmetric=False, per_channel=True, axis=0, observer="minmax")


def _embedding_weight_spec(spec: Optional[QuantSpec]) -> QuantSpec:
    # A per-channel spec is put on axis 0 (one scale per row) whatever axis it names.
    return weight_spec_for(default_weight_spec() if spec is None else spec, 0)


def _check_dense(cls, sparse: bool) -> None:
    if sparse:
        raise ValueError(
            f"{cls.__module__}.{cls.__name__}: sparse=True is not supported: a sparse "
            f"gradient cannot flow back through the fake-quantized (dense) weight; build "
            f"the embedding with sparse=False")


class Embedding(nn.Embedding):
    """``nn.Embedding`` whose weight goes through ``weight_fake_quant`` (a
    :class:`qat.FakeQuantize`, per row when the spec is per channel) before the lookup.
    Gradients reach the float weight as the spec's estimator defines them (straight
    through for ``ste``); the ``padding_idx`` row gets none, as in ``nn.Embedding``.

    Args:
        num_embeddings, embedding_dim, padding_idx, max_norm, norm_type,
        scale_grad_by_freq, _weight, device, dtype: as ``nn.Embedding`` (see the module
            docstring for ``max_norm``).
        sparse: must be False.
        weight_spec: the table's QuantSpec (default: :func:`default_weight_spec`).

    Attributes:
        weight_only: True: the input is indices, not values to quantize, and the output
            rows are already on the weight's quantization grid, so ``qat.prepare`` adds no
            activation FakeQuantize before or after this module.

    Raises:
        ValueError: when ``sparse`` is True.
    """

    _FLOAT_MODULE = nn.Embedding
    weight_only = True

    def __init__(self, num_embeddings: int, embedding_dim: int,
                 padding_idx: Optional[int] = None, max_norm: Optional[float] = None,
                 norm_type: float = 2.0, scale_grad_by_freq: bool = False,
                 sparse: bool = False, _weight: Optional[torch.Tensor] = None,
                 device=None, dtype=None, weight_spec: Optional[QuantSpec] = None):
        _check_dense(type(self), sparse)
        super().__init__(num_embeddings, embedding_dim, padding_idx=padding_idx,
                         max_norm=max_norm, norm_type=norm_type,
                         scale_grad_by_freq=scale_grad_by_freq, sparse=False,
                         _weight=_weight, device=device, dtype=dtype)
        self.weight_fake_quant = FakeQuantize(_embedding_weight_spec(weight_spec)).to(
            self.weight.device)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        max_norm = self.max_norm
        if max_norm is not None:
            # As F.embedding: renormalize the looked-up rows of the float table in place,
            # outside autograd (detach shares the storage).
            input = input.contiguous()
            torch.embedding_renorm_(self.weight.detach(), input, max_norm, self.norm_type)
        return F.embedding(input, self.weight_fake_quant(self.weight), self.padding_idx,
                           None, self.norm_type, self.scale_grad_by_freq, False)

    @classmethod
    def from_float(cls, mod: nn.Embedding,
                   weight_spec: Optional[QuantSpec] = None) -> "Embedding":
        """The QAT version of ``mod``, sharing its weight (so an optimizer built on ``mod``
        keeps training it).

        Raises:
            TypeError: when ``mod`` is not exactly an ``nn.Embedding``.
            ValueError: when ``mod.sparse`` is True.
        """
        check_float(cls, mod, cls._FLOAT_MODULE)
        _check_dense(cls, mod.sparse)
        # _weight spares the random initialization of a table that is replaced below.
        qat_mod = cls(mod.num_embeddings, mod.embedding_dim, padding_idx=mod.padding_idx,
                      max_norm=mod.max_norm, norm_type=mod.norm_type,
                      scale_grad_by_freq=mod.scale_grad_by_freq, _weight=mod.weight,
                      device=mod.weight.device, dtype=mod.weight.dtype,
                      weight_spec=weight_spec)
        qat_mod.weight = mod.weight
        return qat_mod.train(mod.training)


class EmbeddingBag(nn.EmbeddingBag):
    """``nn.EmbeddingBag`` (modes ``sum``, ``mean``, ``max``; ``per_sample_weights`` with
    ``sum``) whose weight goes through ``weight_fake_quant`` before the bags are reduced.
    The reduction itself runs in float, as ``quantized::embedding_bag_byte`` does after
    dequantizing the rows.

    Args:
        num_embeddings, embedding_dim, max_norm, norm_type, scale_grad_by_freq, mode,
        _weight, include_last_offset, padding_idx, device, dtype: as ``nn.EmbeddingBag``
            (see the module docstring for ``max_norm``).
        sparse: must be False.
        weight_spec: the table's QuantSpec (default: :func:`default_weight_spec`).

    Attributes:
        weight_only: True, as :attr:`Embedding.weight_only`.

    Raises:
        ValueError: when ``sparse`` is True.
    """

    _FLOAT_MODULE = nn.EmbeddingBag
    weight_only = True

    def __init__(self, num_embeddings: int, embedding_dim: int,
                 max_norm: Optional[float] = None, norm_type: float = 2.0,
                 scale_grad_by_freq: bool = False, mode: str = "mean", sparse: bool = False,
                 _weight: Optional[torch.Tensor] = None, include_last_offset: bool = False,
                 padding_idx: Optional[int] = None, device=None, dtype=None,
                 weight_spec: Optional[QuantSpec] = None):
        _check_dense(type(self), sparse)
        super().__init__(num_embeddings, embedding_dim, max_norm=max_norm,
                         norm_type=norm_type, scale_grad_by_freq=scale_grad_by_freq,
                         mode=mode, sparse=False, _weight=_weight,
                         include_last_offset=include_last_offset, padding_idx=padding_idx,
                         device=device, dtype=dtype)
        self.weight_fake_quant = FakeQuantize(_embedding_weight_spec(weight_spec)).to(
            self.weight.device)

    def forward(self, input: torch.Tensor, offsets: Optional[torch.Tensor] = None,
                per_sample_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        max_norm = self.max_norm
        if max_norm is not None:
            # As Embedding.forward; the indices' shape does not matter to the renorm.
            input = input.contiguous()
            torch.embedding_renorm_(self.weight.detach(), input, max_norm, self.norm_type)
        return F.embedding_bag(input, self.weight_fake_quant(self.weight), offsets, None,
                               self.norm_type, self.scale_grad_by_freq, self.mode, False,
                               per_sample_weights, self.include_last_offset,
                               self.padding_idx)

    @classmethod
    def from_float(cls, mod: nn.EmbeddingBag,
                   weight_spec: Optional[QuantSpec] = None) -> "EmbeddingBag":
        """The QAT version of ``mod``, sharing its weight.

        Raises:
            TypeError: when ``mod`` is not exactly an ``nn.EmbeddingBag``.
            ValueError: when ``mod.sparse`` is True.
        """
        check_float(cls, mod, cls._FLOAT_MODULE)
        _check_dense(cls, mod.sparse)
        qat_mod = cls(mod.num_embeddings, mod.embedding_dim, max_norm=mod.max_norm,
                      norm_type=mod.norm_type, scale_grad_by_freq=mod.scale_grad_by_freq,
                      mode=mod.mode, _weight=mod.weight,
                      include_last_offset=mod.include_last_offset,
                      padding_idx=mod.padding_idx, device=mod.weight.device,
                      dtype=mod.weight.dtype, weight_spec=weight_spec)
        qat_mod.weight = mod.weight
        return qat_mod.train(mod.training)
