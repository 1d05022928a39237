"""qat.export to ONNX (.onnx, QDQ): each op pattern on ONNX Runtime's integer kernels, the
fused nodes in ONNX Runtime's optimized graph, the fresh-process round trip (without qat or
torch), parity on the Fashion-MNIST CNN, the metadata, the command line, and the refusals.

The reference is the integer model on PyTorch's quantized kernels (qat.convert's), which
the .onnx re-expresses as QuantizeLinear / DequantizeLinear pairs: ONNX Runtime's integer
kernels round their requantization with fp32 multipliers of their own, so outputs are held
to one quantization step of the output per element (a flip in one layer may move the
output by more, rarely)."""

import copy
import functools
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import qat
from qat import _onnx
from qat.export import describe, load

from helpers import (QDQ_PATTERNS, Activations, ConvBnRelu, FashionNet,
                     GroupAndLayerNormed, Mlp, TextCNN, TextEncoder, calibrated, small_swin,
                     sqnr_db, steps_apart)

MISSING = _onnx.available()
# A real limit: onnx and onnxruntime are pinned for the PyPI leg (requirements/pypi.txt);
# Debian's world has neither, and there the refusal test below runs.
needs_onnx = pytest.mark.skipif(MISSING is not None,
                                reason=f"{MISSING} (the .onnx tests run on the PyPI leg)")

# ONNX Runtime's CPU provider has no integer transposed convolution: those stay float
# ConvTranspose ops on the dequantized int8 weights.
_LAYERS = (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.Linear)


def _optimized_ops(path, tmp_path):
    """The op types of ONNX Runtime's optimized graph of the model at ``path``, read from
    the file ONNX Runtime saves (not from qat's report)."""
    import onnx
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]


@needs_onnx
@pytest.mark.parametrize("name", QDQ_PATTERNS)
def test_each_op_pattern_runs_on_integer_kernels_as_the_integer_model(name, tmp_path):
    cls, shape, preset = QDQ_PATTERNS[name]
    x = torch.rand(64, *shape)
    config = getattr(qat.presets, preset)() if preset else None
    qmodel = calibrated(cls(), x, config)
    path = str(tmp_path / "model.onnx")
    int_model = qat.export(qmodel, path, x[:8])
    with torch.no_grad():
        expected = int_model(x[:8])
    got = _onnx.run_fresh(path, (x[:8],))[0]
    steps = steps_apart(qmodel, expected, got)
    assert (steps <= 1 + 1e-3).float().mean().item() >= 0.99, steps.max()
    assert steps.max().item() <= 3
    modules = list(cls().modules())
    layers = sum(isinstance(m, _LAYERS) for m in modules)
    transposed = sum(isinstance(m, nn.ConvTranspose2d) for m in modules)
    ops = _optimized_ops(path, tmp_path)
    integer = sum(op in ("QLinearConv", "QGemm", "QLinearMatMul") for op in ops)
    assert integer == layers - transposed, ops
    assert ops.count("ConvTranspose") == transposed
    assert "Conv" not in ops and "Gemm" not in ops
    report = qat.read_metadata(path)["onnx"]
    assert (report["layers"], report["layers_integer"], report["layers_float"]) == \
        (layers, layers - transposed, transposed)
    # The float island of hardswish, which ONNX Runtime writes as x * hardsigmoid(x).
    assert report["float_ops"] == (["HardSigmoid", "Mul"] if name.startswith("add_mul") else [])
    named = [n for n, m in cls().named_modules() if isinstance(m, _LAYERS)]
    assert report["sub_8bit_weights_as_int8"] == (named if preset == "w4a8" else [])


class _Shuffle(nn.Module):
    """ShuffleNet's split, channel shuffle (size arithmetic, view, transpose) and mean."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.branch = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        left, right = self.stem(x).chunk(2, dim=1)
        x = torch.cat([left, torch.relu(self.branch(right))], 1)
        n, c, h, w = x.size()
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        return self.fc(x.mean((2, 3)))


@needs_onnx
def test_split_shuffle_and_mean_follow_the_integer_model(tmp_path):
    x = torch.rand(64, 3, 8, 8)
    qmodel = calibrated(_Shuffle(), x)
    path = str(tmp_path / "shuffle.onnx")
    int_model = qat.export(qmodel, path, x[:8])
    # Shapes come from the integer model, the batch dimension stays free.
    got = _onnx.run_fresh(path, (x[:5],))[0]
    with torch.no_grad():
        expected = int_model(x[:5])
    assert (steps_apart(qmodel, expected, got) <= 1 + 1e-3).all()
    report = qat.read_metadata(path)["onnx"]
    assert (report["layers"], report["layers_integer"]) == (3, 3)
    assert report["float_ops"] == ["ReduceMean"]  # the mean the integer model runs in float


@needs_onnx
@pytest.mark.parametrize("regroup", [
    lambda y: torch.cat(torch.split(y, [5, 11], 1)[::-1], 1),
    lambda y: torch.cat([torch.split(y, 8, 1)[1], torch.split(y, 8, 1)[0]], 1),
    lambda y: torch.cat(y.chunk(4, 1), 1),
], ids=["slice_of_split_sections", "split_parts", "cat_of_chunk"])
def test_splits_and_their_slices_follow_the_integer_model(regroup, tmp_path):
    """torch.split had no ONNX lowering (torch.chunk had), and a cat of one node's tuple
    (a split's slice, a chunk) failed; both are ONNX's Split and Concat now."""
    assert (_steps_between_convs(regroup, "Split", tmp_path) <= 1 + 1e-3).all()


@needs_onnx
@pytest.mark.parametrize("activation, float_ops", [
    (nn.SiLU(), ["Mul", "Sigmoid"]),
    (nn.GELU(), ["Add", "Erf", "Mul"]),
    (nn.GELU(approximate="tanh"), ["Add", "Mul", "Tanh"]),
], ids=["silu", "gelu", "gelu_tanh"])
def test_a_float_activation_between_integer_convs(activation, float_ops, tmp_path):
    """EfficientNet's SiLU and the transformers' GELU have no integer kernel: the integer
    model runs them in float, and so does the file (opset 17 has neither op: x * sigmoid(x),
    GELU from Erf or Tanh), between the convs' integer kernels."""
    model = nn.Sequential(nn.Conv2d(3, 6, 3), activation, nn.Conv2d(6, 4, 3), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 3))
    x = torch.rand(64, 3, 8, 8) * 4 - 2
    qmodel = calibrated(model, x)
    path = str(tmp_path / "activation.onnx")
    int_model = qat.export(qmodel, path, x[:8])
    with torch.no_grad():
        expected = int_model(x[:8])
    got = _onnx.run_fresh(path, (x[:8],))[0]
    assert (steps_apart(qmodel, expected, got) <= 1 + 1e-3).float().mean().item() >= 0.99
    report = qat.read_metadata(path)["onnx"]
    assert (report["layers"], report["layers_integer"]) == (3, 3)
    assert report["float_ops"] == float_ops


class _Between(nn.Module):
    """``op`` between two convs (a module, or a function the graph records as a call)."""

    def __init__(self, op, channels_after: int = 16):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.op = op
        self.head = nn.Conv2d(channels_after, 4, 3, padding=1)

    def forward(self, x):
        return self.head(self.op(self.conv(x)))


def _steps_between_convs(op, onnx_op: str, tmp_path, channels_after: int = 16):
    """``op`` between two integer convs (:class:`_Between`), exported to ONNX with a batch
    of 4: checks that the file holds ``onnx_op`` and returns, per output element of the
    file run at a batch of 5, how many output steps it is from the integer model."""
    import onnx

    x = torch.randn(32, 3, 8, 8)
    qmodel = calibrated(_Between(op, channels_after), x)
    path = str(tmp_path / "between.onnx")
    int_model = qat.export(qmodel, path, x[:4])
    assert onnx_op in [n.op_type for n in onnx.load(path).graph.node]
    with torch.no_grad():
        expected = int_model(x[4:9])
    got = _onnx.run_fresh(path, (x[4:9],))[0]
    assert got.shape == expected.shape
    return steps_apart(qmodel, expected, got)


@needs_onnx
@pytest.mark.parametrize("op, channels_after, onnx_op", [
    (nn.Upsample(scale_factor=2), 16, "Resize"),
    (nn.Upsample(scale_factor=1.5), 16, "Resize"),
    (nn.Upsample(size=(13, 11)), 16, "Resize"),
    (nn.Upsample(scale_factor=1.7, mode="nearest-exact"), 16, "Resize"),
    (nn.Upsample(size=(13, 11), mode="bilinear"), 16, "Resize"),
    (nn.UpsamplingBilinear2d(scale_factor=2), 16, "Resize"),
    (lambda y: F.interpolate(y, scale_factor=1.3, recompute_scale_factor=True), 16, "Resize"),
    # 30 x 2.1: 63 in PyTorch (double), 62 at float32(2.1) in ONNX Runtime.
    (lambda y: F.interpolate(F.interpolate(y, size=(30, 30)), scale_factor=2.1), 16, "Resize"),
    # An output of size 1 samples the input's middle.
    (lambda y: F.interpolate(y, size=(1, 5), mode="bilinear"), 16, "Resize"),
    (nn.PixelShuffle(2), 4, "DepthToSpace"),
    (lambda y: F.pixel_shuffle(y, 2), 4, "DepthToSpace"),
    (nn.Softmax(dim=1), 16, "Softmax"),
    (lambda y: y.softmax(-1), 16, "Softmax"),
    (nn.LogSoftmax(dim=1), 16, "LogSoftmax"),
], ids=["nearest_x2", "nearest_x1.5", "nearest_to_size", "nearest_exact", "bilinear_to_size",
        "bilinear_align_corners", "nearest_recomputed_scale", "nearest_x2.1_of_30",
        "bilinear_to_size_1", "pixel_shuffle",
        "pixel_shuffle_function", "softmax", "softmax_method", "log_softmax"])
def test_resizes_pixel_shuffles_and_softmaxes_follow_the_integer_model(op, channels_after,
                                                                      onnx_op, tmp_path):
    """Segmentation and super-resolution heads (nn.Upsample, F.interpolate, PixelShuffle) and
    a classifier's softmax had no ONNX lowering, so such models wrote no .onnx; each is now
    the ONNX op that computes it with PyTorch's coordinates, and the file, run at another
    batch size than the example's, gives the integer model's outputs."""
    steps = _steps_between_convs(op, onnx_op, tmp_path, channels_after)
    assert (steps <= 1 + 1e-3).all()


class _PaddedConv(nn.Conv2d):
    """A subclass that only sets the constructor's defaults: a Conv2d to every emitter."""

    def __init__(self, in_channels, out_channels):
        super().__init__(in_channels, out_channels, 3, padding=1)


class _FloatLayers(nn.Module):
    """Layers the integer model runs in float around one integer conv (``mid``): the first
    (a subclass of Conv2d) and last skipped in the Config, convs padded by reflection, by
    replication and by an asymmetric "same", and a grouped transposed conv."""

    def __init__(self):
        super().__init__()
        self.first = _PaddedConv(3, 8)
        self.reflect = nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")
        self.replicate = nn.Conv2d(8, 8, 3, padding=2, dilation=2, padding_mode="replicate")
        self.mid = nn.Conv2d(8, 8, 1)
        self.even = nn.Conv2d(8, 8, 4, padding="same")
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2, groups=2)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.reflect(torch.relu(self.first(x))))
        x = self.up(self.even(self.mid(self.replicate(x))))
        return self.head(x.mean((2, 3)))


@needs_onnx
def test_layers_left_in_float_run_as_float_onnx_layers(tmp_path):
    """A layer skipped in the Config (the usual first and last) or without an integer
    kernel wrote no .onnx ('no ONNX lowering for Conv2d'); each is now the float Conv /
    ConvTranspose / Gemm over the weights the integer model holds, after a Pad where it
    pads by reflection, by replication or asymmetrically."""
    import onnx

    x = torch.randn(32, 3, 8, 8)
    qmodel = calibrated(_FloatLayers(), x, qat.Config(skip=["first", "head"]))
    path = str(tmp_path / "float_layers.onnx")
    int_model = qat.export(qmodel, path, x[:4])
    assert type(int_model.mid) is qat.quantized.Conv2d
    ops = [n.op_type for n in onnx.load(path).graph.node]
    assert (ops.count("Conv"), ops.count("ConvTranspose"), ops.count("Gemm")) == (5, 1, 1)
    assert sorted(n.attribute[0].s.decode() for n in onnx.load(path).graph.node
                  if n.op_type == "Pad") == ["constant", "edge", "reflect"]
    with torch.no_grad():
        expected = int_model(x[4:9])
    got = _onnx.run_fresh(path, (x[4:9],))[0]
    assert sqnr_db(expected, got) >= 40
    # (ONNX Runtime's optimizer may put a float conv between a dequantize and a quantize on
    # an integer kernel itself: the split is its own, the total is the model's.)
    report = qat.read_metadata(path)["onnx"]
    assert report["layers"] == report["layers_integer"] + report["layers_float"] == 7


@needs_onnx
@pytest.mark.parametrize("op, onnx_op", [
    (lambda y: y - y.mean((2, 3), keepdim=True), "Sub"),
    (lambda y: 1 - y, "Sub"),
    (lambda y: y / (y.abs() + 1), "Div"),
    (lambda y: -y, "Neg"),
    (lambda y: torch.exp(-y.abs()), "Exp"),
    (lambda y: torch.sqrt(y.abs() + 1), "Sqrt"),
    (lambda y: torch.log(y.abs() + 1), "Log"),
    (lambda y: torch.pow(y, 3), "Pow"),
    (lambda y: torch.matmul(y, y.transpose(2, 3)), "MatMul"),
    (lambda y: torch.maximum(y, y * 0.5), "Max"),
    (lambda y: torch.where(y > 0, y, 0.1 * y), "Where"),
    (lambda y: y.clamp(min=-1, max=2), "Clip"),
    (lambda y: torch.clamp(y, max=0.5), "Clip"),
    (nn.Hardtanh(-1, 1), "Clip"),
    (lambda y: F.hardtanh(y, -0.5, 0.5), "Clip"),
    (lambda y: F.pad(y, (1, 2, 0, 1), mode="reflect"), "Pad"),
    (lambda y: F.pad(y, (1, 1, 1, 1), value=0.5), "Pad"),
    (nn.ZeroPad2d(1), "Pad"),
    (nn.ReplicationPad2d(1), "Pad"),
    (nn.PReLU(16), "PRelu"),
    (nn.Mish(), "Softplus"),
    (nn.InstanceNorm2d(16, affine=True), "InstanceNormalization"),
    (lambda y: torch.stack([y, y * 2]).mean(0), "Unsqueeze"),
    (lambda y: y.sum(1, keepdim=True).expand(-1, 16, -1, -1), "ReduceSum"),
    (nn.AdaptiveMaxPool2d(1), "GlobalMaxPool"),
    (nn.AdaptiveMaxPool2d((4, 2)), "MaxPool"),
    (nn.AdaptiveAvgPool2d((2, 4)), "AveragePool"),
    # Sizes that do not divide the input's (AlexNet's 6 x 6 head below 224 pixels), and one
    # above it.
    (lambda y: F.adaptive_avg_pool2d(y, (3, 5)), "ReduceMean"),
    (lambda y: F.adaptive_max_pool2d(y, 3), "ReduceMax"),
    (nn.AdaptiveAvgPool2d(11), "ReduceMean"),
    # Pooling called as functions (Inception-v3's).
    (lambda y: F.avg_pool2d(y, kernel_size=3, stride=1, padding=1), "AveragePool"),
    (lambda y: F.avg_pool2d(y, 3, 2, ceil_mode=True, count_include_pad=False), "AveragePool"),
    (lambda y: F.max_pool2d(y, kernel_size=3, stride=2), "MaxPool"),
    (lambda y: F.max_pool2d(y, 2, 1, 0, 2), "MaxPool"),
    # A last window past the padding: PyTorch divides it by what it covers of the padded
    # input (ONNX Runtime's integer pooling, given the padding as pads, by the kernel).
    (lambda y: F.avg_pool2d(y, 3, 2, 0, True, True), "AveragePool"),
    (nn.AvgPool2d(3, 2, 1, ceil_mode=True), "AveragePool"),
    (lambda y: F.max_pool1d(y.flatten(2), 3, 2, 1, 1, True).unsqueeze(-1), "MaxPool"),
    (lambda y: F.avg_pool1d(y.flatten(2), 3, 2, 1, True, False).unsqueeze(-1), "AveragePool"),
    # ConvNeXt's layer norm over channels: F.layer_norm on its own parameters.
    (torchvision.models.convnext.LayerNorm2d(16), "LayerNormalization"),
], ids=["sub", "rsub", "div", "neg", "exp", "sqrt", "log", "pow", "matmul", "maximum", "where",
        "clamp", "clamp_max", "hardtanh", "hardtanh_function", "pad_reflect", "pad_value",
        "zero_pad", "replication_pad", "prelu", "mish", "instance_norm", "stack",
        "sum_expand", "global_max_pool", "adaptive_max_pool", "adaptive_avg_pool",
        "adaptive_avg_pool_not_dividing", "adaptive_max_pool_function_not_dividing",
        "adaptive_avg_pool_up", "avg_pool_function", "avg_pool_function_ceil",
        "max_pool_function", "max_pool_function_dilated", "avg_pool_function_ceil_with_pad",
        "avg_pool_ceil_padded", "max_pool1d_function", "avg_pool1d_function",
        "layer_norm_function"])
def test_float_ops_follow_the_integer_model(op, onnx_op, tmp_path):
    """The integer model runs these in float32 between a dequantize and a quantize (or, the
    pools, on its quantized tensors); each wrote no .onnx ('no ONNX lowering for sub') and
    is now its ONNX op."""
    steps = _steps_between_convs(op, onnx_op, tmp_path)
    assert (steps <= 1 + 1e-3).float().mean().item() >= 0.99


@needs_onnx
@pytest.mark.parametrize("op, named", [
    (lambda y: F.interpolate(y, scale_factor=2, mode="bicubic"), "interpolate"),
    (lambda y: F.pad(y, (1, 1, 1, 1), mode="circular"), "pad"),
    (lambda y: F.softmax(y, 1, dtype=torch.float64).float(), "softmax"),
    (lambda y: F.avg_pool2d(y, 2, divisor_override=3), "avg_pool2d"),
    (lambda y: F.layer_norm(y, y.shape[-1:]), "layer_norm"),
], ids=["bicubic", "circular_pad", "softmax_to_float64", "avg_pool_divisor",
        "layer_norm_of_a_computed_shape"])
def test_ops_onnx_does_not_compute_as_pytorch_are_named(op, named, tmp_path):
    """What Resize, Pad, Softmax or AveragePool would compute otherwise than PyTorch
    (bicubic coefficients at the border, wrap padding, a cast, a divisor of its own) is
    refused by name, no file left."""
    x = torch.randn(32, 3, 8, 8)
    path = tmp_path / "refused.onnx"
    with pytest.raises(TypeError, match=rf"qat.export: no ONNX lowering for {named} \(node "):
        qat.export(calibrated(_Between(op), x), path, x[:4])
    assert os.listdir(tmp_path) == []


class _Norms(nn.Module):
    """A standalone batch norm (on the input, not foldable), a per-channel mean (a float
    island), and a layer norm after the head."""

    def __init__(self):
        super().__init__()
        self.bn_in = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 12 * 12, 16)
        self.layer_norm = nn.LayerNorm(16)

    def forward(self, x):
        x = self.conv(self.bn_in(x))
        x = torch.relu(x + x.mean(1, keepdim=True))
        return self.layer_norm(self.fc(torch.flatten(x, 1)))


@needs_onnx
@pytest.mark.parametrize("cls, kernels, float_ops", [
    (_Norms, {"bn_in": qat.quantized.BatchNorm, "layer_norm": qat.quantized.LayerNorm},
     ["BatchNormalization", "LayerNormalization", "ReduceMean"]),
    (functools.partial(Activations, 12), {
        "elu": qat.quantized.ELU, "leaky_relu_int": qat.quantized.LeakyReLU,
        "leaky": qat.quantized.LeakyReLU, "elu_1_int": qat.quantized.ELU},
     ["Elu"]),  # ONNX Runtime fuses a leaky ReLU between the pairs into QLinearLeakyRelu
    (GroupAndLayerNormed, {"group_norm": qat.quantized.GroupNorm,
                           "layer_norm": qat.quantized.LayerNorm},
     # Opset 17 has no GroupNormalization: InstanceNormalization, then weight and bias.
     ["Add", "InstanceNormalization", "LayerNormalization", "Mul"]),
], ids=["batch_and_layer_norm", "elu_and_leaky_relu", "group_and_layer_norm"])
def test_norms_and_activations_follow_the_integer_model(cls, kernels, float_ops, tmp_path):
    """Integer kernels of PyTorch that ONNX Runtime (mostly) has no integer form of: each
    runs in float between the quantize / dequantize pairs of the integer model's qparams."""
    torch.manual_seed(0)
    x = torch.rand(64, 3, 12, 12)
    model = cls()
    with torch.no_grad():  # running statistics that are not the identity
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    qmodel = calibrated(model, x)
    path = str(tmp_path / "model.onnx")
    int_model = qat.export(qmodel, path, x[:8])
    assert {name: type(int_model.get_submodule(name)) for name in kernels} == kernels
    with torch.no_grad():
        expected = int_model(x[:8])
    got = _onnx.run_fresh(path, (x[:8],))[0]
    steps = steps_apart(qmodel, expected, got)
    assert (steps <= 1 + 1e-3).float().mean().item() >= 0.99 and steps.max() <= 3, steps.max()
    report = qat.read_metadata(path)["onnx"]
    assert report["layers"] == report["layers_integer"]
    assert report["float_ops"] == float_ops


class _Tagger(nn.Module):
    """Linears over a sequence (3-D input)."""

    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(8, 16)
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        return self.out(torch.relu(self.hidden(x)))


@needs_onnx
@pytest.mark.parametrize("shape", [(8,), (5, 8)], ids=["rows", "sequences"])
def test_dynamic_linears_quantize_their_input_at_run_time_as_the_integer_model(shape,
                                                                               tmp_path):
    """qat.presets.w8a8_dynamic: each linear's input quantized to uint8 from its own range
    in the file (DynamicQuantizeLinear), int8 weights stored as their integers, one integer
    kernel per linear in ONNX Runtime; the file gives the integer model's outputs."""
    import onnx
    from onnx import numpy_helper

    torch.manual_seed(0)
    x = torch.randn(64, *shape)
    qmodel = calibrated(_Tagger(), x, qat.presets.w8a8_dynamic())
    path = tmp_path / "dynamic.onnx"
    int_model = qat.export(qmodel, path, x[:4])
    got = _run_without_qat(path, x[:13], tmp_path)
    with torch.no_grad():
        expected = int_model(x[:13])
    # ONNX Runtime's dynamic kernel multiplies the same integers with the same scales.
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    stored = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    for name in ("hidden", "out"):
        weight = int_model.get_submodule(name).lowered(name).weight
        assert np.array_equal(stored[f"{name}_weight"], weight.int_repr().numpy().T)
    report = qat.read_metadata(path)["onnx"]
    assert report["layers"] == report["layers_integer"] == 2 and report["float_ops"] == []
    assert _optimized_ops(path, tmp_path) == ["DynamicQuantizeMatMul", "Relu",
                                              "DynamicQuantizeMatMul"]


class _Recurrent(nn.Module):
    """A recurrent layer, its last step (or, sequence first, the mean over time) and its
    final state into a linear head."""

    def __init__(self, kind, layers, bidirectional, batch_first):
        super().__init__()
        self.batch_first = batch_first
        self.rnn = getattr(nn, kind)(8, 12, layers, batch_first=batch_first,
                                     bidirectional=bidirectional)
        self.fc = nn.Linear(12 * (2 if bidirectional else 1) + 12, 3)

    def forward(self, x):
        out = self.rnn(x)
        return self.head(out[0], out[1])

    def head(self, out, state):
        last = out[:, -1] if self.batch_first else out.mean(0)
        h_n = state[0] if isinstance(self.rnn, nn.LSTM) else state
        return self.fc(torch.cat([last, h_n[-1]], 1))


class _RecurrentFromState(_Recurrent):
    """:class:`_Recurrent` from a given initial state (an LSTM's h and c both ``h0``)."""

    def forward(self, x, h0):
        out = self.rnn(x, (h0, h0) if isinstance(self.rnn, nn.LSTM) else h0)
        return self.head(out[0], out[1])


@needs_onnx
@pytest.mark.parametrize("kind,layers,bidirectional,batch_first,initial", [
    ("LSTM", 1, False, True, False), ("LSTM", 2, True, False, True),
    ("GRU", 2, False, True, True), ("GRU", 1, True, False, False),
])
def test_dynamic_recurrent_layers_run_in_float_over_their_stored_integers(
        kind, layers, bidirectional, batch_first, initial, tmp_path):
    """qat.presets.w8a8_dynamic's LSTM / GRU: ONNX's LSTM / GRU over the layer's int8
    weights (stored as their integers, gates in ONNX's order), stacked and joined as
    PyTorch does, from a given initial state too; float where PyTorch's kernel quantizes
    input and state at run time, so the file follows the integer model within that
    rounding; the head stays integer."""
    import onnx
    from onnx import numpy_helper

    torch.manual_seed(0)
    x = torch.randn(64, 7, 8) if batch_first else torch.randn(7, 64, 8)
    h0 = torch.randn(layers * (2 if bidirectional else 1), 64, 12)
    model = (_RecurrentFromState if initial else _Recurrent)(kind, layers, bidirectional,
                                                             batch_first)

    def batch(rows):  # the model's inputs for those sequences
        xs = x[rows] if batch_first else x[:, rows]
        return (xs, h0[:, rows]) if initial else (xs,)

    qmodel = qat.prepare(model, qat.presets.w8a8_dynamic())
    # Each batch (inputs,), its inputs a tuple of the positional ones.
    qat.calibrate(qmodel, [(batch(slice(0, 32)),), (batch(slice(32, 64)),)], progress=False)
    path = tmp_path / "recurrent.onnx"
    int_model = qat.export(qmodel, path, batch(slice(0, 4)))
    # Other sequences, more of them: the batch is free where it lies (a sequence-first
    # input's second dimension, an initial state's second beside a batch-first input).
    got = _onnx.run_fresh(str(path), batch(slice(8, 14)))[0]
    # What the file should compute: the integer model with PyTorch's float layer over the
    # values of the recurrent layer's integers in its place.
    float_rnn = getattr(nn, kind)(8, 12, layers, batch_first=batch_first,
                                  bidirectional=bidirectional)
    values = {**int_model.rnn.get_weight(), **int_model.rnn.get_bias()}
    with torch.no_grad():
        for name, value in values.items():
            getattr(float_rnn, name).copy_(value.dequantize() if value.is_quantized else value)
        reference = copy.deepcopy(int_model)
        reference.rnn = float_rnn.eval()
        torch.testing.assert_close(got, reference(*batch(slice(8, 14))), rtol=1e-4,
                                   atol=1e-5)
        expected = int_model(*batch(slice(8, 14)))
    # The integer model's kernel also rounds input and state at run time.
    assert sqnr_db(expected, got) >= 30, sqnr_db(expected, got)
    stored = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    weight = int_model.rnn.get_weight()["weight_hh_l0"]
    blocks = weight.int_repr().numpy().reshape(-1, 12, 12)
    order = [0, 3, 1, 2] if kind == "LSTM" else [1, 0, 2]  # ONNX's gate order
    assert stored["rnn_weight_hh_l0"].dtype == np.int8
    assert np.array_equal(stored["rnn_weight_hh_l0"], blocks[order].reshape(-1, 12))
    report = qat.read_metadata(path)["onnx"]
    assert kind in report["float_ops"] and report["layers_integer"] == report["layers"] == 1


class _Indexed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(2 * 1 * 2, 3)

    def forward(self, x):
        y = self.conv(x)  # (batch, 4, 6, 6)
        y = y[..., 1::2, :][:, None, 1:3, :, ::3]  # (batch, 1, 2, 3, 2)
        return self.fc(torch.flatten(y[:, 0, :, -1:], 1))  # (batch, 2, 1, 2) flattened


@needs_onnx
def test_basic_indexing_slices_and_adds_axes_as_the_integer_model(tmp_path):
    x = torch.rand(32, 3, 8, 8)
    qmodel = calibrated(_Indexed(), x)
    path = tmp_path / "indexed.onnx"
    int_model = qat.export(qmodel, path, x[:4])
    got = _onnx.run_fresh(str(path), (x[4:17],))[0]
    with torch.no_grad():
        expected = int_model(x[4:17])
    assert (steps_apart(qmodel, expected, got) <= 1e-3).all()


class _Doubled(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        return y + y


class _Double(qat.quantized._WithOutputQParams):
    """An integer module of PyTorch's kernels that no exporter knows."""

    def forward(self, a, b):
        return torch.ops.quantized.add(a, b, self.scale, self.zero_point)


@needs_onnx
def test_an_integer_op_without_onnx_lowering_is_named(tmp_path):
    # Every integer module qat.convert makes has a lowering: one of qat's kind that a
    # user's code put into an integer model stands in for the next one added.
    x = torch.rand(16, 3, 6, 6)
    int_model = qat.convert(calibrated(_Doubled(), x))
    add = next(name for name, m in int_model.named_modules()
               if isinstance(m, qat.quantized.Add))
    known = int_model.get_submodule(add)
    setattr(int_model, add, _Double(known.scale, known.zero_point))
    with pytest.raises(TypeError, match=rf"qat.export: no ONNX lowering for _Double "
                                        rf"\({add}\), so no \.onnx was written"):
        qat.export(int_model, tmp_path / "double.onnx", x[:2])
    assert os.listdir(tmp_path) == []


@needs_onnx
def test_weights_are_stored_as_their_integers_and_biases_on_the_int32_grid(tmp_path):
    import onnx
    from onnx import numpy_helper

    x = torch.rand(32, 3, 12, 12)
    qmodel = calibrated(ConvBnRelu(), x)
    path = tmp_path / "model.onnx"
    int_model = qat.export(qmodel, path, x[:2])
    # Each layer's input scale, as the integer model's kernels see it.
    input_scales = {}

    def note(name):
        def hook(module, inputs):
            input_scales[name] = inputs[0].q_scale()
        return hook

    for name in ("conv", "depthwise", "fc"):
        int_model.get_submodule(name).register_forward_pre_hook(note(name))
    with torch.no_grad():
        int_model(x[:2])
    stored = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    for name in ("conv", "depthwise", "fc"):
        lowered = int_model.get_submodule(name).lowered(name)
        weight = lowered.weight
        assert stored[f"{name}_weight"].dtype == np.int8
        assert np.array_equal(stored[f"{name}_weight"], weight.int_repr().numpy())
        assert np.array_equal(stored[f"{name}_weight_scale"],
                              weight.q_per_channel_scales().float().numpy())
        # The bias the integer kernels add: the nearest multiples of input scale x weight
        # scale, which ONNX Runtime gets back by dividing by that step.
        step = (np.float32(input_scales[name])
                * weight.q_per_channel_scales().float().numpy()).astype(np.float32)
        ints = stored[f"{name}_bias"] / step
        # Within float32's rounding of an integer (far from the half-way points).
        assert np.all(np.abs(ints - np.round(ints)) <= 1e-6 * np.maximum(1, np.abs(ints)))
        bias = lowered.bias.float().numpy()
        assert np.all(np.abs(np.round(ints) * step - bias) <= step / 2 * (1 + 1e-5))


# Runs an .onnx where neither qat nor torch can be imported: the file needs ONNX Runtime
# alone.
_WITHOUT_QAT = """
import sys
sys.modules["qat"] = None
sys.modules["torch"] = None  # import torch now fails
import numpy as np
import onnxruntime
session = onnxruntime.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
x = np.load(sys.argv[2])
np.save(sys.argv[3], session.run(None, {session.get_inputs()[0].name: x})[0])
"""


def _run_without_qat(path, x: torch.Tensor, tmp_path) -> torch.Tensor:
    """The output of the .onnx at ``path`` on ``x``, run in a fresh process without qat or
    torch."""
    np.save(tmp_path / "x.npy", x.numpy())
    done = subprocess.run([sys.executable, "-c", _WITHOUT_QAT, str(path),
                           str(tmp_path / "x.npy"), str(tmp_path / "out.npy")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    return torch.from_numpy(np.load(tmp_path / "out.npy"))


@needs_onnx
@pytest.mark.parametrize("config", ["int8", "w4a8"])
def test_an_embedding_table_is_stored_as_its_integers_and_runs_without_qat(config, tmp_path):
    """The table as the integer model stores it (unsigned integers, a scale and a zero point
    per row; a 4-bit table a value per byte, and said so); the file, run without qat or
    torch at another batch size, looks up what the integer model looks up."""
    import onnx
    from onnx import numpy_helper

    torch.manual_seed(0)
    qmodel = qat.prepare(TextCNN(), getattr(qat.presets, config)())
    tokens = torch.randint(0, 500, (32, 20))
    qat.calibrate(qmodel, [tokens[:16], tokens[16:]], progress=False)
    path = tmp_path / "text.onnx"
    int_model = qat.export(qmodel.eval(), path, tokens[:8])
    stored = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    table = int_model.embed.table()
    ints = table.int_repr().numpy()
    assert stored["embed_weight"].dtype == np.uint8
    assert np.array_equal(stored["embed_weight"], ints)
    scales = stored["embed_weight_scale"]
    zero_points = stored["embed_weight_zero_point"]
    assert zero_points.dtype == np.uint8
    # What those integers are worth: (q - zero point) * scale per row, the values the
    # integer model's kernel looks up.
    values = (ints.astype(np.float32) - zero_points[:, None]) * scales[:, None]
    np.testing.assert_allclose(values, table.dequantize().numpy(), rtol=1e-6, atol=1e-7)
    expected_sub_8bit = [] if config == "int8" else ["embed", "conv", "fc"]
    assert qat.read_metadata(path)["onnx"]["sub_8bit_weights_as_int8"] == expected_sub_8bit
    got = _run_without_qat(path, tokens[:13], tmp_path)
    with torch.no_grad():
        expected = int_model(tokens[:13])
    assert (steps_apart(qmodel, expected, got) <= 1 + 1e-3).float().mean().item() >= 0.99


@needs_onnx
def test_a_table_left_in_float_is_looked_up_in_float(tmp_path):
    torch.manual_seed(0)
    qmodel = qat.prepare(TextCNN(), qat.Config(skip=["embed"]))
    tokens = torch.randint(0, 500, (32, 20))
    qat.calibrate(qmodel, [tokens[:16], tokens[16:]], progress=False)
    path = tmp_path / "text.onnx"
    int_model = qat.export(qmodel.eval(), path, tokens[:8])
    assert type(int_model.embed) is nn.Embedding
    got = _onnx.run_fresh(str(path), (tokens,))[0]
    with torch.no_grad():
        expected = int_model(tokens)
    assert (steps_apart(qmodel, expected, got) <= 1 + 1e-3).float().mean().item() >= 0.99


@needs_onnx
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_a_bag_per_row_of_indices_gives_the_integer_models_bags(mode, tmp_path):
    """Each bag the sum or mean of its rows, as the integer kernel's (which sums, and the
    integer model divides for the mean), checked against that model on other indices."""
    torch.manual_seed(1)
    qmodel = qat.prepare(nn.Sequential(nn.EmbeddingBag(40, 8, mode=mode), nn.Linear(8, 3)))
    tokens = torch.randint(0, 40, (64, 6))
    qat.calibrate(qmodel, [tokens[:32], tokens[32:]], progress=False)
    path = tmp_path / "bag.onnx"
    int_model = qat.export(qmodel.eval(), path, tokens[:4])
    got = _onnx.run_fresh(str(path), (tokens,))[0]
    with torch.no_grad():
        expected = int_model(tokens)
    assert (steps_apart(qmodel, expected, got) <= 1 + 1e-3).float().mean().item() >= 0.99


@needs_onnx
@pytest.mark.parametrize("mode,include_last_offset,weighted,skipped", [
    ("sum", False, False, False), ("mean", False, False, False), ("sum", True, True, False),
    ("mean", True, False, False), ("mean", False, False, True)])
def test_bags_given_offsets_give_the_integer_models_bags(mode, include_last_offset, weighted,
                                                         skipped, tmp_path):
    """1-D indices cut into bags at their offsets (empty bags and a last offset that only
    ends the last bag included; per-sample weights with ``sum``; a bag the Config leaves in
    float too), each bag the sum or mean of its rows, checked against the integer model on
    other indices, bag counts and lengths than the example's."""
    class Bags(nn.Module):
        def __init__(self):
            super().__init__()
            self.bag = nn.EmbeddingBag(40, 8, mode=mode, include_last_offset=include_last_offset)
            self.fc = nn.Linear(8, 3)

        def forward(self, tokens, offsets, weights):
            return self.fc(self.bag(tokens, offsets,
                                    per_sample_weights=weights if weighted else None))

    def batch(tokens: int, starts):
        offsets = torch.tensor(starts + ([tokens] if include_last_offset else []))
        return torch.randint(0, 40, (tokens,)), offsets, torch.rand(tokens)

    torch.manual_seed(2)
    qmodel = qat.prepare(Bags(), qat.Config(skip=["bag"]) if skipped else qat.Config())
    qat.calibrate(qmodel, [(batch(30, [0, 4, 9, 9, 20]),), (batch(12, [0, 5]),)],
                  progress=False)
    path = tmp_path / "bags.onnx"
    int_model = qat.export(qmodel.eval(), path, batch(12, [0, 5]))
    for tokens, starts in ((30, [0, 4, 9, 9, 20]), (7, [0, 0, 3]), (50, [0, 1, 2, 3, 50])):
        inputs = batch(tokens, starts)
        got = _onnx.run_fresh(str(path), inputs)[0]
        with torch.no_grad():
            expected = int_model(*inputs)
        assert got.shape == expected.shape
        assert (steps_apart(qmodel, expected, got) <= 1 + 1e-3).all()


@needs_onnx
def test_a_float_bag_in_mode_max_is_named_and_no_file_is_left(tmp_path):
    tokens = torch.randint(0, 40, (4, 6))
    qmodel = qat.prepare(nn.Sequential(nn.EmbeddingBag(40, 8, mode="max"), nn.Linear(8, 3)),
                         qat.Config(skip=["0"]))
    qat.calibrate(qmodel, [tokens], progress=False)
    with pytest.raises(TypeError, match=r"no ONNX lowering for the float EmbeddingBag 0 in "
                                        r"mode max"):
        qat.export(qmodel.eval(), tmp_path / "bags.onnx", tokens)
    assert os.listdir(tmp_path) == []


@needs_onnx
def test_a_transformer_encoder_runs_its_projections_on_integer_kernels(tmp_path):
    """Attention (heads split, scaled scores, the padding mask from a comparison of the
    tokens, softmax, the heads' sums) in float between the integer projections, as the
    integer model computes it; every projection and feed-forward linear, over its 3-D
    input, on an integer kernel; the file runs without qat or torch."""
    torch.manual_seed(0)
    qmodel = qat.prepare(TextEncoder(padding=True))
    tokens = torch.randint(1, 50, (32, 12))
    tokens[::4, 8:] = 0
    qat.calibrate(qmodel, [tokens[:16], tokens[16:]], progress=False)
    path = tmp_path / "encoder.onnx"
    int_model = qat.export(qmodel, path, tokens[:8])
    got = _run_without_qat(path, tokens[:13], tmp_path)
    with torch.no_grad():
        expected = int_model(tokens[:13])
    steps = steps_apart(qmodel, expected, got)
    assert (steps <= 1 + 1e-3).float().mean().item() >= 0.99 and steps.max() <= 3, steps.max()
    report = qat.read_metadata(path)["onnx"]
    # Per layer: query, key, value and output projections and two feed-forward linears;
    # and the head. Float: the attention's two matmuls per layer.
    assert report["layers"] == report["layers_integer"] == 2 * 6 + 1
    assert report["layers_float"] == 2 * 2
    assert {"Softmax", "Equal", "Where"} <= set(report["float_ops"])
    ops = _optimized_ops(path, tmp_path)
    assert ops.count("QGemm") == 13 and "Gemm" not in ops, ops


@needs_onnx
def test_a_vision_transformer_follows_the_integer_model_at_any_batch(tmp_path):
    """torchvision's ViT wrote no .onnx: its shape checks (torch._assert) and its class
    token expanded to the batch (``expand(x.shape[0], -1, -1)``) had no lowering. The
    checks hold for the traced shapes; the class tokens follow the batch the file runs
    with, here 5 for an example of 4."""
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
        num_classes=10)
    x = torch.randn(32, 3, 32, 32)
    qmodel = calibrated(model, x)
    path = str(tmp_path / "vit.onnx")
    int_model = qat.export(qmodel, path, x[:4])
    with torch.no_grad():
        expected = int_model(x[4:9])
    got = _onnx.run_fresh(path, (x[4:9],))[0]
    assert got.shape == expected.shape == (5, 10)
    steps = steps_apart(qmodel, expected, got)
    assert (steps <= 1 + 1e-3).float().mean().item() >= 0.99 and steps.max() <= 3, steps.max()
    report = qat.read_metadata(path)["onnx"]
    # Per layer: the query, key, value and output projections and two MLP linears; the
    # patch embedding conv and the head.
    assert report["layers"] == report["layers_integer"] == 2 * 6 + 2


def _dims(value_infos) -> list:
    return [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in value_infos]


@needs_onnx
def test_a_sequence_first_files_batch_is_its_second_dimension(tmp_path):
    """``nn.TransformerEncoderLayer``'s default layout, (length, batch, features): the file
    leaves the batch free where it lies, the second dimension (it declared the first, the
    length, free, and then ran at the example's shape only), and runs without qat at other
    batch sizes as the integer model does."""
    import onnx

    class SequenceFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0)
            self.head = nn.Linear(16, 3)

        def forward(self, x):
            return self.head(self.layer(x))

    torch.manual_seed(0)
    x = torch.randn(10, 24, 16)
    qmodel = qat.prepare(SequenceFirst())
    qat.calibrate(qmodel, [x[:, :12], x[:, 12:]], progress=False)
    path = tmp_path / "sequence_first.onnx"
    int_model = qat.export(qmodel.eval(), path, x[:, :4])
    graph = onnx.load(str(path)).graph
    assert _dims(graph.input) == [[10, "batch", 16]]
    assert _dims(graph.output) == [[10, "batch", 3]]
    for batch in (1, 9):
        got = _onnx.run_fresh(str(path), (x[:, :batch],))[0]
        with torch.no_grad():
            expected = int_model(x[:, :batch])
        steps = steps_apart(qmodel, expected, got)
        assert got.shape == expected.shape
        assert (steps <= 1 + 1e-3).float().mean().item() >= 0.99 and steps.max() <= 3


@needs_onnx
def test_a_file_that_cannot_take_another_batch_keeps_the_examples_shapes(tmp_path):
    """A model that reshapes to a fixed size takes no other batch: the file's inputs keep
    the example's shapes (declared free, ONNX Runtime would take another batch and fail
    inside), with a warning saying so; the file still runs on the example."""
    import onnx

    class FixedReshape(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            return self.fc(x).reshape(2, -1)

    torch.manual_seed(0)
    x = torch.randn(4, 8)
    qmodel = qat.prepare(FixedReshape())
    qat.calibrate(qmodel, [x], progress=False)
    path = tmp_path / "fixed.onnx"
    with pytest.warns(UserWarning, match=r"no input dimension can be left free as the batch"):
        int_model = qat.export(qmodel.eval(), path, x)
    graph = onnx.load(str(path)).graph
    assert _dims(graph.input) == [[4, 8]] and _dims(graph.output) == [[2, 6]]
    with torch.no_grad():
        expected = int_model(x)
    assert torch.equal(_onnx.run_fresh(str(path), (x,))[0], expected)


@needs_onnx
@pytest.mark.parametrize("height,width,v2", [(32, 32, False), (36, 16, False), (36, 16, True)],
                         ids=["whole_windows", "padded_shifted_along_rows_only", "v2"])
def test_swin_window_attention_follows_the_integer_model(height, width, v2, tmp_path):
    """torchvision's Swin through qat's window attention: windows padded, shifted and cut,
    scores with the position bias and the shift's mask, merged back; patch merging, GELU and
    the float layer norms; Swin V2's cosine scores with their logit scale, query / value
    bias and position-bias MLP (its linears on integer kernels too); every qkv, proj, MLP
    and reduction linear on an integer kernel; the file runs without qat or torch."""
    import onnx

    torch.manual_seed(0)
    x = torch.randn(24, 3, height, width)
    qmodel = qat.prepare(small_swin(v2))
    qat.calibrate(qmodel, [x[:8], x[8:16]], progress=False)
    path = tmp_path / "swin.onnx"
    int_model = qat.export(qmodel, path, x[:4])
    got = _run_without_qat(path, x[16:], tmp_path)
    with torch.no_grad():
        expected = int_model(x[16:])
    steps = steps_apart(qmodel, expected, got)
    assert (steps <= 1 + 1e-3).float().mean().item() >= 0.99 and steps.max() <= 3, steps.max()
    report = qat.read_metadata(path)["onnx"]
    layers = sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in small_swin(v2).modules())
    assert report["layers"] == report["layers_integer"] == layers  # the patches' conv too
    v2_ops = {"ReduceL2", "Sigmoid"} if v2 else set()
    assert {"Softmax", "Erf", "LayerNormalization"} | v2_ops <= set(report["float_ops"])
    # The constants read at export (logit scales, position indices, the V2 bias) are not
    # left behind as initializers no op reads (ONNX Runtime warns about each).
    graph = onnx.load(str(path)).graph
    read = {name for op in graph.node for name in op.input}
    assert [t.name for t in graph.initializer if t.name not in read] == []


class _MaskedAttention(nn.Module):
    """nn.MultiheadAttention, sequence first, under a causal mask held as a buffer,
    returning its averaged attention weights too."""

    def __init__(self):
        super().__init__()
        self.attention = nn.MultiheadAttention(16, 2)
        self.register_buffer("causal", torch.ones(6, 6, dtype=torch.bool).triu(1))
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        out, weights = self.attention(x, x, x, attn_mask=self.causal)
        return self.fc(out), weights


@needs_onnx
def test_attention_under_a_mask_buffer_returns_the_integer_models_weights(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(6, 32, 16)
    qmodel = qat.prepare(_MaskedAttention())
    qat.calibrate(qmodel, [x[:, :16], x[:, 16:]], progress=False)
    path = tmp_path / "attention.onnx"
    int_model = qat.export(qmodel, path, x[:, :8])
    got_out, got_weights = _onnx.run_fresh(str(path), (x[:, :8],))
    with torch.no_grad():
        out, weights = int_model(x[:, :8])
    steps = (out - got_out).abs() / float(qmodel.fc_activation_fake_quant.scale)
    assert (steps <= 1 + 1e-3).float().mean().item() >= 0.99 and steps.max() <= 3, steps.max()
    assert torch.allclose(got_weights, weights, atol=1e-5)
    # The causal mask held: no weight on a later position.
    assert bool((got_weights.triu(1) == 0).all()) and bool((weights.triu(1) == 0).all())
    assert torch.allclose(got_weights.sum(-1), torch.ones(8, 6), atol=1e-5)


@needs_onnx
def test_an_int8_file_is_about_a_quarter_of_the_float_weights(tmp_path):
    model = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    x = torch.randn(64, 512)
    path = tmp_path / "mlp.onnx"
    qat.export(calibrated(model, x), path, x[:1])
    floats = sum(p.numel() for p in model.parameters()) * 4
    assert path.stat().st_size <= 0.27 * floats, (path.stat().st_size, floats)




@needs_onnx
def test_the_file_runs_without_qat_or_torch_at_any_batch_size(tmp_path):
    x = torch.rand(32, 1, 28, 28)
    qmodel = calibrated(FashionNet(), x)
    path = tmp_path / "fashion.onnx"
    int_model = qat.export(qmodel, path, x[:4])
    # The batch dimension is free: exported with 4, run with 7.
    got = _run_without_qat(path, x[:7], tmp_path)
    with torch.no_grad():
        expected = int_model(x[:7])
    assert got.shape == expected.shape
    assert (steps_apart(qmodel, expected, got) <= 1 + 1e-3).float().mean().item() >= 0.99


@needs_onnx
def test_fashion_mnist_onnx_matches_the_simulation(fashion_qat_model, tmp_path):
    qmodel, test_x, test_y = fashion_qat_model
    path = str(tmp_path / "fashion.onnx")
    qat.export(qmodel, path, test_x[:1])
    batches = [test_x[i:i + 500] for i in range(0, len(test_x), 500)]
    parity = qat.compare(qmodel, path, batches)
    session, runtime = load(path)
    with torch.no_grad():
        accuracy = {
            "simulation": (qmodel(test_x).argmax(1) == test_y).float().mean().item(),
            "onnx": (torch.cat([session(b) for b in batches]).argmax(1) == test_y)
            .float().mean().item()}
    print(f"\nFashion-MNIST test set (10,000), .onnx in ONNX Runtime: {parity}, "
          f"accuracy {accuracy}")
    assert runtime == "ONNX Runtime"
    assert parity["within_one_step"] >= 0.99
    assert parity["top1_agreement"] >= 0.995
    assert accuracy["simulation"] > 0.6, "the model did learn"


@needs_onnx
def test_metadata_is_the_shared_writers_with_the_integer_kernel_report(tmp_path):
    x = torch.rand(32, 3, 12, 12)
    qmodel = calibrated(ConvBnRelu(), x)
    qat.export(qmodel, tmp_path / "m.onnx", x[:2])
    qat.export(qmodel, tmp_path / "m.pt", x[:2], mobile=False)
    onnx_meta = qat.read_metadata(tmp_path / "m.onnx")
    pt = qat.read_metadata(tmp_path / "m.pt")
    assert set(onnx_meta) - set(pt) == {"onnx"}
    assert {k: v for k, v in onnx_meta.items() if k != "onnx"} == pt
    assert onnx_meta["onnx"] == {"opset": 17, "layers": 3, "layers_integer": 3,
                                 "layers_float": 0, "float_ops": [],
                                 "sub_8bit_weights_as_int8": []}
    assert "ONNX Runtime runs 3 of 3 convs / linears on integer kernels (opset 17); float " \
        "ops: none" in describe(tmp_path / "m.onnx")


@needs_onnx
def test_a_file_below_the_floor_says_why_and_is_not_kept(tmp_path, monkeypatch):
    """A file whose outputs drift from the integer model's (ONNX Runtime's requantization,
    carried through a deep model: torchvision's swin_v2_t at 64 pixels gave 21 dB) was
    refused with its SQNR alone; the error now gives the floor, the reason and the formats
    that match bit for bit. Nothing is left."""
    x = torch.randn(32, 3, 8, 8)
    qmodel = calibrated(_Between(nn.ReLU()), x)
    run_fresh = _onnx.run_fresh

    def drifted(file, inputs):
        return [y + 0.3 * y.std() * torch.randn_like(y) for y in run_fresh(file, inputs)]

    monkeypatch.setattr(_onnx, "run_fresh", drifted)
    with pytest.raises(RuntimeError, match=r"dB, below the 30 dB floor\), so it was not kept: "
                                           r"often ONNX Runtime's integer kernels, which round "
                                           r".* A \.pt file runs PyTorch's kernels"):
        qat.export(qmodel, tmp_path / "drifted.onnx", x[:4])
    assert os.listdir(tmp_path) == []


@needs_onnx
def test_an_op_without_onnx_lowering_is_named_and_no_file_is_left(tmp_path):
    class Erf(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)

        def forward(self, x):
            return torch.erf(self.conv(x))

    x = torch.randn(16, 1, 8, 8)
    path = tmp_path / "erf.onnx"
    path.write_bytes(b"the previous file")
    with pytest.raises(TypeError, match=r"qat.export: no ONNX lowering for erf \(node erf\), "
                                        r"so no \.onnx was written"):
        qat.export(calibrated(Erf(), x), path, x[:2])
    assert path.read_bytes() == b"the previous file"
    assert sorted(os.listdir(tmp_path)) == ["erf.onnx"]


@needs_onnx
def test_format_forces_the_kind_whatever_the_suffix(tmp_path):
    x = torch.rand(16, 20)
    path = tmp_path / "model.bin"
    qat.export(calibrated(Mlp(), x), path, x[:2], format="onnx")
    assert _onnx.read_metadata_text(str(path)) is not None


@needs_onnx
def test_a_model_neither_prepared_nor_converted_is_refused(tmp_path):
    with pytest.raises(TypeError, match=r"an \.onnx is written from a QAT model or one "
                                        r"converted by qat\.convert .* got Linear"):
        qat.export(nn.Linear(2, 2), tmp_path / "m.onnx", torch.randn(1, 2))
    assert os.listdir(tmp_path) == []


# The refusal can only be seen where onnx is absent (the Debian leg runs it).
@pytest.mark.skipif(MISSING is None, reason="onnx and onnxruntime are installed here")
def test_without_onnx_an_onnx_file_is_refused_with_the_reason(tmp_path):
    x = torch.rand(16, 20)
    with pytest.raises(RuntimeError, match=r"qat.export: cannot write or run .onnx files: "
                                           r"the onnx and onnxruntime packages are not "
                                           r"installed"):
        qat.export(calibrated(Mlp(), x), tmp_path / "m.onnx", x[:2])
    assert os.listdir(tmp_path) == []


@needs_onnx
def test_command_line_inspects_benches_and_compares_onnx_files(tmp_path, fashion_qat_model):
    qmodel, test_x, _ = fashion_qat_model
    qat.export(qmodel, tmp_path / "int.onnx", test_x[:1])
    qat.export(qmodel, tmp_path / "int.pt", test_x[:1], mobile=False)

    def cli(*args):
        done = subprocess.run([sys.executable, "-m", "qat", *map(str, args)],
                              capture_output=True, text=True, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    assert "ONNX Runtime runs 5 of 5 convs / linears on integer kernels" in \
        cli("inspect", tmp_path / "int.onnx")
    out = cli("bench", tmp_path / "int.onnx", "--iterations", "5", "--threads", "1",
              "--batch", "4")
    assert "ONNX Runtime, engine CPUExecutionProvider, threads 1, input 4x1x28x28 float32" \
        in out
    out = cli("compare", tmp_path / "int.pt", tmp_path / "int.onnx", "--limit", "200")
    assert float(out.split("top-1 agreement ")[1].split()[0]) >= 0.99
