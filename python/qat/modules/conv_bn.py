"""ConvNd + BatchNormNd (+ ReLU) for QAT, 1d, 2d and 3d, with the batch norm folded into the
weight before it is fake-quantized, as the integer model will hold it."""

import operator
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .._torch_support import compiling, eager_under_compile
from ..config import QuantSpec
from ..fake_quant import FakeQuantize
from . import fused
from ._common import (KernelQParams, check_float, computes_as_kernel, integer_operands,
                      requantize, round_bias, weight_spec_for)

__all__ = ["ConvBn1d", "ConvBn2d", "ConvBn3d", "ConvBnReLU1d", "ConvBnReLU2d",
           "ConvBnReLU3d"]


def fold_weights_ahead(modules: List[nn.Module]) -> None:
    """Lets the first of ``modules`` fake-quantize the folded weights of all of them, one
    after the other, when it is called with gradients on; each then takes its own result
    (:meth:`_ConvBnNd._take_folded`). For the conv + batch norms of a traced model, which
    its forward calls once each in this order (:func:`qat.prepare` passes those that share
    no module or tensor): the weights are still in cache from the optimizer step, rather
    than each read between the activations' passes (mobilenet_v2, batch 8: 1-3 ms of a
    90 ms step on a quiet machine)."""
    for module in modules:
        module.__dict__.pop("_fold_schedule", None)
    if len(modules) > 1:
        # The others only: a module listing itself would keep itself alive in a cycle.
        modules[0].__dict__["_fold_schedule"] = list(modules[1:])


def _nothing() -> None:
    return None


class _MadeAhead:
    """A folded weight made for one module's next call (:meth:`_ConvBnNd._take_folded`),
    with what it was made from. It belongs to the forward it was made in: a copy or a
    pickle of the module holds None in its place (an autograd result cannot be deep-copied,
    and one not taken, after a forward that stopped part way, must not be used later)."""

    __slots__ = ("inputs", "factor", "weight")

    def __init__(self, inputs, factor: torch.Tensor, weight: torch.Tensor):
        self.inputs, self.factor, self.weight = inputs, factor, weight

    def __deepcopy__(self, memo) -> None:
        return None

    def __reduce__(self):
        return _nothing, ()


class _ConvBnNd:
    """A conv followed by a batch norm, trained as the folded conv the integer model runs
    (Jacob et al. 2018, Krishnamoorthi 2018; the formula of PyTorch's
    ``torch.ao.nn.intrinsic.qat.ConvBn2d``), mixed into an ``nn.ConvNd`` subclass.

    The weight is scaled by ``gamma / sqrt(running_var + eps)`` and then fake-quantized, so
    the quantization error is that of the folded weight; the conv output is divided by the
    same factor and goes through ``bn``, which in training normalizes with the batch
    statistics (and updates the running ones) and in eval with the running ones, where the
    whole equals the folded conv. :meth:`freeze_bn_stats` makes ``bn`` use and keep its
    running statistics in training too, as is done late in training.

    Args:
        in_channels ... padding_mode, device, dtype: as ``nn.ConvNd`` (bias defaults to
            False, as a conv before a batch norm has none).
        eps, momentum: as ``nn.BatchNormNd``.
        freeze_bn: start with the batch-norm statistics frozen.
        weight_spec: the weight's QuantSpec (default: ``qat.Config().weight``).
    """

    _FLOAT_MODULE: type
    _BN_CLASS: type

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = False, padding_mode: str = "zeros",
                 eps: float = 1e-5, momentum: Optional[float] = 0.1, freeze_bn: bool = False,
                 weight_spec: Optional[QuantSpec] = None, device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias, padding_mode, device=device, dtype=dtype)
        self.bn = self._BN_CLASS(out_channels, eps, momentum, device=device, dtype=dtype)
        self.weight_fake_quant = FakeQuantize(weight_spec_for(weight_spec, 0)).to(device)
        self.freeze_bn = freeze_bn
        self.train(self.training)

    def freeze_bn_stats(self):
        """Normalize with the running statistics and stop updating them, in training too."""
        self.freeze_bn = True
        self.bn.train(False)
        return self

    def unfreeze_bn_stats(self):
        """Back to batch statistics (and running-statistic updates) in training."""
        self.freeze_bn = False
        self.bn.train(self.training)
        return self

    def train(self, mode: bool = True):
        # nn.Module.train would switch bn back to batch statistics after a freeze.
        self.training = mode
        self.weight_fake_quant.train(mode)
        self.bn.train(mode and not self.freeze_bn)
        return self

    def _fold(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(f, fq(w * f) / f): the batch norm's factor per output channel and the folded
        weight, fake-quantized and folded back."""
        bn = self.bn
        scale_factor = torch.ops.qat.batch_norm_factor(bn.weight, bn.running_var, bn.eps)
        # conv(x, fq(w * f)) / f per channel, as conv(x, fq(w * f) / f): the division
        # lands on the weight, not on the (usually larger) output, and the folded weight
        # need not be built (FakeQuantize.fake_quantize_folded).
        return scale_factor, self.weight_fake_quant.fake_quantize_folded(self.weight,
                                                                         scale_factor)

    @torch.jit.unused
    @eager_under_compile
    def _fold_eager(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return self._fold()

    @torch.jit.unused
    def _fold_reads(self) -> Tuple[Tuple[nn.Module, ...], Tuple[Optional[torch.Tensor], ...]]:
        """The modules and tensors :meth:`_fold` reads (the tensors None where a module has
        no such one, as a batch norm without affine weight): what a weight made ahead was
        made from (:meth:`_fold_inputs`), and what :func:`qat.prepare` checks that no other
        module holds before it schedules the fold."""
        # Read from the modules' tables, not as attributes: this runs twice per module and
        # training step, and each nn.Module.__getattr__ costs about half a microsecond.
        bn, fq = self._modules["bn"], self._modules["weight_fake_quant"]
        # A parametrized weight is no entry of the table but a property.
        params = self._parameters
        weight = params["weight"] if "weight" in params else self.weight
        # Learned qparams are parameters, observed ones buffers.
        fq_state = {**fq._buffers, **fq._parameters}
        return ((bn, fq, fq._modules["observer"]),
                (weight, bn._parameters.get("weight"), bn._buffers.get("running_var"),
                 fq_state["scale"], fq_state["zero_point"], fq_state["observer_enabled"],
                 fq_state["fake_quant_enabled"]))

    @torch.jit.unused
    def _fold_inputs(self):
        """What :meth:`_fold` reads that can change between two calls: the modules and
        tensors, and the tensors' versions (bumped by every in-place change)."""
        modules, tensors = self._fold_reads()
        return (modules + tensors,
                tuple([-1 if t is None else t._version for t in tensors]))

    @torch.jit.unused
    def _fold_ahead(self) -> None:
        factor, weight = self._fold()
        self.__dict__["_folded_ahead"] = _MadeAhead(self._fold_inputs(), factor, weight)

    @torch.jit.unused
    def _take_folded(self) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """This module's :meth:`_fold` with gradients on: the first module of the schedule
        (:func:`fold_weights_ahead`) makes its own and then the others'; each other takes
        what was made for it once, while the modules, tensors and versions it was made from
        are unchanged (after an optimizer step, a switch turned, a quantizer swapped: None,
        and it makes its own). Modules with forward pre-hooks or parametrizations, which
        may give them another weight just before their call, make their own."""
        if compiling():
            # Each makes its own (weights made ahead are module state set during the
            # forward, which the compiled graph would have to guard), in one graph break:
            # traced, the factor's backward would keep the running variance itself, which
            # the batch norm then updates in place before the backward runs.
            return self._fold_eager()
        if not torch.is_grad_enabled():
            return None
        schedule = self.__dict__.get("_fold_schedule")
        if schedule is not None:
            folded = self._fold()
            for module in schedule:
                if not module._forward_pre_hooks and "parametrizations" not in module._modules:
                    module._fold_ahead()
            return folded
        made = self.__dict__.pop("_folded_ahead", None)
        if made is None:
            return None
        objects, versions = made.inputs
        now_objects, now_versions = self._fold_inputs()
        if versions != now_versions or not all(map(operator.is_, objects, now_objects)):
            return None
        return made.factor, made.weight

    def _conv_bn(self, input: torch.Tensor, input_scale: Optional[torch.Tensor] = None,
                 kernel_qparams: Optional[KernelQParams] = None) -> torch.Tensor:
        folded: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        if not torch.jit.is_scripting():
            folded = self._take_folded()
        if folded is None:
            scale_factor, weight = self._fold()
        else:
            scale_factor, weight = folded
        bn = self.bn
        # The conv bias is added after the division: it is not part of the folded weight's
        # product.
        if (input_scale is not None and not bn.training
                and bool(self.weight_fake_quant.fake_quant_enabled)):
            # With the running statistics the whole is the folded conv the integer model
            # runs, conv(x, fq(w * f)) + beta + f * (b - mean), whose bias the kernel
            # rounds to its int32 grid: so is it here (qat.round_bias).
            shape = [1, -1] + [1] * (input.dim() - 2)
            bias = torch.ops.qat.fold_bias(self.bias, bn.bias, bn.running_mean,
                                           scale_factor)
            if kernel_qparams is not None and computes_as_kernel(self.training, True,
                                                                 kernel_qparams):
                # The kernel's weight is fq(w * f) (qat.convert), the folded weight times f.
                x, w = integer_operands(input, input_scale, weight,
                                        self.weight_fake_quant.scale, 0, scale_factor)
                return requantize(self._conv_forward(x, w, None), bias, input_scale,
                                  self.weight_fake_quant.scale, kernel_qparams[1], 1)
            bias = round_bias(bias, input_scale, self.weight_fake_quant.scale)
            return (self._conv_forward(input, weight, None) * scale_factor.reshape(shape)
                    + bias.reshape(shape))
        return bn(self._conv_forward(input, weight, self.bias))

    def forward(self, input: torch.Tensor, input_scale: Optional[torch.Tensor] = None,
                kernel_qparams: Optional[KernelQParams] = None) -> torch.Tensor:
        output = self._conv_bn(input, input_scale, kernel_qparams)
        if hasattr(self, "activation_post_process"):
            output = self.activation_post_process(output)
        return output

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, freeze_bn={self.freeze_bn}"

    @classmethod
    def from_float(cls, mod, weight_spec: Optional[QuantSpec] = None):
        """The QAT version of a fused conv + batch norm (:mod:`qat.modules.fused`, or
        PyTorch's ``torch.ao.nn.intrinsic`` equivalent), sharing the conv's and the batch
        norm's parameters and running statistics."""
        check_float(cls, mod, cls._FLOAT_MODULE, fused.TORCH_EQUIVALENTS)
        conv, bn = mod[0], mod[1]
        qat_mod = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                      conv.padding, conv.dilation, conv.groups, conv.bias is not None,
                      conv.padding_mode, bn.eps, bn.momentum, weight_spec=weight_spec,
                      device=conv.weight.device, dtype=conv.weight.dtype)
        qat_mod.weight = conv.weight
        qat_mod.bias = conv.bias
        qat_mod.bn.weight = bn.weight
        qat_mod.bn.bias = bn.bias
        qat_mod.bn.running_mean = bn.running_mean
        qat_mod.bn.running_var = bn.running_var
        qat_mod.bn.num_batches_tracked = bn.num_batches_tracked
        return qat_mod.train(mod.training)


class ConvBn1d(_ConvBnNd, nn.Conv1d):
    """``Conv1d`` + ``BatchNorm1d`` with the batch norm folded (see :class:`ConvBn2d`)."""

    _FLOAT_MODULE = fused.FusedConvBn1d
    _BN_CLASS = nn.BatchNorm1d


class ConvBn2d(_ConvBnNd, nn.Conv2d):
    __doc__ = _ConvBnNd.__doc__
    _FLOAT_MODULE = fused.FusedConvBn2d
    _BN_CLASS = nn.BatchNorm2d


class ConvBn3d(_ConvBnNd, nn.Conv3d):
    """``Conv3d`` + ``BatchNorm3d`` with the batch norm folded (see :class:`ConvBn2d`)."""

    _FLOAT_MODULE = fused.FusedConvBn3d
    _BN_CLASS = nn.BatchNorm3d


class _ReLU:
    """A ReLU after the folded conv + batch norm."""

    def forward(self, input: torch.Tensor, input_scale: Optional[torch.Tensor] = None,
                kernel_qparams: Optional[KernelQParams] = None,
                relu: bool = True) -> torch.Tensor:
        """``relu=False`` leaves the ReLU to the quantizer after this module, which qat.prepare
        gives it (:attr:`qat.FakeQuantize.relu_input`): one pass over the activation instead
        of two, forward and backward."""
        output = self._conv_bn(input, input_scale, kernel_qparams)
        if relu:
            output = F.relu(output)
        if hasattr(self, "activation_post_process"):
            output = self.activation_post_process(output)
        return output


class ConvBnReLU1d(_ReLU, ConvBn1d):
    """:class:`ConvBn1d` followed by a ReLU."""

    _FLOAT_MODULE = fused.FusedConvBnReLU1d


class ConvBnReLU2d(_ReLU, ConvBn2d):
    """:class:`ConvBn2d` followed by a ReLU."""

    _FLOAT_MODULE = fused.FusedConvBnReLU2d


class ConvBnReLU3d(_ReLU, ConvBn3d):
    """:class:`ConvBn3d` followed by a ReLU."""

    _FLOAT_MODULE = fused.FusedConvBnReLU3d
