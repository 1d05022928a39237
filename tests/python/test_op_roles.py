"""The op-role table lives in C++ (csrc/qat/op_roles.h); Python only spells its ops. Every op
of the table has Python spellings and every spelling belongs to an op of the table, so that
a role added in C++ cannot be missed in Python nor a Python-only role creep back in."""

import torch
import torch.nn.functional as F
from torch import nn

from qat import _C, _op_roles

ROLES = {"layer", "passes_qparams", "requantizes", "fixed_range", "moves_data"}


def test_every_op_of_the_table_has_python_spellings_and_no_other():
    table = _C._op_roles()
    assert set(table) == set(_op_roles._SPELLINGS)
    assert {role for role, _, _, _ in table.values()} <= ROLES
    for name, (role, _, _, _) in table.items():
        if role != "layer":
            functions, methods, modules = _op_roles.spellings(name)
            assert functions or methods or modules, name


def test_roles_read_from_the_table():
    functions, methods, modules = _op_roles.with_role("passes_qparams")
    assert F.relu in functions and "view" in methods and nn.MaxPool2d in modules
    assert F.relu6 not in functions and nn.ReLU6 not in modules
    requantized = _op_roles.with_role("requantizes")
    assert torch.cat in requantized[0] and nn.ReLU6 in requantized[2]
    # Averages are requantized but run in float: their kernels would round twice.
    assert nn.AvgPool2d not in _op_roles.with_role("requantizes", integer_kernel=True)[2]
    ranges = _op_roles.fixed_ranges()
    assert ranges[nn.Sigmoid] == (0.0, 1.0) and ranges["tanh"] == (-1.0, 1.0)
