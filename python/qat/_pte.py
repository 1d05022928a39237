"""The ExecuTorch emitter: a converted integer model as a ``.pte`` program whose integer ops
XNNPACK runs.

The program is built from the lowered form, not by re-tracing the float model: each integer
op of the converted model (``module.lowered(name)``) becomes float arithmetic between
PyTorch's ``quantized_decomposed`` quantize / dequantize ops, with the simulation's scales,
zero points and integer weights, which XNNPACK's partitioner recognizes and runs as int8
kernels. Unsigned 8-bit activations are written as signed ones with the zero point moved
by 128: the same real values, in the type XNNPACK's kernels take.

Ops that run on quantized tensors in the integer model without an integer module of their
own (ReLU, max pooling, reshapes, the fixed-range kernels) keep their input's qparams or
take fixed ones; which qparams each tensor carries is read from one run of the converted
model on the example inputs, so this emitter decides nothing the integer model did not."""

import inspect
import json
import math
import operator
import os
import re
import subprocess
import sys
import tempfile
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.ao.nn.quantized import dynamic

from . import quantized

__all__ = ["available", "emit", "load", "lower", "read_metadata_text", "run_fresh"]

# What a quantized tensor of the integer model carries: scale, zero point, dtype.
_QParams = Tuple[float, int, torch.dtype]

# The ops ExecuTorch programs hold for integer ops, registered by this import.
_DECOMPOSED = "torch.ao.quantization.fx._decomposed"


def available() -> Optional[str]:
    """None where ExecuTorch's exporter and runtime import here, else why not."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import executorch.exir  # noqa: F401
            from executorch.backends.xnnpack.partition.xnnpack_partitioner import (  # noqa: F401
                XnnpackPartitioner)
            from executorch.extension.pybindings import portable_lib  # noqa: F401
    except Exception as error:  # noqa: BLE001 - an absent or broken install alike
        return (f"ExecuTorch is not installed for this PyTorch ({torch.__version__}): "
                f"{type(error).__name__}: {error}")
    return None


def _ops():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        __import__(_DECOMPOSED)
    return torch.ops.quantized_decomposed


class _Recorder(fx.Interpreter):
    """Runs the converted model once, noting each quantized tensor's qparams, each tensor's
    shape and dtype, and which nodes compute sizes (numbers, not tensors) by node."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.qparams: Dict[fx.Node, _QParams] = {}
        self.shapes: Dict[fx.Node, Tuple[int, ...]] = {}
        self.dtypes: Dict[fx.Node, torch.dtype] = {}
        self.sizes = set()

    def run_node(self, node: fx.Node):
        out = super().run_node(node)
        if isinstance(out, torch.Tensor):
            self.shapes[node] = tuple(out.shape)
            self.dtypes[node] = out.dtype
        elif isinstance(out, (int, float)) or (
                isinstance(out, tuple) and all(isinstance(v, int) for v in out)):
            self.sizes.add(node)
        if isinstance(out, torch.Tensor) and out.is_quantized:
            if out.qscheme() != torch.per_tensor_affine:
                raise ValueError(f"qat.export: {node.name} gives a tensor quantized per "
                                 f"channel; .pte activations are quantized per tensor")
            self.qparams[node] = (out.q_scale(), out.q_zero_point(), out.dtype)
        return out


def pair_value(node: fx.Node, module: nn.Module, env: Dict, recorded: Dict[fx.Node, _QParams],
               quantize: Callable):
    """What the integer model's Quantize / DeQuantize ``module`` at ``node`` becomes in an
    emitter whose tensors are float between quantize / dequantize pairs (the .pte and .onnx
    ones): a DeQuantize, or a Quantize to the grid its input is on already, passes its
    input's value on; another Quantize is ``quantize(value, qparams)``."""
    source = node.args[0]
    if isinstance(module, quantized.DeQuantize) or recorded.get(source) == recorded[node]:
        return env[source]
    return quantize(env[source], recorded[node])


def _signed(qparams: _QParams) -> Tuple[float, int]:
    """(scale, zero point) of the same values in int8: quint8 v is int8 v - 128."""
    scale, zero_point, dtype = qparams
    return scale, zero_point - 128 if dtype == torch.quint8 else zero_point


# The integer convs by their lowered kind, and the float conv each is emitted as.
_CONVS = {"Conv1d": torch.conv1d, "Conv2d": torch.conv2d}
_TRANSPOSED_CONVS = {"ConvTranspose1d": torch.conv_transpose1d,
                     "ConvTranspose2d": torch.conv_transpose2d}


def _bags(indices: torch.Tensor, table: torch.Tensor, offsets: Optional[torch.Tensor],
          per_sample_weights: Optional[torch.Tensor], mode: str,
          include_last_offset: bool) -> torch.Tensor:
    """``F.embedding_bag`` in ops of the Core ATen opset: the rows looked up (weighted
    first where per-sample weights are given), then per bag their sum, mean or max. 2-D
    indices are one bag per row; 1-D indices are cut at their ``offsets`` (the last one,
    with ``include_last_offset``, only ends the last bag): each index's bag is the number
    of starts at or before it, less one, and a 0/1 matrix of bags by indices sums each
    bag's rows. An empty bag gives 0, as PyTorch's."""
    rows = F.embedding(indices, table)
    if per_sample_weights is not None:
        rows = rows * per_sample_weights.unsqueeze(-1)
    if indices.dim() == 2:
        if mode == "max":
            return rows.amax(1)
        sums = rows.sum(1)
        return sums / indices.size(1) if mode == "mean" else sums
    starts = offsets[:-1] if include_last_offset else offsets
    positions = torch.arange(indices.numel(), device=indices.device)
    bag_of = (starts.unsqueeze(0) <= positions.unsqueeze(1)).sum(1) - 1
    member = torch.arange(starts.numel(), device=indices.device).unsqueeze(1) == bag_of
    sizes = member.sum(1, keepdim=True)
    if mode == "max":
        masked = torch.where(member.unsqueeze(-1), rows.unsqueeze(0),
                             torch.full_like(rows[:1], -math.inf))
        return torch.where(sizes > 0, masked.amax(1), torch.zeros_like(masked[:, 0]))
    sums = member.to(rows.dtype).mm(rows)
    return sums / sizes.clamp_min(1).to(rows.dtype) if mode == "mean" else sums


def bag_arguments(node: fx.Node, module: nn.Module) -> list:
    """The (indices, offsets, per_sample_weights) an embedding bag's graph node passes
    (None where not given), for the integer bag and the float one alike (whose forward
    calls its indices ``input``)."""
    bound = inspect.signature(module.forward).bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    return list(bound.arguments.values())[:3]


class _Emitter:
    def __init__(self, gm: fx.GraphModule, qparams: Dict[fx.Node, _QParams]):
        self.gm = gm
        self.recorded = qparams
        self.graph = fx.Graph()
        self.root = nn.Module()
        self.env: Dict[fx.Node, fx.Node] = {}
        self.ops = _ops()
        self.names = set()
        self.int8_stored: List[str] = []  # sub-8-bit weights XNNPACK takes as int8 only
        self.float_stored: List[str] = []  # tables no kernel of the runtime reads as integers

    def attr(self, name: str, value) -> str:
        """``value`` (a module or a tensor) as an attribute of the new model, under a free
        name made from ``name``, which it returns."""
        name = name.replace(".", "_")
        base, count = name, 0
        while name in self.names:
            count += 1
            name = f"{base}_{count}"
        self.names.add(name)
        if isinstance(value, nn.Module):
            self.root.add_module(name, value)
        else:
            self.root.register_buffer(name, value)
        return name

    def constants(self, name: str, module: nn.Module, *attributes: str) -> List:
        """The tensors ``attributes`` of ``module`` (``name``) as constants of the new model
        (get_attr nodes), None for those that are None."""
        return [None if getattr(module, a) is None
                else self.graph.get_attr(self.attr(f"{name}.{a}", getattr(module, a)))
                for a in attributes]

    def quantize(self, x: fx.Node, qparams: _QParams) -> fx.Node:
        """``x`` rounded to the grid of ``qparams`` (quantize, then dequantize: the pair
        XNNPACK's partitioner reads as an int8 tensor between kernels)."""
        scale, zero_point = _signed(qparams)
        args = (scale, zero_point, -128, 127, torch.int8)
        q = self.graph.call_function(self.ops.quantize_per_tensor.default, (x,) + args)
        return self.graph.call_function(self.ops.dequantize_per_tensor.default, (q,) + args)

    def dynamic(self, x: fx.Node) -> fx.Node:
        """``x`` quantized to int8 with qparams chosen from its own range at run time."""
        args = (-128, 127, torch.finfo(torch.float32).eps, torch.int8)
        qparams = self.graph.call_function(self.ops.choose_qparams.tensor, (x,) + args)
        scale = self.graph.call_function(operator.getitem, (qparams, 0))
        zero_point = self.graph.call_function(operator.getitem, (qparams, 1))
        q = self.graph.call_function(self.ops.quantize_per_tensor.tensor,
                                     (x, scale, zero_point, -128, 127, torch.int8))
        return self.graph.call_function(self.ops.dequantize_per_tensor.tensor,
                                        (q, scale, zero_point, -128, 127, torch.int8))

    def weight(self, op) -> fx.Node:
        """The dequantized integer weight of a lowered conv / linear: int8 integers stored
        as they are, dequantized in the graph, as XNNPACK expects a quantized weight."""
        w = op.weight
        ints = self.graph.get_attr(self.attr(f"{op.name}.weight", w.int_repr()))
        low, high = op.weight_quant_min, 2 ** (op.weight_bits - 1) - 1
        if (op.kind in _CONVS or op.kind in _TRANSPOSED_CONVS) and op.weight_bits < 8:
            # XNNPACK's 4-bit weight kernels are for linears only; a conv's sub-8-bit
            # integers are stored as int8 (the same values).
            low, high = -128, 127
            self.int8_stored.append(op.name)
        if w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            scales = self.graph.get_attr(self.attr(f"{op.name}.weight_scale",
                                                   w.q_per_channel_scales().float()))
            zero_points = self.graph.get_attr(self.attr(
                f"{op.name}.weight_zero_point", w.q_per_channel_zero_points().long()))
            return self.graph.call_function(
                self.ops.dequantize_per_channel.default,
                (ints, scales, zero_points, w.q_per_channel_axis(), low, high, torch.int8))
        return self.graph.call_function(
            self.ops.dequantize_per_tensor.default,
            (ints, w.q_scale(), w.q_zero_point(), low, high, torch.int8))

    def bias(self, op) -> Optional[fx.Node]:
        if op.bias is None:
            return None
        return self.graph.get_attr(self.attr(f"{op.name}.bias", op.bias.detach().float()))

    def integer_op(self, node: fx.Node, module: nn.Module) -> fx.Node:
        """The float arithmetic of one integer module, quantized to its output qparams."""
        op = module.lowered(node.target)
        args = [self.env[a] if isinstance(a, fx.Node) else a for a in node.args]
        if op.kind in _CONVS:
            y = self.graph.call_function(_CONVS[op.kind], (
                args[0], self.weight(op), self.bias(op), list(op.stride), list(op.padding),
                list(op.dilation), op.groups))
        elif op.kind in _TRANSPOSED_CONVS:
            y = self.graph.call_function(_TRANSPOSED_CONVS[op.kind], (
                args[0], self.weight(op), self.bias(op), list(op.stride), list(op.padding),
                list(op.output_padding), op.groups, list(op.dilation)))
        elif isinstance(module, quantized.LinearDynamic):
            # The input quantized at run time to its own range, as quantized::linear_dynamic
            # does, in the pattern XNNPACK runs as a dynamically quantized linear; float out.
            return self.graph.call_function(
                F.linear, (self.dynamic(args[0]), self.weight(op), self.bias(op)))
        elif isinstance(module, quantized.Linear):
            y = self.graph.call_function(F.linear, (args[0], self.weight(op), self.bias(op)))
        elif isinstance(module, (quantized.Add, quantized.Mul)):
            fn = torch.add if isinstance(module, quantized.Add) else torch.mul
            y = self.graph.call_function(fn, (args[0], args[1]))
        elif isinstance(module, quantized.Cat):
            # XNNPACK concatenates on one grid: each input is requantized to the output's
            # first, as quantized::cat does in the integer model.
            inputs = [self.env[a] if self.recorded.get(a) == self.recorded[node]
                      else self.quantize(self.env[a], self.recorded[node])
                      for a in node.args[0]]
            y = self.graph.call_function(torch.cat, (inputs, module.dim))
        elif isinstance(module, quantized.Hardswish):
            y = self.graph.call_function(F.hardswish, (args[0],))
        elif isinstance(module, quantized.ELU):
            y = self.graph.call_function(F.elu, (args[0], module.alpha))
        elif isinstance(module, quantized.LeakyReLU):
            y = self.graph.call_function(F.leaky_relu, (args[0], module.negative_slope))
        elif isinstance(module, quantized.BatchNorm):
            # Its affine map (weight, bias), with the running statistics 0 and 1 it keeps.
            stats = [self.graph.get_attr(self.attr(f"{node.target}.{what}", fill(module.weight)))
                     for what, fill in (("running_mean", torch.zeros_like),
                                        ("running_var", torch.ones_like))]
            affine = self.constants(node.target, module, "weight", "bias")
            y = self.graph.call_function(F.batch_norm,
                                         (args[0], *stats, *affine, False, 0.0, module.eps))
        elif isinstance(module, (quantized.LayerNorm, quantized.GroupNorm)):
            affine = self.constants(node.target, module, "weight", "bias")
            if isinstance(module, quantized.LayerNorm):
                y = self.graph.call_function(F.layer_norm, (args[0], module.normalized_shape,
                                                            *affine, module.eps))
            else:
                y = self.graph.call_function(F.group_norm, (args[0], module.num_groups,
                                                            *affine, module.eps))
        elif isinstance(module, quantized.Conv3d):
            raise TypeError(f"qat.export: no .pte lowering for the 3-D conv {node.target}: "
                            f"neither XNNPACK nor ExecuTorch's portable kernels have a 3-D "
                            f"convolution; export it as .ptl or .pt")
        else:
            raise TypeError(f"qat.export: no .pte lowering for {type(module).__name__} "
                            f"({node.target})")
        if op.relu:
            y = self.graph.call_function(F.relu, (y,))
        return self.quantize(y, self.recorded[node])

    def embedding(self, node: fx.Node, module: quantized.Embedding) -> fx.Node:
        """An integer embedding as a float lookup in the values of its integers: XNNPACK
        has no embedding kernel, and ExecuTorch's runtime does not ship its quantized
        embedding kernels by default, so the table is stored in float (and reported)."""
        self.float_stored.append(node.target)
        weight = self.graph.get_attr(self.attr(f"{node.target}.weight",
                                               module.table().dequantize()))
        if isinstance(module, quantized.EmbeddingBag):
            return self.bags(node, module, weight)
        return self.graph.call_function(F.embedding, (self._arg(node.args[0]), weight))

    def bags(self, node: fx.Node, module: nn.Module, weight: fx.Node) -> fx.Node:
        """An embedding bag (integer, or float where the Config skips it) as
        :func:`_bags` over ``weight``: ``embedding_bag`` is not in the Core ATen opset that
        ExecuTorch lowers."""
        args = [self._arg(a) for a in bag_arguments(node, module)]
        if isinstance(module, nn.EmbeddingBag) and (module.max_norm is not None
                                                    or module.padding_idx is not None):
            raise TypeError(f"qat.export: no .pte lowering for the embedding bag "
                            f"{node.target} with max_norm or padding_idx; export it as .ptl, "
                            f".pt or .onnx")
        return self.graph.call_function(
            _bags, (args[0], weight, *args[1:], module.mode, module.include_last_offset))

    def recurrent(self, node: fx.Node, module: nn.Module) -> fx.Node:
        """A dynamic quantized LSTM / GRU as the float layer over the values of its
        integers: ExecuTorch has no dynamic quantized recurrent kernel (reported as stored
        in float, like embedding tables)."""
        self.float_stored.append(node.target)
        float_cls = nn.LSTM if isinstance(module, dynamic.LSTM) else nn.GRU
        layer = float_cls(module.input_size, module.hidden_size, module.num_layers,
                          bias=module.bias, batch_first=module.batch_first,
                          dropout=float(module.dropout), bidirectional=module.bidirectional)
        values = {**module.get_weight(), **module.get_bias()}
        for name, value in values.items():
            value = value.dequantize() if value.is_quantized else value
            setattr(layer, name, nn.Parameter(value.detach().float(), requires_grad=False))
        return self.graph.call_module(
            self.attr(node.target, layer.eval()),
            *fx.node.map_aggregate((node.args, node.kwargs), self._arg))

    def node(self, node: fx.Node) -> fx.Node:
        if node.op == "placeholder":
            return self.graph.placeholder(node.target)
        if node.op == "output":
            return self.graph.output(fx.node.map_arg(node.args[0], self.env.__getitem__))
        if node.op == "get_attr":
            return self.graph.get_attr(
                self.attr(node.target, operator.attrgetter(node.target)(self.gm)))
        if node.op == "call_module":
            module = self.gm.get_submodule(node.target)
            if isinstance(module, (quantized.Quantize, quantized.DeQuantize)):
                return pair_value(node, module, self.env, self.recorded, self.quantize)
            if isinstance(module, quantized._WithOutputQParams):
                return self.integer_op(node, module)
            if isinstance(module, quantized.Embedding):
                return self.embedding(node, module)
            if isinstance(module, nn.EmbeddingBag):
                return self.bags(node, module, self.graph.get_attr(self.attr(
                    f"{node.target}.weight", module.weight.detach())))
            if isinstance(module, (dynamic.LSTM, dynamic.GRU)):
                return self.recurrent(node, module)
            new = self.graph.call_module(
                self.attr(node.target, module),
                *fx.node.map_aggregate((node.args, node.kwargs), self._arg))
        else:
            new = self.graph.create_node(
                node.op, node.target, *fx.node.map_aggregate((node.args, node.kwargs), self._arg))
        # An op that ran on quantized tensors (ReLU, max pooling, a reshape, a fixed-range
        # kernel) wrote its output on a grid: the pair after it says which.
        if node in self.recorded:
            return self.quantize(new, self.recorded[node])
        return new

    def _arg(self, a):
        return self.env[a] if isinstance(a, fx.Node) else a

    def run(self) -> fx.GraphModule:
        for node in self.gm.graph.nodes:
            self.env[node] = self.node(node)
        self.dequantize_per_user()
        return fx.GraphModule(self.root, self.graph, type(self.gm).__name__)

    def dequantize_per_user(self) -> None:
        """Gives each user of a shared dequantize its own copy, as PyTorch's PT2E convert
        does: XNNPACK's partitioner takes a dequantize into the partition of its user, and
        one shared by two partitions (a residual input, a cat's input) makes a cycle."""
        for node in list(self.graph.nodes):
            if node.target is not self.ops.dequantize_per_tensor.default or len(node.users) < 2:
                continue
            for user in list(node.users)[1:]:
                with self.graph.inserting_after(node):
                    copy = self.graph.call_function(node.target, node.args, node.kwargs)
                user.replace_input_with(node, copy)


def _emit_qdq(int_model: fx.GraphModule,
              inputs: tuple) -> Tuple[fx.GraphModule, List[str], List[str]]:
    """(The float model with quantize / dequantize pairs that computes what ``int_model``
    (from :func:`qat.convert`) computes, ready for ``torch.export``; the layers whose
    sub-8-bit weights it stores as int8; the embeddings whose tables it stores in float)."""
    if not isinstance(int_model, fx.GraphModule):
        raise TypeError(f"qat.export: a .pte is written from a QAT model or one converted "
                        f"by qat.convert (a torch.fx.GraphModule), got "
                        f"{type(int_model).__name__}")
    recorder = _Recorder(int_model)
    with torch.no_grad():
        recorder.run(*inputs)
    emitter = _Emitter(int_model, recorder.qparams)
    return emitter.run().eval(), emitter.int8_stored, emitter.float_stored


# Ops whose absence from XNNPACK's part of the program is worth naming in the report; the
# rest of what stays outside (getitem, views) costs nothing.
_SKIP_IN_REPORT = {"getitem", "executorch_call_delegate"}


def _not_delegated(program) -> List[str]:
    """The ops of the lowered program that run outside XNNPACK, by their ATen names."""
    names = [getattr(node.target, "__name__", str(node.target))
             for node in program.graph_module.graph.nodes if node.op == "call_function"]
    return [name for name in names if name.split(".")[0] not in _SKIP_IN_REPORT]


def _count(graph_module, names) -> int:
    return sum(1 for n in graph_module.graph.nodes if n.op == "call_function"
               and getattr(n.target, "__name__", "").split(".")[0] in names)


# A traced graph's convs and linears, before the edge dialect (conv2d, linear, ...) and
# after it (convolution, addmm / mm), where those left outside XNNPACK's part are counted.
_LAYERS = {"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "linear",
           "convolution", "addmm", "mm"}


def _lowering_error(stage: str, error: Exception) -> RuntimeError:
    """A RuntimeError that says which stage failed and, where the message names one, on
    which ATen op, with the first line of what the stage said."""
    text = str(error)
    ops = re.findall(r"aten\.\w+(?:\.\w+)?", text)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    op = f" (at {ops[0]})" if ops else ""
    return RuntimeError(f"qat.export: ExecuTorch cannot {stage}{op}, so no .pte was written: "
                        f"{type(error).__name__}: "
                        f"{lines[0] if lines else 'no message'}")


_PADS = (torch.ops.aten.pad.default, torch.ops.aten.constant_pad_nd.default)


def _argument(node: fx.Node, position: int, name: str, default=None):
    """Argument ``name`` of a call, given at ``position`` or by name, else ``default``."""
    if len(node.args) > position:
        return node.args[position]
    return node.kwargs.get(name, default)


def _mend_pads(graph_module: fx.GraphModule) -> None:
    """Pads of a dequantized tensor as XNNPACK builds them. One that adds nothing (all
    widths 0: Swin's window partition and patch merging on whole windows and even sides) is
    removed; one whose output no quantize follows (Swin's roll after it, which stays outside
    XNNPACK) gets the quantize / dequantize pair of its input's grid after it, exact since
    it adds zeros (or copies) to values on that grid. XNNPACK refuses to build either pad
    otherwise ("Failed to create StaticConstantPad node ... xnn_status_invalid_parameter":
    the program would not load)."""
    ops = torch.ops.quantized_decomposed
    graph = graph_module.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _PADS:
            continue
        if not any(node.args[1]):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            continue
        source = node.args[0]
        if node.target is torch.ops.aten.constant_pad_nd.default:
            mode, value = "constant", _argument(node, 2, "value", 0)
        else:
            mode, value = _argument(node, 2, "mode", "constant"), _argument(node, 3, "value")
        # A reflection or replication copies values; zeros are on every grid.
        on_grid = mode != "constant" or not value
        if (not on_grid or source.op != "call_function"
                or source.target is not ops.dequantize_per_tensor.default
                or all(user.target is ops.quantize_per_tensor.default for user in node.users)):
            continue
        grid = tuple(source.args[1:])
        with graph.inserting_after(node):
            quantized = graph.call_function(ops.quantize_per_tensor.default, (node,) + grid)
        with graph.inserting_after(quantized):
            values = graph.call_function(ops.dequantize_per_tensor.default, (quantized,) + grid)
        node.replace_all_uses_with(values, delete_user_cb=lambda user: user is not quantized)
    graph_module.recompile()


def lower(model: nn.Module, inputs: tuple, metadata: Optional[dict] = None,
          report: Optional[dict] = None) -> Tuple[bytes, dict]:
    """``model`` (float, or quantize / dequantize pairs around float ops) as a ``.pte``
    program lowered with XNNPACK's partitioner, and the delegation report: how many convs /
    linears it has and XNNPACK runs, and the ops left outside XNNPACK, added to ``report``.
    With ``metadata``, the program's ``qat_metadata`` method returns it as JSON with the
    report under ``executorch``."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeProgramManager, to_edge_transform_and_lower

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            exported = torch.export.export(model, inputs, strict=False)
        except Exception as error:  # noqa: BLE001 - torch.export raises many kinds
            raise _lowering_error("export this model (torch.export)", error) from error
        _mend_pads(exported.graph_module)
        layers = _count(exported.graph_module, _LAYERS)
        try:
            edge = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()])
        except Exception as error:  # noqa: BLE001 - so does ExecuTorch's lowering
            raise _lowering_error("lower this model to its edge dialect", error) from error
        lowered = edge.exported_program()
        report = {"layers": layers,
                  "layers_delegated": layers - _count(lowered.graph_module, _LAYERS),
                  "not_delegated": _not_delegated(lowered), **(report or {})}
        if metadata is not None:
            # The report is known once the program is lowered; the metadata method that
            # carries it is added to the lowered program as the partitioner's own step does.
            edge = EdgeProgramManager(
                {"forward": lowered},
                {"qat_metadata": json.dumps({**metadata, "executorch": report})},
                edge.compile_config)
        program = edge.to_executorch()
    return program.buffer, report


def emit(int_model: fx.GraphModule, inputs: tuple, metadata: dict) -> Tuple[bytes, dict]:
    """The ``.pte`` program of ``int_model`` (:func:`_emit_qdq`, then :func:`lower`), with
    ``metadata`` and the delegation report (also naming the convs whose sub-8-bit weights
    are stored as int8) in its ``qat_metadata`` method; and that report."""
    model, int8_stored, float_stored = _emit_qdq(int_model, inputs)
    return lower(model, inputs, metadata, {"sub_8bit_weights_as_int8": int8_stored,
                                           "weights_as_float": float_stored})


# Loads a .pte with ExecuTorch's runtime alone and runs it on saved inputs: the check of a
# written file, in a process that has not imported qat.
_FRESH_CHECK = """
import sys, torch
from executorch.extension.pybindings.portable_lib import _load_for_executorch
program = _load_for_executorch(sys.argv[1])
inputs = torch.load(sys.argv[2])
outputs = program.forward(list(inputs))
assert "qat" not in sys.modules, "the check imported qat"
torch.save([o.clone() for o in outputs], sys.argv[3])
"""


def run_fresh(path: str, inputs: tuple) -> List[torch.Tensor]:
    """The outputs of the ``.pte`` at ``path`` on ``inputs``, computed by ExecuTorch's
    runtime in a fresh Python process that does not import qat."""
    with tempfile.TemporaryDirectory() as folder:
        saved_in = os.path.join(folder, "inputs.pt")
        saved_out = os.path.join(folder, "outputs.pt")
        torch.save(tuple(t.contiguous() for t in inputs), saved_in)
        done = subprocess.run([sys.executable, "-c", _FRESH_CHECK, path, saved_in, saved_out],
                              capture_output=True, text=True, cwd=folder)
        if done.returncode != 0:
            lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
            # The runtime logs why (an XNNPACK status, a missing operator) before the
            # exception, which only gives an error code.
            # (cpuinfo's notes about files this machine lacks are not among the causes.)
            causes = [line for line in lines if ("fail" in line.lower() or "missing" in
                      line.lower()) and "cpuinfo" not in line][:3] or lines[-1:] or [
                          f"exit status {done.returncode}"]
            hint = ""
            if any("xnn_status_unsupported_parameter" in line for line in causes):
                hint = ("; XNNPACK bounds the ratio of an op's input and output scales "
                        "(e.g. input scale x weight scale / output scale below 256), which "
                        "an output range collapsed to its floor exceeds: train or calibrate "
                        "on real data")
            raise RuntimeError(f"qat.export: ExecuTorch's runtime could not run the program "
                               f"for {path!r} in a fresh process: {' / '.join(causes)}{hint}")
        return torch.load(saved_out)


def load(path: str):
    """ExecuTorch's runtime module of the program at ``path``."""
    from executorch.extension.pybindings.portable_lib import _load_for_executorch

    try:
        return _load_for_executorch(path)
    except RuntimeError as error:
        raise ValueError(f"qat: {path!r} is not an ExecuTorch program ExecuTorch's runtime "
                         f"can load ({error})") from None


# ExecuTorch's codes of the dtypes a program's inputs may take (c10's ScalarType numbering).
_INPUT_DTYPES = {0: torch.uint8, 1: torch.int8, 2: torch.int16, 3: torch.int32, 4: torch.int64,
                 5: torch.float16, 6: torch.float32, 7: torch.float64, 11: torch.bool,
                 15: torch.bfloat16}


def input_signature(program) -> List[Tuple[Tuple[int, ...], object]]:
    """(shape, dtype) of each input of the program's ``forward`` (the dtype as ExecuTorch's
    code where it is none of _INPUT_DTYPES)."""
    meta = program.method_meta("forward")
    infos = [meta.input_tensor_meta(i) for i in range(meta.num_inputs())]
    return [(tuple(info.sizes()), _INPUT_DTYPES.get(int(info.dtype()),
                                                    f"ScalarType {int(info.dtype())}"))
            for info in infos]


def check_inputs(path: str, signature, inputs) -> None:
    """Fails, naming the input and what the program takes, when ``inputs`` do not fit the
    program's ``forward`` (its :func:`input_signature`): ExecuTorch's runtime only answers
    with an error code (0x10 for a shape, 0x12 for a dtype or a count). qat's programs have
    the fixed shapes of the example input they were exported with."""
    if len(inputs) != len(signature):
        raise ValueError(f"{path}: the program takes {len(signature)} input(s), got "
                         f"{len(inputs)}")
    for i, (x, (shape, dtype)) in enumerate(zip(inputs, signature)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{path}: input {i} must be a tensor of shape {shape} and dtype "
                             f"{dtype}, got {type(x).__name__}")
        if tuple(x.shape) != shape:
            raise ValueError(
                f"{path}: input {i} has shape {tuple(x.shape)}, but the program takes {shape}: "
                f"an ExecuTorch program keeps the shapes of the example input it was exported "
                f"with (export with an example input of the shape it will run on)")
        if x.dtype != dtype:
            raise ValueError(f"{path}: input {i} has dtype {x.dtype}, but the program takes "
                             f"{dtype}")


def read_metadata_text(path: str) -> Optional[str]:
    """The metadata JSON a ``.pte`` written by qat carries (its ``qat_metadata`` method), or
    None when it has no such method."""
    program = load(path)
    if "qat_metadata" not in program.method_names():
        return None
    return program.run_method("qat_metadata", [])[0]
