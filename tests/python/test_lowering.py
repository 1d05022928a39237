"""The lowering operators (csrc/export/lowering.cpp), which the Python and C++ front ends both
call, against references written here from their definitions and from PyTorch's own
quantization functions."""

import numpy as np
import pytest
import torch

from qat import quantized

ops = torch.ops.qat


def test_batch_norm_factor_and_folded_bias_follow_batch_norm_in_eval():
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(6, eps=1e-3).eval()
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.2, 3)
    torch.nn.init.uniform_(bn.weight, 0.5, 1.5)
    torch.nn.init.uniform_(bn.bias, -0.5, 0.5)
    conv_bias = torch.randn(6)
    factor = ops.batch_norm_factor(bn.weight, bn.running_var, bn.eps)
    folded = ops.fold_bias(conv_bias, bn.bias, bn.running_mean, factor)
    # Folding is exact algebra: bn(y + b) == factor * y + folded for any y.
    y = torch.randn(4, 6, 3, 3)
    with torch.no_grad():
        expected = bn(y + conv_bias.view(1, -1, 1, 1))
        got = factor.view(1, -1, 1, 1) * y + folded.view(1, -1, 1, 1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # No affine parameters (weight 1, bias 0) and no conv bias.
    torch.testing.assert_close(ops.batch_norm_factor(None, bn.running_var, bn.eps),
                               1 / torch.sqrt(bn.running_var + bn.eps))
    torch.testing.assert_close(ops.fold_bias(None, None, bn.running_mean, factor),
                               -factor * bn.running_mean)


@pytest.mark.parametrize("eps", [1e-5, 1e-3, 0.1, 1e-12])
def test_batch_norm_factor_rounds_the_formula_in_float32_on_every_pytorch(eps):
    """gamma / sqrt(var + eps) for a float32 running variance: the sum rounded to float32,
    the square root and the quotient correctly rounded (IEEE 754, numpy's float32
    arithmetic here), whatever the installed PyTorch's sqrt kernel rounds to; contiguous
    or not."""
    torch.manual_seed(0)
    var = torch.cat([torch.rand(500) * 10, torch.rand(500) * 1e-6, torch.zeros(3)])
    gamma = torch.randn(var.numel())
    v32 = var.numpy() + np.float32(eps)
    assert v32.dtype == np.float32
    expected = torch.from_numpy(gamma.numpy() / np.sqrt(v32))
    expected_without_gamma = torch.from_numpy(np.float32(1) / np.sqrt(v32))
    for v in (var, torch.stack([var, var], 1)[:, 0]):
        assert torch.equal(ops.batch_norm_factor(gamma, v, eps), expected)
        assert torch.equal(ops.batch_norm_factor(None, v, eps), expected_without_gamma)
    # Other types are the tensor formula's.
    v64 = var.double()
    torch.testing.assert_close(ops.batch_norm_factor(gamma.double(), v64, eps),
                               gamma.double() / torch.sqrt(v64 + eps), rtol=0, atol=0)


def test_batch_norm_factor_and_folded_bias_carry_gradients():
    gamma = torch.rand(3, requires_grad=True)
    var = torch.rand(3) + 0.5
    factor = ops.batch_norm_factor(gamma, var, 1e-5)
    beta = torch.zeros(3, requires_grad=True)
    mean = torch.rand(3)
    ops.fold_bias(None, beta, mean, factor).sum().backward()
    torch.testing.assert_close(beta.grad, torch.ones(3))
    # d/dgamma of beta - factor * mean, factor = gamma / sqrt(var + eps)
    torch.testing.assert_close(gamma.grad, -mean / torch.sqrt(var + 1e-5))


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("eps", [1e-5, 1e-3, 0.1])
def test_a_batch_norm_stored_as_its_affine_map_writes_the_kernels_integers(dims, affine, eps):
    """qat.quantized.BatchNorm keeps weight / sqrt(var + eps) and bias - mean * that, and
    runs the kernel with mean 0, variance 1, eps 0: the integers must be those PyTorch's
    kernel writes from the batch norm's own four tensors, to the bit."""
    torch.manual_seed(dims * 10 + int(affine))
    channels = 300
    weight = torch.randn(channels) * 2 if affine else None
    bias = torch.randn(channels) if affine else None
    mean = torch.randn(channels) * 3
    var = torch.rand(channels) * 5 + 1e-3
    shape = {1: (8, channels, 7), 2: (4, channels, 5, 6), 3: (2, channels, 3, 4, 5)}[dims]
    x = torch.quantize_per_tensor(torch.randn(shape) * 4, 0.05, 128, torch.quint8)
    kernel = getattr(torch.ops.quantized, f"batch_norm{dims}d")
    expected = kernel(x, torch.ones(channels) if weight is None else weight,
                      torch.zeros(channels) if bias is None else bias, mean, var, eps, 0.07, 120)
    layer = quantized.BatchNorm(dims, weight, bias, mean, var, eps, 0.07, 120)
    assert sorted(name for name, _ in layer.named_buffers()) == ["bias", "weight"]
    assert torch.equal(layer(x).int_repr(), expected.int_repr())
    assert torch.equal(torch.jit.script(layer)(x).int_repr(), expected.int_repr())
    # The map itself, against float64 (the kernel rounds it in float32).
    gamma = torch.ones(channels) if weight is None else weight
    beta = torch.zeros(channels) if bias is None else bias
    inv_sigma = 1 / torch.sqrt(var.double() + eps)
    folded_weight, folded_bias = ops.batch_norm_affine(weight, bias, mean, var, eps)
    torch.testing.assert_close(folded_weight.double(), gamma.double() * inv_sigma,
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(folded_bias.double(),
                               beta.double() - mean.double() * inv_sigma * gamma.double(),
                               rtol=1e-5, atol=1e-5)


def test_batch_norm_affine_refuses_tensors_of_other_lengths():
    with pytest.raises(ValueError, match=r"running_mean must be 1-D with one value per "
                                         r"channel \(3 as running_var\), got shape \[4\]"):
        ops.batch_norm_affine(None, None, torch.zeros(4), torch.ones(3), 1e-5)
    with pytest.raises(ValueError, match=r"running_var must be 1-D"):
        ops.batch_norm_affine(None, None, torch.zeros(3), torch.ones(1, 3), 1e-5)


def test_round_bias_is_the_int32_grid_of_the_kernels_with_a_straight_through_gradient():
    bias = torch.randn(5, requires_grad=True)
    input_scale = torch.tensor([0.02])
    weight_scale = torch.tensor([0.01, 0.02, 0.005, 0.03, 0.001])
    step = input_scale * weight_scale
    rounded = ops.round_bias(bias, input_scale, weight_scale)
    torch.testing.assert_close(rounded, torch.round(bias.detach() / step) * step, rtol=0, atol=0)
    rounded.sum().backward()
    torch.testing.assert_close(bias.grad, torch.ones(5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels", [1, 1000])
def test_round_bias_adds_the_formulas_offset_to_the_bit(dtype, channels):
    """The float32 loop of the training step and the tensor formula (other dtypes) add
    bias + (round(bias / step) * step - bias), step = input scale x weight scale."""
    generator = torch.Generator().manual_seed(7)
    bias = torch.randn(1000, generator=generator, dtype=dtype) * 3
    input_scale = torch.tensor([0.0173])
    weight_scale = torch.rand(channels, generator=generator) * 0.01 + 1e-4
    step = (input_scale * weight_scale).to(dtype)
    expected = bias + (torch.round(bias / step) * step - bias)
    assert torch.equal(ops.round_bias(bias, input_scale, weight_scale), expected)


def _qnnpack_layer_output(kind, x, weight, bias, input_scale, weight_scale, output_scale,
                          output_zero_point, groups=1):
    """The integers PyTorch's qnnpack conv2d / linear kernel writes, the reference."""
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = "qnnpack"
    try:
        q_x = torch.quantize_per_tensor(x, input_scale, 128, torch.quint8)
        q_w = torch.quantize_per_channel(weight, weight_scale.double(),
                                         torch.zeros(weight.shape[0], dtype=torch.long), 0,
                                         torch.qint8)
        if kind == "linear":
            packed = torch.ops.quantized.linear_prepack(q_w, bias)
            out = torch.ops.quantized.linear(q_x, packed, output_scale, output_zero_point)
        else:
            packed = torch.ops.quantized.conv2d_prepack(q_w, bias, [1, 1], [1, 1], [1, 1], groups)
            out = torch.ops.quantized.conv2d(q_x, packed, output_scale, output_zero_point)
        return q_x, q_w, out.int_repr().float()
    finally:
        torch.backends.quantized.engine = previous


@pytest.mark.parametrize("kind, groups", [("conv", 1), ("conv", 16), ("linear", 1)])
def test_requantize_of_the_integer_operands_writes_the_qnnpack_kernels_integers(kind, groups):
    """The accumulator of integer_operands, requantized, is what qnnpack's kernel writes,
    to the integer, ties and all: random layers (one output in about 10^5 lands within
    float32 error of a tie, where another order of operations rounds the other way) and a
    dyadic one, whose products are exact and land on ties by the hundred."""
    generator = torch.Generator().manual_seed(3)
    for dyadic in (False, True):
        if kind == "linear":
            x = torch.rand(512, 96, generator=generator) * 4 - 2
            weight = torch.randn(200, 96, generator=generator) * 0.1
        else:
            x = torch.rand(32, 16, 24, 24, generator=generator) * 4 - 2
            weight = torch.randn(32, 16 // groups, 3, 3, generator=generator) * 0.1
        channels = weight.shape[0]
        if dyadic:
            input_scale, output_scale = 2.0 ** -6, 2.0 ** -7
            weight_scale = torch.full((channels,), 2.0 ** -9)
        else:
            input_scale, output_scale = 0.0157, 0.0731
            weight_scale = torch.rand(channels, generator=generator) * 2e-3 + 5e-4
        bias = torch.randn(channels, generator=generator) * 0.5
        q_x, q_w, expected = _qnnpack_layer_output(kind, x, weight, bias, input_scale,
                                                   weight_scale, output_scale, 128, groups)
        x_int, w_int = ops.integer_operands(q_x.dequantize(), torch.tensor([input_scale]),
                                            q_w.dequantize(), weight_scale, 0)
        assert torch.equal(x_int, q_x.int_repr().float() - 128)
        assert torch.equal(w_int, q_w.int_repr().float())
        acc = (torch.nn.functional.linear(x_int, w_int) if kind == "linear" else
               torch.nn.functional.conv2d(x_int, w_int, None, 1, 1, 1, groups))
        axis = -1 if kind == "linear" else 1
        out = ops.requantize(acc, bias, torch.tensor([input_scale]), weight_scale,
                             torch.tensor([output_scale]), axis)
        levels = torch.clamp(torch.round(out / output_scale) + 128, 0, 255)
        assert torch.equal(levels, expected), int((levels != expected).sum())
        if dyadic:
            # Ties were tested: many exact halves before rounding.
            shape = [1] * acc.dim()
            shape[axis] = -1
            exact = (acc + torch.round(bias / (input_scale * weight_scale)).reshape(shape)) \
                * (input_scale * weight_scale / output_scale).reshape(shape)
            assert int((exact - exact.floor() == 0.5).sum()) > 300


@pytest.mark.parametrize("axis", [0, 1])
def test_integer_operands_are_the_rounded_quotients_in_every_layout(axis):
    """The one-pass loops (contiguous CPU tensors) and the tensor formula (any other
    layout) both give round(x / input_scale) and round(w * factor / weight_scale), per
    channel along ``axis``, to the bit."""
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(4, 6, 5, 5, generator=generator) * 3
    weight = torch.randn(6, 8, 3, 3, generator=generator)
    channels = weight.shape[axis]
    scale = torch.rand(channels, generator=generator) * 0.01 + 1e-3
    factor = torch.rand(channels, generator=generator) + 0.5
    shape = [1] * 4
    shape[axis] = -1
    input_scale = torch.tensor([0.0123])
    expected_x = torch.round(x / input_scale)
    expected_w = torch.round(weight * factor.reshape(shape) / scale.reshape(shape))
    for layout in (lambda t: t, lambda t: t.transpose(2, 3).contiguous().transpose(2, 3)):
        got_x, got_w = ops.integer_operands(layout(x), input_scale, layout(weight), scale,
                                            axis, factor)
        assert torch.equal(got_x, expected_x)
        assert torch.equal(got_w, expected_w)
    _, plain = ops.integer_operands(x, input_scale, weight, scale, axis)
    assert torch.equal(plain, torch.round(weight / scale.reshape(shape)))


def test_requantize_and_integer_operands_refuse_shapes_that_do_not_fit():
    acc = torch.zeros(2, 3, 4, 4)
    one = torch.tensor([0.1])
    with pytest.raises(ValueError, match="acc must be float32"):
        ops.requantize(acc.double(), None, one, one, one, 1)
    with pytest.raises(ValueError, match="axis 4 is not an axis of acc"):
        ops.requantize(acc, None, one, one, one, 4)
    with pytest.raises(ValueError, match="weight_scale must hold one value or one per output "
                                         r"channel \(3\), got 2"):
        ops.requantize(acc, None, one, torch.ones(2), one, 1)
    with pytest.raises(ValueError, match=r"bias must hold one value per output channel \(3\)"):
        ops.requantize(acc, torch.ones(4), one, one, one, 1)
    with pytest.raises(ValueError, match="input_scale and output_scale must hold one value"):
        ops.requantize(acc, None, torch.ones(2), one, one, 1)
    weight = torch.zeros(3, 2, 1, 1)
    with pytest.raises(ValueError, match="axis 4 is not an axis of the weight"):
        ops.integer_operands(acc, one, weight, one, 4)
    with pytest.raises(ValueError, match=r"factor must hold one value per channel along axis 0 "
                                         r"\(3\), got 2"):
        ops.integer_operands(acc, one, weight, one, 0, torch.ones(2))


@pytest.mark.parametrize("per_channel", [False, True])
def test_integer_weight_is_what_pytorch_quantizes_the_fake_quantized_weight_to(per_channel):
    torch.manual_seed(2)
    weight = torch.randn(6, 3, 3, 3)
    scale = torch.rand(6) * 0.02 + 0.01 if per_channel else torch.tensor([0.02])
    zero_point = torch.zeros(scale.numel(), dtype=torch.int32)
    fake = torch.fake_quantize_per_channel_affine(weight, scale, zero_point, 0, -8, 7) \
        if per_channel else torch.fake_quantize_per_tensor_affine(weight, 0.02, 0, -8, 7)
    got = ops.integer_weight(fake, scale, zero_point, -8, 7, per_channel)
    expected = torch.quantize_per_channel(fake, scale.double(), zero_point.long(), 0,
                                          torch.qint8) if per_channel else \
        torch.quantize_per_tensor(fake, 0.02, 0, torch.qint8)
    assert got.qscheme() == expected.qscheme()
    assert torch.equal(got.int_repr(), expected.int_repr())
    assert int(got.int_repr().min()) >= -8 and int(got.int_repr().max()) <= 7


def test_integer_weight_stores_an_unsigned_range_as_quint8():
    """Embedding rows are quantized to [0, 255] with a zero point per row."""
    torch.manual_seed(3)
    weight = torch.randn(5, 8)
    scale = torch.rand(5) * 0.02 + 0.01
    zero_point = torch.randint(0, 256, (5,), dtype=torch.int32)
    fake = torch.fake_quantize_per_channel_affine(weight, scale, zero_point, 0, 0, 255)
    got = ops.integer_weight(fake, scale, zero_point, 0, 255, True)
    expected = torch.quantize_per_channel(fake, scale.double(), zero_point.long(), 0,
                                          torch.quint8)
    assert got.dtype == torch.quint8
    assert torch.equal(got.int_repr(), expected.int_repr())
    assert torch.equal(got.q_per_channel_zero_points(), zero_point.long())


@pytest.mark.parametrize("axis", [1, -3])
def test_integer_weight_per_channel_along_a_transposed_convs_output_axis(axis):
    """A transposed conv's weight (in, out, kh, kw) has one scale per output channel, axis 1."""
    torch.manual_seed(4)
    weight = torch.randn(3, 6, 3, 3)
    scale = torch.rand(6) * 0.02 + 0.01
    zero_point = torch.zeros(6, dtype=torch.int32)
    fake = torch.fake_quantize_per_channel_affine(weight, scale, zero_point, 1, -128, 127)
    got = ops.integer_weight(fake, scale, zero_point, -128, 127, True, axis)
    expected = torch.quantize_per_channel(fake, scale.double(), zero_point.long(), 1,
                                          torch.qint8)
    assert got.q_per_channel_axis() == 1
    assert torch.equal(got.int_repr(), expected.int_repr())
    torch.testing.assert_close(got.dequantize(), fake, rtol=0, atol=0)


def test_integer_weight_refuses_an_axis_the_weight_lacks():
    with pytest.raises(ValueError, match=r"axis 4 is not an axis of a weight of shape \[2, 2\]"):
        ops.integer_weight(torch.zeros(2, 2), torch.ones(2), torch.zeros(2, dtype=torch.int32),
                           -128, 127, True, 4)


def test_integer_weight_refuses_a_range_that_fits_no_8_bit_type():
    with pytest.raises(ValueError, match=r"\[-1, 255\] fit neither int8 nor uint8"):
        ops.integer_weight(torch.zeros(2, 2), torch.ones(1), torch.zeros(1, dtype=torch.int32),
                           -1, 255, False)


@pytest.mark.parametrize("lo, hi, quant_min, quant_max, inclusive, expected", [
    (0.0, 6.0, 0, 255, True, (6 / 255, 0)),      # ReLU6 fused into a conv or linear
    (0.0, 1.0, 0, 255, False, (1 / 256, 0)),     # PyTorch's quantized sigmoid output
    (-1.0, 1.0, 0, 255, False, (2 / 256, 128)),  # PyTorch's quantized tanh output
    (-1.0, 1.0, -128, 127, False, (2 / 256, 0)),
])
def test_fixed_qparams_are_those_of_pytorchs_fixed_range_kernels(lo, hi, quant_min, quant_max,
                                                                  inclusive, expected):
    scale, zero_point = ops.fixed_qparams(lo, hi, quant_min, quant_max, inclusive)
    assert scale == pytest.approx(expected[0], rel=1e-12) and zero_point == expected[1]


def test_fixed_qparams_match_the_quantized_sigmoid_kernel():
    x = torch.quantize_per_tensor(torch.randn(64), 0.05, 128, torch.quint8)
    out = torch.sigmoid(x)
    scale, zero_point = ops.fixed_qparams(0.0, 1.0, 0, 255, False)
    assert out.q_scale() == pytest.approx(scale) and out.q_zero_point() == zero_point


def _reference_pack(ints, bits, quant_min):
    """Values - quant_min, `8 // bits` to a byte, the first in the low bits."""
    per_byte = 8 // bits
    values = [int(v) - quant_min for v in ints.flatten()]
    values += [0] * (-len(values) % per_byte)
    return torch.tensor([sum(values[i + k] << (bits * k) for k in range(per_byte))
                         for i in range(0, len(values), per_byte)], dtype=torch.uint8)


@pytest.mark.parametrize("quant_min, quant_max, dtype", [
    (0, 255, torch.quint8), (-128, 127, torch.qint8), (0, 15, None), (-127, 127, None),
    (0, 127, None)])
def test_activation_dtype_is_the_range_the_kernels_saturate_at(quant_min, quant_max, dtype):
    # The rule both front ends' convert read (qat::activation_dtype): only a dtype's whole
    # range, where the kernels saturate as the simulation clips.
    if dtype is None:
        with pytest.raises(ValueError, match=rf"\[{quant_min}, {quant_max}\] have no integer"):
            quantized.activation_dtype(quant_min, quant_max)
    else:
        assert quantized.activation_dtype(quant_min, quant_max) is dtype
        info = torch.iinfo(torch.uint8 if dtype is torch.quint8 else torch.int8)
        assert (info.min, info.max) == (quant_min, quant_max)


@pytest.mark.parametrize("kernel_size, dilation", [((3, 3), (1, 1)), ((4, 2), (1, 3)),
                                                    ((5, 2), (2, 1)), ((1, 1), (4, 4))])
def test_same_padding_pads_as_atens_string_padding(kernel_size, dilation):
    # The sizes both front ends pad a conv "same" by: an input padded with them and a conv
    # with no padding give what ATen's padding="same" gives.
    sides = ops.same_padding(list(kernel_size), list(dilation))
    assert len(sides) == 4
    x = torch.randn(1, 2, 9, 8)
    weight = torch.randn(3, 2, *kernel_size)
    expected = torch.nn.functional.conv2d(x, weight, padding="same", dilation=dilation)
    # F.pad takes the last dimension first.
    padded = torch.nn.functional.pad(x, [sides[2], sides[3], sides[0], sides[1]])
    torch.testing.assert_close(
        torch.nn.functional.conv2d(padded, weight, dilation=dilation), expected)


def test_same_padding_names_bad_sizes():
    with pytest.raises(ValueError, match="one size per dimension"):
        ops.same_padding([3, 3], [1])
    with pytest.raises(ValueError, match="must be positive"):
        ops.same_padding([3, 0], [1, 1])


@pytest.mark.parametrize("bits, quant_min", [(4, -8), (4, 0), (2, -2), (8, -128)])
def test_pack_and_unpack_store_sub_8_bit_weights_in_bytes(bits, quant_min):
    torch.manual_seed(3)
    shape = (5, 3, 3)  # 45 values: the last byte is padded
    ints = torch.randint(quant_min, quant_min + (1 << bits), shape, dtype=torch.int8)
    packed = ops.pack_weight(ints, bits, quant_min)
    assert ops.values_per_byte(bits) == (8 // bits if bits <= 4 else 1)
    if bits <= 4:
        assert torch.equal(packed, _reference_pack(ints, bits, quant_min))
    else:
        assert torch.equal(packed, ints)
    assert torch.equal(ops.unpack_weight(packed, bits, quant_min, list(shape)), ints)


def test_pack_refuses_values_outside_the_bit_width():
    with pytest.raises(ValueError, match="4 bits"):
        ops.pack_weight(torch.tensor([8], dtype=torch.int8), 4, -8)


@pytest.mark.parametrize("bits, quant_min", [(4, -8), (2, -2), (8, -128)])
def test_the_files_unpacking_in_torchscript_equals_unpack_weight(bits, quant_min):
    # A written file unpacks its weights in plain TorchScript (it must run without qat);
    # that code and the operator must agree.
    torch.manual_seed(4)
    ints = torch.randint(quant_min, quant_min + (1 << bits), (7, 5), dtype=torch.int8)
    weight = torch._make_per_channel_quantized_tensor(
        ints, torch.full((7,), 0.01, dtype=torch.double), torch.zeros(7, dtype=torch.long), 0)
    layer = quantized.Linear(weight, None, 0.1, 0, weight_bits=bits, weight_quant_min=quant_min)
    expected = ops.unpack_weight(layer.weight_data, bits, quant_min, [7, 5])
    assert torch.equal(layer._ints(), expected)
    assert torch.equal(torch.jit.script(layer)._ints(), expected)
    assert torch.equal(expected, ints)


def test_unsigned_rows_shift_a_signed_table_to_the_embedding_kernels_bytes():
    """4-bit rows in [-8, 7] become [0, 15] with their zero points: same values, unsigned."""
    torch.manual_seed(5)
    scale = torch.rand(4, dtype=torch.double) * 0.1 + 0.01
    zero_point = torch.tensor([0, -2, 3, 1])
    ints = torch.randint(-8, 8, (4, 6), dtype=torch.int8)
    weight = torch._make_per_channel_quantized_tensor(ints, scale, zero_point, 0)
    got = ops.unsigned_rows(weight, -8)
    assert got.dtype == torch.quint8
    assert torch.equal(got.int_repr(), (ints.to(torch.int16) + 8).to(torch.uint8))
    assert torch.equal(got.q_per_channel_zero_points(), zero_point + 8)
    assert torch.equal(got.q_per_channel_scales(), scale)
    expected = (ints.double() - zero_point.double().unsqueeze(1)) * scale.unsqueeze(1)
    torch.testing.assert_close(got.dequantize().double(), expected, rtol=0, atol=1e-6)


def test_unsigned_rows_refuses_a_per_tensor_table():
    weight = torch.quantize_per_tensor(torch.randn(3, 4), 0.1, 0, torch.qint8)
    with pytest.raises(ValueError, match="per channel along axis 0"):
        ops.unsigned_rows(weight, -128)


@pytest.mark.parametrize("norm_type", [2.0, 1.0])
def test_renormalized_table_scales_each_row_above_max_norm_to_it(norm_type):
    """Rows whose norm exceeds max_norm come back at max_norm (direction kept), the others
    as they are; the table passed in is untouched. Reference: the norm from its definition."""
    torch.manual_seed(6)
    weight = torch.randn(8, 5, requires_grad=True)
    before = weight.detach().clone()
    norms = before.abs().pow(norm_type).sum(1).pow(1 / norm_type)
    # Between two rows' norms, half the rows above it, none on it.
    max_norm = norms.sort().values[3:5].mean().item()
    got = ops.renormalized_table(weight, max_norm, norm_type)
    over = norms > max_norm
    assert over.any() and (~over).any()
    torch.testing.assert_close(got[~over], before[~over], rtol=0, atol=0)
    torch.testing.assert_close(got[over], before[over] * (max_norm / norms[over]).unsqueeze(1),
                               rtol=1e-5, atol=1e-6)
    assert not got.requires_grad
    assert torch.equal(weight.detach(), before)


def test_renormalized_table_without_max_norm_is_the_table():
    weight = torch.randn(4, 3)
    assert torch.equal(ops.renormalized_table(weight, None, 2.0), weight)


def test_renormalized_table_refuses_a_tensor_that_is_not_a_table():
    with pytest.raises(ValueError, match="weight must be a 2-D table"):
        ops.renormalized_table(torch.randn(4), 1.0, 2.0)
