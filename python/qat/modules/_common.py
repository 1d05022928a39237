"""What the QAT modules share: the weight spec they quantize with, the bias grid of the
integer kernels, and the convs' swap from their float modules."""

import dataclasses
from typing import Dict, Optional, Tuple

import torch

from .._torch_support import eager_under_compile
from ..config import Config, QuantSpec
from .registry import registered_base


def weight_spec_for(spec: Optional[QuantSpec], axis: int) -> QuantSpec:
    """``spec`` (default: the default Config's weight spec) with its per-channel axis set
    to the output-channel axis of the weight, ``axis``: the integer kernels keep one scale
    per output channel, whatever axis a shared spec names."""
    if spec is None:
        spec = Config().weight
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"weight_spec must be a QuantSpec or None, got {type(spec).__name__}")
    if spec.per_channel and spec.axis != axis:
        spec = dataclasses.replace(spec, axis=axis)
    return spec


def check_float(cls, mod, float_cls, equivalents: Optional[Dict[type, type]] = None) -> None:
    """``mod`` is a ``float_cls`` (or a subclass that computes as it,
    :func:`registry.registered_base`), or a class that ``equivalents`` maps to it."""
    if registered_base(type(mod)) is not float_cls and \
            (equivalents or {}).get(type(mod)) is not float_cls:
        raise TypeError(
            f"{cls.__module__}.{cls.__name__}.from_float: expected a "
            f"{float_cls.__module__}.{float_cls.__name__}, got {type(mod).__name__}")


def conv_from_float(cls, mod, weight_spec: Optional[QuantSpec], **geometry):
    """The QAT conv of class ``cls`` for the float conv ``mod``, sharing its parameters;
    ``geometry``: what else its constructor takes (a transposed conv's output padding)."""
    check_float(cls, mod, cls._FLOAT_MODULE)
    qat_mod = cls(mod.in_channels, mod.out_channels, mod.kernel_size, stride=mod.stride,
                  padding=mod.padding, dilation=mod.dilation, groups=mod.groups,
                  bias=mod.bias is not None, padding_mode=mod.padding_mode,
                  device=mod.weight.device, dtype=mod.weight.dtype, weight_spec=weight_spec,
                  **geometry)
    qat_mod.weight = mod.weight
    qat_mod.bias = mod.bias
    return qat_mod.train(mod.training)


def kernel_bias(bias: Optional[torch.Tensor], input_scale: Optional[torch.Tensor],
                weight_scale: torch.Tensor, quantizing: bool) -> Optional[torch.Tensor]:
    """The bias a layer adds: on the grid the integer kernels add it on
    (``torch.ops.qat.round_bias``: int32 multiples of input scale x weight scale) when the
    input scale is known and the weight is fake-quantized, else as it is.

    The kernels round the bias once per channel; the rounding is a constant offset of up to
    half that product on every output of the channel, which moves a share of the outputs to
    the next quantization step (measured: 0.1-0.5% per layer on efficientnet_b0), and the
    network amplifies these flips layer after layer. Rounding the bias here makes the
    simulation add exactly what the kernel adds."""
    if bias is None or input_scale is None or not quantizing:
        return bias
    return round_bias(bias, input_scale, weight_scale)


#: What :func:`qat.prepare` passes a layer with an integer kernel as ``kernel_qparams=``:
#: (its input FakeQuantize's fake_quant_enabled, its output FakeQuantize's scale,
#: observer_enabled and fake_quant_enabled).
KernelQParams = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def computes_as_kernel(training: bool, weight_quantizing: bool,
                       kernel_qparams: Optional[KernelQParams]) -> bool:
    """Whether a layer computes its output as its integer kernel does (:func:`requantize`):
    in eval, given ``kernel_qparams``, with its weight, input and output fake-quantized and
    the output's observer off (calibration observes the float output, as before).

    The float convolution rounds apart from the kernel's int32 arithmetic on about one
    output in 10^5, a step where the product lands within float32 error of a tie, and deep
    networks amplify each step layer after layer (efficientnet_b2, inception_v3: 98% top-1
    agreement between simulation and file); computed so, the eval simulation writes the
    integers the file's kernels write."""
    if training or not weight_quantizing or kernel_qparams is None:
        return False
    input_quantizing, _, output_observing, output_quantizing = kernel_qparams
    return bool(input_quantizing) and bool(output_quantizing) and not bool(output_observing)


def integer_operands(input: torch.Tensor, input_scale: torch.Tensor, weight: torch.Tensor,
                     weight_scale: torch.Tensor, axis: int = 0,
                     factor: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor,
                                                                     torch.Tensor]:
    """``torch.ops.qat.integer_operands``: the integers, less their zero points, of a
    layer's input (on the grid of the FakeQuantize before it) and of its fake-quantized
    weight (one scale per channel along ``axis``, or one; times ``factor`` per channel
    first, a folded batch norm's), as float32: what its kernel multiplies (a graph break
    under torch.compile)."""
    if torch.jit.is_scripting():
        return torch.ops.qat.integer_operands(input, input_scale, weight, weight_scale, axis,
                                              factor)
    return _integer_operands_eager(input, input_scale, weight, weight_scale, axis, factor)


@torch.jit.unused
@eager_under_compile
def _integer_operands_eager(input: torch.Tensor, input_scale: torch.Tensor,
                            weight: torch.Tensor, weight_scale: torch.Tensor, axis: int,
                            factor: Optional[torch.Tensor]) -> Tuple[torch.Tensor,
                                                                      torch.Tensor]:
    return torch.ops.qat.integer_operands(input, input_scale, weight, weight_scale, axis,
                                          factor)


def requantize(acc: torch.Tensor, bias: Optional[torch.Tensor], input_scale: torch.Tensor,
               weight_scale: torch.Tensor, output_scale: torch.Tensor, axis: int) -> torch.Tensor:
    """``torch.ops.qat.requantize``, as a graph break under torch.compile."""
    if torch.jit.is_scripting():
        return torch.ops.qat.requantize(acc, bias, input_scale, weight_scale, output_scale,
                                        axis)
    return _requantize_eager(acc, bias, input_scale, weight_scale, output_scale, axis)


@torch.jit.unused
@eager_under_compile
def _requantize_eager(acc: torch.Tensor, bias: Optional[torch.Tensor],
                      input_scale: torch.Tensor, weight_scale: torch.Tensor,
                      output_scale: torch.Tensor, axis: int) -> torch.Tensor:
    return torch.ops.qat.requantize(acc, bias, input_scale, weight_scale, output_scale, axis)


def round_bias(bias: torch.Tensor, input_scale: torch.Tensor,
               weight_scale: torch.Tensor) -> torch.Tensor:
    """``torch.ops.qat.round_bias``, as a graph break under torch.compile."""
    if torch.jit.is_scripting():
        return torch.ops.qat.round_bias(bias, input_scale, weight_scale)
    return _round_bias_eager(bias, input_scale, weight_scale)


@torch.jit.unused
@eager_under_compile
def _round_bias_eager(bias: torch.Tensor, input_scale: torch.Tensor,
                      weight_scale: torch.Tensor) -> torch.Tensor:
    return torch.ops.qat.round_bias(bias, input_scale, weight_scale)
