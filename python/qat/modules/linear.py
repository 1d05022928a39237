"""QAT ``nn.Linear``: the weight is fake-quantized in every forward."""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import QuantSpec
from ..fake_quant import FakeQuantize
from ._common import (KernelQParams, check_float, computes_as_kernel, integer_operands,
                      kernel_bias, requantize, weight_spec_for)

__all__ = ["Linear"]


class Linear(nn.Linear):
    """``nn.Linear`` whose weight goes through ``weight_fake_quant`` (a
    :class:`qat.FakeQuantize`, per channel along the output features when the spec is per
    channel) before the matmul (``weight_fake_quant.linear``, which runs the two as one
    operator where it can: :meth:`qat.FakeQuantize.linear`). The integer kernels quantize
    the bias to int32 with the input scale times the weight scale; given ``input_scale``
    (as :func:`qat.prepare` passes it, the scale of the FakeQuantize before the layer) and
    with the weight fake-quantized, the bias is rounded the same way
    (``torch.ops.qat.round_bias``). Given ``kernel_qparams`` too (qat.prepare passes them
    for the qnnpack backend), in eval the output is computed as the kernel computes it, from
    the integers (``torch.ops.qat.requantize``; see
    ``qat.modules._common.computes_as_kernel``): the file writes the same integers.

    Args:
        in_features, out_features, bias, device, dtype: as ``nn.Linear``.
        weight_spec: the weight's QuantSpec (default: ``qat.Config().weight``).
    """

    _FLOAT_MODULE = nn.Linear

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device=None, dtype=None, weight_spec: Optional[QuantSpec] = None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.weight_fake_quant = FakeQuantize(weight_spec_for(weight_spec, 0)).to(device)

    def forward(self, input: torch.Tensor, input_scale: Optional[torch.Tensor] = None,
                kernel_qparams: Optional[KernelQParams] = None) -> torch.Tensor:
        quantizing = bool(self.weight_fake_quant.fake_quant_enabled)
        if input_scale is not None and kernel_qparams is not None and computes_as_kernel(
                self.training, quantizing, kernel_qparams):
            weight = self.weight_fake_quant(self.weight)
            x, w = integer_operands(input, input_scale, weight, self.weight_fake_quant.scale)
            return requantize(F.linear(x, w), self.bias, input_scale,
                              self.weight_fake_quant.scale, kernel_qparams[1], -1)
        # The weight first: its per-channel scale, which the bias grid needs, is sized by it.
        output = self.weight_fake_quant.linear(input, self.weight)
        bias = kernel_bias(self.bias, input_scale, self.weight_fake_quant.scale, quantizing)
        if bias is not None:
            output = output + bias
        if hasattr(self, "activation_post_process"):
            # The eager fallback of qat.prepare quantizes the output here (no hook: see
            # qat.prepare._quantize_output).
            output = self.activation_post_process(output)
        return output

    @classmethod
    def from_float(cls, mod: nn.Linear, weight_spec: Optional[QuantSpec] = None) -> "Linear":
        """The QAT version of ``mod``, sharing its parameters (so an optimizer built on
        ``mod`` keeps training them)."""
        check_float(cls, mod, cls._FLOAT_MODULE)
        qat_mod = cls(mod.in_features, mod.out_features, mod.bias is not None,
                      device=mod.weight.device, dtype=mod.weight.dtype, weight_spec=weight_spec)
        qat_mod.weight = mod.weight
        qat_mod.bias = mod.bias
        return qat_mod.train(mod.training)
