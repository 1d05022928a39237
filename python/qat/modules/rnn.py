"""QAT ``nn.LSTM`` / ``nn.GRU`` for dynamic quantization: every weight matrix is
fake-quantized (per row when the spec is per channel) in every forward; activations stay
in float, as PyTorch's dynamic quantized RNN kernels (``qat.convert`` with a dynamic config)
quantize them at run time.

Only a dynamic config (``qat.presets.w8a8_dynamic``) swaps them in: PyTorch has no static
integer RNN kernel, so with a static config the layers stay PyTorch's, in float.
"""

from typing import List, Optional, Tuple

import torch
from torch import Tensor, _VF, nn

from ..config import QuantSpec
from ..fake_quant import FakeQuantize
from ._common import check_float, weight_spec_for

__all__ = ["GRU", "LSTM"]


class _RNNWeights:
    """What the QAT RNNs share: one FakeQuantize per weight matrix, in the order of
    ``_flat_weights``, and the flat list with those matrices fake-quantized."""

    dynamic_only = True

    def _add_weight_fake_quants(self, weight_spec: Optional[QuantSpec]) -> None:
        spec = weight_spec_for(weight_spec, 0)
        self.weight_positions: List[int] = [
            i for i, name in enumerate(self._flat_weights_names) if name.startswith("weight")]
        self.weight_fake_quants = nn.ModuleList(
            FakeQuantize(spec) for _ in self.weight_positions)

    def _quantized_flat_weights(self) -> List[Tensor]:
        weights = list(self._flat_weights)
        for i, fq in enumerate(self.weight_fake_quants):
            position = self.weight_positions[i]
            weights[position] = fq(weights[position])
        return weights

    def _zeros(self, input: Tensor, size: int) -> Tensor:
        directions = 2 if self.bidirectional else 1
        return torch.zeros(self.num_layers * directions, input.size(0 if self.batch_first else 1),
                           size, dtype=input.dtype, device=input.device)

    @classmethod
    def _from_float(cls, mod: nn.RNNBase, weight_spec: Optional[QuantSpec]):
        check_float(cls, mod, cls._FLOAT_MODULE)
        first = mod._flat_weights[0]
        kwargs = {"proj_size": mod.proj_size} if getattr(mod, "proj_size", 0) else {}
        qat_mod = cls(mod.input_size, mod.hidden_size, mod.num_layers, bias=mod.bias,
                      batch_first=mod.batch_first, dropout=mod.dropout,
                      bidirectional=mod.bidirectional, device=first.device, dtype=first.dtype,
                      weight_spec=weight_spec, **kwargs)
        # Shared parameters, so that an optimizer built on ``mod`` keeps training them
        # (RNNBase.__setattr__ keeps _flat_weights in step).
        for name in mod._flat_weights_names:
            setattr(qat_mod, name, getattr(mod, name))
        return qat_mod.train(mod.training)


def _check_input(cls_name: str, input) -> None:
    if not isinstance(input, Tensor) or input.dim() != 3:
        raise ValueError(
            f"qat.modules.{cls_name}: input must be a batched 3-D tensor (no PackedSequence, "
            f"no unbatched input), got {type(input).__name__}"
            + (f" of {input.dim()} dimensions" if isinstance(input, Tensor) else ""))


class LSTM(_RNNWeights, nn.LSTM):
    """``nn.LSTM`` whose weight matrices go through ``weight_fake_quants`` (one
    :class:`qat.FakeQuantize` each, per row when the spec is per channel) before
    PyTorch's LSTM kernel. Takes a batched 3-D input.

    Args:
        as ``nn.LSTM``, and ``weight_spec``: the weights' QuantSpec (default:
        ``qat.Config().weight``).
    """

    _FLOAT_MODULE = nn.LSTM

    def __init__(self, *args, weight_spec: Optional[QuantSpec] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._add_weight_fake_quants(weight_spec)

    def forward(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None
                ) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        _check_input("LSTM", input)
        if hx is None:
            hidden = self.proj_size if self.proj_size > 0 else self.hidden_size
            hx = (self._zeros(input, hidden), self._zeros(input, self.hidden_size))
        result = _VF.lstm(input, hx, self._quantized_flat_weights(), self.bias,
                          self.num_layers, float(self.dropout), self.training,
                          self.bidirectional, self.batch_first)
        return result[0], (result[1], result[2])

    @classmethod
    def from_float(cls, mod: nn.LSTM, weight_spec: Optional[QuantSpec] = None) -> "LSTM":
        """The QAT version of ``mod``, sharing its parameters."""
        return cls._from_float(mod, weight_spec)


class GRU(_RNNWeights, nn.GRU):
    """``nn.GRU`` whose weight matrices go through ``weight_fake_quants`` (see
    :class:`LSTM`)."""

    _FLOAT_MODULE = nn.GRU

    def __init__(self, *args, weight_spec: Optional[QuantSpec] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._add_weight_fake_quants(weight_spec)

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        _check_input("GRU", input)
        if hx is None:
            hx = self._zeros(input, self.hidden_size)
        result = _VF.gru(input, hx, self._quantized_flat_weights(), self.bias, self.num_layers,
                         float(self.dropout), self.training, self.bidirectional,
                         self.batch_first)
        return result[0], result[1]

    @classmethod
    def from_float(cls, mod: nn.GRU, weight_spec: Optional[QuantSpec] = None) -> "GRU":
        """The QAT version of ``mod``, sharing its parameters."""
        return cls._from_float(mod, weight_spec)
