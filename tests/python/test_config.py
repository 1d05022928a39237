"""qat.Config and qat.presets: validation errors that name the field, override precedence
(exact name > pattern > type) and skip, and the presets' bits."""

import pytest
import torch
from torch import nn

import qat
from qat import Config, QuantSpec

W4 = QuantSpec(bits=4, symmetric=True, per_channel=True)
A4 = QuantSpec(bits=4)
W6 = QuantSpec(bits=6, symmetric=True, per_channel=True)


def test_defaults_follow_qnnpack():
    config = Config()
    assert config.backend == "qnnpack" and not config.dynamic
    w, a = config.weight, config.activation
    assert (w.bits, w.symmetric, w.per_channel, w.axis, w.observer) == (8, True, True, 0, "minmax")
    assert w.quant_range == (-128, 127)
    assert (a.bits, a.symmetric, a.per_channel, a.observer) == (8, False, False, "moving_average")
    assert a.quant_range == (0, 255)
    assert config.spec_for("fc", nn.Linear(2, 2)) == (config.weight, config.activation)


@pytest.mark.parametrize("kwargs, field", [
    (dict(backend="tensorrt"), "backend"),
    (dict(weight=8), "weight"),
    (dict(activation="uint8"), "activation"),
    (dict(dynamic="yes"), "dynamic"),
    (dict(overrides=[("fc", (W4, A4))]), "overrides"),
    (dict(overrides={3: (W4, A4)}), "overrides"),
    (dict(overrides={int: (W4, A4)}), "overrides"),
    (dict(overrides={"fc": W4}), "overrides"),
    (dict(overrides={"fc": (W4, 4)}), "overrides"),
    (dict(overrides={"fc": {"weights": W4}}), "overrides"),
    (dict(skip=[1.5]), "skip"),
    (dict(skip=5), "skip"),
])
def test_invalid_field_is_named(kwargs, field):
    with pytest.raises(ValueError, match=f"Config.{field}"):
        Config(**kwargs)


def test_backend_error_lists_allowed_values():
    with pytest.raises(ValueError, match="qnnpack, fbgemm"):
        Config(backend="x86")
    with pytest.raises(ValueError, match="qnnpack, fbgemm"):
        Config(backend="none")
    assert Config(backend="qnnpack").backend == "qnnpack"


def test_backend_must_be_an_engine_of_this_pytorch():
    # Debian's PyTorch 1.13 has no fbgemm; the PyPI build has it.
    engines = torch.backends.quantized.supported_engines
    if "fbgemm" in engines:
        assert Config(backend="fbgemm").backend == "fbgemm"
    else:
        with pytest.raises(ValueError, match=r"'fbgemm' is not a quantized engine of this "
                                             r"PyTorch .*; it has qnnpack"):
            Config(backend="fbgemm")


def test_override_precedence_exact_over_pattern_over_type():
    config = Config(overrides={
        nn.Linear: (W6, None),
        "encoder.*": {"weight": W4},
        "encoder.fc2": (None, A4),
    })
    linear, conv = nn.Linear(2, 2), nn.Conv2d(1, 1, 1)
    # Type only.
    assert config.spec_for("head", linear) == (W6, config.activation)
    # Pattern over type; a missing role keeps the default.
    assert config.spec_for("encoder.fc1", linear) == (W4, config.activation)
    assert config.spec_for("encoder.conv", conv) == (W4, config.activation)
    # Exact name over pattern.
    assert config.spec_for("encoder.fc2", linear) == (config.weight, A4)
    # Nothing matches.
    assert config.spec_for("stem", conv) == (config.weight, config.activation)


def test_first_pattern_and_most_derived_type_win():
    class MyLinear(nn.Linear):
        pass

    config = Config(overrides={"a.*": (W4, None), "a.b*": (W6, None),
                               nn.Linear: (W4, None), MyLinear: (W6, None)})
    assert config.spec_for("a.b1", nn.Identity())[0] is W4
    assert config.spec_for("x", MyLinear(1, 1))[0] is W6
    assert config.spec_for("x", nn.Linear(1, 1))[0] is W4


def test_skip_by_name_pattern_and_type():
    config = Config(skip=["head", "backbone.layer4.*", nn.LayerNorm],
                    overrides={"head": (W4, A4)})
    assert config.spec_for("head", nn.Linear(1, 1)) is None  # skip wins over overrides
    assert config.spec_for("backbone.layer4.0.conv1", nn.Conv2d(1, 1, 1)) is None
    assert config.spec_for("norm", nn.LayerNorm(3)) is None
    assert config.spec_for("backbone.layer3.0.conv1", nn.Conv2d(1, 1, 1)) is not None
    assert Config(skip="head").skip == ("head",)


@pytest.mark.parametrize("preset, w_bits, a_bits, estimator, dynamic", [
    (qat.presets.int8, 8, 8, "ste", False),
    (qat.presets.w4a8, 4, 8, "ste", False),
    (qat.presets.w4a4, 4, 4, "lsq", False),
    (qat.presets.w8a8_dynamic, 8, 8, "ste", True),
])
def test_presets(preset, w_bits, a_bits, estimator, dynamic):
    config = preset()
    assert isinstance(config, Config)
    assert config.weight.bits == w_bits and config.activation.bits == a_bits
    assert config.weight.symmetric and config.weight.per_channel and config.weight.axis == 0
    assert not config.activation.symmetric and not config.activation.per_channel
    assert config.weight.estimator == estimator
    if preset is qat.presets.w4a4:
        assert config.activation.estimator == "lsq"
    assert config.dynamic is dynamic
    assert config.backend == "qnnpack"


def test_int8_preset_is_the_default():
    assert qat.presets.int8() == Config()
