"""qat.modules: QAT Linear / Conv / ConvTranspose against F.linear / F.conv with a weight
fake-quantized by plain torch, gradients and training, ConvBn2d's batch-norm folding against the float
model and against PyTorch's own QAT ConvBn2d, freezing BN statistics, and the registry."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qat
from qat import QuantSpec
from qat.modules import registry

from helpers import sgd_losses

try:  # torch >= 2.0
    from torch.ao.nn import intrinsic as nni
    from torch.ao.nn.intrinsic import qat as nniqat
except ImportError:  # torch 1.13
    from torch.nn import intrinsic as nni
    from torch.nn.intrinsic import qat as nniqat


def reference_weight(weight: torch.Tensor, fq: qat.FakeQuantize, axis: int = 0) -> torch.Tensor:
    """The weight fake-quantized by ATen with the module's qparams, after checking those
    against the symmetric per-channel qparams computed here with plain tensor ops."""
    w = weight.detach()
    amax = w.abs().transpose(0, axis).reshape(w.shape[axis], -1).amax(dim=1)
    expected_scale = torch.clamp(amax / ((fq.quant_max - fq.quant_min) / 2),
                                 min=torch.finfo(torch.float32).eps)
    torch.testing.assert_close(fq.scale, expected_scale)
    assert torch.all(fq.zero_point == 0)
    return torch.fake_quantize_per_channel_affine(
        w, fq.scale, fq.zero_point.to(torch.int32), axis, fq.quant_min, fq.quant_max)


def test_linear_matches_reference():
    torch.manual_seed(0)
    float_mod = nn.Linear(16, 8)
    mod = qat.modules.Linear.from_float(float_mod)
    assert mod.weight is float_mod.weight and mod.bias is float_mod.bias
    x = torch.randn(4, 16)
    out = mod(x)
    expected = F.linear(x, reference_weight(mod.weight, mod.weight_fake_quant), mod.bias)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert not torch.equal(out, float_mod(x))  # the weight really was quantized


CONVS = [
    (nn.Conv1d, dict(in_channels=4, out_channels=6, kernel_size=3), (2, 4, 10)),
    (nn.Conv2d, dict(in_channels=4, out_channels=6, kernel_size=3, padding=1), (2, 4, 7, 7)),
    (nn.Conv2d, dict(in_channels=4, out_channels=8, kernel_size=3, groups=2, stride=2,
                     bias=False), (2, 4, 9, 9)),
    (nn.Conv2d, dict(in_channels=6, out_channels=6, kernel_size=3, groups=6,
                     padding="same", padding_mode="reflect"), (2, 6, 8, 8)),
    (nn.Conv3d, dict(in_channels=3, out_channels=4, kernel_size=2, dilation=2), (1, 3, 6, 6, 6)),
]


@pytest.mark.parametrize("float_cls, kwargs, shape", CONVS,
                         ids=["conv1d", "conv2d", "grouped", "depthwise", "conv3d"])
def test_conv_matches_reference(float_cls, kwargs, shape):
    torch.manual_seed(0)
    float_mod = float_cls(**kwargs)
    mod = qat.modules.lookup(float_mod).from_float(float_mod)
    assert type(mod).__name__ == float_cls.__name__
    assert mod.groups == float_mod.groups and mod.padding_mode == float_mod.padding_mode
    x = torch.randn(shape)
    out = mod(x)
    expected = float_mod._conv_forward(
        x, reference_weight(mod.weight, mod.weight_fake_quant), float_mod.bias)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


TRANSPOSED = [
    (nn.ConvTranspose1d, dict(in_channels=4, out_channels=6, kernel_size=3, stride=2),
     (2, 4, 5), F.conv_transpose1d),
    (nn.ConvTranspose2d, dict(in_channels=4, out_channels=6, kernel_size=3, stride=2,
                              padding=1, output_padding=1, groups=2), (2, 4, 5, 5),
     F.conv_transpose2d),
    (nn.ConvTranspose3d, dict(in_channels=2, out_channels=3, kernel_size=2, bias=False),
     (1, 2, 3, 3, 3), F.conv_transpose3d),
]


@pytest.mark.parametrize("float_cls, kwargs, shape, conv", TRANSPOSED,
                         ids=["1d", "2d-grouped", "3d"])
def test_conv_transpose_matches_reference(float_cls, kwargs, shape, conv):
    torch.manual_seed(0)
    float_mod = float_cls(**kwargs)
    mod = qat.modules.lookup(float_mod).from_float(float_mod)
    assert mod.weight_fake_quant.spec.axis == 1  # the output channels
    x = torch.randn(shape)
    out = mod(x)
    expected = conv(x, reference_weight(mod.weight, mod.weight_fake_quant, axis=1),
                    float_mod.bias, float_mod.stride, float_mod.padding,
                    float_mod.output_padding, float_mod.groups, float_mod.dilation)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert out.shape == float_mod(x).shape


@pytest.mark.parametrize("float_mod, x", [
    (nn.Linear(5, 3), torch.randn(4, 5)),
    (nn.Conv2d(2, 3, 3), torch.randn(2, 2, 5, 5)),
    (nn.ConvTranspose2d(2, 3, 3), torch.randn(2, 2, 5, 5)),
])
def test_gradients_reach_weight_and_bias(float_mod, x):
    mod = qat.modules.lookup(float_mod).from_float(float_mod)
    mod(x).square().sum().backward()
    for p in (mod.weight, mod.bias):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_sgd_steps_lower_the_loss():
    torch.manual_seed(0)
    mod = qat.modules.Linear.from_float(nn.Linear(8, 4), QuantSpec(bits=4, symmetric=True,
                                                                   per_channel=True))
    x, target = torch.randn(64, 8), torch.randn(64, 4)
    losses = sgd_losses(mod, x, target, steps=20, lr=0.1, loss_fn=F.mse_loss)
    assert losses[-1] < 0.8 * losses[0]


def test_weight_spec_axis_and_bits():
    spec = QuantSpec(bits=4, symmetric=True, per_channel=True, axis=1)
    mod = qat.modules.Conv2d.from_float(nn.Conv2d(2, 3, 1), spec)
    fq = mod.weight_fake_quant
    assert fq.spec.bits == 4 and fq.spec.axis == 0  # one scale per output channel
    mod(torch.randn(1, 2, 4, 4))
    assert fq.scale.shape == (3,)
    with pytest.raises(TypeError, match="from_float"):
        qat.modules.Conv2d.from_float(nn.Conv1d(2, 3, 1))


def make_conv_bn(seed: int = 0, bias: bool = False):
    """A fused float ConvBn2d with non-trivial batch-norm parameters and statistics."""
    torch.manual_seed(seed)
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=bias)
    bn = nn.BatchNorm2d(8)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1, 1)
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return nni.ConvBn2d(conv, bn)


def no_fake_quant(mod):
    mod.weight_fake_quant.disable_fake_quant()
    mod.weight_fake_quant.disable_observer()
    return mod


@pytest.mark.parametrize("bias", [False, True])
def test_conv_bn_eval_matches_float_conv_then_bn(bias):
    fused = make_conv_bn(bias=bias).eval()
    mod = no_fake_quant(qat.modules.ConvBn2d.from_float(fused))
    assert not mod.training and not mod.bn.training
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = fused[1](fused[0](x))
        torch.testing.assert_close(mod(x), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_conv_bn_train_matches_pytorch_qat(bias):
    float_mod = make_conv_bn(bias=bias)
    mod = no_fake_quant(qat.modules.ConvBn2d.from_float(float_mod))
    qconfig = torch.ao.quantization.get_default_qat_qconfig("qnnpack")
    ref = nniqat.ConvBn2d(3, 8, 3, padding=1, bias=bias, qconfig=qconfig)
    ref.load_state_dict(
        {k: v for k, v in mod.state_dict().items() if not k.startswith("weight_fake_quant")},
        strict=False)
    ref.weight_fake_quant.disable_fake_quant()
    ref.weight_fake_quant.disable_observer()
    # In float64: PyTorch divides the conv output by the fold factor, qat the weight,
    # which rounds differently in float32.
    mod.double().train()
    ref.double().train()
    for step in range(3):
        x = torch.randn(4, 3, 6, 6, dtype=torch.float64) + step
        out, ref_out = mod(x), ref(x)
        torch.testing.assert_close(out, ref_out)
        torch.testing.assert_close(mod.bn.running_mean, ref.bn.running_mean)
        torch.testing.assert_close(mod.bn.running_var, ref.bn.running_var)
        out.square().sum().backward()
        ref_out.square().sum().backward()
        for name in ("weight", "bn.weight", "bn.bias"):
            torch.testing.assert_close(mod.get_parameter(name).grad,
                                       ref.get_parameter(name).grad, msg=name)


def test_conv_bn_relu_applies_relu_and_quantizes_the_folded_weight():
    fused = nni.ConvBnReLU2d(*make_conv_bn(), nn.ReLU())
    mod = qat.modules.lookup(fused).from_float(fused)
    assert isinstance(mod, qat.modules.ConvBnReLU2d)
    # Folded with the running statistics from before this batch updates them.
    folded = mod.weight * (mod.bn.weight / torch.sqrt(mod.bn.running_var + mod.bn.eps)).reshape(
        -1, 1, 1, 1)
    out = mod(torch.randn(2, 3, 5, 5))
    assert out.min() >= 0 and out.max() > 0
    reference_weight(folded, mod.weight_fake_quant)  # the scales were chosen for it


def test_freeze_bn_stats_stops_running_stat_updates():
    mod = no_fake_quant(qat.modules.ConvBn2d.from_float(make_conv_bn()))
    mod.train()
    x = torch.randn(4, 3, 6, 6) + 3
    mod(x)
    mean = mod.bn.running_mean.clone()
    mod.freeze_bn_stats()
    mod.train()  # a parent's .train() must not undo the freeze
    assert mod.training and not mod.bn.training
    out = mod(x)
    torch.testing.assert_close(mod.bn.running_mean, mean, rtol=0, atol=0)
    mod.eval()
    torch.testing.assert_close(mod(x), out, rtol=0, atol=0)  # frozen = eval numerics
    mod.train()
    mod.unfreeze_bn_stats()
    mod(x)
    assert not torch.equal(mod.bn.running_mean, mean)


def test_registry(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    assert qat.modules.lookup(nn.Linear(1, 1)) is qat.modules.Linear
    assert qat.modules.lookup(nn.Conv3d) is qat.modules.Conv3d
    assert qat.modules.lookup(nn.ReLU()) is None

    class Scale(nn.Module):
        def forward(self, x):
            return 2 * x

    class QatScale(Scale):
        @classmethod
        def from_float(cls, mod, weight_spec=None):
            return cls()

    class SubLinear(nn.Linear):
        pass

    class TwiceLinear(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    qat.register_module(Scale, QatScale)
    assert qat.modules.lookup(Scale()) is QatScale
    # A subclass that overrides nothing computes as its base; one that overrides a method
    # may not, and torch's own (MultiheadAttention's out_proj) mark layers kept as they are.
    assert qat.modules.lookup(SubLinear(1, 1)) is qat.modules.Linear
    assert qat.modules.lookup(TwiceLinear(1, 1)) is None
    assert qat.modules.lookup(nn.modules.linear.NonDynamicallyQuantizableLinear(1, 1)) is None
    with pytest.raises(TypeError, match="float_cls"):
        qat.register_module(int, QatScale)
    with pytest.raises(TypeError, match="qat_cls"):
        qat.register_module(Scale, "QatScale")
    with pytest.raises(TypeError, match="qat_cls .*from_float"):
        qat.register_module(Scale, Scale)


def _kernel_bias(bias, input_scale, weight_scale):
    """The int32 bias of the integer kernels, back in float: each channel's bias rounded to
    a multiple of input_scale * weight_scale, computed one channel at a time in float64."""
    steps = (input_scale * weight_scale).double().expand(bias.numel())
    rounded = [round(b / s) * s for b, s in zip(bias.double().tolist(), steps.tolist())]
    return torch.tensor(rounded, dtype=bias.dtype)


def test_linear_adds_its_bias_on_the_kernel_grid_given_the_input_scale():
    torch.manual_seed(0)
    layer = qat.modules.Linear(6, 4)
    x = torch.randn(5, 6)
    layer(x)  # the weight observer sets the weight's qparams
    layer.weight_fake_quant.disable_observer()
    input_scale = torch.tensor([0.037])
    out = layer(x, input_scale=input_scale)
    weight = layer.weight_fake_quant(layer.weight).detach()
    bias = _kernel_bias(layer.bias.detach(), input_scale, layer.weight_fake_quant.scale)
    assert not torch.equal(bias, layer.bias.detach())  # the grid is coarse enough to show
    torch.testing.assert_close(out, x @ weight.T + bias)
    out.sum().backward()
    # Straight through: the bias learns as if it were not rounded.
    torch.testing.assert_close(layer.bias.grad, torch.full((4,), 5.0))
    # Without the input scale (a model called outside qat.prepare's graph), the float bias.
    torch.testing.assert_close(layer(x), x @ weight.T + layer.bias.detach())


def test_linear_computes_as_its_kernel_in_eval_given_kernel_qparams():
    """Given kernel_qparams (qat.prepare passes them for qnnpack), a Linear in eval, with its
    quantizers on and its output's observer off, writes the integers qnnpack's
    quantized::linear writes (on the output's grid); in training, or while the output is
    observed (calibration), it computes the float formula as before."""
    torch.manual_seed(0)
    layer = qat.modules.Linear(64, 24)
    in_fq, out_fq = qat.FakeQuantize(qat.Config().activation), qat.FakeQuantize(
        qat.Config().activation)
    x = in_fq(torch.randn(256, 64))
    out_fq(layer(x))  # both quantizers and the weight's observe a batch
    kernel_qparams = (in_fq.fake_quant_enabled, out_fq.scale, out_fq.observer_enabled,
                      out_fq.fake_quant_enabled)
    for m in (layer, in_fq, out_fq):
        m.apply(lambda q: q.disable_observer() if isinstance(q, qat.FakeQuantize) else None)
    weight = layer.weight_fake_quant(layer.weight).detach()
    bias = _kernel_bias(layer.bias.detach(), in_fq.scale, layer.weight_fake_quant.scale)
    float_formula = x @ weight.T + bias
    with torch.no_grad():
        torch.testing.assert_close(layer(x, in_fq.scale, kernel_qparams), float_formula)
        layer.eval()
        out_fq.enable_observer()
        torch.testing.assert_close(layer(x, in_fq.scale, kernel_qparams), float_formula)
        out_fq.disable_observer()
        out = layer(x, in_fq.scale, kernel_qparams)
    scale, zero_point = out_fq.scale.item(), int(out_fq.zero_point.item())
    assert torch.equal(out, torch.round(out / scale) * scale)  # on the output's grid
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = "qnnpack"
    try:
        q_x = torch.quantize_per_tensor(x, in_fq.scale.item(), int(in_fq.zero_point.item()),
                                        torch.quint8)
        q_w = torch.quantize_per_channel(weight, layer.weight_fake_quant.scale.double(),
                                         torch.zeros(24, dtype=torch.long), 0, torch.qint8)
        packed = torch.ops.quantized.linear_prepack(q_w, layer.bias.detach())
        expected = torch.ops.quantized.linear(q_x, packed, scale, zero_point).int_repr()
    finally:
        torch.backends.quantized.engine = previous
    levels = torch.clamp(torch.round(out / scale) + zero_point, 0, 255)
    assert torch.equal(levels, expected.float())


@pytest.mark.parametrize("bias", [False, True])
def test_conv_bn_eval_with_input_scale_is_the_integer_kernels_folded_conv(bias):
    """In eval, given its input's scale, ConvBn2d is conv(x, fq(w * f)) plus the folded bias
    beta + f * (b - mean) rounded to the kernel's grid; the reference uses PyTorch's own
    per-channel fake quantization of the folded weight."""
    torch.manual_seed(0)
    fused = make_conv_bn(bias=bias)
    with torch.no_grad():
        fused[1].running_mean.normal_()
        fused[1].running_var.uniform_(0.5, 2.0)
    mod = qat.modules.ConvBn2d.from_float(fused.train())
    mod(torch.randn(2, 3, 8, 8))  # the weight observer sees the folded weight
    mod.weight_fake_quant.disable_observer()
    mod.eval()
    x = torch.randn(2, 3, 8, 8)
    input_scale = torch.tensor([0.5])  # a coarse grid, so that the rounding shows
    bn, fq = mod.bn, mod.weight_fake_quant
    with torch.no_grad():
        f = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        folded = torch.fake_quantize_per_channel_affine(
            mod.weight * f.reshape(-1, 1, 1, 1), fq.scale, fq.zero_point, 0, fq.quant_min,
            fq.quant_max)
        b = bn.bias - f * bn.running_mean + (f * mod.bias if bias else 0)
        expected = F.conv2d(x, folded, padding=1) + _kernel_bias(b, input_scale, fq.scale).reshape(
            1, -1, 1, 1)
        torch.testing.assert_close(mod(x, input_scale), expected, rtol=1e-5, atol=1e-5)
        # Without the input scale, the running-statistics batch norm: the float bias.
        assert (mod(x) - expected).abs().max() > 1e-4
