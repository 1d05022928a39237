"""Rules the Python front end shares with the C++ one (tests/cpp/test_front_end_rules.cpp)."""

import inspect

import pytest
from torch import nn

import qat
from qat.modules import registry


class _Scale(nn.Module):
    def forward(self, x):
        return 2 * x


class _QatScale(_Scale):
    @classmethod
    def from_float(cls, module, weight_spec=None):
        return cls()


class _OtherQatScale(_Scale):
    @classmethod
    def from_float(cls, module, weight_spec=None):
        return cls()


@pytest.fixture
def own_registry(monkeypatch):
    """The built-in registrations, on a copy this test may change."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


def test_registering_another_qat_class_needs_replace(own_registry):
    qat.register_module(_Scale, _QatScale)
    with pytest.raises(ValueError, match=(
            r"qat.register_module: .*\._Scale is registered already, with .*\._QatScale; "
            r"pass replace=True to replace it with .*\._OtherQatScale")):
        qat.register_module(_Scale, _OtherQatScale)
    assert qat.modules.lookup(_Scale) is _QatScale

    qat.register_module(_Scale, _OtherQatScale, replace=True)
    assert qat.modules.lookup(_Scale) is _OtherQatScale


def test_a_built_in_registration_is_not_replaced_by_accident(own_registry):
    with pytest.raises(ValueError, match=r"torch\.nn\.modules\.linear\.Linear is registered "
                                         r"already, with qat\.modules\.linear\.Linear"):
        qat.register_module(nn.Linear, _QatScale)
    assert qat.modules.lookup(nn.Linear) is qat.modules.Linear


def test_registering_the_same_pair_again_does_nothing(own_registry):
    qat.register_module(_Scale, _QatScale)
    qat.register_module(_Scale, _QatScale)  # a re-run notebook cell
    qat.register_module(_Scale, _QatScale, replace=False)
    qat.register_module(nn.Linear, qat.modules.Linear, replace=False)
    assert qat.modules.lookup(_Scale) is _QatScale
    assert qat.modules.lookup(nn.Linear) is qat.modules.Linear


def test_replace_is_keyword_only():
    replace = inspect.signature(qat.register_module).parameters["replace"]
    assert replace.kind is inspect.Parameter.KEYWORD_ONLY and replace.default is False
