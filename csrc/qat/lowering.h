#pragma once

// The lowering numerics: how a QAT layer's float state becomes what the integer kernels
// hold. Each formula lives here once and is registered as a `torch.ops.qat.*` operator
// (csrc/export/lowering.cpp); the QAT modules (Python and C++), Python's qat.convert and
// the C++ qat::convert all call these, so a simulation and its integer model cannot drift
// apart between the front ends.

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <tuple>
#include <vector>

namespace qat {

/// gamma / sqrt(running_var + eps): the per-channel factor a batch norm in eval multiplies
/// by, folded into the conv weight before it is fake-quantized. Differentiable. For a
/// float32 running variance on the CPU the sum is rounded to float32 and the square root
/// correctly (IEEE 754), so the factor does not depend on the PyTorch it runs under.
/// @param weight the batch norm's gamma (undefined: 1, a batch norm without affine).
at::Tensor batch_norm_factor(
    const c10::optional<at::Tensor>& weight, const at::Tensor& running_var, double eps);

/// beta + factor * (conv_bias - running_mean): the bias of the folded conv (undefined
/// `conv_bias` or `bn_bias`: 0). Differentiable.
at::Tensor fold_bias(
    const c10::optional<at::Tensor>& conv_bias, const c10::optional<at::Tensor>& bn_bias,
    const at::Tensor& running_mean, const at::Tensor& factor);

/// (gamma / sqrt(running_var + eps), beta - running_mean * gamma / sqrt(running_var + eps)):
/// a batch norm in eval as one affine map per channel, computed in float32 as PyTorch's
/// quantized::batch_norm kernels compute it from the four tensors, so that the kernel given
/// this weight and bias with running mean 0, variance 1 and eps 0 writes the same integers.
/// An integer model stores two vectors per batch norm instead of four.
/// @param weight, bias gamma and beta (undefined: 1 and 0, a batch norm without affine).
/// @throws c10::ValueError when the tensors are not 1-D of one length.
std::tuple<at::Tensor, at::Tensor> batch_norm_affine(
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& running_mean, const at::Tensor& running_var, double eps);

/// `bias` on the grid the integer kernels add it on: int32 multiples of
/// input_scale * weight_scale (one step per output channel), with a straight-through
/// gradient. The kernels round the bias once per channel; rounding it in the simulation
/// too makes the simulation add exactly what the kernel adds.
at::Tensor round_bias(
    const at::Tensor& bias, const at::Tensor& input_scale, const at::Tensor& weight_scale);

/// The output of an integer conv / linear kernel as QNNPACK computes it, from `acc`, the sum
/// of the products of the input's and the weight's integers (each less its zero point), as
/// float32 holding integers: (acc + the bias in int32 steps of input_scale * weight_scale,
/// rounded as round_bias rounds it) times the float32 requantization scale
/// (weight_scale * input_scale) * (1 / output_scale), rounded half to even (levels beyond
/// 2^22, far outside any 8-bit grid, to within one), times output_scale. The FakeQuantize with
/// `output_scale` after the layer gives back the same levels: a simulation that computes its layers
/// so in eval writes the integers the kernel writes, float32 ties included (the float convolution
/// rounds apart from the kernel on one output in about 10^5, and networks amplify each such step).
/// @param axis the output-channel axis of `acc` (negative counts from the end); one weight
///   scale per channel along it, or one for all.
/// @throws c10::ValueError when `acc` is not float32, a scale's size does not fit, or `bias`
///   is not one value per output channel.
at::Tensor requantize(
    const at::Tensor& acc, const c10::optional<at::Tensor>& bias, const at::Tensor& input_scale,
    const at::Tensor& weight_scale, const at::Tensor& output_scale, int64_t axis);

/// The integers, less their zero points, of a layer's input (on the grid of `input_scale`,
/// the FakeQuantize's before it) and of its fake-quantized weight (one scale per channel
/// along `axis`, or one; times `factor`, one per channel, first when given: a folded conv
/// + batch norm's weight), as float32: what its integer kernel multiplies. A conv or linear
/// of the two is the kernel's accumulator for requantize, exact while its sums stay below
/// 2^24.
/// @throws c10::ValueError when `axis` is not an axis of `weight` or `factor` does not
///   hold one value per channel.
std::tuple<at::Tensor, at::Tensor> integer_operands(
    const at::Tensor& input, const at::Tensor& input_scale, const at::Tensor& weight,
    const at::Tensor& weight_scale, int64_t axis,
    const c10::optional<at::Tensor>& factor = c10::nullopt);

/// The 8-bit quantized tensor (per channel along `axis` when `per_channel`, else per tensor)
/// whose dequantized values are `weight`, a weight already fake-quantized with `scale` and
/// `zero_point`: the integers the simulation computed with, on the CPU, where the quantized
/// kernels run. qint8 when [quant_min, quant_max] fits int8, else quint8 (embedding rows).
/// A transposed conv's weight has its output channels on axis 1.
/// @throws c10::ValueError when [quant_min, quant_max] fits neither int8 nor uint8, or
/// `axis` (negative counts from the end) is not an axis of `weight`.
at::Tensor integer_weight(
    const at::Tensor& weight, const at::Tensor& scale, const at::Tensor& zero_point,
    int64_t quant_min, int64_t quant_max, bool per_channel, int64_t axis = 0);

/// (scale, zero_point) of an op whose output range [lo, hi] is known (sigmoid [0, 1), tanh
/// [-1, 1), ReLU6 [0, 6]): lo on quant_min, and `hi` the top level when `inclusive` (scale
/// (hi - lo) / (levels - 1)), else one step above it ((hi - lo) / levels, PyTorch's sigmoid
/// and tanh kernels).
/// @throws c10::ValueError when the range is not finite or does not hold zero.
std::tuple<double, int64_t> fixed_qparams(
    double lo, double hi, int64_t quant_min, int64_t quant_max, bool inclusive);

/// The quantized dtype the integer kernels hold activations quantized to [quant_min,
/// quant_max] in: quint8 for [0, 255], qint8 for [-128, 127], nullopt for any other range
/// (4-bit activations, narrow range): the kernels saturate at the dtype's limits only, so
/// such an integer model would not clip where the simulation did. Both front ends' convert
/// read it (Python through qat._C._activation_dtype).
c10::optional<c10::ScalarType> activation_dtype(int64_t quant_min, int64_t quant_max);

/// The padding "same" gives a conv, as ATen computes it: per spatial dimension d, the
/// total dilation[d] * (kernel_size[d] - 1) split into (left, right) with left the half
/// rounded down (an odd total pads one more on the right), flat as left_0, right_0, left_1,
/// right_1, .... An integer conv pads both sides alike, so each front end runs a conv whose
/// sides differ on a padded input or refuses it.
/// @throws c10::ValueError when the lists differ in length, or a size or dilation is not
///   positive.
std::vector<int64_t> same_padding(at::IntArrayRef kernel_size, at::IntArrayRef dilation);

/// How many integers of `bits` bits one stored byte holds: 8 / bits at 4 bits or fewer
/// (two at 4 bits, four at 2), else 1 (stored as they are).
int64_t values_per_byte(int64_t bits);

/// `ints` (int8) as a file stores them: as they are (int8) at more than 4 bits; else as
/// uint8 bytes holding `values_per_byte(bits)` values each, `ints - quant_min` (which is
/// in [0, 2^bits)), the first in the low bits, the last byte padded with zeros.
/// @throws c10::ValueError when a value does not fit `bits` bits above quant_min.
at::Tensor pack_weight(const at::Tensor& ints, int64_t bits, int64_t quant_min);

/// The inverse of pack_weight: the int8 integers of shape `shape`.
at::Tensor unpack_weight(
    const at::Tensor& data, int64_t bits, int64_t quant_min, at::IntArrayRef shape);

/// An embedding table's integers (`weight`, quantized per row along axis 0 to
/// [quant_min, ...]) as the embedding kernels read them: unsigned, `ints - quant_min` (in
/// [0, 2^bits)) as quint8, the zero points moved with them, the scales as they are. The
/// dequantized values do not change.
/// @throws c10::ValueError when `weight` is not quantized per channel along axis 0, or a
/// shifted value does not fit a byte.
at::Tensor unsigned_rows(const at::Tensor& weight, int64_t quant_min);

/// An embedding table (2-D) as its lookups read it: with `max_norm` a renormalized copy,
/// every row of norm (`norm_type`) above max_norm scaled to max_norm as a lookup would
/// leave it (torch.embedding_renorm_); without, `weight` detached. A converted table is read
/// as it is (no in-place change at run time, which a frozen file would drop and an integer
/// table cannot take), so the converters store this.
/// @throws c10::ValueError when `weight` is not 2-D.
at::Tensor renormalized_table(
    const at::Tensor& weight, c10::optional<double> max_norm, double norm_type);

}  // namespace qat
