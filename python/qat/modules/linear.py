"""QAT ``nn.Linear``: the weight is fake-quantized in every forward."""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import QuantSpec
from ..fake_quant import FakeQuantize
from ._common import check_float, weight_spec_for

__all__ = ["Linear"]


class Linear(nn.Linear):
    """``nn.Linear`` whose weight goes through ``weight_fake_quant`` (a
    :class:`qat.FakeQuantize`, per channel along the output features when the spec is per
    channel) before ``F.linear``. The bias stays in float: the integer kernels quantize it
    to int32 with the input scale times the weight scale.

    Args:
        in_features, out_features, bias, device, dtype: as ``nn.Linear``.
        weight_spec: the weight's QuantSpec (default: ``qat.Config().weight``).
    """

    _FLOAT_MODULE = nn.Linear

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device=None, dtype=None, weight_spec: Optional[QuantSpec] = None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.weight_fake_quant = FakeQuantize(weight_spec_for(weight_spec, 0)).to(device)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(input, self.weight_fake_quant(self.weight), self.bias)

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
