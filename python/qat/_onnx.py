"""The ONNX emitter: a converted integer model as a QDQ ONNX graph that ONNX Runtime runs on
integer kernels.

The graph is built from the lowered form, not by re-tracing the float model: each integer op
of the converted model (``module.lowered(name)``) becomes its float ONNX op between
``DequantizeLinear`` inputs and a ``QuantizeLinear`` / ``DequantizeLinear`` pair with the
simulation's output qparams. Weights are stored as their integers (int8 initializers, per
channel scales along their axis) behind a ``DequantizeLinear``, biases as the float values of
the int32 multiples of input scale x weight scale that the integer kernels add (what
``qat::round_bias`` simulates). ONNX Runtime's graph optimizer fuses each dequantize -> op ->
quantize group into an integer kernel (``QLinearConv``, ``QGemm``, ``QLinearAdd``, ...).

Which qparams each tensor carries is read from one run of the converted model on the example
inputs (as the ExecuTorch emitter does), so this emitter decides nothing the integer model
did not."""

import inspect
import itertools
import json
import math
import operator
import os
import subprocess
import sys
import tempfile
from types import SimpleNamespace
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.ao.nn.quantized import dynamic

from . import _op_roles, _transformer, quantized
from ._pte import _QParams, _Recorder, bag_arguments, pair_value
from .modules.registry import registered_base

__all__ = ["METADATA_KEY", "OPSET", "available", "batch_layouts", "emit", "grown", "load",
           "read_metadata_text", "run_fresh"]

# The model's metadata_props entry that holds qat's metadata (JSON).
METADATA_KEY = "qat_metadata"

# LayerNormalization is in the default domain from opset 17 on; ONNX Runtime's QDQ fusions
# cover it.
OPSET = 17

# ONNX Runtime's integer kernels that its QDQ fusions make of a conv / linear, and the float
# ops that a conv / linear stays when a group is not fused.
_INTEGER_LAYERS = {"QLinearConv", "QLinearMatMul", "QGemm", "ConvInteger", "MatMulInteger",
                   "QLinearConvTranspose", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}
_FLOAT_LAYERS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "FusedConv", "FusedGemm",
                 "FusedMatMul"}
# Ops of an optimized graph that compute nothing in float worth naming in the report.
_NOT_COMPUTE = {"QuantizeLinear", "DequantizeLinear", "Reshape", "Flatten", "Identity",
                "Shape", "Slice", "Concat", "Transpose", "Squeeze", "Unsqueeze", "MaxPool",
                "Relu", "Gather", "Split", "ReorderInput", "ReorderOutput", "Range",
                "ConstantOfShape"}
# PyTorch's padding modes as ONNX Pad's; circular has no Pad mode at opset 17.
_PAD_MODES = {"constant": "constant", "reflect": "reflect", "replicate": "edge"}


def available() -> Optional[str]:
    """None where the onnx package and ONNX Runtime import here, else why not."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except Exception as error:  # noqa: BLE001 - an absent or broken install alike
        return f"the onnx and onnxruntime packages are not installed ({type(error).__name__}: " \
               f"{error})"
    return None


def _np_dtype(dtype: torch.dtype):
    if dtype == torch.quint8:
        return np.uint8
    if dtype == torch.qint8:
        return np.int8
    raise TypeError(f"qat.export: activations of dtype {dtype} have no ONNX QDQ form "
                    f"(quint8 or qint8 expected)")


class _Emitter:
    def __init__(self, gm: fx.GraphModule, recorder: _Recorder):
        import onnx

        self.onnx = onnx
        self.gm = gm
        self.recorded = recorder.qparams
        self.shapes = recorder.shapes
        self.dtypes = recorder.dtypes
        self.sizes = recorder.sizes
        self.nodes: List = []
        self.initializers: List = []
        self.used = set()
        self.env: Dict[fx.Node, str] = {}
        self.layers = 0
        self.int8_stored: List[str] = []
        self.functions, self.methods, self.modules = _op_roles.names_by_spelling()

    def fresh(self, base: str) -> str:
        base = base.replace(".", "_")
        name, count = base, 0
        while name in self.used:
            count += 1
            name = f"{base}_{count}"
        self.used.add(name)
        return name

    def const(self, base: str, array: np.ndarray) -> str:
        name = self.fresh(base)
        self.initializers.append(self.onnx.numpy_helper.from_array(np.asarray(array), name))
        return name

    def op(self, op_type: str, inputs: List[str], base: str, **attributes) -> str:
        out = self.fresh(base)
        self.nodes.append(self.onnx.helper.make_node(op_type, inputs, [out], name=out,
                                                     **attributes))
        return out

    def qdq(self, x: str, qparams: _QParams, base: str) -> str:
        """``x`` rounded to the grid of ``qparams`` (quantize, then dequantize)."""
        scale, zero_point, dtype = qparams
        s = self.const(f"{base}_scale", np.array(scale, np.float32))
        z = self.const(f"{base}_zero_point", np.array(zero_point, _np_dtype(dtype)))
        q = self.op("QuantizeLinear", [x, s, z], f"{base}_quantized")
        return self.op("DequantizeLinear", [q, s, z], f"{base}_dequantized")

    def quantized_constant(self, node: fx.Node, module: quantized.Quantize) -> str:
        """A constant quantized by the integer model (Swin V2's coordinate table): its
        integers stored, as the model's own quantization gave them. A QuantizeLinear at run
        time divides by the scale where PyTorch multiplies by its inverse, which puts values
        half a step from a level (the symmetric table's ends) a step apart."""
        with torch.no_grad():
            ints = module(operator.attrgetter(node.args[0].target)(self.gm)).int_repr()
        scale, zero_point, dtype = self.recorded[node]
        return self.op("DequantizeLinear", [
            self.const(f"{node.name}_integers", ints.numpy()),
            self.const(f"{node.name}_scale", np.array(scale, np.float32)),
            self.const(f"{node.name}_zero_point", np.array(zero_point, _np_dtype(dtype)))],
                       f"{node.name}_dequantized")

    def weight(self, op, zero_points_needed: bool) -> Tuple[str, np.ndarray]:
        """(the dequantized integer weight of a lowered layer, its float32 scales): int8 for
        a conv / linear, uint8 for an embedding table (per row, axis 0). The zero points, of
        the integers' own type, are left out where they are all 0 and not
        ``zero_points_needed`` (ONNX Runtime's QGemm fusion reads the weight's type from
        them; its conv fusion does not)."""
        if op.weight_bits < 8:
            self.int8_stored.append(op.name)  # int4 needs opset 21: stored as 8-bit
        ints, scales, zero_points, axis = _integers(op.weight)
        s = self.const(f"{op.name}.weight_scale", scales)
        z = [self.const(f"{op.name}.weight_zero_point", zero_points)] \
            if zero_points_needed or zero_points.any() else []
        return self.op("DequantizeLinear", [self.const(f"{op.name}.weight", ints), s, *z],
                       f"{op.name}.weight_dequantized", **axis), scales

    def bias(self, op, input_qparams: _QParams, weight_scales: np.ndarray) -> str:
        """The bias rounded to int32 multiples of input scale x weight scale (half to even,
        in float32, as ``qat::round_bias`` rounds the simulation's), stored as those float
        values: ONNX Runtime divides a float bias by the same step when it fuses the op,
        which gives back these integers exactly, and a float32 costs half of an int32 with
        a scale of its own."""
        bias = op.bias.detach().float().numpy()
        step = (np.float32(input_qparams[0]) * weight_scales).astype(np.float32)
        step = np.broadcast_to(step, bias.shape).astype(np.float32)
        ints = np.round(bias / step)
        return self.const(f"{op.name}.bias", (ints * step).astype(np.float32))

    def input_qparams(self, node: fx.Node) -> _QParams:
        source = node.args[0]
        if source not in self.recorded:
            raise ValueError(f"qat.export: the input of {node.target} is not a quantized "
                             f"tensor in the integer model")
        return self.recorded[source]

    def integer_op(self, node: fx.Node, module: nn.Module) -> str:
        """The float op of one integer module, quantized to its output qparams."""
        op = module.lowered(node.target)
        args = [self.env[a] if isinstance(a, fx.Node) else a for a in node.args]
        name = node.name
        if isinstance(module, quantized.LinearDynamic):
            self.layers += 1
            return self.linear_dynamic(op, args[0], name)
        if isinstance(module, quantized._ConvNd):
            self.layers += 1
            w, scales = self.weight(op, zero_points_needed=False)
            b = self.bias(op, self.input_qparams(node), scales)
            geometry = dict(strides=list(op.stride), pads=list(op.padding) * 2,
                            dilations=list(op.dilation), group=op.groups)
            if isinstance(module, quantized._ConvTransposeNd):
                y = self.op("ConvTranspose", [args[0], w, b], name,
                            output_padding=list(op.output_padding), **geometry)
            else:
                y = self.op("Conv", [args[0], w, b], name, **geometry)
        elif isinstance(module, quantized.Linear):
            self.layers += 1
            w, scales = self.weight(op, zero_points_needed=True)
            b = self.bias(op, self.input_qparams(node), scales)
            shape = self.shapes[node.args[0]]
            if len(shape) > 2:
                return self.linear_nd(node, op, args[0], w, b, shape)
            # The weight stays [out, in]: ONNX Runtime's QGemm takes per-channel weights
            # along that axis.
            y = self.op("Gemm", [args[0], w, b], name, transB=1)
        elif isinstance(module, (quantized.Add, quantized.Mul)):
            y = self.op("Add" if isinstance(module, quantized.Add) else "Mul",
                        [args[0], args[1]], name)
        elif isinstance(module, quantized.Cat):
            rank = len(self.shapes[node])
            y = self.op("Concat", [self.env[a] for a in node.args[0]], name,
                        axis=module.dim % rank)
        elif isinstance(module, quantized.Hardswish):
            y = self.op("HardSwish", [args[0]], name)
        elif isinstance(module, quantized.ELU):
            y = self.op("Elu", [args[0]], name, alpha=float(module.alpha))
        elif isinstance(module, quantized.LeakyReLU):
            y = self.op("LeakyRelu", [args[0]], name, alpha=float(module.negative_slope))
        elif isinstance(module, quantized.BatchNorm):
            # Its affine map (weight, bias), with the running statistics 0 and 1 it keeps.
            channels = module.weight.numel()
            y = self.op("BatchNormalization", [
                args[0], self.const(f"{name}.weight", module.weight.numpy()),
                self.const(f"{name}.bias", module.bias.numpy()),
                self.const(f"{name}.running_mean", np.zeros(channels, np.float32)),
                self.const(f"{name}.running_var", np.ones(channels, np.float32))],
                name, epsilon=module.eps)
        elif isinstance(module, quantized.LayerNorm):
            y = self.layer_norm(args[0], module.normalized_shape, module.weight, module.bias,
                                module.eps, name)
        elif isinstance(module, quantized.GroupNorm):
            y = self.group_norm(args[0], module, self.shapes[node.args[0]], name)
        else:
            raise TypeError(f"qat.export: no ONNX lowering for {type(module).__name__} "
                            f"({node.target}), so no .onnx was written")
        return self.output(node, op, y)

    def layer_norm(self, x: str, shape: Sequence[int], weight, bias, eps: float,
                   name: str) -> str:
        """LayerNormalization over the last ``len(shape)`` axes; ``weight`` and ``bias``
        are tensors, the names of graph values, or None (1 and 0)."""
        def operand(value, what: str, default: float) -> str:
            if isinstance(value, str):
                return value
            return self.const(f"{name}.{what}", np.full(tuple(shape), default, np.float32)
                              if value is None else value.detach().float().numpy())

        return self.op("LayerNormalization", [x, operand(weight, "weight", 1.0),
                                              operand(bias, "bias", 0.0)],
                       name, axis=-len(shape), epsilon=float(eps))

    def group_norm(self, x: str, module: quantized.GroupNorm, shape: Tuple[int, ...],
                   name: str) -> str:
        """Opset 17 has no GroupNormalization: each (sample, group) normalized as one
        instance of ``InstanceNormalization`` over the group's channels reshaped into one
        row, then the per-channel weight and bias."""
        groups = module.num_groups
        rows = self.op("Reshape", [x, self.const(f"{name}_groups",
                                                 np.array([0, groups, -1], np.int64))],
                       f"{name}_rows")
        normalized = self.op("InstanceNormalization", [
            rows, self.const(f"{name}_ones", np.ones(groups, np.float32)),
            self.const(f"{name}_zeros", np.zeros(groups, np.float32))],
            f"{name}_normalized", epsilon=module.eps)
        y = self.op("Reshape", [normalized, self.op("Shape", [x], f"{name}_shape")],
                    f"{name}_reshaped")
        channels = (shape[1],) + (1,) * (len(shape) - 2)
        if module.weight is not None:
            y = self.op("Mul", [y, self.const(f"{name}.weight",
                                              module.weight.numpy().reshape(channels))],
                        f"{name}_scaled")
        if module.bias is not None:
            y = self.op("Add", [y, self.const(f"{name}.bias",
                                              module.bias.numpy().reshape(channels))],
                        f"{name}_shifted")
        return y

    def output(self, node: fx.Node, op, y: str) -> str:
        """``y``, the float op of an integer module, with its fused ReLU, quantized to the
        module's output qparams."""
        name = node.name
        if op.relu:
            _, zero_point, dtype = self.recorded[node]
            if zero_point != (0 if dtype == torch.quint8 else -128):
                # ONNX Runtime fuses a Relu into the integer op only where the quantize's own
                # clamp does its work (zero point at the floor). Elsewhere (an output grid
                # shared with a cat's other inputs) the op is quantized first and the ReLU
                # runs on that grid: the same integers, as 0 is on the grid.
                y = self.qdq(y, self.recorded[node], f"{name}_before_relu")
            y = self.op("Relu", [y], f"{name}_relu")
        return self.qdq(y, self.recorded[node], name)

    def embedding(self, node: fx.Node, module: nn.Module) -> str:
        """An integer table: its unsigned integers with their scale and zero point per row
        (``DequantizeLinear`` along axis 0), then ``Gather`` of the rows the indices name;
        float rows out, as the integer model's. A bag (integer, or float where the Config
        skips it) sums or averages its rows, each weighted first by its per-sample weight
        where given: one bag per row of 2-D indices (``ReduceSum`` / ``ReduceMean``), or
        bags of 1-D indices cut at their offsets (:meth:`bags`)."""
        if isinstance(module, quantized.Embedding):
            table, _ = self.weight(module.lowered(node.target), zero_points_needed=True)
        elif module.mode == "max" or module.max_norm is not None \
                or module.padding_idx is not None:
            raise TypeError(f"qat.export: no ONNX lowering for the float EmbeddingBag "
                            f"{node.target} in mode max or with max_norm or padding_idx, so "
                            f"no .onnx was written; export it as .ptl, .pt or .pte")
        else:
            table = self.const(f"{node.target}.weight", module.weight.detach().float().numpy())
        if not isinstance(module, (quantized.EmbeddingBag, nn.EmbeddingBag)):
            return self.op("Gather", [table, self.env[node.args[0]]], node.name, axis=0)
        indices, offsets, per_sample_weights = bag_arguments(node, module)
        rows = self.op("Gather", [table, self.env[indices]], f"{node.name}_rows", axis=0)
        if per_sample_weights is not None:
            weights = self.op("Unsqueeze", [self.env[per_sample_weights], self.const(
                f"{node.name}_last", np.array([-1], np.int64))], f"{node.name}_weights")
            rows = self.op("Mul", [rows, weights], f"{node.name}_weighted")
        if len(self.shapes[indices]) == 1:
            return self.bags(node, module, indices, offsets, rows)
        if module.mode == "mean":
            return self.op("ReduceMean", [rows], node.name, axes=[1], keepdims=0)
        # Opset 17's ReduceSum takes its axes as an input (ReduceMean, as an attribute).
        axes = self.const(f"{node.name}_axes", np.array([1], np.int64))
        return self.op("ReduceSum", [rows, axes], node.name, keepdims=0)

    def bags(self, node: fx.Node, module: nn.Module, indices: fx.Node,
             offsets: fx.Node, rows: str) -> str:
        """Bags of 1-D indices starting at their offsets (the last one, with
        ``include_last_offset``, only ends the last bag): each index's bag is the number of
        starts at or before it, less one; its row is added into that bag (``ScatterND``
        with ``add``, in index order as the kernel sums); a mean divides by the bag's size
        (an empty bag's sum and mean are 0, as the integer model's)."""
        name = node.name

        def ints(base: str, *values: int) -> str:
            return self.const(f"{name}_{base}", np.array(values, np.int64))

        bounds = self.op("Cast", [self.env[offsets]], f"{name}_bounds",
                         to=self.onnx.TensorProto.INT64)
        length = self.op("Shape", [self.env[indices]], f"{name}_length")
        if module.include_last_offset:
            starts = self.op("Slice", [bounds, ints("first", 0), ints("last", -1)],
                             f"{name}_starts")
            ends = self.op("Slice", [bounds, ints("second", 1), ints("end", _LAST)],
                           f"{name}_ends")
        else:
            starts = bounds
            ends = self.op("Concat", [self.op("Slice", [bounds, ints("second", 1),
                                                        ints("end", _LAST)],
                                              f"{name}_inner_ends"), length],
                           f"{name}_ends", axis=0)
        positions = self.op("Range", [
            self.const(f"{name}_zero", np.array(0, np.int64)),
            self.op("Squeeze", [length], f"{name}_count"),
            self.const(f"{name}_one", np.array(1, np.int64))], f"{name}_positions")
        started = self.op("LessOrEqual", [
            self.op("Unsqueeze", [starts, ints("rows", 0)], f"{name}_starts_row"),
            self.op("Unsqueeze", [positions, ints("columns", 1)], f"{name}_positions_column")],
                          f"{name}_started")
        bag_of = self.op("Sub", [
            self.op("ReduceSum", [self.op("Cast", [started], f"{name}_started_ints",
                                          to=self.onnx.TensorProto.INT64),
                                  ints("axes", 1)], f"{name}_starts_before", keepdims=1),
            ints("less_one", 1)], f"{name}_bag_of")
        shape = self.op("Concat", [self.op("Shape", [starts], f"{name}_bags"),
                                   ints("width", self.shapes[node][-1])],
                        f"{name}_shape", axis=0)
        zeros = self.op("ConstantOfShape", [shape], f"{name}_zeros",
                        value=self.onnx.numpy_helper.from_array(np.zeros(1, np.float32)))
        sums = self.op("ScatterND", [zeros, bag_of, rows],
                       name if module.mode != "mean" else f"{name}_sums", reduction="add")
        if module.mode != "mean":
            return sums
        sizes = self.op("Max", [
            self.op("Cast", [self.op("Sub", [ends, starts], f"{name}_sizes_int")],
                    f"{name}_sizes_float", to=self.onnx.TensorProto.FLOAT),
            self.const(f"{name}_at_least", np.float32(1))], f"{name}_sizes")
        return self.op("Div", [sums, self.op("Unsqueeze", [sizes, ints("per_row", 1)],
                                             f"{name}_divisors")], name)

    def linear_dynamic(self, op, x: str, name: str) -> str:
        """``quantized::linear_dynamic``: the input quantized to uint8 from its own range
        at run time (``DynamicQuantizeLinear``, the qnnpack kernel's full 8-bit range), the
        int8 integers multiplied (``MatMulInteger``, the weight stored transposed, its zero
        point per column), the int32 sums scaled by input scale x weight scale, plus the
        float bias: float in and out. ONNX Runtime fuses the group into one integer kernel
        (``DynamicQuantizeMatMul``)."""
        if op.weight_bits < 8:
            self.int8_stored.append(op.name)
        ints, scales, zero_points, _ = _integers(op.weight)  # per output channel: a column
        quantized_x = [self.fresh(f"{name}_input_{part}") for part in ("q", "scale", "zero")]
        self.nodes.append(self.onnx.helper.make_node("DynamicQuantizeLinear", [x], quantized_x,
                                                     name=quantized_x[0]))
        sums = self.op("MatMulInteger", [
            quantized_x[0], self.const(f"{op.name}.weight", np.ascontiguousarray(ints.T)),
            quantized_x[2], self.const(f"{op.name}.weight_zero_point", zero_points)],
            f"{name}_sums")
        step = self.op("Mul", [quantized_x[1], self.const(f"{op.name}.weight_scale", scales)],
                       f"{name}_step")
        y = self.op("Mul", [self.op("Cast", [sums], f"{name}_float",
                                    to=self.onnx.TensorProto.FLOAT), step], f"{name}_scaled")
        if op.bias is None:
            return y
        return self.op("Add", [y, self.const(f"{op.name}.bias",
                                             op.bias.detach().float().numpy())], name)

    def linear_nd(self, node: fx.Node, op, x: str, w: str, b: str,
                  shape: Tuple[int, ...]) -> str:
        """A Linear over an input of more than two dimensions: ``Gemm`` on the input
        flattened to two, its leading dimensions restored after. ONNX Runtime fuses
        dequantize -> Gemm -> quantize only where they are adjacent, so the flattened input
        and the Gemm's output are put on their grids again before and after the reshapes
        (exact: a value on a grid quantizes to itself)."""
        name = node.name
        flat = self.qdq(self.op("Flatten", [x], f"{name}_flat", axis=len(shape) - 1),
                        self.input_qparams(node), f"{name}_flat")
        y = self.output(node, op, self.op("Gemm", [flat, w, b], name, transB=1))
        leading = self.op("Shape", [x], f"{name}_leading", start=0, end=-1)
        out = self.const(f"{name}_features", np.array([-1], np.int64))
        target = self.op("Concat", [leading, out], f"{name}_out_shape", axis=0)
        return self.qdq(self.op("Reshape", [y, target], f"{name}_reshaped"),
                        self.recorded[node], f"{name}_reshaped")

    def op_name(self, node: fx.Node) -> Optional[str]:
        """The op-role name of a node that is not one of qat's integer modules."""
        if node.op == "call_function":
            return self.functions.get(node.target)
        if node.op == "call_method":
            return self.methods.get(node.target)
        module = self.gm.get_submodule(node.target)
        for types, name in self.modules:
            if _op_roles.is_module_of(module, (types,)):
                return name
        return None

    def chunk(self, node: fx.Node) -> List[str]:
        """``torch.chunk`` or ``torch.split`` as a Split into as many outputs (``getitem``
        picks one)."""
        chunked = node.target is torch.chunk or node.target == "chunk"
        parts = node.args[1] if len(node.args) > 1 else next(
            node.kwargs[k] for k in ("chunks", "split_size_or_sections", "split_size")
            if k in node.kwargs)
        shape = self.shapes[node.args[0]]
        dim = (node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)) % len(shape)
        if isinstance(parts, (tuple, list)):
            sizes = list(parts)
        else:
            each = -(-shape[dim] // parts) if chunked else parts
            sizes = [each] * (shape[dim] // each) + (
                [shape[dim] % each] if shape[dim] % each else [])
        outputs = [self.fresh(f"{node.name}_{i}") for i in range(len(sizes))]
        self.nodes.append(self.onnx.helper.make_node(
            "Split", [self.env[node.args[0]], self.const(f"{node.name}_sizes",
                                                         np.array(sizes, np.int64))],
            outputs, name=node.name, axis=dim))
        return outputs

    def other(self, node: fx.Node):
        """An op without an integer module: a ReLU, pooling, a reshape, a fixed-range
        activation, an average left in float."""
        if node.target in (torch.chunk, torch.split) or (
                node.op == "call_method" and node.target in ("chunk", "split")):
            return self.chunk(node)
        if node.target is F.silu or (node.op == "call_module" and isinstance(
                self.gm.get_submodule(node.target), nn.SiLU)):
            # A float activation with no integer kernel (opset 17 has no SiLU op).
            x = self.env[node.args[0]]
            return self.op("Mul", [x, self.op("Sigmoid", [x], f"{node.name}_sigmoid")],
                           node.name)
        if node.op == "call_function" and node.target in self._ATTENTION:
            return self._ATTENTION[node.target](self, *_bound(node))
        if node.op == "call_function" and _qualified(node.target) == _PATCH_MERGING:
            return self.patch_merging(node, *node.args)
        if node.target is F.gelu or (node.op == "call_module" and type(
                self.gm.get_submodule(node.target)) is nn.GELU):
            return self.gelu(node)
        resampled = self.resampling(node)
        if resampled is not None:
            return resampled
        if node.op == "call_module" and node.args and isinstance(node.args[0], fx.Node) and \
                node.args[0] in self.shapes:
            computed = self.float_module(self.gm.get_submodule(node.target),
                                         self.env[node.args[0]], len(self.shapes[node.args[0]]),
                                         node.name, str(node.target))
            if computed is not None:
                return computed
        computed = self.elementwise(node)
        if computed is not None:
            return computed
        comparison = _op_roles.comparison(node)
        if comparison is not None:
            return self.compare(node, comparison)
        name = self.op_name(node)
        if name == "getitem" and isinstance(self.env[node.args[0]], list):
            return self.env[node.args[0]][node.args[1]]
        if name == "getitem":
            return self.index(node)
        module = self.gm.get_submodule(node.target) if node.op == "call_module" else None
        args = [self.env[a] if isinstance(a, fx.Node) else a for a in node.args]
        what = type(module).__name__ if module is not None else getattr(
            node.target, "__name__", node.target)
        if name in ("dropout", "identity", "contiguous"):
            return args[0]
        if node.target is torch._assert:
            return None  # a check of the traced shapes (ViT's), which the export holds to
        if type(module) is nn.LayerNorm:
            # Left in float (its input is not quantized).
            return self.layer_norm(args[0], module.normalized_shape, module.weight,
                                   module.bias, module.eps, node.name)
        if node.target is F.layer_norm:
            # Functional, over parameters of the model (ConvNeXt's LayerNorm2d) or none; a
            # shape the graph computes, or a quantized weight, is left to the refusal.
            _, _, shape, weight, bias, eps = _bound(node)
            affine = [None if a is None else self.env.get(a) for a in (weight, bias)]
            if isinstance(shape, (tuple, list)) and all(isinstance(n, int) for n in shape) \
                    and all(a is None or isinstance(a, str) for a in affine) \
                    and isinstance(eps, float):
                return self.layer_norm(args[0], shape, *affine, eps, node.name)
        if type(module) is nn.Embedding:
            # A table left in float (skipped in the Config): a Gather of its rows.
            weight = self.const(f"{node.target}.weight", module.weight.detach().float().numpy())
            return self.op("Gather", [weight, args[0]], node.name, axis=0)
        if name in _UNARY_ROLES:
            return self.op(_UNARY_ROLES[name], [args[0]], node.name)
        if name == "cat":
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            # A list in the graph, or one node's (a split's outputs, or a slice of them).
            parts = node.args[0]
            parts = self.env[parts] if isinstance(parts, fx.Node) else [self.env[a] for a in parts]
            if isinstance(parts, list):
                return self.op("Concat", parts, node.name, axis=dim % len(self.shapes[node]))
        if name in ("add", "mul") and len(args) == 2 and not node.kwargs:
            operands = [a if isinstance(a, str) else
                        self.const(f"{node.name}_operand", np.array(a, np.float32))
                        for a in args]
            return self.op(name.capitalize(), operands, node.name)
        if name in ("transpose", "permute"):
            rank = len(self.shapes[node])
            dims = list(node.args[1:]) or list(node.kwargs.values())
            if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
                dims = list(dims[0])
            if name == "transpose":
                perm = list(range(rank))
                i, j = dims[0] % rank, dims[1] % rank
                perm[i], perm[j] = perm[j], perm[i]
            else:
                perm = [d % rank for d in dims]
            return self.op("Transpose", [args[0]], node.name, perm=perm)
        if node.target is torch.amax or (node.op == "call_method" and node.target == "amax"):
            name = "amax"  # not in the op-role table: a float op of the integer model
        if name in ("mean", "amax"):
            axes, keepdims = self.reduced_axes(node)
            return self.op("ReduceMean" if name == "mean" else "ReduceMax", [args[0]],
                           node.name, axes=axes, keepdims=keepdims)
        if name == "relu6":
            return self.op("Clip", [args[0], self.const(f"{node.name}_min", np.float32(0)),
                                    self.const(f"{node.name}_max", np.float32(6))], node.name)
        if name == "hardsigmoid":
            return self.op("HardSigmoid", [args[0]], node.name, alpha=1 / 6, beta=0.5)
        if name in ("flatten", "reshape", "view", "squeeze", "unsqueeze"):
            return self.reshape(node, args[0])
        if name in ("max_pool1d", "max_pool2d", "avg_pool1d", "avg_pool2d"):
            pooled = self.pooling(node, module, name, args[0])
            if pooled is not None:
                return pooled
        if name in ("adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d"):
            return self.adaptive_pool(node, args[0], "Average")
        raise TypeError(f"qat.export: no ONNX lowering for {what} (node {node.name}), so no "
                        f".onnx was written")

    def float_module(self, module: nn.Module, x: str, rank: int, base: str,
                     path: str) -> Optional[str]:
        """A layer the integer model runs in float (skipped in the Config, or without an
        integer kernel: a padding mode, an asymmetric "same"), with the float weights it
        holds, and the padding or sequence convert builds around one, on ``x`` of rank
        ``rank`` (which none of them changes); None for any other module."""
        if type(module) is nn.Sequential:
            for i, child in enumerate(module):
                x = self.float_module(child, x, rank, f"{base}_{i}", f"{path}.{i}")
                if x is None:
                    return None
            return x
        if type(module) is nn.ReLU:
            return self.op("Relu", [x], base)
        if isinstance(module, (nn.modules.padding._ConstantPadNd,
                               nn.modules.padding._ReflectionPadNd,
                               nn.modules.padding._ReplicationPadNd)):
            mode = ("constant" if isinstance(module, nn.modules.padding._ConstantPadNd) else
                    "reflect" if isinstance(module, nn.modules.padding._ReflectionPadNd)
                    else "replicate")
            return self.pad_as(x, rank, list(module.padding), _PAD_MODES[mode],
                               getattr(module, "value", 0.0), base)
        # A subclass that computes as its base (registry.registered_base) is that layer.
        kind = registered_base(type(module))
        conv = kind in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d,
                        nn.ConvTranspose2d, nn.ConvTranspose3d)
        if not conv and kind is not nn.Linear:
            return None
        pre_pad: List[int] = []
        if conv and not module.transposed:
            # The sizes a string padding means, and what a padding mode or an asymmetric
            # "same" pads first, as the integer model's own float conv computes them.
            own, pre_pad, mode = quantized._conv_padding(module)
            mode = _PAD_MODES.get(mode)
            if mode is None:
                return None  # circular: opset 17 has no wrap padding
            pads = own * 2
        elif conv:
            if module.padding_mode != "zeros":
                return None
            pads = list(module.padding) * 2
        w = self.const(f"{path}.weight", module.weight.detach().float().numpy())
        inputs = [x, w]
        if module.bias is not None:
            inputs.append(self.const(f"{path}.bias", module.bias.detach().float().numpy()))
        self.layers += 1
        if not conv:
            # Gemm's B transposed: the weight as stored, any rank of input (MatMul + Add).
            if rank == 2:
                return self.op("Gemm", inputs, base, transB=1)
            y = self.op("MatMul", [x, self.op("Transpose", [w], f"{base}_weight_t")], base)
            return y if module.bias is None else self.op("Add", [y, inputs[2]], f"{base}_bias")
        if pre_pad:
            inputs[0] = self.pad_as(x, rank, pre_pad, mode, 0.0, f"{base}_pad")
        geometry = dict(strides=list(module.stride), pads=pads,
                        dilations=list(module.dilation), group=module.groups)
        if module.transposed:
            return self.op("ConvTranspose", inputs, base,
                           output_padding=list(module.output_padding), **geometry)
        return self.op("Conv", inputs, base, **geometry)

    def elementwise(self, node: fx.Node) -> Optional[str]:
        """A float op of one or two operands (``x - y``, ``x / 2``, ``x.abs()``, clamps,
        ``torch.where``, ``F.pad``, a PReLU, Mish, a global max pooling, ...), where the
        integer model computes it in float32; None for any other node."""
        if self.dtypes.get(node) != torch.float32:
            return None
        module = self.gm.get_submodule(node.target) if node.op == "call_module" else None
        target = type(module) if module is not None else node.target
        args = [self.env[a] if isinstance(a, fx.Node) else a for a in node.args]

        def operand(value, base: str) -> str:
            return value if isinstance(value, str) else self.const(
                f"{node.name}_{base}", np.array(value, np.float32))

        if target in _UNARY and len(args) == 1 and not node.kwargs:
            return self.op(_UNARY[target], [args[0]], node.name)
        if target in _BINARY and len(args) == 2 and not node.kwargs and all(
                isinstance(a, (int, float)) or (
                    isinstance(a, fx.Node) and self.dtypes.get(a) == torch.float32)
                for a in node.args):
            return self.op(_BINARY[target], [operand(args[0], "a"), operand(args[1], "b")],
                           node.name)
        if target in (torch.clamp, torch.clip, "clamp", "clip", nn.Hardtanh, F.hardtanh):
            hardtanh = target in (nn.Hardtanh, F.hardtanh)
            if module is not None:
                bounds = [module.min_val, module.max_val]
            else:
                names = ("min_val", "max_val") if hardtanh else ("min", "max")
                given = list(node.args[1:3]) + [None] * (3 - len(node.args))
                bounds = [node.kwargs.get(n, g) for n, g in zip(names, given)]
                if hardtanh:
                    bounds = [-1.0 if bounds[0] is None else bounds[0],
                              1.0 if bounds[1] is None else bounds[1]]
            if any(isinstance(b, fx.Node) for b in bounds):
                return None  # bounds per element: no Clip
            return self.op("Clip", [args[0], *[
                "" if b is None else operand(float(b), name)
                for b, name in zip(bounds, ("min", "max"))]], node.name)
        if target is torch.where and len(args) == 3 and not node.kwargs:
            return self.op("Where", [args[0], operand(args[1], "a"), operand(args[2], "b")],
                           node.name)
        if target is F.pad and node.args:
            given = list(node.args[1:4]) + [None] * (4 - len(node.args))
            sizes, mode, value = (node.kwargs.get(n, g) for n, g in
                                  zip(("pad", "mode", "value"), given))
            mode = _PAD_MODES.get("constant" if mode is None else mode)
            if mode is None:
                return None  # circular: opset 17 has no wrap padding
            x = node.args[0]
            return self.pad_as(self.env[x], len(self.shapes[x]), list(sizes), mode,
                               0.0 if value is None else float(value), node.name)
        if target in (torch.sum, "sum") and node.args and not node.kwargs.get("dtype"):
            axes, keepdims = self.reduced_axes(node)
            # Opset 13 on: the axes are an input of ReduceSum.
            return self.op("ReduceSum", [args[0], self.const(
                f"{node.name}_axes", np.array(axes, np.int64))], node.name, keepdims=keepdims)
        if target == "expand" and node.op == "call_method":
            sizes = node.args[1:] or node.kwargs.get("size", ())
            if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
                sizes = sizes[0]
            if not sizes:
                return None
            # Expand broadcasts as numpy does: a 1 keeps the input's size, as -1 does.
            sizes = [(1 if size == -1 else size) if isinstance(size, int) else size
                     for size in sizes]
            if all(isinstance(size, int) for size in sizes):
                shape = self.const(f"{node.name}_shape", np.array(sizes, np.int64))
            else:
                dims = [self.const(f"{node.name}_size", np.array([size], np.int64))
                        if isinstance(size, int) else self.size_of(size, node.name)
                        for size in sizes]
                if None in dims:
                    return None
                shape = self.op("Concat", dims, f"{node.name}_shape", axis=0)
            return self.op("Expand", [args[0], shape], node.name)
        if target is torch.stack and node.args and isinstance(node.args[0], (tuple, list)):
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            dim %= len(self.shapes[node])
            axes = self.const(f"{node.name}_axes", np.array([dim], np.int64))
            return self.op("Concat", [
                self.op("Unsqueeze", [self.env[a], axes], f"{node.name}_{i}")
                for i, a in enumerate(node.args[0])], node.name, axis=dim)
        if type(module) in (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d) and (
                not module.track_running_stats
                and len(self.shapes[node]) == module._get_no_batch_dim() + 1):
            # Statistics of each sample and channel, as PyTorch computes them without
            # running statistics.
            channels = self.shapes[node][1]
            scale = (module.weight.detach().float().numpy() if module.affine
                     else np.ones(channels, np.float32))
            bias = (module.bias.detach().float().numpy() if module.affine
                    else np.zeros(channels, np.float32))
            return self.op("InstanceNormalization", [
                args[0], self.const(f"{node.target}.weight", scale),
                self.const(f"{node.target}.bias", bias)], node.name, epsilon=module.eps)
        if type(module) is nn.PReLU:
            # The slope along the channels (dim 1), as PyTorch broadcasts it.
            rank = len(self.shapes[node])
            slope = module.weight.detach().float().numpy().reshape(
                [-1] + [1] * max(rank - 2, 0))
            return self.op("PRelu", [args[0], self.const(f"{node.target}.weight", slope)],
                           node.name)
        if target in (nn.Mish, F.mish):
            softplus = self.op("Softplus", [args[0]], f"{node.name}_softplus")
            return self.op("Mul", [args[0], self.op("Tanh", [softplus], f"{node.name}_tanh")],
                           node.name)
        if target in (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
                      F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d):
            indices = (module.return_indices if module is not None else
                       (node.args[2:3] or [node.kwargs.get("return_indices", False)])[0])
            return None if indices else self.adaptive_pool(node, args[0], "Max")
        return None

    def size_of(self, size: fx.Node, base: str) -> Optional[str]:
        """A size the graph reads off a tensor (``x.shape[i]``, ``x.size(i)``: ViT's batch
        of class tokens) as a one-element int64 value of the ONNX graph, so that it follows
        the batch a file is run with; None for other size arithmetic."""
        tensor = index = None
        if size.op == "call_method" and size.target == "size" and len(size.args) == 2:
            tensor, index = size.args
        elif size.op == "call_function" and size.target is operator.getitem:
            source, index = size.args
            if isinstance(source, fx.Node) and (
                    (source.target is getattr and source.args[1] == "shape")
                    or (source.target == "size" and len(source.args) == 1)):
                tensor = source.args[0]
        if not isinstance(tensor, fx.Node) or not isinstance(index, int) or \
                not isinstance(self.env.get(tensor), str):
            return None
        rank = len(self.shapes[tensor])
        return self.op("Shape", [self.env[tensor]], f"{base}_size", start=index % rank,
                       end=index % rank + 1)

    def adaptive_pool(self, node: fx.Node, x: str, kind: str) -> str:
        """An adaptive average or max pooling (``kind``) to the output sizes the integer
        model gave: global where they are all 1; a pooling whose kernel and stride are
        in / out where each input size is a multiple of its output size (PyTorch's bins are
        then those windows: VGG's 7 x 7 of a 14 x 14 map); else PyTorch's bins one axis at
        a time (AlexNet's 6 x 6 of a smaller map), each output the mean or max of its
        slice (the bins of several axes are products of theirs, so axis by axis gives the
        same mean or max)."""
        sizes_in, sizes_out = self.shapes[node.args[0]][2:], self.shapes[node][2:]
        if all(size == 1 for size in sizes_out):
            return self.op(f"Global{kind}Pool", [x], node.name)
        if not any(i % o for i, o in zip(sizes_in, sizes_out)):
            window = [i // o for i, o in zip(sizes_in, sizes_out)]
            return self.op(f"{kind}Pool", [x], node.name, kernel_shape=window, strides=window)
        reduce = "ReduceMean" if kind == "Average" else "ReduceMax"
        for axis, (size_in, size_out) in enumerate(zip(sizes_in, sizes_out), start=2):
            if size_in == size_out:
                continue
            bins = []
            for i in range(size_out):
                # PyTorch's bin i: [floor(i * in / out), ceil((i + 1) * in / out)).
                start, end = i * size_in // size_out, -(-(i + 1) * size_in // size_out)
                base = f"{node.name}_{axis}_{i}"
                part = self.op("Slice", [x, self.const(f"{base}_start",
                                                       np.array([start], np.int64)),
                                         self.const(f"{base}_end", np.array([end], np.int64)),
                                         self.const(f"{base}_axis", np.array([axis], np.int64))],
                               base)
                bins.append(self.op(reduce, [part], f"{base}_reduced", axes=[axis],
                                    keepdims=1))
            x = self.op("Concat", bins, f"{node.name}_{axis}", axis=axis)
        return x

    def reduced_axes(self, node: fx.Node) -> Tuple[List[int], int]:
        """(axes, keepdims) of a reduction called as ``x.mean(dim, keepdim)`` /
        ``torch.sum(x, dim=..., keepdim=...)``: every axis where ``dim`` is not given."""
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        rank = len(self.shapes[node.args[0]])
        dims = (dims,) if isinstance(dims, int) else (dims or range(rank))  # (): all
        return [d % rank for d in dims], int(bool(keepdim))

    def pad_as(self, x: str, rank: int, sizes: List[int], mode: str, value: float,
               base: str) -> str:
        """``F.pad(x, sizes, mode)`` on ``x`` of rank ``rank`` (``sizes`` from the last
        dimension back, (before, after) each) as ONNX's Pad, which takes every dimension's
        befores, then afters."""
        before, after = [0] * rank, [0] * rank
        for k in range(len(sizes) // 2):
            before[rank - 1 - k], after[rank - 1 - k] = sizes[2 * k], sizes[2 * k + 1]
        inputs = [x, self.const(f"{base}_sizes", np.array(before + after, np.int64))]
        if mode == "constant":
            inputs.append(self.const(f"{base}_value", np.array(value, np.float32)))
        return self.op("Pad", inputs, base, mode=mode)

    def resampling(self, node: fx.Node) -> Optional[str]:
        """A softmax or log-softmax, pixel shuffle or resize (``nn.Upsample``,
        ``F.interpolate``), which the integer model runs in float (or, nearest, on the
        quantized tensor itself); None for any other node."""
        module = self.gm.get_submodule(node.target) if node.op == "call_module" else None
        target = type(module) if module is not None else node.target
        if target in _SOFTMAXES:
            if node.kwargs.get("dtype") is not None or (
                    module is None and len(node.args) > 2 and node.args[2] is not None):
                return None  # a cast on the way: left to the refusal
            rank = len(self.shapes[node])
            dim = (module.dim if module is not None else
                   node.args[1] if len(node.args) > 1 else node.kwargs.get("dim"))
            if dim is None:
                # PyTorch's implicit dim (deprecated): 0 for ranks 0, 1 and 3, else 1.
                dim = 0 if rank in (0, 1, 3) else 1
            return self.op(_SOFTMAXES[target], [self.env[node.args[0]]], node.name,
                           axis=dim % max(rank, 1))
        if target in (nn.PixelShuffle, torch.pixel_shuffle) and len(self.shapes[node]) == 4:
            factor = (module.upscale_factor if module is not None else
                      node.args[1] if len(node.args) > 1 else node.kwargs["upscale_factor"])
            # DepthToSpace's CRD order is pixel_shuffle's: channel c * r^2 + i * r + j.
            return self.op("DepthToSpace", [self.env[node.args[0]]], node.name,
                           blocksize=int(factor), mode="CRD")
        if isinstance(module, nn.Upsample):
            return self.resize(node, self.env[node.args[0]], module.size, module.scale_factor,
                               module.mode, module.align_corners,
                               module.recompute_scale_factor, False)
        if target is F.interpolate:
            _, x, *options = _bound(node)
            return self.resize(node, self.env[x], *options)
        return None

    def resize(self, node: fx.Node, x: str, size, scale_factor, mode: str, align_corners,
               recompute_scale_factor, antialias: bool) -> Optional[str]:
        """``F.interpolate`` as a Resize with PyTorch's coordinates: to the output sizes
        where PyTorch computes from them (a size given, or the scale recomputed), else by the
        scale factors, which PyTorch then uses as given; None for what Resize does not
        compute as PyTorch does (antialiasing, the bicubic and area modes)."""
        spatial = len(self.shapes[node]) - 2
        if antialias or spatial < 1:
            return None
        if mode == "nearest":
            attributes = dict(mode="nearest", coordinate_transformation_mode="asymmetric",
                              nearest_mode="floor")
        elif mode == "nearest-exact":
            # floor((dst + 0.5) * in / out): half-pixel coordinates rounded half up.
            attributes = dict(mode="nearest", coordinate_transformation_mode="half_pixel",
                              nearest_mode="round_prefer_ceil")
        elif mode in ("linear", "bilinear", "trilinear"):
            # half_pixel, not pytorch_half_pixel: PyTorch samples an output of size 1 at the
            # input's middle, (in - 1) / 2, as half_pixel does.
            attributes = dict(mode="linear", coordinate_transformation_mode=(
                "align_corners" if align_corners else "half_pixel"))
        else:
            return None
        if size is None and not recompute_scale_factor:
            factors = (list(scale_factor) if isinstance(scale_factor, (tuple, list))
                       else [scale_factor] * spatial)
            scales = np.array([1.0, 1.0] + [
                _resize_scale(f, size_in, size_out) for f, size_in, size_out in zip(
                    factors, self.shapes[node.args[0]][2:], self.shapes[node][2:])], np.float32)
            # (An empty name: the region of interest, which only tf_crop_and_resize reads.)
            return self.op("Resize", [x, "", self.const(f"{node.name}_scales", scales)],
                           node.name, **attributes)
        # The batch and channel sizes from the input (the batch stays free), the spatial
        # ones those the integer model gave.
        leading = self.op("Shape", [x], f"{node.name}_leading", start=0, end=2)
        sizes = self.op("Concat", [leading, self.const(
            f"{node.name}_spatial", np.array(self.shapes[node][2:], np.int64))],
            f"{node.name}_sizes", axis=0)
        return self.op("Resize", [x, "", "", sizes], node.name, **attributes)

    def compare(self, node: fx.Node, comparison: str) -> str:
        """A comparison of two tensors, or of a tensor and a number, in the dtype PyTorch
        promotes them to."""
        a, b = node.args[:2]
        dtype = torch.result_type(*(torch.empty(0, dtype=self.dtypes[v])
                                    if isinstance(v, fx.Node) else v for v in (a, b)))
        np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
        operands = []
        for i, v in enumerate((a, b)):
            if not isinstance(v, fx.Node):
                operands.append(self.const(f"{node.name}_operand", np.array(v, np_dtype)))
            elif self.dtypes[v] != dtype:
                operands.append(self.op(
                    "Cast", [self.env[v]], f"{node.name}_operand_{i}",
                    to=self.onnx.helper.np_dtype_to_tensor_dtype(np_dtype)))
            else:
                operands.append(self.env[v])
        if comparison == "ne":
            return self.op("Not", [self.op("Equal", operands, f"{node.name}_eq")], node.name)
        onnx_op = {"eq": "Equal", "lt": "Less", "le": "LessOrEqual", "gt": "Greater",
                   "ge": "GreaterOrEqual"}[comparison]
        return self.op(onnx_op, operands, node.name)

    def heads(self, x: fx.Node, heads: int, perm: List[int], base: str) -> str:
        """(batch, length, embed) -> (batch, heads, ...) with ``perm`` applied to
        (batch, length, heads, head dim), as attention splits its projections."""
        _, length, embed = self.shapes[x]
        split = self.op("Reshape", [self.env[x], self.const(
            f"{base}_heads", np.array([0, length, heads, embed // heads], np.int64))],
                        f"{base}_split")
        return self.op("Transpose", [split], base, perm=perm)

    def additive(self, mask: fx.Node, base: str) -> str:
        """A boolean mask as 0 / -inf (True: masked out), a float one as it is
        (qat._transformer's ``_additive``)."""
        if self.dtypes[mask] != torch.bool:
            return self.op("Cast", [self.env[mask]], base, to=self.onnx.TensorProto.FLOAT)
        return self.op("Where", [self.env[mask],
                                 self.const(f"{base}_masked", np.float32(-np.inf)),
                                 self.const(f"{base}_kept", np.float32(0))], base)

    def attention_probs(self, node: fx.Node, q: fx.Node, k: fx.Node, heads: int,
                        attn_mask: Optional[fx.Node], key_padding_mask: Optional[fx.Node],
                        is_causal: bool) -> str:
        """``qat._transformer.attention_probs``, op for op: softmax(q k^T / sqrt(head_dim)
        + masks) per head."""
        target, source = self.shapes[q][1], self.shapes[k][1]
        head_dim = self.shapes[q][2] // heads
        queries = self.op("Mul", [
            self.heads(q, heads, [0, 2, 1, 3], f"{node.name}_q"),
            self.const(f"{node.name}_norm", np.float32(math.sqrt(1.0 / head_dim)))],
                          f"{node.name}_q_scaled")
        keys = self.heads(k, heads, [0, 2, 3, 1], f"{node.name}_k")
        scores = self.op("MatMul", [queries, keys], f"{node.name}_scores")
        if attn_mask is None and is_causal:
            causal = np.triu(np.full((target, source), -np.inf, np.float32), 1)
            scores = self.op("Add", [scores, self.const(f"{node.name}_causal", causal)],
                             f"{node.name}_causal_scores")
        if attn_mask is not None:
            mask = self.additive(attn_mask, f"{node.name}_attn_mask")
            if len(self.shapes[attn_mask]) == 3:  # (batch * heads, target, source)
                mask = self.op("Reshape", [mask, self.const(
                    f"{node.name}_mask_shape", np.array([-1, heads, target, source],
                                                        np.int64))], f"{node.name}_mask")
            scores = self.op("Add", [scores, mask], f"{node.name}_masked_scores")
        if key_padding_mask is not None:
            mask = self.op("Reshape", [
                self.additive(key_padding_mask, f"{node.name}_padding_mask"),
                self.const(f"{node.name}_padding_shape", np.array([0, 1, 1, source], np.int64))],
                           f"{node.name}_padding")
            scores = self.op("Add", [scores, mask], f"{node.name}_padded_scores")
        return self.op("Softmax", [scores], node.name, axis=-1)

    def attend(self, node: fx.Node, probs: fx.Node, v: fx.Node) -> str:
        """``qat._transformer.attend``: the heads' weighted sums of the values, joined."""
        heads, target = self.shapes[probs][1], self.shapes[probs][2]
        values = self.heads(v, heads, [0, 2, 1, 3], f"{node.name}_v")
        out = self.op("Transpose", [self.op("MatMul", [self.env[probs], values],
                                            f"{node.name}_sums")], f"{node.name}_heads",
                      perm=[0, 2, 1, 3])
        return self.op("Reshape", [out, self.const(
            f"{node.name}_shape", np.array([0, target, self.shapes[v][2]], np.int64))],
                       node.name)

    def head_weights(self, node: fx.Node, probs: fx.Node, average: bool) -> str:
        """``qat._transformer.head_weights``: the heads' attention, averaged or not."""
        if not average:
            return self.env[probs]
        return self.op("ReduceMean", [self.env[probs]], node.name, axes=[1], keepdims=0)

    def roll(self, x: str, shape: Tuple[int, ...], shifts: List[int], base: str) -> str:
        """``torch.roll(x, shifts, dims=(1, 2))`` (opset 17 has no Roll): per shifted axis,
        the last ``shift`` entries moved to the front by two ``Slice`` s and a ``Concat``."""
        for axis, shift in ((1, shifts[0]), (2, shifts[1])):
            shift %= shape[axis]
            if shift == 0:
                continue
            parts = [self.op("Slice", [x, self.const(f"{base}_start", np.array([start], np.int64)),
                                       self.const(f"{base}_end", np.array([end], np.int64)),
                                       self.const(f"{base}_axis", np.array([axis], np.int64))],
                             f"{base}_part") for start, end in ((-shift, _LAST), (0, -shift))]
            x = self.op("Concat", parts, f"{base}_rolled", axis=axis)
        return x

    def pad(self, x: str, after: List[int], base: str) -> str:
        """``x`` padded with zeros at the end of each axis by ``after``."""
        if not any(after):
            return x
        pads = np.array([0] * len(after) + list(after), np.int64)
        return self.op("Pad", [x, self.const(f"{base}_pads", pads)], base)

    def window_partition(self, node: fx.Node, x: fx.Node, window_size: List[int],
                         shift_size: List[int]) -> str:
        """``qat._transformer.window_partition``: padded to whole windows, cyclically
        shifted, cut into windows of tokens."""
        shape = self.shapes[x]
        pad_h, pad_w, shift = _transformer._window_geometry(list(shape), window_size,
                                                             shift_size)
        y = self.pad(self.env[x], [0, pad_h - shape[1], pad_w - shape[2], 0], f"{node.name}_pad")
        y = self.roll(y, (shape[0], pad_h, pad_w, shape[3]), [-shift[0], -shift[1]],
                      f"{node.name}_shift")
        grid = [0, pad_h // window_size[0], window_size[0], pad_w // window_size[1],
                window_size[1], shape[3]]
        y = self.op("Reshape", [y, self.const(f"{node.name}_grid", np.array(grid, np.int64))],
                    f"{node.name}_grid")
        y = self.op("Transpose", [y], f"{node.name}_windows", perm=[0, 1, 3, 2, 4, 5])
        tokens = [-1, window_size[0] * window_size[1], shape[3]]
        return self.op("Reshape", [y, self.const(f"{node.name}_tokens",
                                                 np.array(tokens, np.int64))], node.name)

    def window_merge(self, node: fx.Node, windows: fx.Node, x: fx.Node,
                     window_size: List[int], shift_size: List[int]) -> str:
        """``qat._transformer.window_merge``: the windows put back, the shift undone, the
        padding cut off."""
        shape = self.shapes[x]
        pad_h, pad_w, shift = _transformer._window_geometry(list(shape), window_size,
                                                             shift_size)
        grid = [-1, pad_h // window_size[0], pad_w // window_size[1], window_size[0],
                window_size[1], shape[3]]
        y = self.op("Reshape", [self.env[windows], self.const(
            f"{node.name}_grid", np.array(grid, np.int64))], f"{node.name}_grid")
        y = self.op("Transpose", [y], f"{node.name}_image", perm=[0, 1, 3, 2, 4, 5])
        y = self.op("Reshape", [y, self.const(f"{node.name}_padded", np.array(
            [-1, pad_h, pad_w, shape[3]], np.int64))], f"{node.name}_padded")
        y = self.roll(y, (shape[0], pad_h, pad_w, shape[3]), shift, f"{node.name}_unshift")
        return self.op("Slice", [y, self.const(f"{node.name}_start", np.array([0, 0], np.int64)),
                                 self.const(f"{node.name}_end",
                                            np.array([shape[1], shape[2]], np.int64)),
                                 self.const(f"{node.name}_axes", np.array([1, 2], np.int64))],
                       node.name)

    def qkv_part(self, qkv: fx.Node, heads: int, part: int, base: str) -> str:
        """Part ``part`` (0: queries, 1: keys, 2: values) of a window's projections as
        (windows, heads, tokens, head channels) (``qat._transformer._qkv_heads``)."""
        windows, tokens, channels = self.shapes[qkv]
        split = self.op("Reshape", [self.env[qkv], self.const(f"{base}_split", np.array(
            [0, tokens, 3, heads, channels // (3 * heads)], np.int64))], f"{base}_split")
        picked = self.op("Gather", [split, self.const(f"{base}_part", np.array(part, np.int64))],
                         f"{base}_picked", axis=2)
        return self.op("Transpose", [picked], base, perm=[0, 2, 1, 3])

    def window_scores(self, node: fx.Node, qkv: fx.Node, position_bias: fx.Node, x: fx.Node,
                      window_size: List[int], shift_size: List[int], heads: int,
                      logit_scale: Optional[fx.Node]) -> str:
        """``qat._transformer.window_scores``, op for op: the scaled products of queries and
        keys (Swin V1) or their cosines times the clamped, exponentiated logit scale (V2),
        the position bias and the shift's mask (a constant of the input's shape) added,
        softmax."""
        queries = self.qkv_part(qkv, heads, 0, f"{node.name}_q")
        keys = self.qkv_part(qkv, heads, 1, f"{node.name}_k")
        if logit_scale is None:
            channels = self.shapes[qkv][2] // (3 * heads)
            queries = self.op("Mul", [queries, self.const(f"{node.name}_norm",
                                                          np.float32(channels ** -0.5))],
                              f"{node.name}_q_scaled")
        else:
            queries = self.unit_rows(queries, f"{node.name}_q_unit")
            keys = self.unit_rows(keys, f"{node.name}_k_unit")
        keys = self.op("Transpose", [keys], f"{node.name}_k_t", perm=[0, 1, 3, 2])
        scores = self.op("MatMul", [queries, keys], f"{node.name}_products")
        if logit_scale is not None:
            with torch.no_grad():
                factor = torch.clamp(self.tensor_constant(node, logit_scale),
                                     max=math.log(100.0)).exp()
            scores = self.op("Mul", [scores, self.const(f"{node.name}_logit_scale",
                                                        factor.float().numpy())],
                             f"{node.name}_cosines")
        scores = self.op("Add", [scores, self.env[position_bias]], f"{node.name}_biased")
        pad_h, pad_w, shift = _transformer._window_geometry(list(self.shapes[x]), window_size,
                                                            shift_size)
        if shift[0] + shift[1] > 0:
            tokens = window_size[0] * window_size[1]
            mask = _transformer._shift_mask(pad_h, pad_w, window_size, shift,
                                            torch.zeros(0)).numpy()
            scores = self.op("Reshape", [scores, self.const(f"{node.name}_per_image", np.array(
                [-1, mask.shape[0], heads, tokens, tokens], np.int64))], f"{node.name}_images")
            scores = self.op("Add", [scores, self.const(f"{node.name}_shift_mask",
                                                        mask[None, :, None])],
                             f"{node.name}_masked")
            scores = self.op("Reshape", [scores, self.const(f"{node.name}_per_window", np.array(
                [-1, heads, tokens, tokens], np.int64))], f"{node.name}_windows")
        return self.op("Softmax", [scores], node.name, axis=-1)

    def unit_rows(self, x: str, base: str) -> str:
        """``F.normalize(x, dim=-1)``: ``x`` over its last axis's L2 norm, at least 1e-12."""
        norm = self.op("ReduceL2", [x], f"{base}_norm", axes=[-1], keepdims=1)
        floor = self.op("Max", [norm, self.const(f"{base}_eps", np.float32(1e-12))],
                        f"{base}_floor")
        return self.op("Div", [x, floor], base)

    def tensor_constant(self, node: fx.Node, arg: fx.Node) -> torch.Tensor:
        """The value of a graph constant (a parameter or buffer) that ``node`` reads."""
        if not isinstance(arg, fx.Node) or arg.op != "get_attr":
            raise TypeError(f"qat.export: no ONNX lowering for {node.target.__name__} of a "
                            f"computed tensor (node {node.name}), so no .onnx was written")
        return operator.attrgetter(arg.target)(self.gm).detach()

    def window_query_value_bias(self, node: fx.Node, qkv: fx.Node, bias: fx.Node) -> str:
        """``qat._transformer.window_query_value_bias`` (Swin V2): the queries' and values'
        parts of the bias added, the keys' left out (a constant with zeros there)."""
        values = self.tensor_constant(node, bias)
        with torch.no_grad():
            added = _transformer.window_query_value_bias(torch.zeros_like(values), values)
        return self.op("Add", [self.env[qkv], self.const(f"{node.name}_bias",
                                                          added.float().numpy())], node.name)

    def window_mlp_position_bias(self, node: fx.Node, table: fx.Node, index: fx.Node,
                                 window_size: List[int]) -> str:
        """``qat._transformer.window_mlp_position_bias`` (Swin V2): the biases that the
        position MLP gave each relative position, gathered for the window's token pairs as
        (1, heads, tokens, tokens), 16 sigmoid(b)."""
        tokens = window_size[0] * window_size[1]
        rows = self.op("Reshape", [self.env[table], self.const(
            f"{node.name}_rows", np.array([-1, self.shapes[table][-1]], np.int64))],
                       f"{node.name}_table")
        picked = self.op("Gather", [rows, self.const(
            f"{node.name}_index", self.tensor_constant(node, index).long().numpy())],
                         f"{node.name}_picked", axis=0)
        pairs = self.op("Reshape", [picked, self.const(
            f"{node.name}_pairs", np.array([tokens, tokens, -1], np.int64))],
                        f"{node.name}_pairs")
        heads = self.op("Unsqueeze", [
            self.op("Transpose", [pairs], f"{node.name}_heads", perm=[2, 0, 1]),
            self.const(f"{node.name}_batch", np.array([0], np.int64))], f"{node.name}_bias")
        return self.op("Mul", [self.op("Sigmoid", [heads], f"{node.name}_sigmoid"),
                               self.const(f"{node.name}_range", np.float32(16))], node.name)

    def window_values(self, node: fx.Node, probs: fx.Node, qkv: fx.Node, heads: int) -> str:
        """``qat._transformer.window_values``: the heads' weighted sums of the values,
        joined."""
        _, tokens, channels = self.shapes[qkv]
        values = self.op("MatMul", [self.env[probs], self.qkv_part(qkv, heads, 2,
                                                                   f"{node.name}_v")],
                         f"{node.name}_sums")
        joined = self.op("Transpose", [values], f"{node.name}_heads", perm=[0, 2, 1, 3])
        return self.op("Reshape", [joined, self.const(f"{node.name}_shape", np.array(
            [0, tokens, channels // 3], np.int64))], node.name)

    def constant(self, node: fx.Node, *_) -> str:
        """A function of the graph's constant tensors only (a window's position bias from
        its table and index), computed once here."""
        def value(arg):
            return self.tensor_constant(node, arg) if isinstance(arg, fx.Node) else arg
        with torch.no_grad():
            result = node.target(*fx.node.map_aggregate(node.args, value),
                                 **fx.node.map_aggregate(node.kwargs, value))
        return self.const(node.name, result.detach().float().numpy())

    def gelu(self, node: fx.Node) -> str:
        """GELU (opset 17 has no Gelu op): x * 0.5 * (1 + erf(x / sqrt(2))), or with
        ``approximate="tanh"`` x * 0.5 * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 x^3)))."""
        module = self.gm.get_submodule(node.target) if node.op == "call_module" else None
        approximate = module.approximate if module is not None else node.kwargs.get(
            "approximate", "none")
        x = self.env[node.args[0]]
        name = node.name

        def const(value: float) -> str:
            return self.const(f"{name}_constant", np.float32(value))

        if approximate == "tanh":
            cube = self.op("Mul", [self.op("Mul", [x, x], f"{name}_square"), x], f"{name}_cube")
            inner = self.op("Add", [x, self.op("Mul", [cube, const(0.044715)], f"{name}_term")],
                            f"{name}_inner")
            curve = self.op("Tanh", [self.op("Mul", [inner, const(math.sqrt(2 / math.pi))],
                                             f"{name}_scaled")], f"{name}_curve")
        else:
            curve = self.op("Erf", [self.op("Mul", [x, const(math.sqrt(0.5))],
                                            f"{name}_scaled")], f"{name}_curve")
        half = self.op("Mul", [x, const(0.5)], f"{name}_half")
        return self.op("Mul", [half, self.op("Add", [curve, const(1.0)], f"{name}_gate")],
                       name)

    def patch_merging(self, node: fx.Node, x: fx.Node) -> str:
        """torchvision's ``_patch_merging_pad``: padded to even sides, the four interleaved
        quarters joined along the channels."""
        shape = self.shapes[x]
        y = self.pad(self.env[x], [0] * (len(shape) - 3) + [shape[-3] % 2, shape[-2] % 2, 0],
                     f"{node.name}_pad")
        axes = np.array([len(shape) - 3, len(shape) - 2], np.int64)
        quarters = [self.op("Slice", [
            y, self.const(f"{node.name}_start", np.array([row, column], np.int64)),
            self.const(f"{node.name}_end", np.array([_LAST, _LAST], np.int64)),
            self.const(f"{node.name}_axes", axes),
            self.const(f"{node.name}_steps", np.array([2, 2], np.int64))], f"{node.name}_quarter")
            for row, column in ((0, 0), (1, 0), (0, 1), (1, 1))]
        return self.op("Concat", quarters, node.name, axis=-1)

    # The attention functions that qat's traceable attention calls as single graph nodes.
    _ATTENTION = {_transformer.attention_probs: attention_probs,
                  _transformer.attend: attend, _transformer.head_weights: head_weights,
                  _transformer.window_partition: window_partition,
                  _transformer.window_merge: window_merge,
                  _transformer.window_scores: window_scores,
                  _transformer.window_values: window_values,
                  _transformer.window_query_value_bias: window_query_value_bias,
                  _transformer.window_mlp_position_bias: window_mlp_position_bias,
                  _transformer.window_position_bias: constant}

    def index(self, node: fx.Node) -> str:
        """A tensor's basic indexing (``x[:, -1]``, ``x[..., 0::2, :]``, ``x[None]``):
        ``Slice`` over the sliced and indexed axes, ``Squeeze`` of the indexed ones,
        ``Unsqueeze`` where None adds one. Indexing with tensors is refused."""
        x, index = node.args
        index = index if isinstance(index, tuple) else (index,)
        rank = len(self.shapes[x])
        explicit = sum(i is not None and i is not Ellipsis for i in index)
        axis, out_axis = 0, 0
        slices, squeezed, added = [], [], []
        for item in index:
            if item is Ellipsis:
                axis += rank - explicit
                out_axis += rank - explicit
            elif item is None:
                added.append(out_axis)
                out_axis += 1
            elif isinstance(item, int):
                slices.append((axis, item, item + 1 if item != -1 else _LAST, 1))
                squeezed.append(axis)
                axis += 1
            elif isinstance(item, slice) and all(
                    v is None or isinstance(v, int) for v in (item.start, item.stop, item.step)):
                step = 1 if item.step is None else item.step
                start = item.start if item.start is not None else (0 if step > 0 else _LAST)
                stop = item.stop if item.stop is not None else (_LAST if step > 0 else _FIRST)
                if (start, stop, step) != (0, _LAST, 1):
                    slices.append((axis, start, stop, step))
                axis += 1
                out_axis += 1
            else:
                raise TypeError(f"qat.export: no ONNX lowering for indexing with {item!r} "
                                f"(node {node.name}), so no .onnx was written")
        y = self.env[x]
        if slices:
            axes, starts, stops, steps = (np.array(v, np.int64) for v in zip(*slices))
            y = self.op("Slice", [y, self.const(f"{node.name}_starts", starts),
                                  self.const(f"{node.name}_ends", stops),
                                  self.const(f"{node.name}_axes", axes),
                                  self.const(f"{node.name}_steps", steps)],
                        f"{node.name}_sliced")
        if squeezed:
            y = self.op("Squeeze", [y, self.const(f"{node.name}_squeezed",
                                                  np.array(squeezed, np.int64))],
                        f"{node.name}_squeezed")
        if added:
            y = self.op("Unsqueeze", [y, self.const(f"{node.name}_added",
                                                    np.array(added, np.int64))],
                        f"{node.name}_unsqueezed")
        return y

    def recurrent(self, node: fx.Node, module: nn.Module) -> list:
        """A dynamic quantized LSTM / GRU as ONNX's LSTM / GRU, one per layer, in float
        over its weights' integers (stored as int8, dequantized in the graph): standard
        ONNX has no integer recurrent op, so its input and state are not quantized at run
        time as PyTorch's kernel quantizes them (ONNX Runtime's optimized graph lists the
        op among the float ops). [output, [h_n, c_n]] (an LSTM) or [output, h_n]."""
        lstm = isinstance(module, dynamic.LSTM)
        x, state = (list(node.args) + [node.kwargs.get("hx")])[:2]
        if state is None:
            states = []
        elif isinstance(state, fx.Node):  # a tensor, or another LSTM's (h, c)
            value = self.env[state]
            states = value if isinstance(value, list) else [value]
        elif all(isinstance(s, fx.Node) for s in state):
            states = [self.env[s] for s in state]
        else:
            raise TypeError(f"qat.export: no ONNX lowering for {type(module).__name__}'s "
                            f"initial state {state!r} (node {node.name}), so no .onnx was "
                            f"written")
        name, hidden = node.name, module.hidden_size
        directions = 2 if module.bidirectional else 1
        # PyTorch's gate blocks -> ONNX's: LSTM (i, f, g, o) -> (i, o, f, c), GRU
        # (r, z, n) -> (z, r, h).
        order = [0, 3, 1, 2] if lstm else [1, 0, 2]

        def gates(array: np.ndarray) -> np.ndarray:
            return array.reshape(len(order), hidden, *array.shape[1:])[order].reshape(
                array.shape)

        weights, biases = module.get_weight(), module.get_bias()
        y = self.env[x]
        if module.batch_first:
            y = self.op("Transpose", [y], f"{name}_time_first", perm=[1, 0, 2])
        finals: List[List[str]] = [[] for _ in range(2 if lstm else 1)]
        for layer in range(module.num_layers):
            matrices = {"ih": [], "hh": []}
            bias = []
            for suffix in ("", "_reverse")[:directions]:
                for kind in ("ih", "hh"):
                    key = f"weight_{kind}_l{layer}{suffix}"
                    ints, scales, zero_points, axis = _integers(weights[key])
                    ints = gates(ints)
                    if axis:  # per gate row
                        scales, zero_points = gates(scales), gates(zero_points)
                    values = self.op("DequantizeLinear", [
                        self.const(f"{name}.{key}", ints),
                        self.const(f"{name}.{key}_scale", scales),
                        self.const(f"{name}.{key}_zero_point", zero_points)],
                        f"{name}.{key}_dequantized", **axis)
                    matrices[kind].append(self.op("Unsqueeze", [values, self.const(
                        f"{name}.{key}_axes", np.array([0], np.int64))], f"{name}.{key}_3d"))
                bias.append(np.concatenate([
                    gates(biases[f"bias_{kind}_l{layer}{suffix}"].detach().float().numpy())
                    for kind in ("ih", "hh")]))
            w_ih, w_hh = (m[0] if len(m) == 1 else self.op(
                "Concat", m, f"{name}_{kind}_l{layer}", axis=0)
                for kind, m in matrices.items())
            inputs = [y, w_ih, w_hh, self.const(f"{name}_bias_l{layer}", np.stack(bias)), ""]
            for i, initial in enumerate(states):
                inputs.append(self.op("Slice", [
                    initial,
                    self.const(f"{name}_state_start", np.array([layer * directions], np.int64)),
                    self.const(f"{name}_state_end",
                               np.array([(layer + 1) * directions], np.int64)),
                    self.const(f"{name}_state_axis", np.array([0], np.int64))],
                    f"{name}_initial_{i}_l{layer}"))
            outputs = [self.fresh(f"{name}_l{layer}_{part}")
                       for part in (("y", "h", "c") if lstm else ("y", "h"))]
            attributes = {} if lstm else {"linear_before_reset": 1}
            self.nodes.append(self.onnx.helper.make_node(
                "LSTM" if lstm else "GRU", inputs, outputs, name=outputs[0], hidden_size=hidden,
                direction="bidirectional" if directions == 2 else "forward", **attributes))
            for final, out in zip(finals, outputs[1:]):
                final.append(out)
            # (time, directions, batch, hidden) -> (time, batch, directions * hidden).
            y = self.op("Reshape", [
                self.op("Transpose", [outputs[0]], f"{name}_l{layer}_joined", perm=[0, 2, 1, 3]),
                self.const(f"{name}_l{layer}_shape", np.array([0, 0, -1], np.int64))],
                f"{name}_l{layer}_out")
        if module.batch_first:
            y = self.op("Transpose", [y], f"{name}_batch_first", perm=[1, 0, 2])
        ends = [self.op("Concat", final, f"{name}_final_{i}", axis=0) if len(final) > 1
                else final[0] for i, final in enumerate(finals)]
        return [y, ends if lstm else ends[0]]

    def pooling(self, node: fx.Node, module: Optional[nn.Module], name: str,
                x: str) -> Optional[str]:
        """A max or average pooling (``name``), a module or a call of ``F.max_pool2d`` /
        ``F.avg_pool2d`` (1d alike) as MaxPool / AveragePool; None for options ONNX has no
        attribute for (indices returned, a divisor override)."""
        options = module
        if module is None and name.startswith("avg"):
            # F.avg_pool* are builtins (no signature to bind) taking nn.AvgPool*d's arguments.
            options = getattr(nn, f"AvgPool{name[-2]}d")(*node.args[1:], **node.kwargs)
        elif module is None:
            # F.max_pool* dispatch on return_indices: bound as their *_with_indices form.
            bound = inspect.signature(getattr(F, f"{name}_with_indices")).bind(
                *node.args, **node.kwargs)
            bound.apply_defaults()
            options = SimpleNamespace(**bound.arguments)
        if getattr(options, "return_indices", False) or \
                getattr(options, "divisor_override", None) is not None:
            return None
        dims = int(name[-2])  # max_pool1d: 1
        # An empty stride (the functions' default in TorchScript's schema) is the kernel's.
        stride = options.stride if options.stride not in (None, [], ()) else options.kernel_size
        attributes = dict(kernel_shape=_tuple(options.kernel_size, dims),
                          strides=_tuple(stride, dims), pads=_tuple(options.padding, dims) * 2,
                          ceil_mode=int(options.ceil_mode))
        if name.startswith("max"):
            return self.op("MaxPool", [x], node.name, dilations=_tuple(options.dilation, dims),
                           **attributes)
        count_include_pad = int(options.count_include_pad)
        if options.ceil_mode and count_include_pad:
            # PyTorch counts the padding but not a last window's part past it; ONNX
            # Runtime's integer pooling divides such a window by the whole kernel. Padded
            # first, the padding is input and count_include_pad=0 divides as PyTorch.
            if any(_tuple(options.padding, dims)):
                x = self.pad_as(x, len(self.shapes[node]),
                                [p for p in reversed(_tuple(options.padding, dims))
                                 for _ in range(2)], "constant", 0.0, f"{node.name}_pad")
                attributes["pads"] = [0] * (2 * dims)
            count_include_pad = 0
        return self.op("AveragePool", [x], node.name, count_include_pad=count_include_pad,
                       **attributes)

    def reshape(self, node: fx.Node, x: str) -> str:
        """Any flatten / reshape / view as a Reshape to the shape the integer model gave,
        its batch dimension copied from the input (ONNX's 0) where it was kept."""
        shape = list(self.shapes[node])
        source = self.shapes[node.args[0]]
        if shape and source and shape[0] == source[0]:
            shape[0] = 0
        return self.op("Reshape", [x, self.const(f"{node.name}_shape",
                                                  np.array(shape, np.int64))], node.name)

    def node(self, node: fx.Node) -> Optional[str]:
        if node.op == "placeholder":
            self.used.add(node.name)
            return node.name
        if node.op == "output" or node in self.sizes:
            # Size arithmetic (x.size(0), c // 2) feeds only reshapes, which take the shapes
            # the integer model gave.
            return None
        if node.op == "call_module":
            module = self.gm.get_submodule(node.target)
            if isinstance(module, (quantized.Quantize, quantized.DeQuantize)):
                if node.args[0].op == "get_attr" and isinstance(module, quantized.Quantize):
                    return self.quantized_constant(node, module)
                return pair_value(node, module, self.env, self.recorded,
                                  lambda x, qparams: self.qdq(x, qparams, node.name))
            if isinstance(module, quantized._WithOutputQParams):
                return self.integer_op(node, module)
            if isinstance(module, (quantized.Embedding, nn.EmbeddingBag)):
                return self.embedding(node, module)
            if isinstance(module, (dynamic.LSTM, dynamic.GRU)):
                return self.recurrent(node, module)
        if node.op == "get_attr":
            value = operator.attrgetter(node.target)(self.gm)
            if isinstance(value, torch.Tensor) and not value.is_quantized:
                return self.const(node.name, value.detach().cpu().numpy())
        if node.op not in ("call_module", "call_function", "call_method"):
            raise TypeError(f"qat.export: no ONNX lowering for the {node.op} node "
                            f"{node.name}, so no .onnx was written")
        out = self.other(node)
        # An op that ran on quantized tensors wrote its output on a grid: the pair says which
        # (ONNX Runtime fuses an integer op only where its inputs come from a dequantize).
        if node in self.recorded and out != self.env.get(node.args[0]):
            return self.qdq(out, self.recorded[node], f"{node.name}_out")
        return out

    def run(self, inputs: tuple, metadata: dict, batch_dims: Sequence[Optional[int]],
            output_batch_dims: Sequence[Optional[int]]):
        helper, onnx = self.onnx.helper, self.onnx
        graph_inputs, graph_outputs = [], []
        own_lengths = _own_lengths(inputs)
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                x = inputs[len(graph_inputs)]
                shape: List = list(x.shape)
                if own_lengths[len(graph_inputs)]:
                    # The length of 1-D indices (an embedding bag's, which its offsets,
                    # another length, cut into bags) or of their weights: free, its own.
                    shape[0] = f"{node.name}_length"
                elif batch_dims[len(graph_inputs)] is not None:
                    shape[batch_dims[len(graph_inputs)]] = "batch"
                graph_inputs.append(helper.make_tensor_value_info(
                    node.name, onnx.helper.np_dtype_to_tensor_dtype(x.numpy().dtype), shape))
            if node.op == "output":
                for i, out in enumerate(_outputs_list(node.args[0])):
                    name = self.op("Identity", [self.env[out]], f"output_{i}")
                    shape = list(self.shapes[out])
                    if i < len(output_batch_dims) and output_batch_dims[i] is not None:
                        shape[output_batch_dims[i]] = "batch"
                    graph_outputs.append(helper.make_tensor_value_info(
                        name, onnx.TensorProto.FLOAT, shape))
                continue
            self.env[node] = self.node(node)
        # Constants that handlers read at export (a logit scale, a position index) were also
        # written as initializers when their get_attr node came; ONNX Runtime warns about
        # each one no op reads.
        read = {name for op in self.nodes for name in op.input}
        initializers = [t for t in self.initializers if t.name in read]
        graph = helper.make_graph(self.nodes, type(self.gm).__name__, graph_inputs,
                                  graph_outputs, initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="qat")
        helper.set_model_props(model, {METADATA_KEY: json.dumps(metadata)})
        onnx.checker.check_model(model, full_check=True)
        return model


# Slice bounds past either end of any axis (ONNX clamps them).
_LAST = np.iinfo(np.int64).max
_FIRST = np.iinfo(np.int64).min


# torchvision's Swin patch merging (a single graph node: torchvision wraps it for torch.fx),
# named rather than imported: importing torchvision costs seconds.
_PATCH_MERGING = "torchvision.models.swin_transformer._patch_merging_pad"


def _resize_scale(factor: float, size_in: int, size_out: int) -> np.float32:
    """``factor`` as the float32 scale Resize takes, moved by as few ulps as it takes for
    ONNX Runtime's output size, trunc(float32(scale) * in), to be PyTorch's,
    floor(in * factor) in double: (30, 2.1) gives 63 in PyTorch and 62 at float32(2.1)."""
    scale = np.float32(factor)
    for _ in range(64):
        got = int(np.float32(scale) * np.float32(size_in))
        if got == size_out:
            return scale
        scale = np.nextafter(scale, np.float32(np.inf if got < size_out else -np.inf))
    return np.float32(factor)


# The softmax spellings and the ONNX op of each (opset 13 on: along one axis).
_SOFTMAXES = {nn.Softmax: "Softmax", F.softmax: "Softmax", torch.softmax: "Softmax",
              "softmax": "Softmax", nn.LogSoftmax: "LogSoftmax", F.log_softmax: "LogSoftmax",
              torch.log_softmax: "LogSoftmax", "log_softmax": "LogSoftmax"}


# Float ops of one operand by their op-role name (module, function and method spellings).
_UNARY_ROLES = {"relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh", "hardswish": "HardSwish"}
# Float ops of one operand, and of two (a tensor and a tensor or a number), by spelling.
_UNARY = {torch.neg: "Neg", operator.neg: "Neg", "neg": "Neg", torch.abs: "Abs",
          "abs": "Abs", torch.exp: "Exp", "exp": "Exp", torch.sqrt: "Sqrt", "sqrt": "Sqrt",
          torch.log: "Log", "log": "Log", torch.reciprocal: "Reciprocal",
          "reciprocal": "Reciprocal"}
_BINARY = {operator.sub: "Sub", torch.sub: "Sub", "sub": "Sub", operator.truediv: "Div",
           torch.div: "Div", "div": "Div", torch.true_divide: "Div", operator.pow: "Pow",
           torch.pow: "Pow", "pow": "Pow", operator.matmul: "MatMul", torch.matmul: "MatMul",
           "matmul": "MatMul", torch.maximum: "Max", torch.minimum: "Min"}


def _qualified(fn) -> str:
    return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__name__', '')}"


def _integers(w: torch.Tensor) -> Tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """(integers, float32 scales, zero points of the integers' type, DequantizeLinear's
    axis attribute) of the quantized weight ``w``, per channel or per tensor."""
    ints = w.int_repr().numpy()
    if w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        return (ints, w.q_per_channel_scales().numpy().astype(np.float32),
                w.q_per_channel_zero_points().numpy().astype(ints.dtype),
                {"axis": w.q_per_channel_axis()})
    return (ints, np.array(w.q_scale(), np.float32), np.array(w.q_zero_point(), ints.dtype),
            {})


def _bound(node: fx.Node) -> tuple:
    """``node`` and the arguments of its call, in the called function's order, defaults
    filled in."""
    bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    return (node, *bound.arguments.values())


def _tuple(value, dims: int) -> List[int]:
    return list(value) if isinstance(value, (tuple, list)) else [int(value)] * dims


def _session_options(optimized_path: Optional[str] = None):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    if optimized_path is not None:
        # The QDQ fusions are of the extended level; the full level adds layouts of this
        # machine's own, which a saved model should not hold.
        options.graph_optimization_level = \
            onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = optimized_path
    return options


def integer_report(model_bytes: bytes) -> dict:
    """What ONNX Runtime's optimizer makes of the model: the op types of its optimized
    graph, and how many convs / linears run on integer kernels."""
    import onnx
    import onnxruntime

    with tempfile.TemporaryDirectory() as folder:
        optimized = os.path.join(folder, "optimized.onnx")
        onnxruntime.InferenceSession(model_bytes, _session_options(optimized),
                                     providers=["CPUExecutionProvider"])
        graph = onnx.load(optimized).graph
    kinds = [n.op_type for n in graph.node]
    return {"layers_integer": sum(k in _INTEGER_LAYERS for k in kinds),
            "layers_float": sum(k in _FLOAT_LAYERS for k in kinds),
            "float_ops": sorted({k for k in kinds if k not in _NOT_COMPUTE | _INTEGER_LAYERS
                                 | _FLOAT_LAYERS and not k.startswith("QLinear")})}


def _own_lengths(inputs: tuple) -> List[bool]:
    """Per input, whether its one dimension is a length of its own rather than a batch: 1-D
    indices or offsets (an embedding bag's), and 1-D values as long as 1-D indices (their
    per-sample weights)."""
    index_lengths = {x.numel() for x in inputs if x.dim() == 1 and not x.is_floating_point()}
    return [x.dim() == 1 and (not x.is_floating_point() or x.numel() in index_lengths)
            for x in inputs]


def batch_layouts(inputs: tuple,
                  sequence_first: bool = False) -> List[Tuple[Optional[int], ...]]:
    """Where the batch may lie in ``inputs``, one dimension per input (None: no batch),
    most likely first: dim 0 of each (batch first), or dim 1 of those of rank 3 and more
    (sequence first, as ``nn.MultiheadAttention``'s and the recurrent layers' default
    (length, batch, features); a recurrent layer's initial state (layers, batch, hidden)
    beside a batch-first input) in every combination, fewest first, or with
    ``sequence_first`` (the model holds a layer that is) most first."""
    first = tuple(None if x.dim() == 0 or own else 0
                  for x, own in zip(inputs, _own_lengths(inputs)))
    if all(d is None for d in first):
        return []
    deep = [i for i, x in enumerate(inputs) if x.dim() >= 3 and first[i] is not None]
    # Most models take one or two such inputs; past three, only the two usual layouts.
    counts = range(len(deep) + 1) if len(deep) <= 3 else (0, len(deep))
    layouts = [tuple(1 if i in chosen else d for i, d in enumerate(first))
               for count in counts for chosen in itertools.combinations(deep, count)]
    return layouts[::-1] if sequence_first else layouts


def grown(inputs: tuple, layout: Sequence[Optional[int]]) -> tuple:
    """``inputs`` with one batch entry more (a copy of the first) along ``layout``."""
    return tuple(x if d is None else torch.cat([x, x.narrow(d, 0, 1)], d)
                 for x, d in zip(inputs, layout))


def _outputs_list(outputs) -> list:
    return list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]


def emit(int_model: fx.GraphModule, inputs: tuple, metadata: dict,
         batch_dims: Optional[Sequence[Optional[int]]] = None,
         grown_outputs=None) -> Tuple[bytes, dict]:
    """The ``.onnx`` model of ``int_model`` (QDQ, checked by ``onnx.checker``) with
    ``metadata`` and the report of what ONNX Runtime runs on integer kernels in its
    ``metadata_props``; and that report. The inputs' dimensions ``batch_dims`` (one per
    input, None for none) are left free as ``batch``, and so is the dimension of each
    output that grew in ``grown_outputs`` (the integer model's outputs on
    :func:`grown` inputs); every other dimension is the example's."""
    if not isinstance(int_model, fx.GraphModule):
        raise TypeError(f"qat.export: an .onnx is written from a QAT model or one converted "
                        f"by qat.convert (a torch.fx.GraphModule), got "
                        f"{type(int_model).__name__}")
    recorder = _Recorder(int_model)
    with torch.no_grad():
        example_outputs = recorder.run(*inputs)
    emitter = _Emitter(int_model, recorder)
    output_batch_dims = []
    if grown_outputs is not None:
        for before, after in zip(_outputs_list(example_outputs), _outputs_list(grown_outputs)):
            grew = [d for d in range(before.dim()) if before.shape[d] != after.shape[d]]
            output_batch_dims.append(grew[0] if len(grew) == 1 else None)
    model = emitter.run(inputs, metadata, batch_dims or (None,) * len(inputs),
                        output_batch_dims)
    report = {"opset": OPSET, "layers": emitter.layers,
              **integer_report(model.SerializeToString()),
              "sub_8bit_weights_as_int8": emitter.int8_stored}
    emitter.onnx.helper.set_model_props(
        model, {METADATA_KEY: json.dumps({**metadata, "onnx": report})})
    return model.SerializeToString(), report


# Loads an .onnx with ONNX Runtime alone and runs it on saved inputs: the check of a written
# file, in a process that has not imported qat (nor torch).
_FRESH_CHECK = """
import sys
import numpy as np
import onnxruntime
session = onnxruntime.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
saved = np.load(sys.argv[2])
feeds = {i.name: saved[f"arg{k}"] for k, i in enumerate(session.get_inputs())}
outputs = session.run(None, feeds)
assert "qat" not in sys.modules and "torch" not in sys.modules, "the check imported qat"
np.savez(sys.argv[3], *outputs)
"""


def run_fresh(path: str, inputs: tuple) -> List[torch.Tensor]:
    """The outputs of the ``.onnx`` at ``path`` on ``inputs``, computed by ONNX Runtime in a
    fresh Python process that imports neither qat nor torch."""
    with tempfile.TemporaryDirectory() as folder:
        saved_in = os.path.join(folder, "inputs.npz")
        saved_out = os.path.join(folder, "outputs.npz")
        np.savez(saved_in, **{f"arg{k}": t.contiguous().numpy() for k, t in enumerate(inputs)})
        done = subprocess.run([sys.executable, "-c", _FRESH_CHECK, path, saved_in, saved_out],
                              capture_output=True, text=True, cwd=folder)
        if done.returncode != 0:
            lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
            cause = lines[-1] if lines else f"exit status {done.returncode}"
            hint = ""
            if "out of computation range" in cause:
                hint = ("; ONNX Runtime's integer kernels bound the ratio of an op's input "
                        "and output scales, which an output range collapsed to its floor "
                        "exceeds: train or calibrate on real data")
            raise RuntimeError(f"qat.export: ONNX Runtime could not run the model for "
                               f"{path!r} in a fresh process: {cause}{hint}")
        with np.load(saved_out) as saved:
            return [torch.from_numpy(saved[f"arr_{k}"]) for k in range(len(saved.files))]


def load(path: str):
    """An ONNX Runtime session of the model at ``path``, on as many threads as
    ``torch.get_num_threads()`` (as the other runtimes are timed)."""
    import onnxruntime

    options = _session_options()
    options.intra_op_num_threads = torch.get_num_threads()
    try:
        return onnxruntime.InferenceSession(path, options,
                                            providers=["CPUExecutionProvider"])
    except Exception as error:  # noqa: BLE001 - ONNX Runtime's own exception types
        raise ValueError(f"qat: {path!r} is not an ONNX model ONNX Runtime can load "
                         f"({error})") from None


def read_metadata_text(path: str) -> Optional[str]:
    """The metadata JSON an ``.onnx`` written by qat carries, or None."""
    import onnx

    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as error:  # noqa: BLE001 - protobuf's decode errors
        raise ValueError(f"qat: {path!r} is not an ONNX model ({error})") from None
    return next((p.value for p in model.metadata_props if p.key == METADATA_KEY), None)
