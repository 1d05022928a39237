"""The integer modules of a converted model: small TorchScript-able modules over PyTorch's
native quantized operators (``torch.ops.quantized.*``, the qnnpack kernels PyTorch Mobile
ships), built by :func:`qat.convert` from a QAT model's learned qparams.

Activations cross between them as quantized tensors (``torch.quint8`` for the default
unsigned 8-bit activations). Weights are stored as integers with their per-channel
scales, packed for the kernels; biases stay float, and the kernels quantize them to int32
at ``input_scale * weight_scale``.
"""

from typing import List

import torch
from torch import nn

__all__ = [
    "Add",
    "Cat",
    "Conv2d",
    "DeQuantize",
    "Hardswish",
    "Linear",
    "LinearDynamic",
    "Mul",
    "Quantize",
    "Requantize",
]


def activation_dtype(quant_min: int, quant_max: int) -> torch.dtype:
    """The quantized dtype holding an activation range: quint8 for [0, 255] (and ranges
    within it), qint8 for signed ranges within [-128, 127]."""
    if 0 <= quant_min and quant_max <= 255:
        return torch.quint8
    if -128 <= quant_min and quant_max <= 127:
        return torch.qint8
    raise ValueError(
        f"qat.convert: activations quantized to [{quant_min}, {quant_max}] have no 8-bit "
        f"quantized dtype; the integer kernels take [0, 255] or [-128, 127]")


class Quantize(nn.Module):
    """A float tensor to a quantized one with fixed qparams."""

    def __init__(self, scale: float, zero_point: int, dtype: torch.dtype):
        super().__init__()
        self.scale = float(scale)
        self.zero_point = int(zero_point)
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.quantize_per_tensor(x, self.scale, self.zero_point, self.dtype)

    def extra_repr(self) -> str:
        return f"scale={self.scale:.6g}, zero_point={self.zero_point}, dtype={self.dtype}"


class DeQuantize(nn.Module):
    """A quantized tensor back to float."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.dequantize()


class Requantize(Quantize):
    """A quantized tensor to other qparams (through float: exact for the input's values)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.quantize_per_tensor(x.dequantize(), self.scale, self.zero_point,
                                         self.dtype)


class _WithOutputQParams(nn.Module):
    def __init__(self, scale: float, zero_point: int, relu: bool = False):
        super().__init__()
        self.scale = float(scale)
        self.zero_point = int(zero_point)
        self.relu = relu

    def extra_repr(self) -> str:
        relu = ", relu" if self.relu else ""
        return f"scale={self.scale:.6g}, zero_point={self.zero_point}{relu}"


class Conv2d(_WithOutputQParams):
    """``quantized::conv2d`` (``conv2d_relu`` with ``relu``) with packed int8 weights;
    ``weight_bits`` records the width they were trained at."""

    def __init__(self, weight: torch.Tensor, bias, stride: List[int], padding: List[int],
                 dilation: List[int], groups: int, scale: float, zero_point: int,
                 relu: bool = False, weight_bits: int = 8):
        super().__init__(scale, zero_point, relu)
        self.weight_bits = weight_bits
        self._packed_params = torch.ops.quantized.conv2d_prepack(
            weight, bias, stride, padding, dilation, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.relu:
            return torch.ops.quantized.conv2d_relu(x, self._packed_params, self.scale,
                                                   self.zero_point)
        return torch.ops.quantized.conv2d(x, self._packed_params, self.scale, self.zero_point)


class Linear(_WithOutputQParams):
    """``quantized::linear`` (``linear_relu`` with ``relu``) with packed int8 weights;
    ``weight_bits`` records the width they were trained at."""

    def __init__(self, weight: torch.Tensor, bias, scale: float, zero_point: int,
                 relu: bool = False, weight_bits: int = 8):
        super().__init__(scale, zero_point, relu)
        self.weight_bits = weight_bits
        self._packed_params = torch.ops.quantized.linear_prepack(weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.relu:
            return torch.ops.quantized.linear_relu(x, self._packed_params, self.scale,
                                                   self.zero_point)
        return torch.ops.quantized.linear(x, self._packed_params, self.scale, self.zero_point)


class LinearDynamic(nn.Module):
    """``quantized::linear_dynamic``: float in and out, int8 weights; the input is
    quantized at run time from its own range (dynamic quantization)."""

    def __init__(self, weight: torch.Tensor, bias, weight_bits: int = 8):
        super().__init__()
        self.weight_bits = weight_bits
        self._packed_params = torch.ops.quantized.linear_prepack(weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # qnnpack takes the full 8-bit activation range (reduce_range is for fbgemm).
        return torch.ops.quantized.linear_dynamic(x, self._packed_params, False)


class Add(_WithOutputQParams):
    """``quantized::add`` (``add_relu`` with ``relu``): both inputs requantized to the
    output's qparams by the kernel."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.relu:
            return torch.ops.quantized.add_relu(a, b, self.scale, self.zero_point)
        return torch.ops.quantized.add(a, b, self.scale, self.zero_point)


class Mul(_WithOutputQParams):
    """``quantized::mul`` (``mul_relu`` with ``relu``)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.relu:
            return torch.ops.quantized.mul_relu(a, b, self.scale, self.zero_point)
        return torch.ops.quantized.mul(a, b, self.scale, self.zero_point)


class Hardswish(_WithOutputQParams):
    """``quantized::hardswish``, written with the output qparams."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.hardswish(x, self.scale, self.zero_point)


class Cat(_WithOutputQParams):
    """``quantized::cat``: the inputs requantized to the output's qparams."""

    def __init__(self, dim: int, scale: float, zero_point: int):
        super().__init__(scale, zero_point)
        self.dim = dim

    def forward(self, tensors: List[torch.Tensor]) -> torch.Tensor:
        return torch.ops.quantized.cat(tensors, self.dim, self.scale, self.zero_point)
