"""QAT ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` (grouped and depthwise included): the
weight is fake-quantized in every forward."""

from typing import Optional

import torch
from torch import nn

from ..config import QuantSpec
from ..fake_quant import FakeQuantize
from ._common import conv_from_float, kernel_bias, weight_spec_for

__all__ = ["Conv1d", "Conv2d", "Conv3d"]


class _ConvNd:
    """The QAT behaviour mixed into an ``nn.ConvNd`` subclass."""

    _FLOAT_MODULE: type

    def __init__(self, *args, weight_spec: Optional[QuantSpec] = None, **kwargs):
        super().__init__(*args, **kwargs)
        # Conv weights are [out_channels, in_channels / groups, *kernel]: one scale per
        # output channel, depthwise included.
        self.weight_fake_quant = FakeQuantize(weight_spec_for(weight_spec, 0)).to(
            self.weight.device)

    def forward(self, input: torch.Tensor,
                input_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        # input_scale: the bias on the integer kernels' grid (see qat.modules.Linear).
        weight = self.weight_fake_quant(self.weight)
        bias = kernel_bias(self.bias, input_scale, self.weight_fake_quant.scale,
                           bool(self.weight_fake_quant.fake_quant_enabled))
        output = self._conv_forward(input, weight, bias)
        if hasattr(self, "activation_post_process"):
            # The eager fallback of qat.prepare quantizes the output here (no hook: see
            # qat.prepare._quantize_output).
            output = self.activation_post_process(output)
        return output

    @classmethod
    def from_float(cls, mod, weight_spec: Optional[QuantSpec] = None):
        """The QAT version of ``mod``, sharing its parameters."""
        return conv_from_float(cls, mod, weight_spec)


class Conv1d(_ConvNd, nn.Conv1d):
    """``nn.Conv1d`` with a fake-quantized weight (``weight_fake_quant``)."""

    _FLOAT_MODULE = nn.Conv1d


class Conv2d(_ConvNd, nn.Conv2d):
    """``nn.Conv2d`` with a fake-quantized weight (``weight_fake_quant``)."""

    _FLOAT_MODULE = nn.Conv2d


class Conv3d(_ConvNd, nn.Conv3d):
    """``nn.Conv3d`` with a fake-quantized weight (``weight_fake_quant``)."""

    _FLOAT_MODULE = nn.Conv3d
