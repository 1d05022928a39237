"""Python's spellings of the ops in qat's op-role table.

What each op does to quantization (passes its input's qparams, requantizes, has a fixed
output range, moves data; whether PyTorch's quantized kernels run it) is decided once, in
C++ (``csrc/qat/op_roles.h``, read here through ``qat._C._op_roles``), for prepare and
convert in both front ends. This module only says how Python code calls each op: as a
function, a tensor method or a module type.
"""

import operator
from typing import Dict, List, Optional, Set, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import _C

# torchvision's residual dropout (identity in eval), named rather than imported: importing
# torchvision costs seconds and qat does not need it.
_STOCHASTIC_DEPTH = "torchvision.ops.stochastic_depth.StochasticDepth"

# op name -> (functions, method names, module types or qualified class names). Layers
# (convs, linear) are swapped by the module registry (qat.modules), not matched here.
_SPELLINGS = {
    "conv1d": ((), (), ()),
    "conv2d": ((), (), ()),
    "conv3d": ((), (), ()),
    "linear": ((), (), ()),
    "relu": ((F.relu, torch.relu), ("relu", "relu_"), (nn.ReLU,)),
    "max_pool1d": ((F.max_pool1d,), (), (nn.MaxPool1d,)),
    "max_pool2d": ((F.max_pool2d,), (), (nn.MaxPool2d,)),
    "flatten": ((torch.flatten,), ("flatten",), (nn.Flatten,)),
    "reshape": ((torch.reshape,), ("reshape",), ()),
    "view": ((), ("view",), ()),
    "contiguous": ((), ("contiguous",), ()),
    "dropout": ((F.dropout,), (), (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                                   nn.AlphaDropout, _STOCHASTIC_DEPTH)),
    "identity": ((), (), (nn.Identity,)),
    "add": ((operator.add, operator.iadd, torch.add), ("add", "add_"), ()),
    "mul": ((operator.mul, operator.imul, torch.mul), ("mul", "mul_"), ()),
    "cat": ((torch.cat,), (), ()),
    "hardswish": ((F.hardswish,), (), (nn.Hardswish,)),
    "elu": ((F.elu,), (), (nn.ELU,)),
    "leaky_relu": ((F.leaky_relu,), (), (nn.LeakyReLU,)),
    "batch_norm": ((F.batch_norm,), (), (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)),
    "layer_norm": ((F.layer_norm,), (), (nn.LayerNorm,)),
    "group_norm": ((F.group_norm,), (), (nn.GroupNorm,)),
    "mean": ((torch.mean,), ("mean",), ()),
    "avg_pool1d": ((F.avg_pool1d,), (), (nn.AvgPool1d,)),
    "avg_pool2d": ((F.avg_pool2d,), (), (nn.AvgPool2d,)),
    "avg_pool3d": ((F.avg_pool3d,), (), (nn.AvgPool3d,)),
    "adaptive_avg_pool1d": ((F.adaptive_avg_pool1d,), (), (nn.AdaptiveAvgPool1d,)),
    "adaptive_avg_pool2d": ((F.adaptive_avg_pool2d,), (), (nn.AdaptiveAvgPool2d,)),
    "adaptive_avg_pool3d": ((F.adaptive_avg_pool3d,), (), (nn.AdaptiveAvgPool3d,)),
    "relu6": ((F.relu6,), (), (nn.ReLU6,)),
    "hardtanh": ((F.hardtanh,), (), (nn.Hardtanh,)),
    "sigmoid": ((torch.sigmoid, F.sigmoid), ("sigmoid",), (nn.Sigmoid,)),
    "hardsigmoid": ((F.hardsigmoid,), (), (nn.Hardsigmoid,)),
    "tanh": ((torch.tanh, F.tanh), ("tanh",), (nn.Tanh,)),
    "transpose": ((torch.transpose,), ("transpose",), ()),
    "permute": ((torch.permute,), ("permute",), ()),
    "squeeze": ((torch.squeeze,), ("squeeze",), ()),
    "unsqueeze": ((torch.unsqueeze,), ("unsqueeze",), ()),
    "getitem": ((operator.getitem,), (), ()),
}

# Comparisons: their outputs are masks and their inputs often ids, never quantized (no role
# in the table); exporters lower them as comparisons. Python's spellings -> name.
COMPARISONS: Dict[object, str] = {
    operator.eq: "eq", torch.eq: "eq", operator.ne: "ne", torch.ne: "ne",
    operator.lt: "lt", torch.lt: "lt", operator.le: "le", torch.le: "le",
    operator.gt: "gt", torch.gt: "gt", operator.ge: "ge", torch.ge: "ge",
}
COMPARISON_METHODS = ("eq", "ne", "lt", "le", "gt", "ge")


def comparison(node) -> Optional[str]:
    """The comparison a graph node calls (``"eq"``, ``"lt"``, ...), or None."""
    if node.op == "call_function":
        return COMPARISONS.get(node.target)
    if node.op == "call_method" and node.target in COMPARISON_METHODS:
        return node.target
    return None


# name -> (role, integer_kernel, lo, hi), from C++.
TABLE: Dict[str, Tuple[str, bool, float, float]] = dict(_C._op_roles())


def _names(roles, integer_kernel=None):
    return [name for name, (role, kernel, _, _) in TABLE.items()
            if role in roles and (integer_kernel is None or kernel == integer_kernel)]


def spellings(*names: str) -> Tuple[Set, Set[str], Tuple[type, ...]]:
    """The functions, method names and module types that call the ops ``names``."""
    functions, methods, modules = set(), set(), []
    for name in names:
        f, m, t = _SPELLINGS[name]
        functions.update(f)
        methods.update(m)
        modules.extend(t)
    return functions, methods, tuple(modules)


def names_by_spelling() -> Tuple[Dict, Dict[str, str], List[Tuple[object, str]]]:
    """(function -> op name, method name -> op name, [(module type, op name)]): how an
    exporter that meets a spelling in a graph finds the op it calls."""
    functions, methods, modules = {}, {}, []
    for name, (fs, ms, ts) in _SPELLINGS.items():
        functions.update({f: name for f in fs})
        methods.update({m: name for m in ms})
        modules.extend((t, name) for t in ts)
    return functions, methods, modules


def is_module_of(module: nn.Module, modules: Tuple) -> bool:
    """Whether ``module`` is an instance of one of the types in ``modules`` or of a class
    that ``modules`` names by its qualified name."""
    cls = type(module)
    return (isinstance(module, tuple(t for t in modules if isinstance(t, type)))
            or f"{cls.__module__}.{cls.__qualname__}" in modules)


def with_role(*roles: str, integer_kernel=None) -> Tuple[Set, Set[str], Tuple[type, ...]]:
    """The spellings of the ops of ``roles`` (those PyTorch's quantized kernels run, or do
    not run, when ``integer_kernel`` is given)."""
    return spellings(*_names(roles, integer_kernel))


def fixed_ranges() -> Dict[object, Tuple[float, float]]:
    """Each spelling of an op with a fixed output range -> that range."""
    ranges = {}
    for name in _names(("fixed_range",)):
        _, _, lo, hi = TABLE[name]
        functions, methods, modules = spellings(name)
        ranges.update({spelling: (lo, hi) for spelling in (*functions, *methods, *modules)})
    return ranges
