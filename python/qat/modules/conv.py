"""QAT ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` (grouped and depthwise included): the
weight is fake-quantized in every forward."""

from typing import Optional

import torch
from torch import nn

from ..config import QuantSpec
from ..fake_quant import FakeQuantize
from ._common import (KernelQParams, computes_as_kernel, conv_from_float, integer_operands,
                      kernel_bias, requantize, weight_spec_for)

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

    def forward(self, input: torch.Tensor, input_scale: Optional[torch.Tensor] = None,
                kernel_qparams: Optional[KernelQParams] = None) -> torch.Tensor:
        # input_scale: the bias on the integer kernels' grid; kernel_qparams: the output as
        # the kernel computes it, in eval (see qat.modules.Linear).
        weight = self.weight_fake_quant(self.weight)
        quantizing = bool(self.weight_fake_quant.fake_quant_enabled)
        if input_scale is not None and kernel_qparams is not None and computes_as_kernel(
                self.training, quantizing, kernel_qparams):
            x, w = integer_operands(input, input_scale, weight, self.weight_fake_quant.scale)
            return requantize(self._conv_forward(x, w, None), self.bias, input_scale,
                              self.weight_fake_quant.scale, kernel_qparams[1], 1)
        bias = kernel_bias(self.bias, input_scale, self.weight_fake_quant.scale, quantizing)
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
