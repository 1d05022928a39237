"""qat.prepare: torchvision models prepared, trained a few steps and saved / loaded; where
activation FakeQuantize modules go (residual add, cat); conv + bn folding against the float
model; the eager fallback; and the refusals and warnings on bad input."""

import copy
import dataclasses
import io
import operator
import warnings

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
import torchvision
from torch import nn

import qat

from helpers import TextEncoder, script, sgd_losses


def _prepare_quietly(model, config=None):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return qat.prepare(model, config)


def _loss_with_seed(model, x, y, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        return F.cross_entropy(model(x), y).item()


def _script_round_trip(qmodel):
    """``qmodel`` scripted, saved and loaded back."""
    scripted = script(qmodel)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    return torch.jit.load(buffer)


def _check_scripted_matches_and_trains(qmodel, x, y):
    """The scripted model computes what the Python one does, and a saved and reloaded
    scripted model keeps training (its observers run the fused operator)."""
    loaded = _script_round_trip(qmodel)
    qat.disable_observer(qmodel)
    loaded.apply(lambda m: m.observer_enabled.fill_(0) if hasattr(m, "observer_enabled") else None)
    qmodel.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), qmodel(x), rtol=0, atol=0)
    qat.enable_observer(qmodel)
    loaded = _script_round_trip(qmodel.train())
    # The profiling executor swaps in its own gradient formulas after the first runs,
    # which round differently (and quantization magnifies that): compare without it.
    with torch.jit.optimized_execution(False):
        torch.manual_seed(1)  # the same dropout masks for both
        losses = sgd_losses(loaded, x, y, steps=4, lr=0.01)
    torch.manual_seed(1)
    torch.testing.assert_close(losses, sgd_losses(qmodel, x, y, steps=4, lr=0.01), rtol=0, atol=0)


_TORCHVISION_MODELS = [
    torchvision.models.resnet18,
    torchvision.models.mobilenet_v2,
    torchvision.models.mobilenet_v3_small,
    torchvision.models.shufflenet_v2_x0_5,
    torchvision.models.squeezenet1_1,
    torchvision.models.efficientnet_b0,
]


@pytest.mark.parametrize("factory", _TORCHVISION_MODELS, ids=lambda f: f.__name__)
def test_torchvision_model_trains_scripts_and_round_trips(factory):
    torch.manual_seed(0)
    float_model = factory(weights=None, num_classes=10)
    qmodel = _prepare_quietly(float_model)
    assert isinstance(qmodel, fx.GraphModule), "traced, not the eager fallback"
    assert qmodel.training
    folded = [m.bn for m in qmodel.modules() if isinstance(m, qat.modules.ConvBn2d)]
    assert len(folded) == sum(isinstance(m, nn.BatchNorm2d) for m in float_model.modules())
    float_layers = [n for n, m in qmodel.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    assert not float_layers, f"left in float: {float_layers}"

    x = torch.randn(4, 3, 64, 64)
    y = torch.randint(0, 10, (4,))
    # The loss on the batch before and after training, with the same dropout and
    # stochastic-depth draws: the losses seen while training draw new ones each step,
    # which on efficientnet can outweigh four steps' progress.
    before = _loss_with_seed(qmodel, x, y, seed=3)
    sgd_losses(qmodel, x, y, steps=4, lr=0.01)
    after = _loss_with_seed(qmodel, x, y, seed=3)
    assert after < before, (before, after)

    restored = _prepare_quietly(factory(weights=None, num_classes=10))
    restored.load_state_dict(qmodel.state_dict())
    qmodel.eval()
    restored.eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(x), qmodel(x), rtol=0, atol=0)
    _check_scripted_matches_and_trains(qmodel, x, y)


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.conv2(self.relu(self.conv1(x))) + x)


def _fake_quant_users_of(gm: fx.GraphModule, node: fx.Node):
    return [u for u in node.users if u.op == "call_module"
            and isinstance(gm.get_submodule(u.target), qat.FakeQuantize)]


def _node(gm: fx.GraphModule, op, target):
    return next(n for n in gm.graph.nodes if n.op == op and n.target == target)


def test_residual_block_quantizes_after_the_add():
    gm = _prepare_quietly(_Residual())
    add = _node(gm, "call_function", operator.add)
    assert len(_fake_quant_users_of(gm, add)) == 1
    # relu after the quantized add keeps its qparams: no FakeQuantize after it.
    (fq,) = add.users
    (relu,) = fq.users
    assert relu.op == "call_module" and relu.target == "relu"
    assert not _fake_quant_users_of(gm, relu)
    # The input (shared by conv1 and the add) is quantized once, at the input.
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    (input_fq,) = placeholder.users
    assert isinstance(gm.get_submodule(input_fq.target), qat.FakeQuantize)
    assert add.args[1] is input_fq
    assert len(_fake_quant_users_of(gm, _node(gm, "call_module", "conv2"))) == 1
    # conv1 -> relu runs as one integer conv2d_relu: quantized after the relu only.
    conv1 = _node(gm, "call_module", "conv1")
    assert not _fake_quant_users_of(gm, conv1)
    (relu_after_conv1,) = conv1.users
    assert len(_fake_quant_users_of(gm, relu_after_conv1)) == 1
    assert sum(isinstance(m, qat.FakeQuantize) for m in gm.modules()) == 4 + 2  # + weights
    gm(torch.randn(2, 4, 8, 8)).sum().backward()


class _Cat(nn.Module):
    def __init__(self):
        super().__init__()
        self.left = nn.Conv2d(3, 4, 1)
        self.right = nn.Conv2d(3, 4, 1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x):
        return torch.flatten(self.pool(torch.cat([self.left(x), self.right(x)], dim=1)), 1)


def test_cat_inputs_share_the_cat_output_fake_quantize():
    gm = _prepare_quietly(_Cat())
    cat = _node(gm, "call_function", torch.cat)
    assert [n.target for n in cat.args[0]] == ["left", "right"]
    for name in ("left", "right"):
        assert not _fake_quant_users_of(gm, _node(gm, "call_module", name))
    assert len(_fake_quant_users_of(gm, cat)) == 1
    activation_fqs = [n for n in gm.graph.nodes if n.op == "call_module"
                      and isinstance(gm.get_submodule(n.target), qat.FakeQuantize)]
    assert len(activation_fqs) == 2  # the input's and the cat's; none after pool / flatten
    assert gm(torch.randn(2, 3, 8, 8)).shape == (2, 8 * 4 * 4)


class _ConvBnReLU(nn.Module):
    def __init__(self, dims):
        super().__init__()
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
        bn = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dims - 1]
        self.conv = conv(3, 8, 3, padding=1, bias=False)
        self.bn = bn(8)
        self.conv2 = conv(8, 4, 3, bias=True)
        self.bn2 = bn(4)

    def forward(self, x):
        return self.bn2(self.conv2(F.relu(self.bn(self.conv(x)))))


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_conv_bn_folding_matches_float_model_in_eval(dims):
    torch.manual_seed(0)
    model = _ConvBnReLU(dims)
    with torch.no_grad():
        for bn in (model.bn, model.bn2):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-1, 1)
    qmodel = _prepare_quietly(model)
    assert type(qmodel.conv) is getattr(qat.modules, f"ConvBnReLU{dims}d")
    assert type(qmodel.conv2) is getattr(qat.modules, f"ConvBn{dims}d")
    assert not hasattr(qmodel, "bn") and not hasattr(qmodel, "bn2")
    qat.disable_fake_quant(qmodel)
    qmodel.eval()
    model.eval()
    x = torch.randn(2, 3, *([10] * dims))
    with torch.no_grad():
        torch.testing.assert_close(qmodel(x), model(x), rtol=1e-4, atol=1e-4)
        qat.enable_fake_quant(qmodel)
        qat.disable_observer(qmodel)
        torch.testing.assert_close(_script_round_trip(qmodel)(x), qmodel(x), rtol=0, atol=0)


class _FoldNet(nn.Module):
    """Conv + batch norm blocks, one of them applied twice."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU())
        self.shared = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.mid = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8))
        self.proj = nn.Sequential(nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.ReLU6())
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.mid(self.shared(self.shared(x)))
        return self.head(self.proj(x).mean((2, 3)))


def _conv_bns_called_once(qmodel):
    """The conv + batch norms that the graph calls exactly once, in graph order."""
    targets = [n.target for n in qmodel.graph.nodes if n.op == "call_module"]
    return [qmodel.get_submodule(t) for t in targets if targets.count(t) == 1
            and isinstance(qmodel.get_submodule(t), qat.modules.conv_bn._ConvBnNd)]


WEIGHT_SPECS = {
    "minmax": qat.QuantSpec(symmetric=True, per_channel=True, signed=True),
    "moving_average": qat.QuantSpec(symmetric=True, per_channel=True, signed=True,
                                    observer="moving_average"),
    "lsq": qat.QuantSpec(symmetric=True, per_channel=True, signed=True, estimator="lsq"),
}


@pytest.mark.parametrize("weight", sorted(WEIGHT_SPECS))
def test_conv_bn_weights_fake_quantized_ahead_equal_each_layers_own(weight):
    # The first conv + batch norm fake-quantizes all their folded weights; the layers then
    # take their own. A moving-average observer that saw a weight twice, or a learned scale
    # initialized at the wrong time, would change the numbers; the layer applied twice is
    # left to make its own weight at each call.
    torch.manual_seed(0)
    config = qat.Config(weight=WEIGHT_SPECS[weight])
    ahead = _prepare_quietly(_FoldNet(), config)
    each = copy.deepcopy(ahead)
    for module in each.modules():
        module.__dict__.pop("_fold_schedule", None)
    once = _conv_bns_called_once(ahead)
    assert len(once) == 3 and ahead.get_submodule("shared") not in once
    assert once[0].__dict__["_fold_schedule"] == once[1:]
    assert "_fold_schedule" not in once[1].__dict__
    x = torch.randn(4, 3, 12, 12)
    y = torch.randint(0, 10, (4,))
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (ahead, each)]
    for step in range(4):
        losses = []
        for model, optimizer in zip((ahead, each), optimizers):
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            losses.append(loss)
        assert torch.equal(losses[0], losses[1]), step
        grads = dict(each.named_parameters())
        for name, a in ahead.named_parameters():
            assert torch.equal(a.grad, grads[name].grad), (step, name)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    state, expected = ahead.state_dict(), each.state_dict()
    assert state.keys() == expected.keys()
    for name, a in state.items():
        b = expected[name]
        assert a == b if isinstance(a, dict) else torch.equal(a, b), name
    # Each took what was made for it.
    assert not any("_folded_ahead" in m.__dict__ for m in ahead.modules())


def test_conv_bn_weight_made_ahead_is_dropped_when_what_it_was_made_from_changed():
    torch.manual_seed(0)
    qmodel = _prepare_quietly(_FoldNet())
    first, second, third = _conv_bns_called_once(qmodel)
    x = torch.randn(2, 3, 12, 12)
    qmodel(x)  # sizes every per-channel state
    with torch.no_grad():
        first(x)
    assert not any("_folded_ahead" in m.__dict__ for m in (first, second, third))
    first(x)
    assert all("_folded_ahead" in m.__dict__ for m in (second, third))
    # What was made for a forward that stopped part way is left out of copies and pickles
    # (a deep copy of an autograd result would raise).
    buffer = io.BytesIO()
    torch.save(qmodel, buffer)
    buffer.seek(0)
    for copied in (copy.deepcopy(qmodel), torch.load(buffer, weights_only=False)):
        made = [m.__dict__.get("_folded_ahead") for m in _conv_bns_called_once(copied)]
        assert made[1:] == [None, None]
        copied(x).sum().backward()
    with torch.no_grad():
        second.weight.mul_(2)  # e.g. an optimizer step in between
    assert second._take_folded() is None
    factor, weight = third._take_folded()
    # Made from the batch norm's state as it is now (the operator's rounding is
    # test_lowering.py's).
    expected_factor = torch.ops.qat.batch_norm_factor(third.bn.weight, third.bn.running_var,
                                                      third.bn.eps)
    assert torch.equal(factor, expected_factor) and weight.shape == third.weight.shape
    assert third._take_folded() is None  # taken once
    first(x)
    third.weight_fake_quant.disable_observer()
    assert third._take_folded() is None
    first(x)
    third.weight_fake_quant = qat.FakeQuantize(WEIGHT_SPECS["minmax"])
    assert third._take_folded() is None
    # A pre-hook may set another weight just before the call: nothing is made for it.
    third.register_forward_pre_hook(lambda module, inputs: None)
    first(x)
    assert "_folded_ahead" in second.__dict__ and "_folded_ahead" not in third.__dict__
    # So may a parametrization (its weight is made anew at each read).
    torch.nn.utils.parametrize.register_parametrization(second, "weight", nn.Identity())
    assert second._take_folded() is None  # made before, for the weight tensor it had then
    first(x)
    assert "_folded_ahead" not in second.__dict__


class _ControlFlow(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = self.conv(x)
        if x.sum() > 0:
            x = x * 2
        return self.fc(x.mean((2, 3)))


def test_control_flow_takes_the_eager_fallback_with_one_warning():
    model = _ControlFlow()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qmodel = qat.prepare(model)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert "tracing failed" in messages[0] and "eager fallback" in messages[0]
    assert "TraceError" in messages[0]
    assert type(qmodel) is _ControlFlow and qmodel is not model and qmodel.training
    assert type(qmodel.conv) is qat.modules.Conv2d
    assert type(qmodel.fc) is qat.modules.Linear
    assert type(model.conv) is nn.Conv2d, "the input model is left as it was"
    x = torch.randn(2, 3, 8, 8)
    qmodel(x).sum().backward()
    # The swapped modules quantize their outputs.
    for layer in (qmodel.conv, qmodel.fc):
        assert isinstance(layer.activation_post_process, qat.FakeQuantize)
        assert layer.activation_post_process.scale.item() != 1.0
    _check_scripted_matches_and_trains(copy.deepcopy(qmodel), x, torch.tensor([0, 1]))

    with pytest.warns(UserWarning, match="tracing failed"):
        restored = qat.prepare(_ControlFlow())
    restored.load_state_dict(qmodel.state_dict())
    qmodel.eval()
    restored.eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(x), qmodel(x), rtol=0, atol=0)


def test_inplace_eager_fallback_swaps_the_given_model():
    model = _ControlFlow()
    with pytest.warns(UserWarning, match="tracing failed"):
        qmodel = qat.prepare(model, inplace=True)
    assert qmodel is model and type(model.fc) is qat.modules.Linear


class _SizeArithmetic(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        return y.reshape(x.size(0) * 2, -1) + 1


def test_size_arithmetic_gets_no_fake_quantize():
    gm = _prepare_quietly(_SizeArithmetic())
    mul = _node(gm, "call_function", operator.mul)
    add = _node(gm, "call_function", operator.add)
    assert not _fake_quant_users_of(gm, mul)
    assert len(_fake_quant_users_of(gm, add)) == 1
    assert gm(torch.randn(2, 3, 4, 4)).shape == (4, 32)


def test_already_prepared_model_is_refused():
    qmodel = _prepare_quietly(_Residual())
    with pytest.raises(ValueError, match="already prepared"):
        qat.prepare(qmodel)
    with pytest.raises(ValueError, match="already prepared"):
        qat.prepare(nn.Sequential(qat.modules.Linear(2, 2)))


def test_override_or_skip_matching_no_module_is_refused():
    spec = qat.QuantSpec(bits=4, symmetric=True, per_channel=True)
    for config, key in ((qat.Config(overrides={"conv9": (spec, None)}), "conv9"),
                        (qat.Config(overrides={"block.*": (spec, None)}), r"block\.\*"),
                        (qat.Config(overrides={nn.Linear: (spec, None)}), "Linear"),
                        (qat.Config(skip=["nothing"]), "nothing")):
        with pytest.raises(ValueError, match=key):
            qat.prepare(_Residual(), config)


def test_overrides_and_skip_reach_the_modules():
    spec4 = qat.QuantSpec(bits=4, symmetric=True, per_channel=True)
    config = qat.Config(overrides={"conv1": (spec4, None)}, skip=["conv2"])
    gm = _prepare_quietly(_Residual(), config)
    assert type(gm.conv1) is qat.modules.Conv2d
    assert gm.conv1.weight_fake_quant.spec.bits == 4
    assert type(gm.conv2) is nn.Conv2d
    assert not _fake_quant_users_of(gm, _node(gm, "call_module", "conv2"))


class _WithUnsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.act = nn.PReLU(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).mean((2, 3)))


def test_unsupported_layer_with_parameters_stays_float_with_a_warning():
    with pytest.warns(UserWarning, match="stay in float: act") as caught:
        gm = qat.prepare(_WithUnsupported())
    assert len(caught) == 1
    assert type(gm.act) is nn.PReLU
    assert type(gm.conv) is qat.modules.Conv2d and type(gm.fc) is qat.modules.Linear
    # The float PReLU output is quantized again before the mean reaches fc.
    gm(torch.randn(2, 3, 8, 8)).sum().backward()


def test_linear_relu_is_quantized_after_the_relu():
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(8, 8)
            self.act = nn.ReLU()
            self.fc2 = nn.Linear(8, 8)
            self.fc3 = nn.Linear(8, 2)

        def forward(self, x):
            return self.fc3(F.relu(self.fc2(self.act(self.fc1(x)))))

    gm = _prepare_quietly(Head())
    for linear, relu in (("fc1", ("call_module", "act")), ("fc2", ("call_function", F.relu))):
        node = _node(gm, "call_module", linear)
        assert not _fake_quant_users_of(gm, node), linear
        assert len(_fake_quant_users_of(gm, _node(gm, *relu))) == 1, linear
    assert len(_fake_quant_users_of(gm, _node(gm, "call_module", "fc3"))) == 1
    # Quantizing after the ReLU: the FakeQuantize sees no negative values.
    x = torch.randn(64, 8)
    gm(x)
    (fq,) = _fake_quant_users_of(gm, _node(gm, "call_module", "act"))
    fq = gm.get_submodule(fq.target)
    assert fq.observer.min_val.item() == 0.0 and fq.zero_point.item() == 0


class _Gates(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x):
        y = self.conv(x)
        return self.sigmoid(y), torch.tanh(y), F.hardsigmoid(y), F.hardswish(y), F.silu(y)


def test_sigmoid_tanh_hardsigmoid_get_fixed_qparams():
    gm = _prepare_quietly(_Gates())
    x = torch.randn(2, 3, 8, 8) * 4
    qat.calibrate(gm, [x], progress=False)
    qat.enable_observer(gm)
    fixed = [m for m in gm.modules() if isinstance(m, qat.FixedQParamsFakeQuantize)]
    assert len(fixed) == 3
    assert all(not m.observer_enabled.item() for m in fixed)
    qat.disable_observer(gm)
    # The gates' input as the graph computed it (its conv rounds the bias to the input's
    # grid, which a bare call of gm.conv would not: a step apart here and there).
    captured = []
    hook = gm.get_submodule("conv_activation_fake_quant").register_forward_hook(
        lambda module, args, output: captured.append(output))
    outputs = gm(x)
    hook.remove()
    y = captured[0]
    # PyTorch's quantized kernels on quint8: sigmoid / hardsigmoid at scale 1/256 and
    # zero point 0, tanh at 2/256 and 128.
    expected = [
        torch.fake_quantize_per_tensor_affine(torch.sigmoid(y), 1 / 256, 0, 0, 255),
        torch.fake_quantize_per_tensor_affine(torch.tanh(y), 2 / 256, 128, 0, 255),
        torch.fake_quantize_per_tensor_affine(F.hardsigmoid(y), 1 / 256, 0, 0, 255),
    ]
    for output, reference in zip(outputs[:3], expected):
        torch.testing.assert_close(output, reference, rtol=0, atol=0)
    # hardswish has an integer kernel that requantizes: a FakeQuantize of its own; silu
    # has none and runs in float.
    hardswish = _node(gm, "call_function", F.hardswish)
    assert len(_fake_quant_users_of(gm, hardswish)) == 1
    assert not _fake_quant_users_of(gm, _node(gm, "call_function", F.silu))


def test_fixed_qparams_follow_a_signed_range_and_refuse_learned_scales():
    fq = qat.FixedQParamsFakeQuantize(qat.QuantSpec(signed=True), (-1.0, 1.0))
    assert fq.scale.item() == 2 / 256 and fq.zero_point.item() == 0
    with pytest.raises(ValueError, match="estimator='lsq'"):
        qat.FixedQParamsFakeQuantize(qat.QuantSpec(estimator="lsq"), (0.0, 1.0))


def test_transformer_encoder_trains_scripts_and_round_trips():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        # No layer stays in float: attention's projections are Linear layers of their own,
        # and layer norms have an integer kernel.
        warnings.simplefilter("error")
        qmodel = qat.prepare(TextEncoder())
    swapped = {n for n, m in qmodel.named_modules() if isinstance(m, qat.modules.Linear)}
    assert swapped == {"head"} | {
        f"encoder.layers.{i}.{name}" for i in range(2) for name in (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
            "linear1", "linear2")}
    assert isinstance(qmodel.embed, qat.modules.Embedding)
    # The token ids reach the embedding as they are.
    placeholder = next(n for n in qmodel.graph.nodes if n.op == "placeholder")
    assert [u.target for u in placeholder.users] == ["embed"]

    tokens = torch.randint(0, 50, (8, 10))
    y = torch.randint(0, 3, (8,))
    losses = sgd_losses(qmodel, tokens, y, steps=6, lr=0.05)
    assert losses[-1] < losses[0], losses

    restored = qat.prepare(TextEncoder())
    restored.load_state_dict(qmodel.state_dict())
    qat.disable_observer(qmodel)
    qat.disable_observer(restored)
    qmodel.eval()
    restored.eval()
    with_grad = qmodel(tokens)
    with torch.no_grad():
        # Without gradients in eval, PyTorch's layers would take their fused native kernel
        # on the float weights; prepare's stand-ins stay on the fake-quantized path.
        torch.testing.assert_close(qmodel(tokens), with_grad, rtol=0, atol=0)
        torch.testing.assert_close(restored(tokens), with_grad, rtol=0, atol=0)
    qat.enable_observer(qmodel)
    _check_scripted_matches_and_trains(qmodel, tokens, y)


def test_embedding_model_quantizes_the_table_not_the_indices():
    model = nn.Sequential(nn.Embedding(20, 8), nn.Flatten(), nn.Linear(24, 4))
    gm = _prepare_quietly(model)
    assert isinstance(gm.get_submodule("0"), qat.modules.Embedding)
    embedding = _node(gm, "call_module", "0")
    assert embedding.args[0].op == "placeholder"
    assert not _fake_quant_users_of(gm, embedding)
    # The float embedding output is quantized where the linear takes it.
    linear = _node(gm, "call_module", "2")
    assert isinstance(gm.get_submodule(linear.args[0].target), qat.FakeQuantize)
    gm(torch.randint(0, 20, (5, 3))).sum().backward()


class _ControlFlowUpsample(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(3, 4, 2, stride=2)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        if x.sum() > 0:
            x = x * 2
        return self.head(self.up(x).mean((2, 3)))


def test_eager_fallback_transposed_conv_quantizes_its_output_and_scripts():
    with pytest.warns(UserWarning, match="tracing failed"):
        qmodel = qat.prepare(_ControlFlowUpsample())
    x = torch.randn(2, 3, 4, 4)
    qmodel(x)
    fq = qmodel.up.activation_post_process
    assert fq.scale.item() != 1.0
    qat.disable_observer(qmodel)
    up = qmodel.up
    weight = up.weight_fake_quant(up.weight)
    expected = fq(F.conv_transpose2d(x, weight, up.bias, stride=2))
    torch.testing.assert_close(up(x), expected, rtol=0, atol=0)
    qat.enable_observer(qmodel)
    _check_scripted_matches_and_trains(qmodel, x, torch.tensor([0, 1]))


def test_relu6_after_a_conv_is_done_by_the_fixed_range_quantizer_after_it():
    """The fixed [0, 6] quantizer (the integer kernel's output scale 6/255 saturates at 6)
    also does the ReLU6's clamp, in one pass; the ReLU6 leaves the graph. Values and
    gradients are those of the ReLU6 followed by the quantizer, and with fake quantization
    off the ReLU6 still clamps."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU6(), nn.Conv2d(4, 2, 1))
    gm = _prepare_quietly(model)
    assert not any(n.op == "call_module" and n.target == "2" for n in gm.graph.nodes)
    assert not hasattr(gm, "2")
    (fq_node,) = _fake_quant_users_of(gm, _node(gm, "call_module", "0"))
    fq = gm.get_submodule(fq_node.target)
    assert isinstance(fq, qat.FixedQParamsFakeQuantize)
    assert fq.clamps_input and fq.clamp_range == (0.0, 6.0)
    assert fq.scale.item() == pytest.approx(6 / 255) and fq.zero_point.item() == 0
    x = torch.randn(2, 3, 8, 8) * 10
    # The conv + batch norm's output, widened past both ends of [0, 6].
    y = gm.get_submodule("0")(gm.get_submodule("input_1_activation_fake_quant")(x)).detach() * 4
    assert (y < 0).any() and (y > 6).any()
    qat.disable_observer(gm)
    absorbed_input = y.clone().requires_grad_()
    reference_input = y.clone().requires_grad_()
    out = fq(absorbed_input)
    expected = torch.fake_quantize_per_tensor_affine(F.relu6(reference_input), 6 / 255, 0, 0, 255)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    grad = torch.randn_like(y)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(absorbed_input.grad, reference_input.grad, rtol=0, atol=0)
    assert fq(torch.tensor([6.0])).item() == 6.0
    qat.disable_fake_quant(gm)
    torch.testing.assert_close(fq(y), F.relu6(y), rtol=0, atol=0)


def test_relu6_stays_when_its_quantizer_estimates_gradients_otherwise():
    """Only the straight-through estimator's gradient is the clamp's: with another one the
    ReLU6 keeps its node and the quantizer after it quantizes its output."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU6(), nn.Conv2d(4, 2, 1))
    config = qat.Config(activation=qat.QuantSpec(estimator="ewgs"))
    gm = _prepare_quietly(model, config)
    (fq_node,) = _fake_quant_users_of(gm, _node(gm, "call_module", "2"))
    fq = gm.get_submodule(fq_node.target)
    assert isinstance(fq, qat.FixedQParamsFakeQuantize) and not fq.clamps_input
    with pytest.raises(ValueError, match="clamps_input needs the 'ste' estimator"):
        qat.FixedQParamsFakeQuantize(qat.QuantSpec(estimator="ewgs"), (0.0, 6.0), True, True)


def _undo_relu_handover(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` whose conv + batch norm + ReLU layers do their ReLU and whose
    quantizers quantize what they are given: the graph before prepare hands the ReLUs over."""
    copied = copy.deepcopy(gm)
    for node in copied.graph.nodes:
        node.kwargs = {k: v for k, v in node.kwargs.items() if k != "relu"}
    for module in copied.modules():
        if isinstance(module, qat.FakeQuantize):
            module.relu_input = False
    copied.recompile()
    return copied


def test_conv_bn_relu_leaves_its_relu_to_the_quantizer_after_it():
    """The quantizer after a conv + batch norm + ReLU takes the ReLU (one pass over the
    activation, forward and backward): its output and gradient are PyTorch's fake-quantize
    of the ReLU's; three training steps leave the parameters, the running statistics and
    the qparams as the graph with the ReLU in the layer does, to the bit; the integer model
    is the same; scripted, the model computes the same and trains."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    gm = _prepare_quietly(model)
    layer = _node(gm, "call_module", "0")
    assert layer.kwargs["relu"] is False
    (fq_node,) = _fake_quant_users_of(gm, layer)
    fq = gm.get_submodule(fq_node.target)
    assert fq.relu_input and "relu_input=True" in repr(fq)
    reference = _undo_relu_handover(gm)
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 10, 10), torch.randn(8, 2, 8, 8)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (gm, reference)]
    for _ in range(3):
        for model_, optimizer in zip((gm, reference), optimizers):
            F.mse_loss(model_(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
        expected_state = reference.state_dict()
        for name, value in gm.state_dict().items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, expected_state[name]), name
    assert fq.observer.min_val.item() == 0.0 and fq.zero_point.item() == 0
    # The quantizer alone, on a pre-ReLU activation with values on both sides of 0.
    pre = (copy.deepcopy(gm.get_submodule("0"))(x, relu=False) * 3).detach()
    assert (pre < 0).any() and (pre > fq.scale * 255).any()
    qat.disable_observer(gm)
    taken_input = pre.clone().requires_grad_()
    reference_input = pre.clone().requires_grad_()
    out = fq(taken_input)
    expected = torch.fake_quantize_per_tensor_affine(
        F.relu(reference_input), fq.scale.item(), int(fq.zero_point), 0, 255)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    grad = torch.randn_like(pre)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(taken_input.grad, reference_input.grad, rtol=0, atol=0)
    # On the path torch.distributed takes (the ReLU, then the quantizer's usual operator)
    # and with fake quantization off, the quantizer still applies the ReLU.
    fq._uses_fused_op = lambda: False
    torch.testing.assert_close(fq(pre), expected.detach(), rtol=0, atol=0)
    del fq._uses_fused_op
    qat.disable_fake_quant(gm)
    torch.testing.assert_close(fq(pre), F.relu(pre), rtol=0, atol=0)
    qat.enable_fake_quant(gm)
    gm.eval()
    reference.eval()
    qat.disable_observer(reference)
    with torch.no_grad():
        torch.testing.assert_close(qat.convert(gm)(x), qat.convert(reference)(x), rtol=0, atol=0)
    qat.enable_observer(gm)
    _check_scripted_matches_and_trains(gm.train(), x, torch.randint(0, 2, (8, 8, 8)))


@pytest.mark.parametrize("estimator", ["lsq", "ewgs"])
def test_conv_bn_relu_keeps_its_relu_when_the_quantizer_cannot_take_it(estimator):
    """A quantizer that learns its qparams (lsq) or estimates another gradient (ewgs)
    leaves the ReLU in the layer."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    gm = _prepare_quietly(model, qat.Config(activation=qat.QuantSpec(estimator=estimator)))
    layer = _node(gm, "call_module", "0")
    assert "relu" not in layer.kwargs
    (fq_node,) = _fake_quant_users_of(gm, layer)
    assert not gm.get_submodule(fq_node.target).relu_input
    assert (gm(torch.randn(2, 3, 6, 6)) >= 0).all()


@pytest.mark.parametrize("estimator", ["lsq", "lsq_plus", "pact"])
def test_learned_activation_qparams_leave_the_fixed_ones_to_the_straight_through_estimator(
        estimator):
    """Activations that learn their qparams (asked for in the Config) and ops whose output
    range fixes them (a fused ReLU6, sigmoid, tanh, hardsigmoid) in one model: the fixed
    quantizers keep their qparams with the 'ste' estimator (prepare refused the model
    before), the others learn with the one asked for; it trains and converts."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3)
            self.bn = nn.BatchNorm2d(3)
            self.relu6 = nn.ReLU6()
            self.gates = _Gates()

        def forward(self, x):
            return self.gates(self.relu6(self.bn(self.conv(x))))

    config = qat.Config(activation=qat.QuantSpec(estimator=estimator))
    gm = _prepare_quietly(Net(), config)
    fixed = [m for m in gm.modules() if isinstance(m, qat.FixedQParamsFakeQuantize)]
    learned = [m for m in gm.modules()
               if type(m) is qat.FakeQuantize and m.spec.estimator == estimator]
    assert len(fixed) == 4 and learned
    assert all(m.spec.estimator == "ste" and not m.learns_qparams for m in fixed)
    relu6_fq = next(m for m in fixed if m.clamps_input)
    assert relu6_fq.scale.item() == pytest.approx(6 / 255)
    x = torch.randn(8, 3, 8, 8)
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.01)
    for _ in range(2):
        sum(out.square().mean() for out in gm(x)).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert relu6_fq.scale.item() == pytest.approx(6 / 255)
    gm.eval()
    qat.disable_observer(gm)
    with torch.no_grad():
        simulated = gm(x)
        integer = qat.convert(gm)(x)
    for s, i in zip(simulated[:3], integer[:3]):
        torch.testing.assert_close(i, s, rtol=0, atol=1 / 128 + 1e-6)  # within a step


def test_the_fixed_qparams_spec_is_per_tensor_and_learns_nothing_keeping_the_rest():
    """qat.prepare.fixed_qparams_spec (the C++ rule both front ends call): per tensor, 'ste'
    for every registered estimator that learns a qparam, that estimator otherwise, and
    every other field as the activation spec has it."""
    from qat.prepare import fixed_qparams_spec

    for name in qat.estimators.available():
        info = qat._C.estimator_info(name)
        spec = qat.QuantSpec(bits=6, symmetric=True, per_channel=True, axis=1, narrow_range=True,
                             observer="minmax", estimator=name, averaging_constant=0.5,
                             percentile=99.0, bins=64)
        fixed = fixed_qparams_spec(spec)
        learns = info["learns_scale"] or info["learns_zero_point"]
        assert fixed.estimator == ("ste" if learns else name), name
        assert not fixed.per_channel
        assert dataclasses.replace(fixed, per_channel=True, estimator=name) == spec
        assert spec.per_channel and spec.estimator == name  # the argument is not changed
    # A field the C++ spec lacks would be lost on the way back: refused by name.
    with pytest.raises(ValueError, match="QuantSpec field 'rounding' has no C\\+\\+ counterpart"):
        qat._C.fixed_qparams_spec({**dataclasses.asdict(qat.QuantSpec()), "rounding": "even"})


def test_mixed_precision_config_gives_each_layer_exactly_its_bits():
    """Overrides by exact name, pattern and type on resnet18: every layer's weight and
    output FakeQuantize carry the bits the config names for it, and print() shows them."""
    w4 = qat.QuantSpec(bits=4, symmetric=True, per_channel=True)
    w2 = qat.QuantSpec(bits=2, symmetric=True, per_channel=True)
    w6 = qat.QuantSpec(bits=6, symmetric=True, per_channel=True)
    a4 = qat.QuantSpec(bits=4)
    config = qat.Config(overrides={
        "layer1.0.conv1": (w2, a4),  # an exact name beats the pattern below
        "layer1.*": (w4, None),
        nn.Linear: (w6, a4),
    })
    gm = _prepare_quietly(torchvision.models.resnet18(weights=None, num_classes=10), config)
    gm(torch.randn(2, 3, 32, 32))

    def expected(name):
        if name == "layer1.0.conv1":
            return 2, 4
        if name.startswith("layer1."):
            return 4, 8
        if name == "fc":
            return 6, 4
        return 8, 8

    layers = {n: m for n, m in gm.named_modules()
              if isinstance(m, (qat.modules.ConvBn2d, qat.modules.Conv2d, qat.modules.Linear))}
    assert len(layers) == 21  # 20 convs (each folded with its batch norm) and fc
    for name, layer in layers.items():
        weight_bits, activation_bits = expected(name)
        assert layer.weight_fake_quant.spec.bits == weight_bits, name
        assert layer.weight_fake_quant.quant_max - layer.weight_fake_quant.quant_min == (
            2 ** weight_bits - 1), name
        # The FakeQuantize that quantizes this layer's output (after its ReLU if fused).
        node = _node(gm, "call_module", name)
        while not _fake_quant_users_of(gm, node):
            (node,) = node.users
        (fq_node,) = _fake_quant_users_of(gm, node)
        assert gm.get_submodule(fq_node.target).spec.bits == activation_bits, name
    text = str(gm)
    assert "bits=2" in text and "bits=4" in text and "bits=6" in text and "scale=" in text


def test_layers_read_the_scale_of_the_fake_quantize_before_them():
    """Conv and linear layers get their input's scale (input_scale=) to round their bias as
    the integer kernels will; convert leaves it out of the integer graph."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 5))
    qmodel = _prepare_quietly(model)
    layers = [n for n in qmodel.graph.nodes if n.op == "call_module"
              and isinstance(qmodel.get_submodule(n.target), (qat.modules.ConvBnReLU2d,
                                                                qat.modules.Linear))]
    assert len(layers) == 2
    # The conv reads the FakeQuantize on the input; the linear, after the flatten (which
    # keeps its input's qparams), the one after the conv's ReLU.
    expected = ["input_1_activation_fake_quant.scale", "_0_activation_fake_quant.scale"]
    for node, target in zip(layers, expected):
        scale = node.kwargs["input_scale"]
        assert scale.op == "get_attr" and scale.target == target
        assert isinstance(qmodel.get_submodule(target.rsplit(".", 1)[0]), qat.FakeQuantize)
    qat.calibrate(qmodel, [torch.randn(4, 3, 8, 8)], progress=False)
    int_model = qat.convert(qmodel)
    assert not [n for n in int_model.graph.nodes if n.op == "get_attr"]


def test_dynamic_config_folds_conv_bn_into_a_model_that_runs():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    qmodel = _prepare_quietly(model, qat.presets.w8a8_dynamic())
    assert isinstance(qmodel.get_submodule("0"), qat.modules.ConvBnReLU2d)
    assert qmodel(torch.randn(2, 1, 8, 8)).shape == (2, 4, 6, 6)


class _ReadsTrainingInHelper(nn.Module):
    def _active(self):
        return self.training

    def forward(self, x):
        return x * 2 if self._active() else x


class _MentionsTraining(nn.Module):
    """Reads nothing: self.training is only named in this docstring and a comment."""

    def forward(self, x):
        # unlike self.training-dependent modules, this one is traced into
        return torch.relu(x)


class _ReadsTrainingInLambda(nn.Module):
    def forward(self, x):
        scale = (lambda: 0.5 if self.training else 1.0)()
        return x * scale


def test_parameter_free_modules_stay_modules_when_their_forward_reads_training():
    from qat.prepare import _reads_training

    assert _reads_training(nn.Dropout)  # torch.nn's own
    assert _reads_training(_ReadsTrainingInLambda)
    # Names in docstrings and comments are not reads.
    assert not _reads_training(_MentionsTraining)
    # The documented limit: a read in another method is not seen.
    assert not _reads_training(_ReadsTrainingInHelper)
    model = nn.Sequential(nn.Linear(4, 4), _ReadsTrainingInLambda(), _MentionsTraining())
    qmodel = qat.prepare(model)
    kept = {type(m) for m in qmodel.modules()}
    assert _ReadsTrainingInLambda in kept and _MentionsTraining not in kept
    x = torch.randn(3, 4)
    qat.calibrate(qmodel, [x], progress=False)
    qat.disable_observer(qmodel)
    # eval() reaches the module kept: its scale switches from 0.5 to 1.0.
    train_out = qmodel.train()(x)
    eval_out = qmodel.eval()(x)
    assert not torch.equal(train_out, eval_out)


def test_example_inputs_check_the_prepared_model_without_changing_it():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 10))
    qmodel = qat.prepare(model, example_inputs=(torch.rand(2, 1, 8, 8),))
    assert qmodel.training
    fqs = [m for m in qmodel.modules() if isinstance(m, qat.FakeQuantize)]
    # Nothing was observed, and every switch is as prepare left it.
    assert fqs and all(not bool(torch.isfinite(fq.observer.min_val).any()) for fq in fqs)
    assert all(int(fq.observer_enabled) == 1 and int(fq.fake_quant_enabled) == 1 for fq in fqs)
    bn = next(m for m in qmodel.modules() if isinstance(m, nn.BatchNorm2d))
    assert int(bn.num_batches_tracked) == 0
    # A graph that does not run on the input is reported by prepare, naming the failure.
    with pytest.raises(RuntimeError, match=r"qat\.prepare: the prepared model fails on "
                                           r"example_inputs: RuntimeError: .*shapes"):
        qat.prepare(model, example_inputs=torch.rand(2, 1, 9, 9))
    with pytest.raises(TypeError, match=r"example_inputs must be a tensor or a tuple of "
                                        r"tensors, got dict"):
        qat.prepare(model, example_inputs={"x": torch.rand(1)})


class _BiaslessConv(nn.Conv2d):
    """A subclass that only changes the constructor's defaults, as models write them."""

    def __init__(self, in_channels, out_channels):
        super().__init__(in_channels, out_channels, 3, padding=1, bias=False)


class _DoubledLinear(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


@pytest.mark.parametrize("conv, bn, shape", [
    (lambda: _BiaslessConv(3, 8), nn.BatchNorm2d, (4, 3, 8, 8)),
    (lambda: torchvision.models.video.resnet.Conv3DSimple(3, 8), nn.BatchNorm3d,
     (4, 3, 4, 8, 8)),
], ids=["own_subclass", "torchvision_conv3d_simple"])
def test_subclasses_that_override_nothing_are_quantized_as_their_base(conv, bn, shape):
    """A subclass of nn.Conv2d / nn.Conv3d that only sets the constructor's defaults
    (torchvision's video ResNets are made of Conv3DSimple) was traced into: its conv ran
    in float in the simulation and the integer model, without a word. It is now fused with
    its batch norm and quantized: the integer model gives, bit for bit, what the same
    model built from the plain base class gives."""
    torch.manual_seed(0)
    model = nn.Sequential(conv(), bn(8), nn.ReLU(), nn.Flatten(1), nn.LazyLinear(4))
    x = torch.randn(*shape)
    model(x)
    base = type(model[0]).__mro__[1]
    plain = copy.deepcopy(model)
    plain[0] = base(3, 8, model[0].kernel_size, model[0].stride, model[0].padding,
                    bias=False)
    plain[0].weight = model[0].weight
    outputs = []
    for float_model in (model, plain):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no layer left in float
            qmodel = qat.prepare(float_model)
        assert type(qmodel.get_submodule("0")).__name__ == f"ConvBnReLU{len(shape) - 2}d"
        qat.calibrate(qmodel, [x], progress=False)
        int_model = qat.convert(qmodel.eval())
        assert isinstance(int_model.get_submodule("0"), qat.quantized._WithOutputQParams)
        with torch.no_grad():
            outputs.append(int_model(x))
    assert torch.equal(outputs[0], outputs[1])


def test_subclasses_that_override_a_method_are_named_as_left_in_float():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), _DoubledLinear(8, 2))
    with pytest.warns(UserWarning, match=r"override its methods, so they run as their code, "
                                         r"in float: 2 \(register a QAT class"):
        qmodel = qat.prepare(model)
    assert isinstance(qmodel.get_submodule("0"), qat.modules.Linear)
