"""``qat.prepare``: a float model becomes a QAT model. It is traced with ``torch.fx``,
conv + batch norm (+ ReLU) are fused, each module the registry knows is swapped for its QAT
version, and activation :class:`qat.FakeQuantize` modules are inserted where the integer
model will hold a quantized tensor. A model that cannot be traced has its modules swapped
in place instead (eager fallback)."""

import collections
import copy
import dataclasses
import dis
import fnmatch
import functools
import inspect
import json
import types
import warnings
from typing import Dict, List, Optional, Set, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .config import Config, QuantSpec, _is_pattern
from .fake_quant import FakeQuantize, FixedQParamsFakeQuantize
from . import _C, _op_roles
from ._transformer import make_traceable
from .quantized import _conv_padding
from .modules import (Conv1d, Conv2d, Conv3d, ConvTranspose1d, ConvTranspose2d, Linear, fused,
                      lookup)
from .modules.conv_bn import _ConvBnNd, _ReLU, fold_weights_ahead
from .modules.registry import registered_base

__all__ = ["prepare"]

# What each op does to quantization is the op-role table's (csrc/qat/op_roles.h), shared
# with convert and the C++ front end; these are its Python spellings.
# Ops whose output the integer model requantizes, so it gets its own FakeQuantize (a clamp
# not fused into a layer before it among them: its bound is not on its input's grid).
_QUANTIZED = _op_roles.with_role("requantizes")
# Ops whose integer kernels keep their input's qparams: no FakeQuantize of their own.
_PASS = _op_roles.with_role("passes_qparams")
_RELU_FUNCTIONS = tuple(_op_roles.spellings("relu")[0])
# Ops whose integer kernels write their output with fixed qparams: the output range.
_FIXED_RANGES = _op_roles.fixed_ranges()


@functools.lru_cache(maxsize=None)
def _reads_training(cls: type) -> bool:
    """Whether ``cls.forward`` reads an attribute named ``training``, by the names its
    compiled code (and the code of the functions and lambdas defined in it) loads: a
    comment, a docstring or a string that mentions ``self.training`` does not count.
    Limits: a read in another method that forward calls (``self._active()``) or through
    ``getattr`` with a computed name is not seen, and ``other.training`` counts as well."""
    code = getattr(getattr(cls.forward, "__func__", cls.forward), "__code__", None)
    codes = [code] if code is not None else []
    while codes:
        code = codes.pop()
        if "training" in code.co_names:
            return True
        codes.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
    return False


class _Proxy(fx.Proxy):
    """``torch.fx``'s proxy, able to unpack a traced value (``n, c, h, w = x.size()``, as
    torchvision's shufflenet does) on Python 3.11 too: ``fx.Proxy.__iter__`` finds the
    unpacking instruction by an index that the 3.11 inline caches put off (reading the
    wrong instruction, or past the end); here it is found by its offset."""

    def __iter__(self):
        frame = inspect.currentframe()
        caller = frame.f_back if frame is not None else None
        if caller is not None:
            for inst in dis.get_instructions(caller.f_code):
                if inst.offset == caller.f_lasti:
                    if inst.opname == "UNPACK_SEQUENCE":
                        return iter([self[i] for i in range(inst.argval)])
                    break
        return self.tracer.iter(self)


class _Tracer(fx.Tracer):
    """``torch.fx``'s tracer with :class:`_Proxy` values, keeping parameter-free modules
    that read ``self.training`` as modules."""

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        # A module with a registered QAT class (qat.register_module: user layers too) stays
        # a module, so that it can be swapped; traced into, its own ops would be all that
        # is left of it. A parameter-free module whose forward reads self.training
        # (torchvision's StochasticDepth, custom dropouts) stays a module too: traced, the
        # flag's value at trace time would be baked into the graph and eval() would not
        # reach it.
        return super().is_leaf_module(m, module_qualified_name) or lookup(m) is not None or (
            next(m.parameters(), None) is None and _reads_training(type(m)))


def _trace(model: nn.Module) -> fx.GraphModule:
    tracer = _Tracer()
    graph = tracer.trace(model)
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def _check_not_prepared(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if isinstance(module, FakeQuantize):
            raise ValueError(
                f"qat.prepare: the model is already prepared: it contains a "
                f"qat.FakeQuantize ({name!r}); prepare the float model instead")


def _check_keys(model: nn.Module, config: Config) -> None:
    """Every override and skip key names, matches or types at least one module."""
    named = list(model.named_modules())
    for field_name, keys in (("overrides", config.overrides), ("skip", config.skip)):
        for key in keys:
            if isinstance(key, type):
                found = any(isinstance(m, key) for _, m in named)
            elif _is_pattern(key):
                found = any(fnmatch.fnmatchcase(n, key) for n, _ in named)
            else:
                found = any(n == key for n, _ in named)
            if not found:
                shown = key.__name__ if isinstance(key, type) else key
                raise ValueError(
                    f"qat.prepare: Config.{field_name} key {shown!r} matches no module "
                    f"of the model")


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, attr, module)


def _has_own_parameters(module: nn.Module) -> bool:
    return next(module.parameters(recurse=False), None) is not None


def _warn_float(names: List[str]) -> None:
    if names:
        warnings.warn(
            f"qat.prepare: no QAT version is registered for these layers with parameters, so "
            f"they stay in float: {', '.join(names)} (qat.register_module adds one)",
            stacklevel=3)


def _qat_class(module: nn.Module, config: Config) -> Optional[type]:
    """The QAT class that ``config`` swaps ``module`` for, or None. Classes marked
    ``dynamic_only`` (recurrent layers: PyTorch has only dynamic integer kernels for them)
    are used with a dynamic config only."""
    qat_cls = lookup(module)
    if getattr(qat_cls, "dynamic_only", False) and not config.dynamic:
        return None
    return qat_cls


def _swap(float_module: nn.Module, name: str, spec_module: nn.Module, config: Config):
    """``(qat_module, activation_spec)``, or None when the module stays in float."""
    qat_cls = _qat_class(float_module, config)
    if qat_cls is None:
        return None
    specs = config.spec_for(name, spec_module)
    if specs is None:
        return None
    return qat_cls.from_float(float_module, specs[0]), specs[1]


# The forward hook that quantizes a swapped module's output in the eager fallback, typed
# for torch.jit.script, which compiles hooks with the argument tuple of each call site.
# Modules whose forward takes an optional second argument (transposed convs: output_size;
# conv and linear layers: input_scale) quantize their output themselves instead.
def _quantize_output(module: nn.Module, inputs: Tuple[torch.Tensor],
                     output: torch.Tensor) -> torch.Tensor:
    return module.activation_post_process(output)


def _swap_in_place(root: nn.Module, config: Config, prefix: str = "") -> List[str]:
    """Swaps the registered modules under ``root`` (named ``prefix`` in the whole model)
    by name. Each swapped module quantizes its output with a FakeQuantize child,
    ``activation_post_process``, called by a forward hook (as PyTorch's eager QAT does).
    Returns the names of the layers with parameters left in float."""
    unsupported = []
    for name, module in list(root.named_modules()):
        if not name:
            continue
        full_name = f"{prefix}.{name}" if prefix else name
        swapped = _swap(module, full_name, module, config)
        if swapped is not None:
            qat_module, activation_spec = swapped
            if not (config.dynamic or getattr(type(qat_module), "weight_only", False)):
                qat_module.activation_post_process = FakeQuantize(activation_spec)
                if len(inspect.signature(qat_module.forward).parameters) <= 1:
                    qat_module.register_forward_hook(_quantize_output)
            _set_module(root, name, qat_module)
        elif (_qat_class(module, config) is None and _has_own_parameters(module)
              and not config.is_skipped(full_name, module)):
            unsupported.append(full_name)
    return unsupported


def _prepare_eager(model: nn.Module, config: Config) -> nn.Module:
    """The fallback for models that cannot be traced: modules swapped in place. Without a
    graph there is no conv + bn fusion and no FakeQuantize at the inputs or after
    functional ops."""
    _warn_float(_swap_in_place(model, config))
    _keep_transformer_layers_in_python(model)
    return model.train()


def _keep_transformer_layers_in_python(model: nn.Module) -> None:
    """In eval mode without gradients, ``nn.TransformerEncoderLayer`` runs one fused native
    kernel on its children's float weights, bypassing their forwards and so their fake
    quantization. That kernel is only taken when ``activation_relu_or_gelu`` is set: clear
    it where a child was swapped."""
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoderLayer) and any(
                isinstance(child, FakeQuantize) for child in module.modules()):
            module.activation_relu_or_gelu = 0


def _single_user(node: fx.Node) -> Optional[fx.Node]:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _is_relu(node: Optional[fx.Node], gm: fx.GraphModule) -> bool:
    """Whether ``node`` is a plain ReLU of its one input."""
    return node is not None and (
        (node.op == "call_module" and type(gm.get_submodule(node.target)) is nn.ReLU)
        or (node.op == "call_function" and node.target in _RELU_FUNCTIONS
            and len(node.args) == 1 and set(node.kwargs) <= {"inplace"})
        or (node.op == "call_method" and node.target in ("relu", "relu_")
            and len(node.args) == 1))


def _takes_indices(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether ``node`` calls a table that takes indices: a QAT embedding, which quantizes
    only its weight, or a float one (skipped in the Config), which quantizes nothing."""
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target),
                                                   (nn.Embedding, nn.EmbeddingBag))


def _is_relu6(node: Optional[fx.Node], gm: fx.GraphModule) -> bool:
    """Whether ``node`` is a ReLU6 of its one input."""
    return node is not None and len(node.args) == 1 and (
        (node.op == "call_module" and type(gm.get_submodule(node.target)) is nn.ReLU6)
        or (node.op == "call_function" and node.target is F.relu6
            and set(node.kwargs) <= {"inplace"}))


def _fixed_range(node: fx.Node, gm: fx.GraphModule):
    """The fixed output range of a sigmoid / hardsigmoid / tanh call, or None."""
    if node.op in ("call_function", "call_method"):
        return _FIXED_RANGES.get(node.target)
    if node.op == "call_module":
        return _FIXED_RANGES.get(type(gm.get_submodule(node.target)))
    return None


# conv type -> (its batch norm, the fused float classes without and with a ReLU).
_CONV_BN = {
    nn.Conv1d: (nn.BatchNorm1d, fused.FusedConvBn1d, fused.FusedConvBnReLU1d),
    nn.Conv2d: (nn.BatchNorm2d, fused.FusedConvBn2d, fused.FusedConvBnReLU2d),
    nn.Conv3d: (nn.BatchNorm3d, fused.FusedConvBn3d, fused.FusedConvBnReLU3d),
}


def _module_calls(gm: fx.GraphModule) -> Dict[str, int]:
    """How many times the graph calls each submodule, by target."""
    return collections.Counter(node.target for node in gm.graph.nodes
                               if node.op == "call_module")


def _fuse_conv_bn(gm: fx.GraphModule, config: Config, spec_modules: Dict[str, nn.Module]):
    """ConvNd -> BatchNormNd (-> ReLU) become one ``FusedConvBnNd`` / ``FusedConvBnReLUNd``
    (:mod:`qat.modules.fused`) under the conv's name, when the conv feeds only the batch norm and
    is called once."""
    calls = _module_calls(gm)
    for bn_node in list(gm.graph.nodes):
        if bn_node.op != "call_module":
            continue
        conv_node = bn_node.args[0] if bn_node.args else None
        if not (isinstance(conv_node, fx.Node) and conv_node.op == "call_module"
                and len(conv_node.users) == 1 and calls[conv_node.target] == 1
                and calls[bn_node.target] == 1):
            continue
        conv = gm.get_submodule(conv_node.target)
        bn = gm.get_submodule(bn_node.target)
        kind = registered_base(type(conv))
        if (kind not in _CONV_BN or type(bn) is not _CONV_BN[kind][0]
                or config.spec_for(conv_node.target, conv) is None):
            continue
        _, conv_bn, conv_bn_relu = _CONV_BN[kind]
        relu_node = _single_user(bn_node)
        is_relu = _is_relu(relu_node, gm)
        fused_module = conv_bn_relu(conv, bn, nn.ReLU()) if is_relu else conv_bn(conv, bn)
        _set_module(gm, conv_node.target, fused_module)
        spec_modules[conv_node.target] = conv
        bn_node.replace_all_uses_with(conv_node)
        gm.graph.erase_node(bn_node)
        if is_relu:
            relu_node.replace_all_uses_with(conv_node)
            gm.graph.erase_node(relu_node)


# Calls that return sizes and other Python values, not tensors.
_NON_TENSOR_METHODS = {"size", "dim", "numel", "item", "tolist"}
_NON_TENSOR_FUNCTIONS = {getattr, len}


def _tensor_nodes(graph: fx.Graph) -> Set[fx.Node]:
    """The nodes that (probably) produce tensors: without example values, a call on a
    tensor is taken to return one unless it reads a size or the like, so that ``x.size(0)
    * 2`` gets no FakeQuantize."""
    tensors: Set[fx.Node] = set()
    for node in graph.nodes:
        if node.op in ("placeholder", "get_attr", "call_module"):
            tensors.add(node)
        elif node.op in ("call_function", "call_method"):
            if node.target in _NON_TENSOR_FUNCTIONS or node.target in _NON_TENSOR_METHODS:
                continue
            inputs: List[fx.Node] = []
            fx.node.map_arg((node.args, node.kwargs), inputs.append)
            if any(n in tensors for n in inputs):
                tensors.add(node)
    return tensors


def _calls_one_of(node: fx.Node, gm: fx.GraphModule, functions, methods, modules) -> bool:
    """Whether ``node`` calls one of ``functions``, a method named in ``methods``, or a
    submodule of one of the ``modules`` types."""
    if node.op == "call_function":
        return node.target in functions
    if node.op == "call_method":
        return node.target in methods
    if node.op == "call_module":
        return _op_roles.is_module_of(gm.get_submodule(node.target), modules)
    return False


def fixed_qparams_spec(spec: QuantSpec) -> QuantSpec:
    """The spec of the quantizer after an op whose output range fixes its qparams (a sigmoid,
    a tanh, a fused ReLU6) when the activations use ``spec``: per tensor, and the
    straight-through estimator where ``spec``'s would learn the qparams (LSQ, LSQ+, PACT;
    ``qat::fixed_qparams_spec``, which the C++ prepare calls too)."""
    return dataclasses.replace(spec, **_C.fixed_qparams_spec(dataclasses.asdict(spec)))


class _Inserter:
    """Adds activation FakeQuantize modules to a graph, one per quantized tensor."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.quantized: Set[fx.Node] = set()
        # node -> the FakeQuantize node on its output, so that a float tensor feeding
        # several swapped modules is quantized once (one module, one set of qparams).
        self.fake_quant: Dict[tuple, fx.Node] = {}

    def after(self, node: fx.Node, spec: QuantSpec, users=None,
              fixed_range=None) -> fx.Node:
        """A FakeQuantize on ``node``'s output, feeding ``users`` (default: all of them);
        a :class:`FixedQParamsFakeQuantize` of :func:`fixed_qparams_spec` for an op with the
        output range ``fixed_range``, ``(lo, hi, inclusive)`` or ``(lo, hi, inclusive,
        absorb_clamp)``: with ``absorb_clamp``, the quantizer also does the op's clamp
        (``clamps_input``) where its spec can."""
        everyone = users is None
        users = list(node.users) if everyone else users
        if fixed_range is not None:
            spec = fixed_qparams_spec(spec)
            lo, hi, inclusive, *absorb = fixed_range
            absorbs = bool(absorb) and absorb[0] and FixedQParamsFakeQuantize.can_clamp_input(spec)
            fixed_range = (lo, hi, inclusive, absorbs)
        key = (node, dataclasses.astuple(spec), fixed_range)
        fq_node = self.fake_quant.get(key)
        if fq_node is None:
            name = f"{node.name}_activation_fake_quant"
            if hasattr(self.gm, name):  # users wanting other specs have one already
                name = f"{name}_{len(self.fake_quant)}"
            self.gm.add_submodule(name, FakeQuantize(spec) if fixed_range is None
                                  else FixedQParamsFakeQuantize(spec, fixed_range[:2],
                                                                *fixed_range[2:]))
            with self.gm.graph.inserting_after(node):
                fq_node = self.gm.graph.call_module(name, (node,))
            self.fake_quant[key] = fq_node
        for user in users:
            user.replace_input_with(node, fq_node)
        self.quantized.add(fq_node)
        if everyone:
            self.quantized.add(node)
        return fq_node


def _prepare_graph(gm: fx.GraphModule, config: Config) -> None:
    spec_modules: Dict[str, nn.Module] = {}
    _fuse_conv_bn(gm, config, spec_modules)

    activation: Dict[fx.Node, QuantSpec] = {}
    swapped_specs: Dict[str, QuantSpec] = {}
    unsupported = []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        if node.target in swapped_specs:
            # A module called again (the same layer applied twice): its QAT version is in
            # place; each call site gets its own output FakeQuantize, the weights are shared.
            activation[node] = swapped_specs[node.target]
            continue
        module = gm.get_submodule(node.target)
        spec_module = spec_modules.get(node.target, module)
        swapped = _swap(module, node.target, spec_module, config)
        if swapped is not None:
            _set_module(gm, node.target, swapped[0])
            activation[node] = swapped_specs[node.target] = swapped[1]
        elif (_qat_class(module, config) is None
              and not config.is_skipped(node.target, spec_module)):
            if _has_own_parameters(module) and not has_integer_norm(module):
                unsupported.append(node.target)
            # A leaf with children (a torch.nn container such as TransformerEncoderLayer,
            # whose forward is not traced) has its children swapped in place.
            unsupported.extend(_swap_in_place(module, config, node.target))
    gm.delete_all_unused_submodules()
    _warn_float(unsupported)
    if config.dynamic:
        # Dynamic quantization chooses activation qparams at run time, from each tensor;
        # the graph still changed (conv + batch norm fusion).
        gm.graph.lint()
        gm.recompile()
        return

    inserter = _Inserter(gm)
    tensors = _tensor_nodes(gm.graph)
    after_relu: Dict[fx.Node, QuantSpec] = {}
    after_relu6: Dict[fx.Node, QuantSpec] = {}
    for node in list(gm.graph.nodes):
        if node.op == "placeholder":
            # A placeholder with a default is an optional argument, often not a tensor;
            # indices for an embedding, and what is compared (token ids made a mask), stay
            # as they are.
            users = [u for u in node.users
                     if not _takes_indices(u, gm) and _op_roles.comparison(u) is None]
            if not node.args and users:
                inserter.after(node, config.activation,
                               users=None if len(users) == len(node.users) else users)
            continue
        if node in inserter.quantized:
            continue
        first = node.args[0] if node.args else None
        if node in activation:
            if _takes_indices(node, gm):
                continue  # its input is indices, its output stays float
            # The integer module takes a quantized input: quantize a float one first.
            if isinstance(first, fx.Node) and first not in inserter.quantized:
                inserter.after(first, activation[node], users=[node])
            spec = activation[node]
            relu = _single_user(node)
            if _is_relu(relu, gm):
                # The integer kernel applies the ReLU before it requantizes (conv2d_relu,
                # linear_relu): one FakeQuantize, after the ReLU, with its range.
                after_relu[relu] = spec
                continue
            if _is_relu6(relu, gm):
                # Likewise with the output scale 6/255, whose saturation is the 6.
                after_relu6[relu] = spec
                continue
        elif node in after_relu:
            spec = after_relu[node]
        elif node in after_relu6:
            fq_node = inserter.after(node, after_relu6[node], fixed_range=(0.0, 6.0, True, True))
            if gm.get_submodule(fq_node.target).clamps_input:
                _remove_absorbed_clamp(gm, node, fq_node)
            continue
        elif _fixed_range(node, gm) is not None and first in inserter.quantized:
            inserter.after(node, config.activation, fixed_range=(*_fixed_range(node, gm), False))
            continue
        elif _calls_one_of(node, gm, *_QUANTIZED) and node in tensors:
            spec = config.activation
            if node.op == "call_module":
                specs = config.spec_for(node.target, gm.get_submodule(node.target))
                if specs is None:
                    continue
                spec = specs[1]
        else:
            if _calls_one_of(node, gm, *_PASS) and first in inserter.quantized:
                inserter.quantized.add(node)
            continue
        users = list(node.users)
        if len(users) == 1 and users[0].op == "call_function" and users[0].target is torch.cat:
            # cat requantizes its inputs to its output's qparams: the FakeQuantize after the
            # cat stands for them all. An output that several cats read (DenseNet's feature
            # maps) is stored once, quantized with qparams of its own, as the integer model
            # stores it; each cat then requantizes it.
            inserter.quantized.add(node)
            continue
        inserter.after(node, spec)
    _pass_kernel_qparams(gm, activation, config.backend)
    _give_relus_to_quantizers(gm)
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()


def _remove_absorbed_clamp(gm: fx.GraphModule, relu6: fx.Node, fq_node: fx.Node) -> None:
    """Removes ``relu6``, whose clamp the fixed [0, 6] FakeQuantize after it does
    (``clamps_input``): the pair read and wrote the activation twice, forward and backward,
    for the same values and gradients. The integer model is unchanged: the kernel's output
    qparams, 6/255 and 0, saturate at 0 and 6 without a fused ReLU."""
    fq_node.replace_input_with(relu6, relu6.args[0])
    gm.graph.erase_node(relu6)


def _give_relus_to_quantizers(gm: fx.GraphModule) -> None:
    """A conv + batch norm + ReLU whose output only its FakeQuantize reads leaves the ReLU
    to that quantizer where it can take it (:meth:`FakeQuantize.can_take_relu`): the same
    values and gradients in one pass over the activation instead of two, forward and
    backward. qat.convert drops the ``relu`` keyword (KERNEL_KWARGS), so that a layer left
    in float does its ReLU; the integer kernel is the fused conv + ReLU either way."""
    calls = collections.Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), _ReLU):
            continue
        users = list(node.users)
        if len(users) != 1 or users[0].op != "call_module" or calls[users[0].target] != 1:
            continue
        fq = gm.get_submodule(users[0].target)
        if type(fq) is FakeQuantize and fq.can_take_relu():
            fq.relu_input = True
            node.kwargs = {**node.kwargs, "relu": False}


# Batch norms whose eval is a fixed affine map, which quantized::batch_norm*d runs.
_BATCH_NORM_DIMS = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}


def integer_batch_norm_dims(module: nn.Module) -> Optional[int]:
    """The dimensions of a standalone batch norm that qat.convert puts on
    ``quantized::batch_norm*d`` (one with running statistics), or None."""
    if type(module) in _BATCH_NORM_DIMS and module.running_mean is not None:
        return _BATCH_NORM_DIMS[type(module)]
    return None


def has_integer_norm(module: nn.Module) -> bool:
    """Whether qat.convert puts the normalization layer ``module`` on an integer kernel
    (given quantized input and output): a batch norm with running statistics, a layer norm
    or a group norm."""
    return integer_batch_norm_dims(module) is not None or type(module) in (nn.LayerNorm,
                                                                           nn.GroupNorm)


def has_integer_kernel(module: nn.Module) -> bool:
    """Whether qat.convert can put the QAT layer ``module`` on an integer kernel with an
    int32 bias (given quantized input and output): a Linear, a conv (batch norm folded in or
    not) or a transposed conv with zero padding, as numbers or as a string the same on both
    sides ("valid"; "same" where dilation * (kernel - 1) is even: the odd one left over
    pads the right only, which the kernels cannot), a transposed conv also with one weight
    scale per output channel (groups 1; a grouped one has one per output channel of a
    group)."""
    if isinstance(module, Linear):
        return True
    if isinstance(module, (ConvTranspose1d, ConvTranspose2d)) and module.groups != 1:
        return False
    return isinstance(module, (Conv1d, Conv2d, Conv3d, _ConvBnNd, ConvTranspose1d,
                               ConvTranspose2d)) and module.padding_mode == "zeros" and (
        not isinstance(module.padding, str) or not _conv_padding(module)[1])


def _output_quantizer(node: fx.Node, gm: fx.GraphModule, is_fake_quant,
                      relu_ok: bool) -> Tuple[Optional[fx.Node], Optional[fx.Node], bool]:
    """(the FakeQuantize node whose qparams an integer op at ``node`` writes its output
    with, the ReLU / ReLU6 between them or None, whether that FakeQuantize quantizes
    ``node``'s output itself); (None, None, False) when there is none. ``is_fake_quant``
    tells a FakeQuantize's node. qat.convert places the integer ops by it, and prepare
    passes layers the output qparams their kernel will have by it (_pass_kernel_qparams)."""
    users = list(node.users)
    if len(users) != 1:
        return None, None, False
    user, relu = users[0], None
    if relu_ok and (_is_relu(user, gm) or _is_relu6(user, gm)) and len(user.users) == 1:
        relu, (user,) = user, user.users
    if is_fake_quant(user):
        return user, relu, True
    if user.op == "call_function" and user.target is torch.cat:
        # prepare quantizes a cat's inputs with the FakeQuantize after the cat: the op
        # writes its output with those qparams, and the cat requantizes nothing.
        fq_node, _, _ = _output_quantizer(user, gm, is_fake_quant, relu_ok=False)
        if fq_node is not None:
            return fq_node, relu, False
    return None, None, False


def _fuses_relu(relu: Optional[fx.Node], fq: nn.Module, gm: fx.GraphModule) -> bool:
    """Whether an integer kernel's ReLU covers ``relu`` before the FakeQuantize ``fq``: a
    ReLU always; a ReLU6 when ``fq`` saturates at 6 (prepare's fixed [0, 6] qparams)."""
    if relu is None or not _is_relu6(relu, gm):
        return True
    return isinstance(fq, FixedQParamsFakeQuantize)


#: The keyword arguments prepare gives layers for the simulation alone (qat.convert drops
#: them): :func:`_pass_kernel_qparams`'s, and :func:`_give_relus_to_quantizers`'s.
KERNEL_KWARGS = ("input_scale", "kernel_qparams", "relu")


def _pass_kernel_qparams(gm: fx.GraphModule, swapped, backend: str) -> None:
    """Gives each layer that the integer model runs with an int32 bias
    (:func:`has_integer_kernel`) the scale of the FakeQuantize before it, ``input_scale=``,
    so that it rounds its bias as the kernel will (``torch.ops.qat.round_bias``); a layer
    that stays in float keeps its bias as it is, as its float version in the converted
    model does. For qnnpack, whose arithmetic ``torch.ops.qat.requantize`` reproduces, it
    also gets ``kernel_qparams=`` (``qat.modules._common.KernelQParams``) when the
    FakeQuantize its kernel writes with is known: in eval it then computes its output as the
    kernel does."""
    def is_fake_quant(n: fx.Node) -> bool:
        return n.op == "call_module" and isinstance(gm.get_submodule(n.target), FakeQuantize)

    for node in swapped:
        if not has_integer_kernel(gm.get_submodule(node.target)):
            continue
        source = node.args[0] if node.args else None
        # Ops such as flatten, relu and max pooling keep their input's qparams.
        while isinstance(source, fx.Node) and _calls_one_of(source, gm, *_PASS) and source.args:
            source = source.args[0]
        if not (isinstance(source, fx.Node) and is_fake_quant(source)):
            continue
        with gm.graph.inserting_before(node):
            kwargs = {"input_scale": gm.graph.get_attr(f"{source.target}.scale")}
            fq_node, relu, _ = _output_quantizer(node, gm, is_fake_quant, relu_ok=True)
            if (backend == "qnnpack" and fq_node is not None and len(node.args) == 1
                    and _fuses_relu(relu, gm.get_submodule(fq_node.target), gm)):
                kwargs["kernel_qparams"] = tuple(
                    gm.graph.get_attr(f"{target}.{name}") for target, name in (
                        (source.target, "fake_quant_enabled"), (fq_node.target, "scale"),
                        (fq_node.target, "observer_enabled"),
                        (fq_node.target, "fake_quant_enabled")))
        node.kwargs = {**node.kwargs, **kwargs}


def prepare(model: nn.Module, config: Optional[Config] = None, example_inputs=None,
            inplace: bool = False) -> nn.Module:
    """Turns a float model into a QAT model, in train mode.

    With ``torch.fx``: ConvNd -> BatchNormNd (-> ReLU) are fused into
    :class:`qat.modules.ConvBn2d` / :class:`qat.modules.ConvBnReLU2d` (and the 1d / 3d
    ones; batch norm folded into the fake-quantized weight); every module with a
    registered QAT class (:func:`qat.register_module`; a subclass that overrides no method
    of a registered class too) is swapped for it, with the weight
    spec ``config.spec_for(name, module)`` gives (None: it stays in float); a
    :class:`qat.FakeQuantize` with the activation spec is inserted at each input and after
    each op whose output the integer model holds quantized: swapped modules, ``+``, ``*``,
    ``torch.add``, ``torch.mul``, ``torch.cat``, ``mean``, average pooling, hardswish, ELU,
    leaky ReLU. A swapped module followed by a ReLU is quantized after the ReLU (the
    integer kernels fuse it); after a ReLU6 it gets a
    :class:`qat.FixedQParamsFakeQuantize` for [0, 6] (scale 6/255: the integer ReLU
    kernel's saturation is the 6); a ReLU6 or Hardtanh
    elsewhere gets a FakeQuantize of its own. Ops that keep their input's qparams (relu,
    max pooling, flatten / reshape / view, dropout, identity) get none. These roles are
    the op-role table's (``csrc/qat/op_roles.h``, shared with the C++ front end). The
    inputs of ``torch.cat`` have no FakeQuantize of their own when the cat is their only
    user: the one after the cat
    quantizes them all, as the integer cat requantizes its inputs to its output's qparams.
    Sigmoid, hardsigmoid and tanh of a quantized tensor get a
    :class:`qat.FixedQParamsFakeQuantize` (the fixed qparams of the integer kernels). A
    float tensor entering a swapped module is quantized first. Weight-only modules
    (embeddings) take their input as it is and get no output FakeQuantize. With
    ``config.dynamic`` no activation FakeQuantize is added. The fused conv + batch norms
    that the graph calls once fake-quantize their folded weights together, at the first
    one's call with gradients on, each layer then taking its own (the same values; see
    :func:`qat.modules.conv_bn.fold_weights_ahead`).

    ``nn.MultiheadAttention`` and the encoder and decoder layers and stacks
    (``nn.TransformerEncoderLayer`` / ``Encoder``, ``nn.TransformerDecoderLayer`` /
    ``Decoder``) are first replaced by traceable equivalents (``qat._transformer``: the
    same arithmetic, each query / key / value / output projection an ``nn.Linear``), so
    that their projections are swapped and converted like any Linear; the attention
    (scores, masks, softmax, weighted sum) runs in float. torchvision's Swin window
    attention (V1, V2) gets a stand-in too, its ``qkv`` / ``proj`` called as modules.
    Token ids compared into a mask are not quantized. Other torch.nn containers that are
    not traced into have their registered children swapped in place, each quantizing its
    output with a FakeQuantize child,
    ``activation_post_process``; transformer layers with QAT children are kept off
    PyTorch's fused eval kernel, which reads the float weights directly.
    Parameter-free modules whose forward reads ``self.training`` stay modules, so that
    ``eval()`` reaches them.

    When tracing fails (e.g. Python control flow on tensors) the registered modules are
    swapped in place instead, with one warning naming the exception; there is then no
    conv + bn fusion and no FakeQuantize at the inputs or after functional ops.

    Layers with parameters and no registered QAT class stay in float, with one warning
    naming them. The result can be scripted with ``torch.jit.script`` and keeps training
    scripted (its FakeQuantize modules observe with the fused operator).

    Args:
        model: the float model.
        config: a :class:`qat.Config` (default: ``qat.presets.int8()``).
        example_inputs: an input of the model (a tensor or a tuple of tensors), or None.
            When given, the prepared model is run once on it in eval mode with its
            observers and fake quantization off (nothing in the model changes), so that a
            graph that does not run is reported here, before training, rather than at the
            first step.
        inplace: modify ``model`` itself instead of a deep copy. The traced result is a new
            ``torch.fx.GraphModule`` that shares ``model``'s submodules. When prepare fails,
            ``model`` keeps the modules it had.

    Returns:
        The QAT model (a ``GraphModule`` when traced), in train mode.

    A module called more than once in ``forward`` (one layer applied twice) is swapped
    once: each call gets its own output FakeQuantize, and the weights are shared (the
    integer model holds one integer layer per call).

    Raises:
        TypeError: when ``model`` is a TorchScript module (prepare the Python module it was
            scripted from) or not an ``nn.Module``.
        ValueError: when ``model`` is already prepared, or an override or skip key of
            ``config`` matches no module (naming it).
        Anything a registered QAT class's ``from_float`` raises; with ``inplace`` the model
        is then left as it was.
    """
    config = Config() if config is None else config
    if not isinstance(config, Config):
        raise TypeError(f"qat.prepare: config must be a qat.Config, got {type(config).__name__}")
    if isinstance(model, (torch.jit.ScriptModule, torch.jit.ScriptFunction)):
        raise TypeError(
            "qat.prepare: model is a TorchScript module (from torch.jit.script or "
            "torch.jit.trace), whose layers cannot be swapped; prepare the Python nn.Module "
            "it was made from, and script the prepared model if you need TorchScript")
    if not isinstance(model, nn.Module):
        raise TypeError(f"qat.prepare: model must be a torch.nn.Module, got "
                        f"{type(model).__name__}")
    _check_not_prepared(model)
    _check_keys(model, config)
    if example_inputs is not None and not (
            isinstance(example_inputs, torch.Tensor) or (
                isinstance(example_inputs, (tuple, list)) and example_inputs and
                all(isinstance(t, torch.Tensor) for t in example_inputs))):
        raise TypeError(f"qat.prepare: example_inputs must be a tensor or a tuple of tensors, "
                        f"got {type(example_inputs).__name__}")
    qmodel = _prepare_keeping(model, config, inplace)
    if example_inputs is not None:
        _try_inputs(qmodel, example_inputs)
    return qmodel


def _try_inputs(qmodel: nn.Module, example_inputs) -> None:
    """Runs ``qmodel`` once on ``example_inputs`` without changing it: eval mode, no
    gradients, every FakeQuantize passing its input through; the switches and modes are
    put back."""
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
    modes = [(m, m.training) for m in qmodel.modules()]
    switches = [(m, m.observer_enabled.clone(), m.fake_quant_enabled.clone())
                for m in qmodel.modules() if isinstance(m, FakeQuantize)]
    try:
        qmodel.eval()
        for fq, _, _ in switches:
            fq.observer_enabled.fill_(0)
            fq.fake_quant_enabled.fill_(0)
        with torch.no_grad():
            qmodel(*inputs)
    except Exception as error:  # noqa: BLE001 - any failure is the model's, reported as one
        raise RuntimeError(f"qat.prepare: the prepared model fails on example_inputs: "
                           f"{type(error).__name__}: {error}") from error
    finally:
        for module, mode in modes:
            module.training = mode
        for fq, observe, quantize in switches:
            fq.observer_enabled.copy_(observe)
            fq.fake_quant_enabled.copy_(quantize)


def _prepare_keeping(model: nn.Module, config: Config, inplace: bool) -> nn.Module:
    if not inplace:
        return _prepare(copy.deepcopy(model), config)
    # In place, a failure part way leaves the model as it was: its module tree is put back
    # (the QAT modules share the float modules' parameters, which prepare does not modify).
    tree = [(module, dict(module._modules)) for module in model.modules()]
    training = [(module, module.training) for module in model.modules()]
    try:
        return _prepare(model, config)
    except BaseException:
        for module, children in tree:
            module._modules.clear()
            module._modules.update(children)
        for module, mode in training:
            module.training = mode
        raise


def _warn_overriding_subclasses(model: nn.Module, config: Config) -> None:
    """Names the layers of a model's own subclasses of a registered layer that override
    one of its methods: no QAT class is registered for them (their computation may
    differ), so tracing goes through them and their ops run in float."""
    names = [name for name, module in model.named_modules()
             if lookup(module) is None and not config.is_skipped(name, module)
             and type(module).__module__.split(".")[0] != "torch"
             and any(registered_base(base) is not None for base in type(module).__mro__)]
    if names:
        warnings.warn(
            f"qat.prepare: these layers subclass a layer qat quantizes but override its "
            f"methods, so they run as their code, in float: {', '.join(names)} (register a "
            f"QAT class for the subclass with qat.register_module)", stacklevel=4)


def _prepare(model: nn.Module, config: Config) -> nn.Module:
    # Attention layers become modules of nn.Linear projections that trace (and swap).
    model = make_traceable(model)
    _warn_overriding_subclasses(model, config)
    try:
        gm = _trace(model)
    except Exception as error:  # noqa: BLE001 - any tracing failure takes the fallback
        warnings.warn(
            f"qat.prepare: torch.fx tracing failed ({type(error).__name__}: {error}); used "
            f"the eager fallback: modules swapped in place, without conv+bn fusion or "
            f"activation FakeQuantize", stacklevel=3)
        return _named(_prepare_eager(model, config))
    _prepare_graph(gm, config)
    _schedule_folds(gm)
    _keep_transformer_layers_in_python(gm)
    # Carried to the converted model and the exported file's metadata (a string, which
    # torch.jit.script keeps as it is).
    gm.qat_config = json.dumps(config.to_dict())
    return _named(gm.train())


def _schedule_folds(gm: fx.GraphModule) -> None:
    """Has the conv + batch norms of the graph fake-quantize their folded weights together,
    at the first one's call (:func:`qat.modules.conv_bn.fold_weights_ahead`): those the
    graph calls once and whose modules and tensors no other module holds. The graph runs
    every node once per forward and nothing else changes their state in between, so each
    takes the weight made from the state it would have read itself."""
    calls = _module_calls(gm)
    holders = collections.Counter()
    for _, module in gm.named_modules(remove_duplicate=False):
        for item in (*module._parameters.values(), *module._buffers.values(),
                     *module._modules.values()):
            if item is not None:
                holders[id(item)] += 1
    scheduled = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or calls[node.target] != 1:
            continue
        module = gm.get_submodule(node.target)
        if not isinstance(module, _ConvBnNd):
            continue
        modules, tensors = module._fold_reads()
        if all(holders[id(item)] == 1 for item in (module, *modules, *tensors)
               if item is not None):
            scheduled.append(module)
    fold_weights_ahead(scheduled)


def _named(model: nn.Module) -> nn.Module:
    """Tells each FakeQuantize its path in ``model``, which its errors name."""
    for name, module in model.named_modules():
        if isinstance(module, FakeQuantize):
            module.qualified_name = name
    return model
