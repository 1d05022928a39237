"""``qat.convert``: a prepared (and trained or calibrated) QAT model becomes an integer model
on PyTorch's native quantized operators, and ``qat.compare`` measures how closely the
integer model follows the simulation it was trained as.

Each integer op takes its qparams from the simulation: a conv's weights are the very
integers its FakeQuantize produced (for a folded conv + batch norm, those of the folded
weight, with the folded bias), and its output scale and zero point are those of the
FakeQuantize after it. Nothing is re-derived, so the simulation and the integer model round
the same numbers."""

import copy
import json
import math
import operator
import os
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from . import _op_roles, quantized
from ._torch_support import uncompiled
from .calibrate import disable_observer, run_batch
from .config import BACKENDS, check_backend
from .fake_quant import FakeQuantize, FixedQParamsFakeQuantize, holds_fake_quantize
from .modules import (Conv1d, Conv2d, Conv3d, ConvBnReLU1d, ConvBnReLU2d, ConvBnReLU3d,
                      ConvTranspose1d, ConvTranspose2d, Embedding, EmbeddingBag, GRU, LSTM,
                      Linear)
from .modules._common import kernel_bias
from .modules.conv_bn import _ConvBnNd
from .modules.conv_transpose import _ConvTransposeNd
from .observers import ObserverBase
from .prepare import (KERNEL_KWARGS, _calls_one_of, _fuses_relu, _output_quantizer,
                      _quantize_output, _set_module, has_integer_kernel, has_integer_norm,
                      integer_batch_norm_dims)

__all__ = ["ConversionReport", "compare", "convert"]

_QParams = Tuple[float, int, torch.dtype]

_ADD = _op_roles.spellings("add")
_MUL = _op_roles.spellings("mul")
# Ops that run on a quantized tensor and keep its qparams (the op-role table's pass-through
# and data-movement ops with quantized kernels: the integer model moves the same integers
# the simulation moves values), but functional dropout. Clamps (ReLU6, Hardtanh) are not
# among them: fused into the layer before them, or requantized after them, they run in
# float.
_PASS = _op_roles.with_role("passes_qparams", "moves_data", integer_kernel=True)
_PASS = (_PASS[0] - {F.dropout}, *_PASS[1:])
# Ops that split a quantized tensor into a tuple of quantized tensors (read by getitem).
_SPLITS = ({torch.chunk, torch.split}, {"chunk", "split"}, ())
# Calls that read sizes, not values: they take the quantized tensor and return no tensor.
_SIZE_CALLS = ({getattr}, {"size", "dim", "numel"}, ())
# Ops whose quantized kernels write their output with the fixed qparams the simulation
# uses (prepare's FixedQParamsFakeQuantize), rounding once. Averages (pooling, mean) are
# not among them: their kernels round to the input's grid, and the requantization after
# would round a second time where the simulation rounds once; they run in float.
_FIXED_QPARAMS = _op_roles.with_role("fixed_range", integer_kernel=True)

# Float islands whose sum over positions runs in another order on a channels-last tensor,
# the layout of the quantized convs' outputs, than on the contiguous one the simulation
# averages: the last bit of ~75% of the averages differs, and the quantize after turns that
# into a step wherever an average lies within it of a tie (efficientnet's squeeze-excitation
# pools). avg_pool2d's windows sum in one order in either layout.
_SPATIAL_SUMS = (
    {F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, torch.mean,
     torch.sum},
    {"mean", "sum"},
    (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d))


@dataclass
class ConversionReport:
    """What :func:`convert` did: ``integer`` names the ops that run on integer kernels,
    ``float`` those that run in float between a dequantize and a quantize (no integer
    kernel, or a float input)."""

    integer: List[str] = field(default_factory=list)
    float: List[str] = field(default_factory=list)
    #: Weight elements stored as integers, and those of each layer left in float, by name.
    integer_weights: int = 0
    float_weights: Dict[str, int] = field(default_factory=dict)

    @property
    def integer_weight_share(self) -> float:
        """The share of the layers' weight elements stored as integers (1.0 without any
        weights)."""
        total = self.integer_weights + sum(self.float_weights.values())
        return self.integer_weights / total if total else 1.0

    def largest_float_layers(self, count: int = 3) -> List[str]:
        """The ``count`` float layers with the most weight elements, as ``name (n)``."""
        largest = sorted(self.float_weights.items(), key=lambda item: -item[1])[:count]
        return [f"{name} ({elements:,})" for name, elements in largest]

    def __str__(self) -> str:
        lines = [f"{len(self.integer)} ops on integer kernels, {len(self.float)} in float; "
                 f"{100 * self.integer_weight_share:.1f}% of weight elements as integers"]
        lines += [f"  float: {name}" for name in self.float]
        return "\n".join(lines)


# PyTorch's dynamic quantized LSTM / GRU (what qat.convert makes of QAT ones).
_DYNAMIC_RNN = (torch.ao.nn.quantized.dynamic.LSTM, torch.ao.nn.quantized.dynamic.GRU)


def weight_elements(int_model: nn.Module) -> Tuple[int, Dict[str, int]]:
    """(weight elements the integer layers store as integers, those of each float layer by
    name) of a converted model. Float weights that the graph reads directly (a layer whose
    forward calls ``F.linear(x, self.qkv.weight)``, as torchvision's Swin does, leaves
    no module behind: its weight is a constant of the graph) count as float layers too,
    every such tensor of two or more dimensions under its own name."""
    integer, floats = 0, {}
    if isinstance(int_model, fx.GraphModule):
        for node in int_model.graph.nodes:
            if node.op != "get_attr":
                continue
            value = operator.attrgetter(node.target)(int_model)
            if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() >= 2:
                floats[node.target] = value.numel()
    for name, module in int_model.named_modules():
        if isinstance(module, (quantized._IntegerLayer, quantized.Embedding)):
            integer += math.prod(module.weight_shape)
        elif isinstance(module, _DYNAMIC_RNN):
            integer += sum(w.numel() for w in module.get_weight().values())
        elif isinstance(module, _PLAIN_LAYERS):
            floats[name] = module.weight.numel()
        elif isinstance(module, (nn.RNNBase, nn.MultiheadAttention)):
            # Recurrent weights and attention's input projection (its output projection is
            # an nn.Linear, counted on its own).
            weights = [p.numel() for n, p in module.named_parameters(recurse=False)
                       if "weight" in n and p is not None]
            floats[name] = sum(weights)
    return integer, floats


def _qparams(fq: FakeQuantize) -> _QParams:
    if fq.per_channel or fq.scale.numel() != 1:
        raise ValueError("qat.convert: activations must be quantized per tensor")
    return (float(fq.scale.detach()), int(round(float(fq.zero_point.detach()))),
            quantized.activation_dtype(fq.quant_min, fq.quant_max))


def _is_kernel_argument(node: fx.Node) -> bool:
    """A get_attr of a FakeQuantize's state that prepare passes to layers only as one of
    their KERNEL_KWARGS (read by the simulation's layers; the kernels take the qparams
    from the tensors themselves)."""
    def passes(user: fx.Node) -> bool:
        values = [user.kwargs.get(key) for key in KERNEL_KWARGS]
        return node not in user.args and any(
            value is node or (isinstance(value, tuple) and node in value) for value in values)

    return node.op == "get_attr" and bool(node.users) and all(passes(u) for u in node.users)


def _call_argument(node: fx.Node, position: int, name: str, default):
    """The value of ``node``'s argument ``name`` (positional at ``position``)."""
    if len(node.args) > position:
        return node.args[position]
    return node.kwargs.get(name, default)


def _integer_activation(node: fx.Node, module: Optional[nn.Module]):
    """For a hardswish, ELU or leaky ReLU, a function of the output qparams that makes its
    integer module (the kernels compute on the dequantized input in float and round once,
    as the simulation does), and for a norm module that ``has_integer_norm`` its integer
    norm's; None for any other op, or one whose constants are computed."""
    def called(function, module_type):
        return (node.op == "call_function" and node.target is function
                or isinstance(module, module_type))

    if module is not None and has_integer_norm(module):
        return lambda scale, zero_point: _integer_norm(module, scale, zero_point)
    if called(F.hardswish, nn.Hardswish):
        return quantized.Hardswish
    if called(F.elu, nn.ELU):
        alpha = module.alpha if module is not None else _call_argument(node, 1, "alpha", 1.0)
        if isinstance(alpha, (int, float)):
            return lambda scale, zero_point: quantized.ELU(alpha, scale, zero_point)
    if called(F.leaky_relu, nn.LeakyReLU):
        slope = (module.negative_slope if module is not None
                 else _call_argument(node, 1, "negative_slope", 0.01))
        if isinstance(slope, (int, float)):
            return lambda scale, zero_point: quantized.LeakyReLU(slope, scale, zero_point)
    return None


def _describe(node: fx.Node) -> str:
    target = node.target if isinstance(node.target, str) else getattr(
        node.target, "__name__", str(node.target))
    return f"{node.name} ({node.op} {target})"


def _integer_weight(fq_weight: torch.Tensor, fq: FakeQuantize) -> torch.Tensor:
    """The int8 tensor whose dequantized values are the fake-quantized weight ``fq_weight``
    with ``fq``'s qparams, per channel along its spec's axis (1 for a transposed conv's
    weight) (``torch.ops.qat.integer_weight``)."""
    return torch.ops.qat.integer_weight(fq_weight, fq.scale, fq.zero_point, fq.quant_min,
                                        fq.quant_max, fq.per_channel, fq.spec.axis)


def _renormalized(module: Union[nn.Embedding, nn.EmbeddingBag]) -> torch.Tensor:
    """A table's float weight as its lookups read it: with max_norm every row renormalized
    (``torch.ops.qat.renormalized_table``, the C++ converter's call too). The converted table
    is read as it is."""
    return torch.ops.qat.renormalized_table(module.weight, module.max_norm, module.norm_type)


def _table(module: Union[Embedding, EmbeddingBag]) -> torch.Tensor:
    """A QAT table's fake-quantized weight as the simulation reads it: each row what the
    simulation looks up."""
    return module.weight_fake_quant(_renormalized(module))


def _integer_embedding(
        module: Union[Embedding, EmbeddingBag]) -> Optional[quantized.Embedding]:
    """The integer table of a QAT embedding or embedding bag with per-row qparams, or None
    (per-tensor qparams; a bag whose mode is max or whose padding index leaves entries out:
    the kernel sums every entry)."""
    fq = module.weight_fake_quant
    if not fq.per_channel:
        return None
    bag = isinstance(module, EmbeddingBag)
    if bag and (module.mode == "max" or module.padding_idx is not None):
        return None
    with torch.no_grad():
        ints = _integer_weight(_table(module), fq)
    if bag:
        return quantized.EmbeddingBag(ints, fq.spec.bits, fq.quant_min, module.mode,
                                      module.include_last_offset)
    return quantized.Embedding(ints, fq.spec.bits, fq.quant_min)


def _folded(module: _ConvBnNd) -> Tuple[torch.Tensor, torch.Tensor]:
    """(fake-quantized folded weight, folded bias) of a conv + batch norm in eval: what
    ``bn(conv(x, weight))`` computes with the running statistics."""
    bn = module.bn
    factor = torch.ops.qat.batch_norm_factor(bn.weight, bn.running_var, bn.eps)
    shape = [-1] + [1] * (module.weight.dim() - 1)
    weight = module.weight_fake_quant.fake_quantize_folded(module.weight, factor)
    return (weight * factor.reshape(shape),
            torch.ops.qat.fold_bias(module.bias, bn.bias, bn.running_mean, factor))


def _weights_of(module: nn.Module) -> torch.Tensor:
    """The fake-quantized weight a QAT conv / linear uses (folded for conv + bn)."""
    if isinstance(module, _ConvBnNd):
        return _folded(module)[0]
    return module.weight_fake_quant(module.weight)


# The QAT convs with an integer kernel, and the integer module of each conv dimension.
_CONVS = (Conv1d, Conv2d, Conv3d, _ConvBnNd)
_INTEGER_CONVS = {1: quantized.Conv1d, 2: quantized.Conv2d, 3: quantized.Conv3d}
_CONV_BN_RELU = (ConvBnReLU1d, ConvBnReLU2d, ConvBnReLU3d)
_INTEGER_TRANSPOSED = {ConvTranspose1d: quantized.ConvTranspose1d,
                       ConvTranspose2d: quantized.ConvTranspose2d}
_TRANSPOSED = tuple(_INTEGER_TRANSPOSED)

# The plain PyTorch layers QAT layers subclass (ConvBn1d is an nn.Conv1d, and so on).
_PLAIN_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                 nn.ConvTranspose3d, nn.Linear, nn.Embedding, nn.EmbeddingBag)


def _rnn_weights(module) -> Dict[str, torch.Tensor]:
    """A QAT LSTM / GRU's parameters by name, the weight matrices fake-quantized."""
    with torch.no_grad():
        return {name: value.detach() for name, value in
                zip(module._flat_weights_names, module._quantized_flat_weights())}


def _float_rnn(module) -> nn.Module:
    """The plain ``nn.LSTM`` / ``nn.GRU`` with a QAT one's fake-quantized weights."""
    kwargs = {"proj_size": module.proj_size} if getattr(module, "proj_size", 0) else {}
    layer = module._FLOAT_MODULE(module.input_size, module.hidden_size, module.num_layers,
                                 bias=module.bias, batch_first=module.batch_first,
                                 dropout=module.dropout, bidirectional=module.bidirectional,
                                 **kwargs)
    for name, value in _rnn_weights(module).items():
        setattr(layer, name, nn.Parameter(value.clone(), requires_grad=False))
    return layer.eval()


def _dynamic_rnn(module) -> Optional[nn.Module]:
    """PyTorch's dynamic quantized LSTM / GRU (``torch.ao.nn.quantized.dynamic``, int8
    weights, inputs quantized at run time) holding the integers of a QAT one's
    fake-quantized weights (``torch.ops.qat.integer_weight``); None where PyTorch has no
    such kernel (no bias, or an LSTM projection)."""
    if not module.bias or getattr(module, "proj_size", 0):
        return None
    from torch.ao.nn.quantized import dynamic
    from torch.ao.nn.quantized.dynamic.modules.rnn import PackedParameter
    cls = dynamic.LSTM if isinstance(module, LSTM) else dynamic.GRU
    layer = cls(module.input_size, module.hidden_size, module.num_layers, module.bias,
                module.batch_first, module.dropout, module.bidirectional, dtype=torch.qint8)
    values = _rnn_weights(module)
    fake_quants = dict(zip([module._flat_weights_names[i] for i in module.weight_positions],
                           module.weight_fake_quants))
    # x86's kernels (fbgemm) need 7-bit run-time activations to avoid overflow; qnnpack's
    # ignore the flag (and warn when it is set).
    reduce_range = torch.backends.quantized.engine != "qnnpack"
    cells = []
    for index in range(module.num_layers):
        for suffix in ("", "_reverse")[:2 if module.bidirectional else 1]:
            packed, biases = [], []
            for kind in ("ih", "hh"):
                name = f"weight_{kind}_l{index}{suffix}"
                bias = values[f"bias_{kind}_l{index}{suffix}"]
                ints = _integer_weight(values[name], fake_quants[name])
                packed.append(torch.ops.quantized.linear_prepack(ints, bias))
                biases.append(bias)
            cells.append(PackedParameter(torch.ops.quantized.make_quantized_cell_params_dynamic(
                packed[0], packed[1], biases[0], biases[1], reduce_range)))
    layer._all_weight_values = nn.ModuleList(cells)
    return layer.train(False)


def _integer_norm(module: nn.Module, scale: float, zero_point: int) -> nn.Module:
    """The integer version of a normalization layer that ``has_integer_norm``."""
    if isinstance(module, nn.LayerNorm):
        return quantized.LayerNorm(list(module.normalized_shape), module.weight, module.bias,
                                   module.eps, scale, zero_point)
    if isinstance(module, nn.GroupNorm):
        return quantized.GroupNorm(module.num_groups, module.weight, module.bias, module.eps,
                                   scale, zero_point)
    return quantized.BatchNorm(integer_batch_norm_dims(module), module.weight, module.bias,
                               module.running_mean, module.running_var, module.eps, scale,
                               zero_point)


def _float_layer(module: nn.Module) -> Optional[nn.Module]:
    """The plain PyTorch layer that computes what the QAT layer ``module`` computes in
    eval, its fake-quantized weight (batch norm folded in) stored as a constant: a layer
    without an integer kernel runs in float without calling qat's operators, so the file
    it is exported to runs where qat is not installed. None for other modules."""
    if isinstance(module, (LSTM, GRU)):
        return _float_rnn(module)
    if type(module) in (nn.Embedding, nn.EmbeddingBag) and module.max_norm is not None:
        # A float table (skipped in the Config) that renormalizes the rows it reads.
        layer = copy.deepcopy(module)
        layer.weight = nn.Parameter(_renormalized(module), requires_grad=False)
        layer.max_norm = None
        return layer
    base = next((cls for cls in _PLAIN_LAYERS if isinstance(module, cls)), None)
    if base is None or not isinstance(getattr(module, "weight_fake_quant", None), FakeQuantize):
        return None
    with torch.no_grad():
        if isinstance(module, _ConvBnNd):
            weight, bias = _folded(module)
        elif isinstance(module, (Embedding, EmbeddingBag)):
            weight, bias = _table(module), None
        else:
            weight, bias = module.weight_fake_quant(module.weight), getattr(module, "bias", None)
    layer = copy.deepcopy(module)
    layer.__class__ = base  # the same geometry and forward, without the QAT parts
    if isinstance(layer, (nn.Embedding, nn.EmbeddingBag)):
        layer.max_norm = None  # its rows are renormalized already (_table)
    # An eager-fallback layer's output quantizer and the hook that called it go too: the
    # caller quantizes the output after the layer (_convert_eager).
    for name in ("weight_fake_quant", "bn", "activation_post_process"):
        if name in layer._modules:
            delattr(layer, name)
    for key, hook in list(layer._forward_hooks.items()):
        if hook is _quantize_output:
            del layer._forward_hooks[key]
    layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    if "bias" in layer._parameters:  # embeddings have none
        layer.bias = None if bias is None else nn.Parameter(bias.detach().clone(),
                                                            requires_grad=False)
    if isinstance(layer, nn.modules.conv._ConvNd) and isinstance(layer.padding, str) and \
            layer.padding_mode == "zeros":
        # The sizes the string means (torch 1.13's mobile optimizer refuses a string), an
        # odd one left over padded on the right first, as ATen does.
        own, pre_pad, _ = quantized._conv_padding(layer)
        layer.padding = tuple(own)
        if pre_pad:
            pad = (nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)[len(own) - 1]
            layer = nn.Sequential(pad(tuple(pre_pad), 0.0), layer)
    relu = isinstance(module, _CONV_BN_RELU)
    return nn.Sequential(layer, nn.ReLU()) if relu else layer


def _check_finite(qmodel: nn.Module) -> None:
    """Refuses weights, biases, batch-norm statistics and qparams that hold NaN or inf, and
    negative batch-norm variances, naming them: the integer model would store other
    numbers than the simulation computes with (a NaN weight becomes the integer 0), and
    its file would pass export's check while the simulation outputs NaN."""
    bad, negative = [], []
    for module_name, module in qmodel.named_modules():
        if isinstance(module, ObserverBase):
            continue  # +inf / -inf is an observer's "nothing seen yet"
        prefix = f"{module_name}." if module_name else ""
        tensors = list(module.named_parameters(recurse=False)) + list(
            module.named_buffers(recurse=False))
        for name, tensor in tensors:
            if tensor is None or not tensor.is_floating_point() or tensor.numel() == 0:
                continue
            finite = torch.isfinite(tensor.detach())
            if not bool(finite.all()):
                kind = "NaN" if bool(torch.isnan(tensor.detach()).any()) else "inf"
                bad.append(f"{prefix}{name} ({int((~finite).sum())} {kind})")
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and \
                module.running_var is not None and bool((module.running_var < 0).any()):
            negative.append(f"{prefix}running_var (min {module.running_var.min().item():.3g})")
    if bad:
        shown = ", ".join(bad[:8]) + (f", and {len(bad) - 8} more" if len(bad) > 8 else "")
        raise ValueError(
            f"qat.convert: non-finite values in {shown}; the integer model cannot hold "
            f"them (a NaN weight would become 0 while the simulation outputs NaN): fix them "
            f"(e.g. retrain with a lower learning rate, or reload a good checkpoint) before "
            f"converting")
    if negative:
        raise ValueError(
            f"qat.convert: negative batch-norm variance in {', '.join(negative)}: a variance "
            f"cannot be negative, and the folded weight would be NaN")


def _observe_weights(gm: nn.Module) -> None:
    """Lets weight FakeQuantize modules that never ran observe their weight: weights are
    known without data (dynamic quantization needs no calibration)."""
    def unobserved(fq) -> bool:
        return isinstance(fq, FakeQuantize) and not bool(
            torch.isfinite(fq.observer.min_val).any())

    with torch.no_grad():
        for module in gm.modules():
            if isinstance(module, (LSTM, GRU)):
                for fq, position in zip(module.weight_fake_quants, module.weight_positions):
                    if unobserved(fq):
                        fq.enable_observer()
                        fq(module._flat_weights[position])
                continue
            fq = getattr(module, "weight_fake_quant", None)
            if unobserved(fq):
                fq.enable_observer()
                if isinstance(module, _ConvBnNd):
                    _folded(module)
                else:
                    fq(module.weight)


def _integer_module(module: nn.Module, out: _QParams, relu: bool,
                    input_scale: Optional[torch.Tensor]) -> Optional[nn.Module]:
    """The integer version of a QAT conv / linear, or None when it has none here.

    ``input_scale`` is the one prepare passed the layer: the bias is stored on the int32 grid
    the simulation rounded it to (``kernel_bias``). QNNPACK would round a float bias so
    itself, but FBGEMM adds it as it is: a bias off the grid put a channel's outputs up to
    half a grid step away from the simulation's (efficientnet_b0, calibrated: 0.06% of its
    convs' outputs a step off, compounding to 98% top-1 agreement)."""
    scale, zero_point, _ = out
    if not has_integer_kernel(module):
        return None
    fq = module.weight_fake_quant

    def stored_bias(bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        bias = kernel_bias(bias, input_scale, fq.scale, bool(fq.fake_quant_enabled))
        return None if bias is None else bias.detach().float()

    with torch.no_grad():
        if isinstance(module, _TRANSPOSED):
            bias = stored_bias(module.bias)
            layer = _INTEGER_TRANSPOSED[type(module)]
            return layer(_integer_weight(fq(module.weight), fq), bias, list(module.stride),
                         list(module.padding), list(module.output_padding),
                         list(module.dilation), module.groups, scale, zero_point, relu,
                         fq.spec.bits, fq.quant_min)
        if isinstance(module, _ConvBnNd):
            weight, bias = _folded(module)
            relu = relu or isinstance(module, _CONV_BN_RELU)
        else:
            weight = _weights_of(module)
            bias = module.bias
        qweight = _integer_weight(weight, fq)
        bias = stored_bias(bias)
        if isinstance(module, Linear):
            return quantized.Linear(qweight, bias, scale, zero_point, relu, fq.spec.bits,
                                    fq.quant_min)
        conv = _INTEGER_CONVS[qweight.dim() - 2]
        # A string padding as its sizes (symmetric: has_integer_kernel).
        return conv(qweight, bias, list(module.stride), quantized._conv_padding(module)[0],
                    list(module.dilation), module.groups, scale, zero_point, relu, fq.spec.bits,
                    fq.quant_min)


class _Converter:
    def __init__(self, gm: fx.GraphModule, dynamic: bool = False):
        self.gm = gm
        self.dynamic = dynamic
        self.graph = fx.Graph()
        self.env: Dict[fx.Node, fx.Node] = {}
        self.qparams: Dict[fx.Node, _QParams] = {}  # new node -> its qparams if quantized
        self.dequantized: Dict[fx.Node, fx.Node] = {}
        self.tuples: Dict[fx.Node, _QParams] = {}  # new split node -> its parts' qparams
        self.report = ConversionReport()
        # The QAT modules by name, as they were: an integer module takes its QAT module's
        # name, and a layer called twice must still be found as the QAT module the second
        # time.
        self.modules = dict(gm.named_modules())
        self.count = 0
        self.named = set()

    # -- helpers ------------------------------------------------------------------------

    def module(self, node: fx.Node) -> Optional[nn.Module]:
        return self.modules[node.target] if node.op == "call_module" else None

    def fake_quant(self, node: Optional[fx.Node]) -> Optional[FakeQuantize]:
        module = self.module(node) if node is not None else None
        return module if isinstance(module, FakeQuantize) else None

    def add_module(self, name: str, module: nn.Module, args, kwargs=None) -> fx.Node:
        """Calls ``module`` under ``name`` (a layer keeps its QAT module's qualified name,
        which it replaces), or a fresh variant of it when taken."""
        taken = name in self.named
        if taken:
            self.count += 1
            name = f"{name}_{self.count}".replace(".", "_")
        self.named.add(name)
        if "." in name and not taken:
            self.gm.get_submodule(name)  # exists: the QAT module being replaced
            parent, _, attr = name.rpartition(".")
            setattr(self.gm.get_submodule(parent), attr, module)
        else:
            setattr(self.gm, name, module)
        return self.graph.call_module(name, tuple(args), kwargs)

    def as_float(self, old: fx.Node) -> fx.Node:
        new = self.env[old]
        if new not in self.qparams:
            return new
        if new not in self.dequantized:
            self.dequantized[new] = self.add_module(f"{new.name}_dequantize",
                                                    quantized.DeQuantize(), [new])
        return self.dequantized[new]

    def input_scale(self, node: fx.Node) -> Optional[torch.Tensor]:
        """The scale prepare passed a layer as ``input_scale=``, if any."""
        scale = node.kwargs.get("input_scale")
        if not isinstance(scale, fx.Node):
            return None
        owner, _, attr = scale.target.rpartition(".")
        return getattr(self.modules[owner], attr)

    def quantized_input(self, old) -> Optional[fx.Node]:
        if isinstance(old, fx.Node) and self.env.get(old) in self.qparams:
            return self.env[old]
        return None

    def getitem_of_split(self, node: fx.Node) -> bool:
        """Takes ``split[i]`` of a quantized split as a quantized tensor."""
        if not (node.op == "call_function" and node.target is operator.getitem
                and isinstance(node.args[0], fx.Node) and self.env[node.args[0]] in self.tuples):
            return False
        new = self.graph.node_copy(node, lambda n: self.env[n])
        self.env[node] = new
        self.qparams[new] = self.tuples[self.env[node.args[0]]]
        return True

    def output_fake_quant(self, node: fx.Node, relu_ok: bool):
        """(FakeQuantize node whose qparams ``node``'s output takes, ReLU node between them
        or None, whether that FakeQuantize quantizes ``node``'s output itself); (None, None,
        False) also where the integer kernel's ReLU would not cover that ReLU (a ReLU6
        before a FakeQuantize that does not saturate at 6: ``_fuses_relu``)."""
        fq_node, relu, owns = _output_quantizer(
            node, self.gm, lambda n: self.fake_quant(n) is not None, relu_ok)
        if fq_node is None or not _fuses_relu(relu, self.fake_quant(fq_node), self.gm):
            return None, None, False
        return fq_node, relu, owns

    def bind_output(self, new: fx.Node, node: fx.Node, fq_node: fx.Node, relu,
                    owns: bool = True) -> None:
        """``new`` (an integer op's quantized output) stands for ``node``, the ReLU after it
        and (``owns``) the FakeQuantize after that."""
        qparams = _qparams(self.fake_quant(fq_node))
        for old in (node, relu, fq_node if owns else None):
            if old is not None:
                self.env[old] = new
        self.qparams[new] = qparams
        self.report.integer.append(_describe(node))

    def copy(self, node: fx.Node, quantized_args: bool) -> fx.Node:
        if quantized_args:
            return self.graph.node_copy(node, lambda n: self.env[n])
        return self.graph.node_copy(node, self.as_float)

    # -- the walk -----------------------------------------------------------------------

    def run(self) -> None:
        for node in self.gm.graph.nodes:
            if node in self.env:
                continue  # folded into an integer op before it
            if node.op == "placeholder":
                new = self.graph.node_copy(node, lambda n: self.env[n])
                if new.args == (None,) and new.type is None:
                    # An unannotated argument that defaults to None (embedding bags'
                    # offsets): TorchScript would type it Tensor, and a Tensor default of
                    # None cannot be saved for the lite interpreter.
                    new.type = Optional[torch.Tensor]
                self.env[node] = new
            elif node.op == "output":
                self.graph.output(fx.node.map_arg(node.args[0], self.as_float))
            elif _is_kernel_argument(node):
                continue
            elif self.fake_quant(node) is not None:
                self.quantize(node)
            elif not self.getitem_of_split(node) and not self.integer_op(node):
                self.float_op(node)

    def quantize(self, node: fx.Node) -> None:
        qparams = _qparams(self.fake_quant(node))
        source = node.args[0]
        new_input = self.env[source]
        if self.qparams.get(new_input) == qparams:
            self.env[node] = new_input
            return
        cls = quantized.Requantize if new_input in self.qparams else quantized.Quantize
        # Named <node>_quantize, or <node>_requantize for an input quantized already.
        new = self.add_module(f"{node.name}_{cls.__name__.lower()}", cls(*qparams), [new_input])
        self.env[node] = new
        self.qparams[new] = qparams

    def integer_op(self, node: fx.Node) -> bool:
        """Emits ``node`` on an integer kernel when it has one and its inputs are
        quantized; False otherwise."""
        module = self.module(node)
        first = node.args[0] if node.args else None
        x = self.quantized_input(first)
        if isinstance(module, Linear) and x is None and self.dynamic:
            with torch.no_grad():
                weight = _integer_weight(_weights_of(module), module.weight_fake_quant)
                bias = None if module.bias is None else module.bias.detach().float()
            fq = module.weight_fake_quant
            layer = quantized.LinearDynamic(weight, bias, fq.spec.bits, fq.quant_min)
            self.env[node] = self.add_module(node.target, layer, [self.as_float(first)])
            self.report.integer.append(_describe(node) + " dynamic")
            return True
        rnn = isinstance(module, (LSTM, GRU)) and self.dynamic
        if rnn or isinstance(module, (Embedding, EmbeddingBag)):
            # Float inputs (a dynamic RNN) or indices (a table): taken as they are.
            layer = _dynamic_rnn(module) if rnn else _integer_embedding(module)
            if layer is None:
                return False
            self.env[node] = self.add_module(node.target, layer,
                                             fx.node.map_arg(node.args, self.as_float),
                                             fx.node.map_arg(node.kwargs, self.as_float))
            self.report.integer.append(_describe(node) + (" dynamic" if rnn else ""))
            return True
        if isinstance(module, (*_CONVS, *_TRANSPOSED, Linear)):
            fq_node, relu, owns = self.output_fake_quant(node, relu_ok=True)
            if x is None or fq_node is None:
                return False
            if len(node.args) > 1 or node.kwargs.get("output_size") is not None:
                return False  # a transposed conv's output size chosen per call
            fake_quant = self.fake_quant(fq_node)
            # A quantizer that does a ReLU6's clamp (prepare removed the ReLU6) stands for
            # the fused ReLU as the ReLU6 did: the output qparams saturate at 6.
            integer = _integer_module(module, _qparams(fake_quant),
                                      relu is not None or fake_quant.clamps_input,
                                      self.input_scale(node))
            if integer is None:
                return False
            self.bind_output(self.add_module(node.target, integer, [x]), node, fq_node, relu,
                             owns)
            return True
        is_add = _calls_one_of(node, self.gm, *_ADD)
        is_mul = _calls_one_of(node, self.gm, *_MUL)
        if (is_add or is_mul) and len(node.args) == 2 and not node.kwargs:
            y = self.quantized_input(node.args[1])
            fq_node, relu, owns = self.output_fake_quant(node, relu_ok=True)
            if x is None or y is None or fq_node is None:
                return False
            scale, zero_point, _ = _qparams(self.fake_quant(fq_node))
            if is_add and not quantized.Add.takes(self.qparams[x][0], self.qparams[y][0], scale):
                return False  # in float, where the simulation's sum is computed alike
            op = (quantized.Add if is_add else quantized.Mul)(scale, zero_point, relu is not None)
            self.bind_output(self.add_module(f"{node.name}_int", op, [x, y]), node, fq_node,
                             relu, owns)
            return True
        if node.op == "call_function" and node.target is torch.cat and isinstance(
                node.args[0], (tuple, list)):
            # (A cat of one node's tuple, as torch.cat(x.chunk(2, 1)), runs in float.)
            tensors = node.args[0]
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            inputs = [self.quantized_input(t) for t in tensors]
            fq_node, _, owns = self.output_fake_quant(node, relu_ok=False)
            if fq_node is None or not owns or any(i is None for i in inputs):
                return False
            scale, zero_point, _ = _qparams(self.fake_quant(fq_node))
            self.bind_output(
                self.add_module(f"{node.name}_int", quantized.Cat(dim, scale, zero_point),
                                [inputs]), node, fq_node, None)
            return True
        activation = _integer_activation(node, module)
        if activation is not None:
            fq_node, _, owns = self.output_fake_quant(node, relu_ok=False)
            if x is None or fq_node is None or not owns:
                return False
            scale, zero_point, _ = _qparams(self.fake_quant(fq_node))
            # A module keeps its path (as the norms and layers do; the C++ front end names
            # it so too), a function gets one.
            name = node.target if module is not None else f"{node.name}_int"
            self.bind_output(self.add_module(name, activation(scale, zero_point), [x]),
                             node, fq_node, None)
            return True
        if x is None:
            return False
        if _calls_one_of(node, self.gm, *_SIZE_CALLS):
            self.env[node] = self.copy(node, quantized_args=True)
            return True
        if _calls_one_of(node, self.gm, *_SPLITS):
            # Only parts taken one by one stay quantized: a slice (split[::-1]) is a tuple,
            # which the float ops after it take as float tensors.
            if not all(u.op == "call_function" and u.target is operator.getitem
                       and isinstance(u.args[1], int) for u in node.users):
                return False
            new = self.copy(node, quantized_args=True)
            self.env[node] = new
            self.tuples[new] = self.qparams[x]
            return True
        if _calls_one_of(node, self.gm, *_PASS):
            new = self.copy(node, quantized_args=True)
            self.env[node] = new
            self.qparams[new] = self.qparams[x]
            return True
        if _calls_one_of(node, self.gm, *_FIXED_QPARAMS):
            fq_node, _, owns = self.output_fake_quant(node, relu_ok=False)
            if fq_node is None or not owns:
                return False
            qparams = _qparams(self.fake_quant(fq_node))
            new = self.add_module(f"{node.name}_requantize", quantized.Requantize(*qparams),
                                  [self.copy(node, quantized_args=True)])
            self.env[node] = self.env[fq_node] = new
            self.qparams[new] = qparams
            self.report.integer.append(_describe(node))
            return True
        return False

    def float_op(self, node: fx.Node) -> None:
        inputs: List[fx.Node] = []
        fx.node.map_arg((node.args, node.kwargs), inputs.append)
        inputs = [n for n in inputs if not _is_kernel_argument(n)]
        if any(self.env[n] in self.qparams for n in inputs):
            self.report.float.append(_describe(node))
        layer = _float_layer(self.module(node)) if node.op == "call_module" else None
        if layer is not None:
            parent, _, attr = node.target.rpartition(".")
            setattr(self.gm.get_submodule(parent), attr, layer)
        if any(key in node.kwargs for key in KERNEL_KWARGS):
            # A layer left in float keeps its float bias, as it runs without a kernel.
            kwargs = {k: v for k, v in node.kwargs.items() if k not in KERNEL_KWARGS}
            self.env[node] = self.graph.create_node(
                node.op, node.target, fx.node.map_arg(node.args, self.as_float),
                fx.node.map_arg(kwargs, self.as_float), node.name)
            return
        if (node.args and isinstance(node.args[0], fx.Node)
                and _calls_one_of(node, self.gm, *_SPATIAL_SUMS)):
            # The simulation sums a contiguous tensor (a no-op copy where the island's
            # input is one already): so does the island.
            source = node.args[0]
            dense = self.graph.call_method("contiguous", (self.as_float(source),))
            self.env[node] = self.graph.node_copy(
                node, lambda n: dense if n is source else self.as_float(n))
            return
        self.env[node] = self.copy(node, quantized_args=False)


def _choose_backend(qmodel: nn.Module, backend: Optional[str]) -> None:
    """Sets the engine to convert for (the argument, else the model's Config.backend) as
    the process's quantized engine, with a warning when that changes it."""
    if backend is None:
        config = json.loads(getattr(qmodel, "qat_config", "{}") or "{}")
        backend = config.get("backend") or "qnnpack"
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"qat.convert: backend must be one of {', '.join(BACKENDS)}; "
                         f"got {backend!r}")
    check_backend("qat.convert: backend", backend)
    previous = torch.backends.quantized.engine
    if previous != backend:
        torch.backends.quantized.engine = backend
        warnings.warn(
            f"qat.convert: set torch.backends.quantized.engine from {previous!r} to "
            f"{backend!r} for this process: the integer model runs on that engine's kernels, "
            f"which are chosen when it first runs (set the engine yourself before converting "
            f"and this warning goes away)", stacklevel=3)


def convert(qmodel: nn.Module, backend: Optional[str] = None,
            return_report: bool = False):
    """The integer model of a prepared, trained or calibrated QAT model, in eval mode.

    With a dynamic config (``qat.presets.w8a8_dynamic``), Linear layers become
    ``quantized::linear_dynamic`` (float in and out, the input quantized at run time),
    LSTM / GRU layers PyTorch's dynamic quantized ones (``torch.ao.nn.quantized.dynamic``),
    and weights that never ran are observed here: no calibration is needed.

    Conv1d / Conv2d / Conv3d (batch norm folded in or not) and Linear (followed by a ReLU
    or not), ConvTranspose1d / 2d (groups 1), Embedding and EmbeddingBag (sum and mean;
    8-bit rows, per-row qparams; with ``max_norm`` every row stored renormalized as a lookup
    would leave it), standalone BatchNorm (with running statistics),
    LayerNorm, GroupNorm, hardswish, ELU, leaky ReLU, ``+``, ``*`` and ``torch.cat`` of
    quantized tensors run on ``torch.ops.quantized`` kernels with the integers and qparams
    of the simulation; relu, max pooling and reshapes run on the
    quantized tensors; sigmoid, tanh and hardsigmoid run on their fixed-qparams kernels.
    Everything else (average pooling and mean among them: their kernels round twice where
    the simulation rounds once) runs in float between a dequantize and a quantize, and is
    listed in the report. A QAT layer left in float becomes the plain PyTorch layer with its
    fake-quantized weight (batch norm folded in) as a constant, so the integer model calls
    no ``qat::`` operator; the report counts the weight elements stored as integers.

    A model that took prepare's eager fallback (torch.fx could not trace it) has no graph
    that says which quantizer precedes a layer, so no integer kernel can take a quantized
    input: its QAT convs (any padding), transposed convs (zero padding) and linears become
    weight-only layers (:class:`qat.quantized.WeightOnlyConv` / ``WeightOnlyConvTranspose`` /
    ``WeightOnlyLinear``: the weight's integers stored, as an integer layer stores them, the
    arithmetic in float on their values, the output fake-quantized with PyTorch's op); its
    QAT embeddings and embedding bags, whose input is indices, their integer tables as in a
    traced model (per-row qparams; the report lists them as integer ops); its other QAT
    layers the plain layer on the fake-quantized weight with the output's fake quantization
    after it, and any other FakeQuantize PyTorch's fake quantization. The result computes
    what the simulation computes in eval bit for bit, is a copy of the model's own class
    (scripted by :func:`qat.export` to ``.ptl`` / ``.pt``), and stores the weights of its
    convs, linears and tables as integers; the report lists each weight-only layer as float
    arithmetic. ``backend`` is not used for it (only the embedding kernels are quantized
    ones, and no engine setting changes them).

    Args:
        qmodel: a model from :func:`qat.prepare` (a ``torch.fx.GraphModule``, or the
            model itself where it took the eager fallback), or that model under
            ``torch.compile``. It is not modified.
        backend: the quantized engine whose kernels the integer model runs on:
            ``qnnpack`` (PyTorch Mobile's; bit for bit the simulation) or ``fbgemm`` (x86
            servers, where this PyTorch has it; within one quantization step of the
            simulation, as its kernels round some sums differently). None (the default)
            takes the ``backend`` of the Config the model was prepared with. The
            process's quantized engine (``torch.backends.quantized.engine``) is set to it,
            with a warning when that changes it: the kernels are the current engine's when
            the integer model first runs, so the engine stays set after convert returns.
        return_report: also return a :class:`ConversionReport`.

    Returns:
        The integer model (a ``torch.fx.GraphModule``, or for an eager-fallback model a
        copy of its own class; ``torch.jit.script`` works on it), or ``(model, report)``.

    Layers keep their names (``layer1.0.conv1`` is the integer conv of that QAT layer);
    the model keeps prepare's config as JSON in ``qat_config``.

    Raises:
        TypeError: when ``qmodel`` holds no qat.FakeQuantize (it was not prepared).
        ValueError: when a FakeQuantize never observed data (the model was neither
            calibrated nor trained), a weight, bias, batch-norm statistic or qparam holds
            NaN or inf or a batch-norm variance is negative (naming them), a weight or
            activation range has no 8-bit integer kernel, or ``backend`` is not an engine
            of this PyTorch (naming the ones it has).
    """
    qmodel = _prepared("qat.convert", qmodel)
    _check_finite(qmodel)
    if not isinstance(qmodel, fx.GraphModule):
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"qat.convert: backend must be one of {', '.join(BACKENDS)}; "
                             f"got {backend!r}")
        return _convert_eager(qmodel, return_report)
    _choose_backend(qmodel, backend)
    gm = _observed_copy(qmodel)
    config = json.loads(getattr(qmodel, "qat_config", "{}") or "{}")
    converter = _Converter(gm, dynamic=bool(config.get("dynamic")))
    converter.run()
    _float_scale_factors(converter.graph)
    converted = fx.GraphModule(gm, converter.graph, type(qmodel).__name__)
    converted.delete_all_unused_submodules()
    converted.qat_config = getattr(qmodel, "qat_config", "{}")
    converted.eval()
    report = converter.report
    report.integer_weights, report.float_weights = weight_elements(converted)
    return (converted, report) if return_report else converted


def _float_scale_factors(graph: fx.Graph) -> None:
    """Writes the scale factors of F.interpolate calls as floats: torch.fx records the
    literal the model passed (``scale_factor=2``), which TorchScript's schema (float or
    list of floats) refuses, so the integer model could not be scripted. The same scale
    either way."""
    def floats(factor):
        if isinstance(factor, int) and not isinstance(factor, bool):
            return float(factor)
        if isinstance(factor, (tuple, list)) and all(isinstance(f, int) for f in factor):
            return type(factor)(float(f) for f in factor)
        return factor

    for node in graph.nodes:
        if node.op != "call_function" or node.target not in (F.interpolate, F.upsample):
            continue
        if "scale_factor" in node.kwargs:
            node.kwargs = {**node.kwargs, "scale_factor": floats(node.kwargs["scale_factor"])}
        elif len(node.args) > 2:
            node.args = node.args[:2] + (floats(node.args[2]),) + node.args[3:]


def _observed_copy(qmodel: nn.Module) -> nn.Module:
    """A copy of ``qmodel`` in eval, its weights observed and its observers off; refused
    when an activation FakeQuantize never observed data."""
    model = copy.deepcopy(qmodel).eval()
    _observe_weights(model)
    unobserved = [name for name, m in model.named_modules()
                  if isinstance(m, FakeQuantize) and not isinstance(m, FixedQParamsFakeQuantize)
                  and not bool(torch.isfinite(m.observer.min_val).any())]
    if unobserved:
        shown = ", ".join(unobserved[:5]) + (", ..." if len(unobserved) > 5 else "")
        raise ValueError(
            f"qat.convert: {len(unobserved)} FakeQuantize modules never observed data, so "
            f"their qparams are still the initial ones ({shown}); calibrate the model "
            f"(qat.calibrate) or train it before converting")
    disable_observer(model)
    return model


def _output_fake_quant(fq: Optional[nn.Module]) -> Optional[Tuple[float, int, int, int]]:
    """(scale, zero point, quant_min, quant_max) of an output FakeQuantize that quantizes in
    eval, None for none."""
    if not isinstance(fq, FakeQuantize) or not bool(fq.fake_quant_enabled):
        return None
    scale, zero_point, _ = _qparams(fq)
    return scale, zero_point, fq.quant_min, fq.quant_max


def _weight_only(module: nn.Module, output) -> Optional[nn.Module]:
    """The weight-only layer (:class:`qat.quantized.WeightOnlyConv` / ``ConvTranspose`` /
    ``Linear``) of an eager-fallback QAT conv, transposed conv or linear whose weight
    FakeQuantize is on, None for others."""
    fq = getattr(module, "weight_fake_quant", None)
    if not isinstance(fq, FakeQuantize) or not bool(fq.fake_quant_enabled):
        return None
    with torch.no_grad():
        if isinstance(module, Linear):
            return quantized.WeightOnlyLinear(_integer_weight(_weights_of(module), fq),
                                              module.bias, fq.spec.bits, fq.quant_min, output)
        if isinstance(module, (Conv1d, Conv2d, Conv3d)):
            padding, pre_pad, pre_pad_mode = quantized._conv_padding(module)
            return quantized.WeightOnlyConv(
                _integer_weight(_weights_of(module), fq), module.bias, list(module.stride),
                padding, list(module.dilation), module.groups, output, fq.spec.bits,
                fq.quant_min, pre_pad, pre_pad_mode)
        if isinstance(module, _ConvTransposeNd) and module.padding_mode == "zeros":
            # The stored zero bias has one value per output channel of every group (the
            # weight's scales, axis 1, one per output channel of a group).
            bias = module.bias if module.bias is not None else torch.zeros(
                module.out_channels)
            return quantized.WeightOnlyConvTranspose(
                _integer_weight(_weights_of(module), fq), bias, list(module.stride),
                list(module.padding), list(module.output_padding), list(module.dilation),
                module.groups, output, fq.spec.bits, fq.quant_min)
    return None


def _integer_table(module: nn.Module) -> Optional[nn.Module]:
    """The integer table (:class:`qat.quantized.Embedding` / ``EmbeddingBag``, as
    :func:`convert` gives a traced model) of an eager-fallback QAT embedding whose weight
    FakeQuantize is on; None for other layers and for tables without a kernel. Its input
    is indices, so no quantizer has to precede it, and as a weight-only layer it has no
    output quantizer after it."""
    if not isinstance(module, (Embedding, EmbeddingBag)) or \
            not bool(module.weight_fake_quant.fake_quant_enabled):
        return None
    return _integer_embedding(module)


def _convert_eager(qmodel: nn.Module, return_report: bool):
    """:func:`convert` of a model that took :func:`qat.prepare`'s eager fallback: each QAT
    conv, transposed conv and linear becomes a weight-only layer (its integers stored,
    float arithmetic on their values, its output fake-quantized as in the simulation), each
    QAT embedding (bag) with per-row qparams its integer table, every other QAT layer the
    plain PyTorch layer on its fake-quantized weight with its output FakeQuantize after it,
    and any other FakeQuantize PyTorch's fake quantization: the model computes
    what the simulation does in eval, bit for bit, without calling qat's operators. The
    weight-only layers are new modules: the QAT layers' hooks go with them."""
    model = _observed_copy(qmodel)
    report = ConversionReport()
    replaced: List[str] = []
    for name, module in list(model.named_modules()):
        if not name or any(name.startswith(f"{done}.") for done in replaced):
            continue
        if isinstance(module, FakeQuantize):
            output = _output_fake_quant(module)
            layer = nn.Identity() if output is None else quantized.FakeQuantizeOutput(*output)
        elif isinstance(getattr(module, "weight_fake_quant", None), FakeQuantize) or \
                isinstance(module, (LSTM, GRU)):
            output = _output_fake_quant(module._modules.get("activation_post_process"))
            layer = _integer_table(module) if output is None else None
            if layer is not None:
                report.integer.append(f"{name} (integer table)")
            elif (layer := _weight_only(module, output)) is not None:
                report.float.append(f"{name} (integer weights, float arithmetic)")
            else:
                layer = _float_layer(module)
                if layer is None:
                    raise TypeError(f"qat.convert: {name} ({type(module).__name__}) has no "
                                    f"float counterpart to convert an eager-fallback model to")
                if output is not None:
                    layer = nn.Sequential(layer, quantized.FakeQuantizeOutput(*output))
                report.float.append(f"{name} (float weights)")
        else:
            continue
        _set_module(model, name, layer.eval())
        replaced.append(name)
    report.integer_weights, report.float_weights = weight_elements(model)
    return (model, report) if return_report else model


def _prepared(caller: str, qmodel) -> nn.Module:
    """The model qat.prepare made (the module a torch.compile wrapper holds); a TypeError
    naming ``caller`` for anything else."""
    qmodel = uncompiled(qmodel)
    if not isinstance(qmodel, nn.Module) or not holds_fake_quantize(qmodel):
        without = " without any" if isinstance(qmodel, nn.Module) else ""
        raise TypeError(
            f"{caller}: expected a model prepared by qat.prepare (holding qat.FakeQuantize "
            f"modules), got {type(qmodel).__name__}{without}")
    return qmodel


def _output_step(qmodel: nn.Module) -> float:
    """The quantization step of the model's output: the scale of the FakeQuantize that
    feeds the graph's output."""
    if not isinstance(qmodel, fx.GraphModule):
        raise TypeError("qat.compare: the QAT model took qat.prepare's eager fallback, so no "
                        "graph tells which FakeQuantize its output comes from (and its step)")
    output = next(n for n in reversed(qmodel.graph.nodes) if n.op == "output")
    source = output.args[0]
    if isinstance(source, (tuple, list, dict)):
        # (fx keeps a returned list or dict as its own immutable subclass.)
        kind = next(k for k in (tuple, list, dict) if isinstance(source, k)).__name__
        raise ValueError(f"qat.compare: the model returns a {kind} of "
                         f"outputs; compare measures models with one tensor output (compare "
                         f"a wrapper that returns the output of interest)")
    while isinstance(source, fx.Node):
        module = qmodel.get_submodule(source.target) if source.op == "call_module" else None
        if isinstance(module, FakeQuantize) and module.scale.numel() == 1:
            return float(module.scale.detach())
        if not (_calls_one_of(source, qmodel, *_PASS) and source.args):
            break
        source = source.args[0]  # relu, flatten, ...: the step of their input
    raise ValueError("qat.compare: the model's output does not come from a per-tensor "
                     "qat.FakeQuantize, so it has no quantization step")


def compare(qmodel: nn.Module, int_model, inputs) -> Dict[str, float]:
    """Parity of the integer model with the simulation it was converted from, on
    ``inputs`` (a tensor, or an iterable of tensors / ``(input, ...)`` batches, each input
    a tensor, a tuple of the model's arguments or a dict of them, as :func:`qat.calibrate`
    takes them).

    ``int_model`` is the integer model, or the path of a file :func:`qat.export` wrote
    (``.pte`` run in ExecuTorch's runtime, ``.ptl`` in the lite interpreter, ``.pt`` in
    TorchScript, ``.onnx`` in ONNX Runtime; see :func:`qat.export.load`). A ``.pte``
    program takes inputs of the example input's shape and dtype only (others: ValueError).

    Returns a dict: ``max_steps`` (the largest output difference in quantization steps of
    the output), ``within_one_step`` (the share of output elements within one step),
    ``top1_agreement`` (share of rows whose argmax agrees, for 2-D outputs; NaN
    otherwise) and ``sqnr_db`` (signal-to-quantization-noise ratio of the integer output
    against the simulation's, in dB).

    Raises:
        TypeError: when ``qmodel`` holds no qat.FakeQuantize (the float model, not the one
            qat.prepare returned).
    """
    qmodel = _prepared("qat.compare", qmodel)
    step = _output_step(qmodel)
    if isinstance(int_model, (str, os.PathLike)):
        from .export import load  # export converts with this module

        int_model, _ = load(int_model)
    simulation = copy.deepcopy(qmodel).eval()
    disable_observer(simulation)
    batches = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
    if not batches:
        raise ValueError("qat.compare: inputs holds no batches; give a tensor or an iterable "
                         "of at least one batch")
    expected, got = [], []
    with torch.no_grad():
        for batch in batches:
            expected.append(run_batch("qat.compare", simulation, batch).float())
            got.append(run_batch("qat.compare", int_model, batch).float())
    a = torch.cat([t.reshape(len(t), -1) for t in expected])
    b = torch.cat([t.reshape(len(t), -1) for t in got])
    steps = (a - b).abs() / step
    noise = (a - b).pow(2).sum().item()
    signal = a.pow(2).sum().item()
    return {
        "max_steps": steps.max().item() if steps.numel() else 0.0,
        "within_one_step": (steps <= 1 + 1e-3).float().mean().item(),
        "top1_agreement": ((a.argmax(1) == b.argmax(1)).float().mean().item()
                           if expected[0].dim() == 2 else math.nan),
        "sqnr_db": math.inf if noise == 0 else 10 * math.log10(signal / noise),
    }
