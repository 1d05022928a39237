"""QAT ``nn.ConvTranspose1d`` / ``2d`` / ``3d``: the weight is fake-quantized in every
forward."""

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import QuantSpec
from ..fake_quant import FakeQuantize
from ._common import (KernelQParams, computes_as_kernel, conv_from_float, integer_operands,
                      kernel_bias, requantize, weight_spec_for)

__all__ = ["ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d"]


class _ConvTransposeNd:
    """The QAT behaviour mixed into an ``nn.ConvTransposeNd`` subclass."""

    _FLOAT_MODULE: type
    _NUM_SPATIAL_DIMS: int

    def __init__(self, *args, weight_spec: Optional[QuantSpec] = None, **kwargs):
        super().__init__(*args, **kwargs)
        # Transposed conv weights are [in_channels, out_channels / groups, *kernel]: the
        # output channels are axis 1 (with groups > 1, one scale serves that channel of
        # every group).
        self.weight_fake_quant = FakeQuantize(weight_spec_for(weight_spec, 1)).to(
            self.weight.device)
        # An attribute, not the class constant alone: torch.jit.script reads it.
        self.num_spatial_dims = self._NUM_SPATIAL_DIMS

    def forward(self, input: torch.Tensor, output_size: Optional[List[int]] = None,
                input_scale: Optional[torch.Tensor] = None,
                kernel_qparams: Optional[KernelQParams] = None):
        if self.padding_mode != "zeros":
            raise ValueError(
                f"qat.modules.ConvTranspose{self.num_spatial_dims}d: only the 'zeros' "
                f"padding_mode is supported, got '{self.padding_mode}'")
        output_padding = self._output_padding(
            input, output_size, self.stride, self.padding, self.kernel_size,
            self.num_spatial_dims, self.dilation)
        weight = self.weight_fake_quant(self.weight)
        # input_scale: the bias on the integer kernels' grid; kernel_qparams: the output as
        # the kernel computes it, in eval (see qat.modules.Linear). qat.prepare passes them
        # where the weight has one scale per output channel (groups 1).
        quantizing = bool(self.weight_fake_quant.fake_quant_enabled)
        bias = kernel_bias(self.bias, input_scale, self.weight_fake_quant.scale, quantizing)
        exact = input_scale is not None and kernel_qparams is not None and computes_as_kernel(
            self.training, quantizing, kernel_qparams)
        if exact and input_scale is not None:
            input, weight = integer_operands(input, input_scale, weight,
                                             self.weight_fake_quant.scale, 1)
            bias = None
        if self.num_spatial_dims == 1:
            output = F.conv_transpose1d(input, weight, bias, self.stride, self.padding,
                                        output_padding, self.groups, self.dilation)
        elif self.num_spatial_dims == 2:
            output = F.conv_transpose2d(input, weight, bias, self.stride, self.padding,
                                        output_padding, self.groups, self.dilation)
        else:
            output = F.conv_transpose3d(input, weight, bias, self.stride, self.padding,
                                        output_padding, self.groups, self.dilation)
        if exact and input_scale is not None and kernel_qparams is not None:
            return requantize(output, self.bias, input_scale, self.weight_fake_quant.scale,
                              kernel_qparams[1], 1)
        # qat.prepare's eager fallback quantizes the output here, not with a forward hook:
        # a scripted hook would have to take the optional output_size argument, which
        # TorchScript does not pass when the caller leaves it out.
        if hasattr(self, "activation_post_process"):
            output = self.activation_post_process(output)
        return output

    @classmethod
    def from_float(cls, mod, weight_spec: Optional[QuantSpec] = None):
        """The QAT version of ``mod``, sharing its parameters."""
        return conv_from_float(cls, mod, weight_spec, output_padding=mod.output_padding)


class ConvTranspose1d(_ConvTransposeNd, nn.ConvTranspose1d):
    """``nn.ConvTranspose1d`` with a fake-quantized weight (``weight_fake_quant``)."""

    _FLOAT_MODULE = nn.ConvTranspose1d
    _NUM_SPATIAL_DIMS = 1


class ConvTranspose2d(_ConvTransposeNd, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` with a fake-quantized weight (``weight_fake_quant``)."""

    _FLOAT_MODULE = nn.ConvTranspose2d
    _NUM_SPATIAL_DIMS = 2


class ConvTranspose3d(_ConvTransposeNd, nn.ConvTranspose3d):
    """``nn.ConvTranspose3d`` with a fake-quantized weight (``weight_fake_quant``)."""

    _FLOAT_MODULE = nn.ConvTranspose3d
    _NUM_SPATIAL_DIMS = 3
