"""qat.ops.fake_quantize / torch.ops.qat.fake_quantize: forward and straight-through
backward against ATen's fake-quantize ops (or, where ATen has no kernel, a plain-PyTorch
reference), layouts, special values, argument checking."""

import math

import numpy as np
import pytest
import torch

import qat
from observer_reference import reference_qparams
from conftest import (
    all_ranges,
    broadcast_shape,
    reference_fake_quantize,
    reference_ste_grad,
    sample_values,
)

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def aten_fake_quantize(x, scale, zero_point, quant_min, quant_max, axis=None):
    """ATen's fake quantization: the tensor-qparams per-tensor op or the per-channel op."""
    if axis is None:
        return torch.fake_quantize_per_tensor_affine(
            x, scale.reshape(1).to(torch.float32), zero_point.reshape(1).to(torch.int32),
            quant_min, quant_max)
    return torch.fake_quantize_per_channel_affine(
        x, scale.to(torch.float32), zero_point.to(torch.int32), axis % x.dim(), quant_min,
        quant_max)


def has_aten_kernel(dtype, scale):
    # torch 1.13 has no bfloat16 fake-quantize kernel, nor a per-channel one for 0 channels.
    return dtype != torch.bfloat16 and scale.numel() > 0


def make_qparams(channels, quant_min, quant_max, generator):
    """float32 scales (one a power of two, so its ties are exact) and int32 zero points."""
    scale = torch.rand(channels, generator=generator) * 0.2 + 0.005
    if channels > 0:
        scale[0] = 2.0**-5
    zero_point = torch.randint(quant_min, quant_max + 1, (channels,), generator=generator,
                               dtype=torch.int32)
    return scale, zero_point


def check_against_aten(x, scale, zero_point, quant_min, quant_max, axis, generator,
                       use_aten=True):
    """Forward bit-identical and straight-through input gradient identical to ATen's ops
    (to the plain-PyTorch reference for bfloat16, or where ``use_aten`` is False), through
    both entry points."""
    use_aten = use_aten and has_aten_kernel(x.dtype, scale)
    # detach() keeps the strides that clone() would compact for a non-dense view.
    xq = x.detach().requires_grad_()
    assert xq.stride() == x.stride()
    out = qat.ops.fake_quantize(xq, scale, zero_point, quant_min, quant_max, axis=axis)
    out_op = torch.ops.qat.fake_quantize(x, scale, zero_point, quant_min, quant_max, axis)
    if use_aten:
        xa = x.detach().requires_grad_()
        expected = aten_fake_quantize(xa, scale, zero_point, quant_min, quant_max, axis)
    else:
        expected = reference_fake_quantize(x, scale, zero_point, quant_min, quant_max, axis)
    assert out.dtype == x.dtype and out.shape == x.shape
    assert torch.equal(out, expected)
    assert torch.equal(out_op, expected)

    grad = torch.randn(x.shape, generator=generator).to(x.dtype)
    out.backward(grad)
    if use_aten:
        expected.backward(grad)
        expected_grad = xa.grad
    else:
        expected_grad = reference_ste_grad(grad, x, scale, zero_point, quant_min, quant_max, axis)
    assert xq.grad.dtype == x.dtype
    assert torch.equal(xq.grad, expected_grad)


# ---------------------------------------------------------------------------------------
# Package surface
# ---------------------------------------------------------------------------------------


def test_version_is_a_string():
    assert isinstance(qat.__version__, str)
    assert qat.__version__.count(".") >= 1 and qat.__version__[0].isdigit()


def test_fake_quantize_has_a_docstring():
    doc = qat.ops.fake_quantize.__doc__
    assert doc and "quant_min" in doc and "estimator" in doc
    assert qat.fake_quantize is qat.ops.fake_quantize


def test_python_scalars_and_tensors_give_the_same_result():
    x = torch.randn(5, 7)
    scalar = qat.ops.fake_quantize(x, 0.05, 3, -128, 127)
    tensor = torch.ops.qat.fake_quantize(
        x, torch.tensor([0.05]), torch.tensor([3], dtype=torch.int32), -128, 127)
    assert torch.equal(scalar, tensor)
    assert torch.equal(scalar, reference_fake_quantize(x, 0.05, 3, -128, 127))


# ---------------------------------------------------------------------------------------
# Forward and STE backward against ATen
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [None, 0, 1, -1])
@pytest.mark.parametrize("quant_range", all_ranges(), ids=lambda r: f"{r[0]}..{r[1]}")
def test_matches_aten_for_every_range(cpu_capability, quant_range, axis):
    quant_min, quant_max = quant_range
    gen = torch.Generator().manual_seed(quant_max * 7 + (axis or 0))
    shape = (6, 9, 13)
    channels = 1 if axis is None else shape[axis]
    scale, zero_point = make_qparams(channels, quant_min, quant_max, gen)
    x = sample_values(shape, scale, zero_point, quant_min, quant_max, axis, gen)
    # The samples reach both clamps and the inside of the range, so all branches are hit.
    ref = reference_fake_quantize(x, scale, zero_point, quant_min, quant_max, axis)
    zp = zero_point.view(broadcast_shape(x, axis)).float()
    s = scale.view(broadcast_shape(x, axis))
    assert (ref == (quant_max - zp) * s).any() and (ref == (quant_min - zp) * s).any()
    check_against_aten(x, scale, zero_point, quant_min, quant_max, axis, gen)


# (shape, axis): scalars, vectors, per-channel along every axis of 2-D to 4-D tensors, a
# single channel, short channel runs (per-element parameters) and long ones, and tensors
# large enough to be split across threads and reduction chunks.
SHAPES_AXES = [
    ((), None),
    ((1,), None),
    ((1,), 0),
    ((17,), None),
    ((17,), 0),
    ((4, 33), None),
    ((4, 33), 0),
    ((4, 33), 1),
    ((4, 33), -1),
    ((4, 33), -2),
    ((4, 1, 5), 1),
    ((2, 3, 5, 7), 0),
    ((2, 3, 5, 7), 1),
    ((2, 3, 5, 7), -2),
    ((2, 3, 5, 7), 3),
    ((3, 130, 70), 1),
    ((40, 700), 1),
    ((40000,), None),
    ((2, 300, 100), 1),
    ((600, 100), -1),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,axis", SHAPES_AXES, ids=str)
def test_matches_aten_for_shapes_axes_dtypes(cpu_capability, shape, axis, dtype):
    quant_min, quant_max = -128, 127
    gen = torch.Generator().manual_seed(len(shape) * 100 + sum(shape) + (axis or 0))
    channels = 1 if axis is None else shape[axis]
    scale, zero_point = make_qparams(channels, -20, 20, gen)
    x = sample_values(shape, scale, zero_point, quant_min, quant_max, axis, gen, dtype)
    check_against_aten(x, scale, zero_point, quant_min, quant_max, axis, gen)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quant_range", [(-32768, 32767), (0, 65535)], ids=str)
@pytest.mark.parametrize("axis", [None, 1])
def test_16_bit_ranges(cpu_capability, quant_range, axis, dtype):
    quant_min, quant_max = quant_range
    gen = torch.Generator().manual_seed(16)
    shape = (5, 8, 9)
    channels = 1 if axis is None else shape[axis]
    scale, zero_point = make_qparams(channels, quant_min, quant_max, gen)
    scale = scale * 1e-3
    x = sample_values(shape, scale, zero_point, quant_min, quant_max, axis, gen, dtype)
    # torch 2.x's per-tensor kernel rounds its float64 results for these ranges to float32
    # (measured on torch 2.11: all 360 values off the exact (q - z) * s in their low bits),
    # where torch 1.13 and qat keep them exact; there the plain-PyTorch reference decides.
    aten_is_exact = not (dtype == torch.float64 and axis is None
                         and int(torch.__version__.split(".")[0]) >= 2)
    check_against_aten(x, scale, zero_point, quant_min, quant_max, axis, gen, aten_is_exact)


def bfloat16_reference(x, scale, zero_point, quant_min, quant_max, axis):
    """The bfloat16 recipe written out: math in float32 with the float32 reciprocal."""
    shape = broadcast_shape(x, axis)
    s = scale.to(torch.float32).view(shape)
    zp = zero_point.to(torch.float32).view(shape)
    inv = 1.0 / s
    q = torch.clamp(torch.round(x.float() * inv) + zp, quant_min, quant_max)
    return ((q - zp) * s).to(x.dtype)


@pytest.mark.parametrize("axis", [None, 0, -1])
def test_bfloat16_matches_float32_recipe(cpu_capability, axis):
    gen = torch.Generator().manual_seed(3)
    shape = (33, 65)
    channels = 1 if axis is None else shape[axis]
    scale, zero_point = make_qparams(channels, -10, 10, gen)
    x = sample_values(shape, scale, zero_point, -128, 127, axis, gen, torch.bfloat16)
    out = qat.ops.fake_quantize(x, scale, zero_point, -128, 127, axis=axis)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, bfloat16_reference(x, scale, zero_point, -128, 127, axis))


def test_float16_and_bfloat16_round_like_float32_then_cast(cpu_capability):
    # Math in float32, result cast: the same as fake-quantizing the widened input.
    gen = torch.Generator().manual_seed(4)
    scale, zero_point = make_qparams(1, -5, 5, gen)
    for dtype in (torch.float16, torch.bfloat16):
        x = sample_values((1000,), scale, zero_point, -128, 127, None, gen, dtype)
        low = qat.ops.fake_quantize(x, scale, zero_point, -128, 127)
        wide = qat.ops.fake_quantize(x.float(), scale, zero_point, -128, 127)
        assert torch.equal(low, wide.to(dtype))


# ---------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------


CHANNELS_LAST = torch.channels_last

# name: (shape of the dense base tensor, view of it under test, axes to test)
LAYOUTS = {
    "transposed": ((33, 12), lambda t: t.t(), [None, 0, 1, -1]),
    "permuted3d": ((4, 6, 70), lambda t: t.permute(2, 0, 1), [None, 0, 1, 2]),
    "sliced": ((8, 40), lambda t: t[1:7:2, ::3], [None, 0, 1]),
    "sliced_last": ((5, 6, 9), lambda t: t[..., 2], [None, 0, 1]),
    "expanded": ((5, 1), lambda t: t.expand(5, 8), [None, 0, 1]),
    "channels_last": ((2, 8, 5, 6), lambda t: t.contiguous(memory_format=CHANNELS_LAST),
                      [None, 0, 1, 3]),
    "channels_last_wide": ((2, 300, 3, 4),
                           lambda t: t.contiguous(memory_format=CHANNELS_LAST), [1]),
}


def make_layout(layout, gen, dtype=torch.float32):
    shape, view, _ = LAYOUTS[layout]
    x = view((torch.randn(shape, generator=gen) * 2.0).to(dtype))
    assert not x.is_contiguous()
    return x


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.float16), ids=str)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_non_contiguous_layouts_match_aten(cpu_capability, layout, dtype):
    gen = torch.Generator().manual_seed(11)
    for axis in LAYOUTS[layout][2]:
        x = make_layout(layout, gen, dtype)
        channels = 1 if axis is None else x.shape[axis]
        scale, zero_point = make_qparams(channels, -8, 8, gen)
        check_against_aten(x, scale, zero_point, -64, 63, axis, gen)


@pytest.mark.parametrize("layout", ["transposed", "permuted3d", "channels_last"])
def test_dense_layouts_are_kept(cpu_capability, layout):
    x = make_layout(layout, torch.Generator().manual_seed(0))
    for axis in LAYOUTS[layout][2]:
        channels = 1 if axis is None else x.shape[axis]
        out = qat.ops.fake_quantize(x, torch.full((channels,), 0.05),
                                    torch.zeros(channels, dtype=torch.int32), -128, 127,
                                    axis=axis)
        assert out.stride() == x.stride()
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)


def test_gradient_in_another_layout(cpu_capability):
    # Autograd may hand over a gradient whose strides differ from the input's.
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 8, 5, 6, generator=gen).contiguous(memory_format=torch.channels_last)
    scale, zero_point = make_qparams(8, -3, 3, gen)
    for grad in (torch.randn(2, 8, 5, 6, generator=gen),
                 torch.randn(6, 5, 8, 2, generator=gen).permute(3, 2, 1, 0),
                 torch.randn(1, 8, 1, 1, generator=gen).expand(2, 8, 5, 6)):
        xq = x.clone().requires_grad_()
        qat.ops.fake_quantize(xq, scale, zero_point, -16, 15, axis=1).backward(grad)
        xa = x.clone().requires_grad_()
        aten_fake_quantize(xa, scale, zero_point, -16, 15, axis=1).backward(grad)
        assert torch.equal(xq.grad, xa.grad)


@pytest.mark.parametrize("estimator", ["ste", "lsq", "lsq_plus", "pact", "ewgs"])
@pytest.mark.parametrize("shape,axis", [((0,), None), ((0, 5), None), ((0, 5), 1),
                                        ((3, 0), 0), ((2, 0, 4), 1), ((2, 0, 4), -1)],
                         ids=str)
def test_empty_tensors(cpu_capability, shape, axis, estimator):
    channels = 1 if axis is None else shape[axis]
    learns_scale = estimator in ("lsq", "lsq_plus", "pact")
    scale = torch.full((channels,), 0.1, requires_grad=learns_scale)
    zero_point = torch.zeros(channels)
    zero_point.requires_grad_(estimator == "lsq_plus")
    x = torch.empty(shape, requires_grad=True)
    out = qat.ops.fake_quantize(x, scale, zero_point, -8, 7, axis=axis, estimator=estimator)
    assert out.shape == shape and out.dtype == torch.float32
    if channels > 0:
        expected = aten_fake_quantize(x.detach(), scale.detach(), zero_point, -8, 7, axis)
        assert expected.shape == out.shape
    out.sum().backward()
    assert x.grad.shape == shape
    if learns_scale:
        # Nothing to learn from: the scale gradient exists and is zero.
        assert torch.equal(scale.grad, torch.zeros(channels))
    else:
        assert scale.grad is None


# ---------------------------------------------------------------------------------------
# Special values
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("per_channel", ["per_tensor", "long_runs", "short_runs"])
def test_nan_propagates_and_infinities_saturate(cpu_capability, dtype, per_channel):
    quant_min, quant_max = -8, 7
    scale = torch.tensor([0.25, 0.5, 0.125])
    zero_point = torch.tensor([2, -3, 0], dtype=torch.int32)
    special = torch.tensor([math.nan, math.inf, -math.inf, 0.3, math.nan, math.inf, -math.inf])
    # Rows long enough that the vector loops, not only their tails, see the values.
    x = torch.cat([special.repeat(5), torch.linspace(-3, 3, 29)]).repeat(3, 1).to(dtype)
    axis = 0
    if per_channel == "per_tensor":
        scale, zero_point, axis = scale[:1], zero_point[:1], None
    elif per_channel == "short_runs":
        x, axis = x.t().contiguous(), 1
    out = qat.ops.fake_quantize(x, scale, zero_point, quant_min, quant_max, axis=axis)
    s = scale.view(broadcast_shape(x, axis)).expand_as(x).to(torch.float32)
    zp = zero_point.view(broadcast_shape(x, axis)).expand_as(x).to(torch.float32)
    assert torch.equal(torch.isnan(out), torch.isnan(x))
    pos, neg = x == math.inf, x == -math.inf
    assert torch.equal(out[pos], ((quant_max - zp) * s).to(dtype)[pos])
    assert torch.equal(out[neg], ((quant_min - zp) * s).to(dtype)[neg])
    finite = torch.isfinite(x)
    expected = reference_fake_quantize(x, scale, zero_point, quant_min, quant_max, axis)
    assert torch.equal(out[finite], expected[finite])


def test_values_far_outside_the_range_saturate(cpu_capability):
    x = torch.tensor([1e30, -1e30, 3e38, -3e38, 1e6, -1e6] * 4)
    out = qat.ops.fake_quantize(x, 1e-3, 10, -128, 127)
    scale32 = torch.tensor(1e-3, dtype=torch.float32)
    expected = torch.where(x > 0, 117 * scale32, -138 * scale32)
    assert torch.equal(out, expected)


def test_float_zero_point_is_rounded_half_to_even(cpu_capability):
    x = torch.linspace(-5, 5, 101)
    for zp, rounded in ((2.5, 2), (3.5, 4), (-1.5, -2), (0.49, 0)):
        out = qat.ops.fake_quantize(x, 0.1, torch.tensor(zp), -16, 15)
        assert torch.equal(out, reference_fake_quantize(x, 0.1, rounded, -16, 15))


def test_python_float_zero_point_is_rounded_half_to_even():
    x = torch.tensor([-20.0, 20.0])
    for zp in (2.7, -1.7, 3.5):
        assert torch.equal(qat.ops.fake_quantize(x, 1.0, zp, -8, 7),
                           reference_fake_quantize(x, 1.0, zp, -8, 7)), zp


def test_capability_names_are_checked():
    with pytest.raises(ValueError, match="capability"):
        qat._C._set_cpu_capability("sse9")
    assert qat._C._cpu_capability() in ("default", "avx2")


# ---------------------------------------------------------------------------------------
# Argument checking
# ---------------------------------------------------------------------------------------


def fq(x=None, scale=0.1, zero_point=0, quant_min=-128, quant_max=127, **kwargs):
    x = torch.randn(4, 3) if x is None else x
    return qat.ops.fake_quantize(x, scale, zero_point, quant_min, quant_max, **kwargs)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(scale=0.0), r"scale must be positive"),
        (dict(scale=-0.1), r"scale must be positive"),
        (dict(scale=math.nan), r"scale must be positive and finite"),
        (dict(scale=math.inf), r"scale must be positive and finite"),
        (dict(scale=torch.tensor([1e-45], dtype=torch.float64)), r"scale"),
        (dict(scale=torch.tensor([0.1, 0.0, 0.1]), zero_point=torch.zeros(3), axis=1),
         r"scale\[1\]"),
        (dict(scale=torch.tensor([1, 2])), r"scale"),
        (dict(zero_point=128), r"zero_point\[0\] = 128 is outside \[quant_min, quant_max\]"),
        (dict(zero_point=-129), r"zero_point.*outside"),
        (dict(zero_point=torch.tensor(math.nan)), r"zero_point must be finite"),
        (dict(zero_point=torch.tensor(True)), r"zero_point"),
        (dict(quant_min=5, quant_max=5, zero_point=5),
         r"quant_min \(5\) must be less than quant_max"),
        (dict(quant_min=10, quant_max=0), r"quant_min"),
        (dict(quant_min=0, quant_max=65536), r"wider than 16 bits"),
        (dict(quant_min=-32769, quant_max=32767), r"wider than 16 bits"),
        (dict(quant_min=-100000, quant_max=-90000, zero_point=-95000), r"quant_min"),
        (dict(x=torch.randint(0, 5, (4, 3))), r"input must be a floating-point tensor"),
        (dict(x=torch.ones(4, 3, dtype=torch.bool)), r"input must be a floating-point tensor"),
        (dict(x=torch.ones(4, 3, dtype=torch.complex64)), r"input must be a floating-point"),
        (dict(scale=torch.full((2,), 0.1), zero_point=torch.zeros(3), axis=1),
         r"scale must be 1-D with one entry per channel of axis 1 \(3\)"),
        (dict(scale=torch.full((3,), 0.1), zero_point=torch.zeros(4), axis=1),
         r"zero_point must be 1-D with one entry per channel"),
        (dict(scale=torch.full((3, 1), 0.1), zero_point=torch.zeros(3), axis=1),
         r"scale must be 1-D"),
        (dict(scale=torch.full((3,), 0.1), zero_point=torch.zeros(3)),
         r"per-tensor quantization \(axis=None\) needs one scale"),
        (dict(zero_point=torch.zeros(2)), r"needs one zero_point"),
        (dict(axis=2), r"axis 2 is out of range"),
        (dict(axis=-3), r"axis -3 is out of range"),
        (dict(x=torch.tensor(1.0), axis=0), r"at least one dimension"),
        (dict(grad_scale=-1.0), r"grad_scale must be finite and non-negative"),
        (dict(grad_scale=math.nan), r"grad_scale"),
        (dict(ewgs_delta=-0.1, estimator="ewgs"), r"ewgs_delta"),
        (dict(scale=torch.tensor([1], dtype=torch.int32)), r"scale must be a floating-point"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises(RuntimeError, match=match):
        fq(**kwargs)


@pytest.mark.parametrize("estimator", ["ste", "lsq", "pact"])
def test_bad_arguments_are_caught_when_tracking_gradients(estimator):
    x = torch.randn(4, 3, requires_grad=True)
    scale = torch.tensor([0.0], requires_grad=True)
    with pytest.raises(RuntimeError, match=r"scale must be positive"):
        qat.ops.fake_quantize(x, scale, 0, -8, 7, estimator=estimator)
    with pytest.raises(RuntimeError, match=r"zero_point"):
        qat.ops.fake_quantize(x, 0.1, 9, -8, 7, estimator=estimator)


def test_bad_arguments_through_torch_ops():
    x = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match=r"axis 5 is out of range"):
        torch.ops.qat.fake_quantize(x, torch.ones(3), torch.zeros(3), -8, 7, 5)
    with pytest.raises(RuntimeError, match=r"scale must be positive"):
        torch.ops.qat.fake_quantize(x, torch.tensor([-1.0]), torch.zeros(1), -8, 7)


@pytest.mark.parametrize("estimator", ["ste", "lsq", "lsq_plus", "pact", "ewgs"])
def test_double_backward_is_refused(estimator):
    x = torch.randn(10, requires_grad=True)
    scale = torch.tensor([0.1], requires_grad=estimator in ("lsq", "lsq_plus", "pact"))
    zero_point = torch.tensor([0.0], requires_grad=estimator == "lsq_plus")
    out = qat.ops.fake_quantize(x, scale, zero_point, -8, 7, estimator=estimator)
    with pytest.raises(RuntimeError, match=r"double backward"):
        torch.autograd.grad((out * out).sum(), x, create_graph=True)


@pytest.mark.parametrize("numel", [37, 4096, 3 * 4096 + 5])
def test_gradient_of_an_input_in_range_is_the_output_gradient(numel):
    # Nothing clamped: the backward hands the output gradient on as it is (no pass, no new
    # tensor), which must equal ATen's g * mask bit for bit, NaN and -0.0 included.
    x = (torch.rand(numel) * 5).requires_grad_()  # in [0, 5): inside [0, 255] * 0.05 - 0.15
    g = torch.randn(numel)
    g[0], g[-1] = math.nan, -0.0
    qat.fake_quantize(x, 0.05, 3, 0, 255).backward(g)
    x_ref = x.detach().clone().requires_grad_()
    torch.fake_quantize_per_tensor_affine(x_ref, 0.05, 3, 0, 255).backward(g)
    assert torch.equal(torch.isnan(x.grad), torch.isnan(x_ref.grad))
    assert torch.equal(x.grad.nan_to_num(7.0), x_ref.grad.nan_to_num(7.0))
    assert math.copysign(1.0, float(x.grad[-1])) == -1.0
    # One value past the top, at the start, the middle or the end: its gradient is zero
    # and the rest still pass.
    for position in (0, numel // 2, numel - 1):
        x2 = x.detach().clone()
        x2[position] = 100.0
        x2.requires_grad_()
        qat.fake_quantize(x2, 0.05, 3, 0, 255).backward(torch.ones(numel))
        expected = torch.ones(numel)
        expected[position] = 0.0
        assert torch.equal(x2.grad, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("clamped", [1, 5, 40, 400, 3000])
def test_gradient_with_few_or_many_clamped_values(cpu_capability, dtype, clamped):
    # Few clamped values keep their positions for the backward, many their codes
    # (one per 64 elements is the line, but a small tensor keeps up to 1024 positions: 400
    # of these 2880 elements still do): either way the gradient is g where the value is
    # inside the range and g * 0 where it was clamped or NaN, so a NaN gradient stays NaN
    # there. A NaN input among in-range neighbours is clamped too (the vector loops skip
    # the code arithmetic of a group with nothing clamped). Per channel along axis 1 of a
    # channels-last input, its gradient contiguous: the positions are memory offsets of the
    # forward's layout.
    generator = torch.Generator().manual_seed(clamped)
    x = torch.rand(4, 6, 10, 12, generator=generator) * 5  # inside [0, 255] * 0.05 - 0.15
    flat = x.view(-1)
    where = torch.randperm(flat.numel(), generator=generator)[:clamped]
    flat[where[: clamped // 2]] = 100.0
    flat[where[clamped // 2:]] = -100.0
    untouched = torch.ones(flat.numel(), dtype=torch.bool)
    untouched[where] = False
    if clamped < flat.numel():
        flat[untouched.nonzero()[::97]] = math.nan
    x = x.to(dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
    g = torch.randn(4, 6, 10, 12, generator=generator).to(dtype)
    g.view(-1)[where[0]] = math.nan
    scale = torch.full((6,), 0.05)
    zero_point = torch.full((6,), 3, dtype=torch.int32)
    y = qat.fake_quantize(x, scale, zero_point, 0, 255, axis=1)
    assert (y.grad_fn.name() == "qat::FakeQuantizeBackward") == (clamped <= 400)
    y.backward(g)
    inside = (x.detach().float() > -1.0) & (x.detach().float() < 20.0)
    expected = torch.where(inside, g, g * 0)
    assert x.grad.dtype == dtype
    assert torch.equal(torch.isnan(x.grad), torch.isnan(expected))
    assert torch.equal(x.grad.nan_to_num(7.0), expected.nan_to_num(7.0))


def _weight_with_clamped(rows, cols, seed):
    # Values inside [0, 255] * 0.05 - 0.15 but for 14 clamped at either end (few enough for
    # the backward to keep their positions); returns the weight (a leaf) and where its
    # straight-through gradient passes.
    generator = torch.Generator().manual_seed(seed)
    w = torch.rand(rows, cols, generator=generator) * 5
    w.view(-1)[torch.randperm(rows * cols, generator=generator)[:7]] = 100.0
    w.view(-1)[torch.randperm(rows * cols, generator=generator)[:7]] = -100.0
    return w.requires_grad_(), (w > -1.0) & (w < 20.0)


def test_gradient_written_into_only_when_nothing_else_holds_it():
    # The backward writes the clamped positions into the incoming gradient when nothing
    # else holds it (a linear's weight gradient arrives as a view of a fresh product, a
    # concatenation's part as a view of the whole); a gradient that another branch or a
    # hook still sees keeps its values, and a retained graph runs again.
    fq = lambda t: qat.fake_quantize(t, 0.05, 3, 0, 255)  # noqa: E731
    x = torch.randn(5, 96)
    g = torch.randn(5, 64)
    w, inside = _weight_with_clamped(64, 96, 0)
    torch.nn.functional.linear(x, fq(w)).backward(g)
    plain = fq(w).detach().requires_grad_()  # PyTorch's own weight gradient
    torch.nn.functional.linear(x, plain).backward(g)
    assert torch.equal(w.grad, torch.where(inside, plain.grad, torch.zeros(())))

    w, inside = _weight_with_clamped(64, 96, 1)
    other = torch.zeros(64, 96, requires_grad=True)
    upstream = torch.randn(64, 96)
    doubled = other * 2.0  # made first, so that its backward runs after the fake-quantize's
    ((fq(w) + doubled) * upstream).sum().backward()  # the add hands both sides one tensor
    assert torch.equal(other.grad, upstream * 2.0)
    assert torch.equal(w.grad, torch.where(inside, upstream, torch.zeros(())))

    w, inside = _weight_with_clamped(64, 96, 2)
    rest = torch.zeros(3, 96, requires_grad=True)
    upstream = torch.randn(67, 96)
    (torch.cat([fq(w), rest]) * upstream).sum().backward()  # views of one gradient
    assert torch.equal(rest.grad, upstream[64:])
    assert torch.equal(w.grad, torch.where(inside, upstream[:64], torch.zeros(())))

    w, inside = _weight_with_clamped(64, 96, 3)
    upstream = torch.randn(64, 96)
    seen = []
    y = fq(w)
    y.register_hook(seen.append)
    (y * 2.0).backward(upstream, retain_graph=True)
    assert torch.equal(seen[0], upstream * 2.0)
    (y * 2.0).backward(upstream)  # the retained graph runs again, the same gradient added
    assert torch.equal(seen[1], upstream * 2.0)
    assert torch.equal(w.grad, torch.where(inside, upstream * 4.0, torch.zeros(())))
    with pytest.raises(RuntimeError, match="backward"):
        (y * 2.0).backward(upstream)


def _clamp_then_fake_quantize(x, grad, lo, hi, scale, zero_point, quant_min, quant_max):
    """The value and gradient of hardtanh followed by a fake-quantize, from ATen's two
    operators: NaN stays NaN (qat's rule, where ATen's integer cast is undefined) and counts
    as clamped; the gradient is exactly 0 where hardtanh's backward selects 0
    (x <= lo or x >= hi) and the output gradient times the fake-quantize's mask elsewhere."""
    clamped = torch.nn.functional.hardtanh(x, lo, hi).requires_grad_()
    value = torch.fake_quantize_per_tensor_affine(clamped, scale, zero_point, quant_min,
                                                  quant_max)
    value.backward(torch.ones_like(value))
    nan = torch.isnan(x)
    mask = torch.where(nan, torch.zeros_like(x), clamped.grad)
    outside = (x <= lo) | (x >= hi)
    expected_grad = torch.where(outside, torch.zeros_like(x), grad * mask)
    return torch.where(nan, x, value.detach()), expected_grad


@pytest.mark.parametrize("numel", [1, 7, 8, 65, 3000, 70001])
@pytest.mark.parametrize("clamp", [
    (0.0, 6.0, 6 / 255, 0, 0, 255),       # ReLU6 and its fixed qparams
    (-1.0, 1.0, 0.004, 128, 0, 255),      # the grid narrower: levels clamp inside (lo, hi)
    (-2.0, 3.0, 0.05, -3, -128, 127),     # signed, the grid wider than the clamp
])
@pytest.mark.parametrize("spread", [4.0, 0.3])  # much outside (lo, hi), or little
def test_clamped_fake_quantize_equals_the_clamp_then_fake_quantize(cpu_capability, numel, clamp,
                                                                   spread):
    """One pass of fake_quantize_clamped: the values and the gradient of hardtanh followed by
    the fake-quantize, to the bit, with boundary values, NaN, infinities and NaN gradients;
    and the values alone where no backward will run (no codes written)."""
    lo, hi, scale, zero_point, quant_min, quant_max = clamp
    generator = torch.Generator().manual_seed(numel)
    x = torch.randn(numel, generator=generator) * spread + (lo + hi) / 2
    specials = torch.tensor([lo, hi, -0.0, 0.0, float("nan"), float("inf"), -float("inf"),
                             math.nextafter(lo, 0.0), math.nextafter(hi, 0.0)])
    x[:min(numel, len(specials))] = specials[:numel]
    grad = torch.randn(numel, generator=generator)
    grad[::5] = float("nan")
    fused_input = x.clone().requires_grad_()
    out = torch.ops.qat.fake_quantize_clamped(
        fused_input, torch.tensor([scale]), torch.tensor([zero_point], dtype=torch.int32),
        quant_min, quant_max, lo, hi)
    expected, expected_grad = _clamp_then_fake_quantize(x, grad, lo, hi, scale, zero_point,
                                                        quant_min, quant_max)
    torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)
    out.backward(grad)
    torch.testing.assert_close(fused_input.grad, expected_grad, rtol=0, atol=0, equal_nan=True)
    for no_backward in (x, fused_input.detach().requires_grad_()):
        with torch.set_grad_enabled(no_backward is x):
            plain = torch.ops.qat.fake_quantize_clamped(
                no_backward, torch.tensor([scale]), torch.tensor([zero_point], dtype=torch.int32),
                quant_min, quant_max, lo, hi)
        assert plain.grad_fn is None
        torch.testing.assert_close(plain, expected, rtol=0, atol=0, equal_nan=True)


def test_clamped_fake_quantize_of_other_dtypes_is_the_two_operators():
    """Outside the fused float32 loop the operator runs hardtanh and the fake-quantize (float64
    here: torch 1.13 has no CPU hardtanh gradient for the 16-bit types)."""
    dtype = torch.float64
    x = (torch.randn(300) * 4).to(dtype).requires_grad_()
    scale, zero_point = torch.tensor([6 / 255]), torch.tensor([0], dtype=torch.int32)
    out = torch.ops.qat.fake_quantize_clamped(x, scale, zero_point, 0, 255, 0.0, 6.0)
    assert out.dtype == dtype
    reference = x.detach().clone().requires_grad_()
    expected = qat.fake_quantize(torch.nn.functional.hardtanh(reference, 0.0, 6.0), scale,
                                 zero_point, 0, 255)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    out.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(x.grad, reference.grad, rtol=0, atol=0)
    inside = (reference.detach() > 0) & (reference.detach() < 6)
    assert torch.equal(x.grad != 0, inside)


def _relu_quantizer_state():
    """A per-tensor quantizer's state before its first batch: running min / max, scale,
    zero point."""
    return [torch.tensor([math.inf]), torch.tensor([-math.inf]), torch.ones(1),
            torch.zeros(1, dtype=torch.int32)]


@pytest.mark.parametrize("numel", [1, 9, 4099, 70001])
@pytest.mark.parametrize("averaging_constant", [None, 0.25])
def test_observe_fake_quantize_relu_is_the_relu_then_the_quantizer(cpu_capability, numel,
                                                                   averaging_constant):
    """Three batches through observe_fake_quantize_relu, the last all but one negative:
    the running range is that of relu(x) (plain min / max, or its moving average), the
    qparams PyTorch's observer math on it, the output relu(x) fake-quantized with them and
    the gradient relu's (0 where x <= 0) times the straight-through mask, each to the bit
    against references computed here from the definitions."""
    generator = torch.Generator().manual_seed(numel)
    state = _relu_quantizer_state()
    running = None
    for shift in (-0.5, 0.4, -50.0):
        x = torch.randn(numel, generator=generator) + shift
        x[0] = 0.0
        if shift == -50.0:
            x[-1] = 1.0
        grad = torch.randn(numel, generator=generator)
        leaf = x.clone().requires_grad_()
        out = torch.ops.qat.observe_fake_quantize_relu(
            leaf, *state, 0, 255, averaging_constant, False, True, True, None, True)
        out.backward(grad)
        relu = torch.where(x > 0, x, torch.zeros_like(x))
        batch = (np.float32(relu.min()), np.float32(relu.max()))
        if running is None or averaging_constant is None:
            running = batch if running is None else (min(running[0], batch[0]),
                                                     max(running[1], batch[1]))
        else:
            c = np.float32(averaging_constant)
            running = tuple(r + c * (b - r) for r, b in zip(running, batch))
        np.testing.assert_allclose(state[0].item(), running[0], rtol=1e-6, atol=0)
        np.testing.assert_allclose(state[1].item(), running[1], rtol=1e-6, atol=0)
        scale, zero_point = reference_qparams(state[0].numpy(), state[1].numpy(), 0, 255, False)
        assert state[2].item() == scale[0] and state[3].item() == zero_point[0]
        expected = reference_fake_quantize(relu, state[2], state[3], 0, 255)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        expected_grad = torch.where(
            x > 0, reference_ste_grad(grad, relu, state[2], state[3], 0, 255),
            torch.zeros_like(grad))
        torch.testing.assert_close(leaf.grad, expected_grad, rtol=0, atol=0)


def test_observe_fake_quantize_relu_takes_the_two_operators_where_the_shortcut_differs():
    """Where raising x's range to 0 would not be relu(x)'s (a -inf is a finite 0 after the
    ReLU; an empty batch), for float64, and with the observer or the quantizer off, the
    operator gives what the ReLU followed by the fused observe + fake-quantize gives: the
    same state, output and gradient, and the same refusal of a range never observed."""
    def both(x, observe=True, quantize=True, require_range=True, dtype=torch.float32):
        results = []
        for fused in (True, False):
            state = _relu_quantizer_state()
            leaf = x.to(dtype).clone().requires_grad_()
            if fused:
                out = torch.ops.qat.observe_fake_quantize_relu(
                    leaf, *state, 0, 255, None, False, observe, quantize, None, require_range)
            else:
                out = torch.ops.qat.fused_observe_fake_quantize(
                    torch.relu(leaf), *state, 0, 255, None, None, False, observe, quantize,
                    "ste", None, False, require_range)
            out.sum().backward()
            results.append((out, leaf.grad, state))
        (out, grad, state), (ref_out, ref_grad, ref_state) = results
        torch.testing.assert_close(out, ref_out, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(grad, ref_grad, rtol=0, atol=0)
        for a, b in zip(state, ref_state):
            assert torch.equal(a, b)
        return state

    x = torch.tensor([-math.inf, -1.0, 0.5, 2.0])
    state = both(x)
    assert state[0].item() == 0.0 and state[1].item() == 2.0
    both(torch.randn(50) - 3.0)  # relu(x): all zeros, the range [0, 0]
    both(torch.randn(0))
    both(torch.randn(300) * 3, dtype=torch.float64)
    both(torch.randn(300), quantize=False)
    both(torch.randn(300), observe=False, require_range=False)
    with pytest.raises(RuntimeError, match="qat::observe_fake_quantize_relu: the scale is not "
                                           "known yet"):
        torch.ops.qat.observe_fake_quantize_relu(torch.randn(4), *_relu_quantizer_state(), 0,
                                                 255, None, False, False, True, None, True)


def test_clamped_fake_quantize_checks_its_arguments():
    scale, zero_point = torch.tensor([0.1]), torch.tensor([0], dtype=torch.int32)
    x = torch.randn(4)
    with pytest.raises(ValueError, match=r"lo and hi must be finite with lo < hi, got \(6, 0\)"):
        torch.ops.qat.fake_quantize_clamped(x, scale, zero_point, 0, 255, 6.0, 0.0)
    with pytest.raises(ValueError, match="lo and hi must be finite"):
        torch.ops.qat.fake_quantize_clamped(x, scale, zero_point, 0, 255, 0.0, float("inf"))
    with pytest.raises(RuntimeError, match="quant_min"):
        torch.ops.qat.fake_quantize_clamped(x, scale, zero_point, 255, 0, 0.0, 6.0)
    with pytest.raises(RuntimeError, match="scale"):
        torch.ops.qat.fake_quantize_clamped(x, torch.tensor([0.1, 0.2]), zero_point, 0, 255,
                                            0.0, 6.0)
