// The lowering numerics (see qat/lowering.h), registered as torch.ops.qat.* for the Python
// front end and TorchScript.

#include <qat/lowering.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <c10/util/accumulate.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace qat {

namespace {

// The field width of one packed value: 4 bits for 3- and 4-bit weights, 2 for 1- and 2-bit.
int64_t field_bits(int64_t bits) {
  return 8 / values_per_byte(bits);
}

void check_bits(const char* op, int64_t bits) {
  TORCH_CHECK_VALUE(bits >= 1 && bits <= 8, op, ": bits must be in [1, 8], got ", bits);
}

// std::nearbyint for float32 (half to even) without a libm call per value, so that the loops
// below vectorize: adding and subtracting 1.5 * 2^23 rounds |v| < 2^22 to an integer in the
// default rounding mode (compiled without fast-math, the pair is not folded away). Larger
// values, far outside any 8-bit grid (the FakeQuantize after a layer clamps them), come
// back within one of v. A zero may lose its sign, which no later operation reads.
inline float round_half_even(float v) {
  constexpr float kMagic = 12582912.0f;
  return (v + kMagic) - kMagic;
}

// A bias in int32 steps of input scale x weight scale (the grid the integer kernels hold it
// on), and that step: round_bias and requantize round on the same grid.
std::tuple<at::Tensor, at::Tensor> bias_levels(
    const at::Tensor& bias, const at::Tensor& input_scale, const at::Tensor& weight_scale) {
  const auto step = (input_scale * weight_scale).detach().reshape({-1}).to(bias.scalar_type());
  return {at::round(bias / step), step};
}

// The number of elements after axis `dim` of `t`: one channel's run along that axis.
int64_t inner_size(const at::Tensor& t, int64_t dim) {
  return c10::multiply_integers(t.sizes().slice(dim + 1));
}

// Calls fn(c, begin, end), in parallel, on element ranges [begin, end) of a contiguous
// tensor of `numel` elements whose channel axis holds `channels` channels with runs of
// `inner` elements; each range lies in one run of channel c (one channel: any range).
template <typename Fn>
void for_each_channel_run(int64_t numel, int64_t channels, int64_t inner, const Fn& fn) {
  constexpr int64_t kGrain = 32768;
  if (channels == 1) {
    at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) { fn(0, begin, end); });
    return;
  }
  const int64_t run = std::max<int64_t>(inner, 1);
  at::parallel_for(
      0, numel / run, std::max<int64_t>(1, kGrain / run), [&](int64_t first, int64_t last) {
        for (int64_t row = first; row < last; ++row) {
          fn(row % channels, row * run, (row + 1) * run);
        }
      });
}

}  // namespace

at::Tensor batch_norm_factor(
    const c10::optional<at::Tensor>& weight, const at::Tensor& running_var, double eps) {
  at::Tensor std_dev;
  if (running_var.is_cpu() && running_var.scalar_type() == at::kFloat &&
      !running_var.requires_grad()) {
    // Every conv + batch norm calls this in every training step: one loop over its few
    // hundred channels instead of an add and a sqrt, whose dispatch and allocations cost
    // more than the arithmetic. The sum is rounded to float32 (as the add rounds it) and
    // the square root correctly (std::sqrt, IEEE 754): the factor, and so the integer
    // weights, are the same under every PyTorch, whose float32 sqrt kernel need not round
    // correctly (2.15's is off by one unit in the last place for some values).
    const auto var = running_var.contiguous();
    std_dev = at::empty_like(var);
    const float* v = var.data_ptr<float>();
    float* out = std_dev.data_ptr<float>();
    const auto e = static_cast<float>(eps);
    for (int64_t c = 0; c < var.numel(); ++c) {
      out[c] = std::sqrt(v[c] + e);
    }
  } else {
    std_dev = at::sqrt(running_var + eps);
  }
  if (weight.has_value() && weight->defined()) {
    return *weight / std_dev;
  }
  return at::reciprocal(std_dev);
}

at::Tensor fold_bias(
    const c10::optional<at::Tensor>& conv_bias, const c10::optional<at::Tensor>& bn_bias,
    const at::Tensor& running_mean, const at::Tensor& factor) {
  // Without a conv bias, factor * (0 - mean) is -(factor * mean) exactly, so both cases
  // are the one formula.
  const auto centred =
      conv_bias.has_value() && conv_bias->defined() ? *conv_bias - running_mean : -running_mean;
  const auto scaled = factor * centred;
  return bn_bias.has_value() && bn_bias->defined() ? *bn_bias + scaled : scaled;
}

std::tuple<at::Tensor, at::Tensor> batch_norm_affine(
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& running_mean, const at::Tensor& running_var, double eps) {
  constexpr const char* op = "qat::batch_norm_affine";
  const int64_t channels = running_var.numel();
  const auto values = [&](const c10::optional<at::Tensor>& t, const char* what) {
    TORCH_CHECK_VALUE(
        t->dim() == 1 && t->numel() == channels, op, ": ", what,
        " must be 1-D with one value per channel (", channels, " as running_var), got shape ",
        t->sizes());
    return t->detach().to(at::kCPU, at::kFloat).contiguous();
  };
  TORCH_CHECK_VALUE(
      running_var.dim() == 1, op, ": running_var must be 1-D, got shape ", running_var.sizes());
  const auto has = [](const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); };
  const auto var = values(running_var, "running_var");
  const auto mean = values(running_mean, "running_mean");
  const auto gamma = has(weight) ? values(weight, "weight") : at::ones({channels}, var.options());
  const auto beta = has(bias) ? values(bias, "bias") : at::zeros({channels}, var.options());
  auto folded_weight = at::empty_like(var);
  auto folded_bias = at::empty_like(var);
  const float* v = var.data_ptr<float>();
  const float* m = mean.data_ptr<float>();
  const float* g = gamma.data_ptr<float>();
  const float* b = beta.data_ptr<float>();
  float* w_out = folded_weight.data_ptr<float>();
  float* b_out = folded_bias.data_ptr<float>();
  for (int64_t c = 0; c < channels; ++c) {
    // The kernels' operations and their order: a float square root, its reciprocal in
    // double rounded to float, then float products (no fused multiply-add, see CMake).
    const float inv_sigma = static_cast<float>(1.0 / std::sqrt(v[c] + static_cast<float>(eps)));
    w_out[c] = inv_sigma * g[c];
    b_out[c] = b[c] - m[c] * inv_sigma * g[c];
  }
  return {folded_weight, folded_bias};
}

at::Tensor requantize(
    const at::Tensor& acc, const c10::optional<at::Tensor>& bias, const at::Tensor& input_scale,
    const at::Tensor& weight_scale, const at::Tensor& output_scale, int64_t axis) {
  constexpr const char* op = "qat::requantize";
  TORCH_CHECK_VALUE(
      acc.scalar_type() == at::kFloat, op, ": acc must be float32, got ", acc.scalar_type());
  TORCH_CHECK_VALUE(
      acc.dim() >= 1 && axis >= -acc.dim() && axis < acc.dim(), op, ": axis ", axis,
      " is not an axis of acc (shape ", acc.sizes(), ")");
  const int64_t dim = axis < 0 ? axis + acc.dim() : axis;
  const int64_t channels = acc.size(dim);
  TORCH_CHECK_VALUE(
      input_scale.numel() == 1 && output_scale.numel() == 1, op,
      ": input_scale and output_scale must hold one value each, got ", input_scale.numel(), " and ",
      output_scale.numel());
  TORCH_CHECK_VALUE(
      weight_scale.numel() == 1 || weight_scale.numel() == channels, op,
      ": weight_scale must hold one value or one per output channel (", channels, "), got ",
      weight_scale.numel());
  std::vector<int64_t> shape(acc.dim(), 1);
  shape[dim] = -1;
  const auto in = input_scale.detach().to(at::kFloat).reshape({});
  const auto w = weight_scale.detach().to(acc.device(), at::kFloat).reshape({-1});
  const float out = output_scale.detach().to(at::kCPU, at::kFloat).item<float>();
  // Float32 throughout, in the kernel's order: (w * in) * (1 / out), as QNNPACK's
  // requantization scales are made.
  const auto multiplier = (w * in.to(acc.device())) * (1.0f / out);
  at::Tensor levels;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK_VALUE(
        bias->numel() == channels, op, ": bias must hold one value per output channel (", channels,
        "), got ", bias->numel());
    levels = std::get<0>(bias_levels(
        bias->detach().to(acc.device(), at::kFloat).reshape({-1}), in.to(acc.device()), w));
  }
  if (!acc.is_cpu() || !acc.is_contiguous()) {
    const auto total = levels.defined() ? acc + levels.reshape(shape) : acc;
    return at::round(total * multiplier.reshape(shape)) * out;
  }
  // The same float32 operations in one pass instead of four (an eval step of a network
  // calls this once per layer).
  const auto m = multiplier.expand({channels}).contiguous();
  const auto b = levels.defined() ? levels.expand({channels}).contiguous()
                                  : at::zeros({channels}, acc.options());
  auto result = at::empty_like(acc);
  const float* a = acc.data_ptr<float>();
  const float* mp = m.data_ptr<float>();
  const float* bp = b.data_ptr<float>();
  float* r = result.data_ptr<float>();
  for_each_channel_run(
      acc.numel(), channels, inner_size(acc, dim), [&](int64_t c, int64_t begin, int64_t end) {
        const float bias_levels = bp[c];
        const float scale = mp[c];
        for (int64_t i = begin; i < end; ++i) {
          r[i] = round_half_even((a[i] + bias_levels) * scale) * out;
        }
      });
  return result;
}

namespace {

// round(x / scale[c]) for x contiguous float32 on the CPU with `channels` channels of
// `inner` values each along one axis (scale[c] one value, or one per channel), optionally x
// times factor[c] first: the float32 operations of the tensor formula, in one pass.
at::Tensor rounded_quotient(
    const at::Tensor& x, const float* scale, bool per_channel, const float* factor,
    int64_t channels, int64_t inner) {
  auto result = at::empty_like(x);
  const float* in = x.data_ptr<float>();
  float* out = result.data_ptr<float>();
  for_each_channel_run(x.numel(), channels, inner, [&](int64_t c, int64_t begin, int64_t end) {
    const float s = scale[per_channel ? c : 0];
    // x * 1 is exact: one loop serves inputs and weights with and without a folded batch
    // norm.
    const float f = factor != nullptr ? factor[c] : 1.0f;
    for (int64_t i = begin; i < end; ++i) {
      out[i] = round_half_even((in[i] * f) / s);
    }
  });
  return result;
}

bool plain_cpu_float(const at::Tensor& t) {
  return t.is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && !t.requires_grad();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> integer_operands(
    const at::Tensor& input, const at::Tensor& input_scale, const at::Tensor& weight,
    const at::Tensor& weight_scale, int64_t axis, const c10::optional<at::Tensor>& factor) {
  TORCH_CHECK_VALUE(
      weight.dim() >= 1 && axis >= -weight.dim() && axis < weight.dim(),
      "qat::integer_operands: axis ", axis, " is not an axis of the weight (shape ", weight.sizes(),
      ")");
  const int64_t dim = axis < 0 ? axis + weight.dim() : axis;
  const int64_t channels = weight.size(dim);
  const bool scaled = factor.has_value() && factor->defined();
  TORCH_CHECK_VALUE(
      !scaled || factor->numel() == channels,
      "qat::integer_operands: factor must hold one value "
      "per channel along axis ",
      axis, " (", channels, "), got ", factor->numel());
  std::vector<int64_t> shape(weight.dim(), 1);
  shape[dim] = -1;
  const auto s = weight_scale.detach().to(at::kFloat).contiguous();
  const auto f = scaled ? factor->detach().to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor x_ints, w_ints;
  const auto in = input_scale.detach().to(at::kFloat).contiguous();
  if (plain_cpu_float(input) && in.is_cpu() && in.numel() == 1) {
    x_ints = rounded_quotient(input, in.data_ptr<float>(), false, nullptr, 1, input.numel());
  } else {
    x_ints = at::round(input / input_scale);
  }
  if (plain_cpu_float(weight) && s.is_cpu() && (s.numel() == 1 || s.numel() == channels) &&
      (!scaled || f.is_cpu())) {
    w_ints = rounded_quotient(
        weight, s.data_ptr<float>(), s.numel() > 1, scaled ? f.data_ptr<float>() : nullptr,
        channels, inner_size(weight, dim));
  } else {
    const auto w = scaled ? weight * factor->reshape(shape) : weight;
    w_ints = at::round(w / weight_scale.reshape(shape));
  }
  return {x_ints, w_ints};
}

at::Tensor round_bias(
    const at::Tensor& bias, const at::Tensor& input_scale, const at::Tensor& weight_scale) {
  const bool plain = bias.is_cpu() && bias.scalar_type() == at::kFloat && bias.dim() == 1 &&
                     input_scale.is_cpu() && input_scale.scalar_type() == at::kFloat &&
                     input_scale.numel() == 1 && weight_scale.is_cpu() &&
                     weight_scale.scalar_type() == at::kFloat &&
                     (weight_scale.numel() == bias.numel() || weight_scale.numel() == 1);
  if (plain) {
    // Every QAT step of every layer: the offsets in one loop, with the float32 operations of
    // the formula below (lowering.cpp is compiled without contraction into fused
    // multiply-adds), instead of seven small tensor operations.
    const auto b = bias.detach().contiguous();
    const auto w = weight_scale.detach().contiguous();
    const float in = input_scale.detach().contiguous().data_ptr<float>()[0];
    auto offset = at::empty_like(b);
    const float* bp = b.data_ptr<float>();
    const float* wp = w.data_ptr<float>();
    float* op = offset.data_ptr<float>();
    const bool per_channel = w.numel() > 1;
    for (int64_t c = 0; c < b.numel(); ++c) {
      const float step = in * wp[per_channel ? c : 0];
      op[c] = std::nearbyint(bp[c] / step) * step - bp[c];
    }
    return bias + offset;
  }
  const auto [levels, step] = bias_levels(bias.detach(), input_scale, weight_scale);
  // The offset is a constant: the gradient flows to `bias` as it is (straight through).
  return bias + (levels * step - bias.detach());
}

at::Tensor integer_weight(
    const at::Tensor& weight, const at::Tensor& scale, const at::Tensor& zero_point,
    int64_t quant_min, int64_t quant_max, bool per_channel, int64_t axis) {
  // Signed ranges are stored as int8 (the kernels' weights), unsigned ones as uint8 (the
  // embedding kernels' rows).
  const bool is_signed = quant_min >= -128 && quant_max <= 127;
  TORCH_CHECK_VALUE(
      is_signed || (quant_min >= 0 && quant_max <= 255),
      "qat::integer_weight: weights quantized to [", quant_min, ", ", quant_max,
      "] fit neither int8 nor uint8; the integer kernels take 8-bit weights (at most)");
  const auto dtype = is_signed ? at::kChar : at::kByte;
  // In double: the quotient of a fake-quantized value by its scale is within rounding of an
  // integer, which double keeps far from the half-way points.
  const auto s = scale.detach().to(at::kCPU, at::kDouble);
  const auto z = zero_point.detach().to(at::kCPU, at::kDouble).round().to(at::kLong);
  const auto w = weight.detach().to(at::kCPU, at::kDouble);
  if (per_channel) {
    TORCH_CHECK_VALUE(
        w.dim() > 0 && -w.dim() <= axis && axis < w.dim(), "qat::integer_weight: axis ", axis,
        " is not an axis of a weight of shape ", w.sizes());
    const auto channel_axis = axis < 0 ? axis + w.dim() : axis;
    std::vector<int64_t> shape(w.dim(), 1);
    shape[channel_axis] = -1;
    const auto ints = at::round(w / s.reshape(shape)) + z.reshape(shape);
    return at::_make_per_channel_quantized_tensor(ints.to(dtype), s, z, channel_axis);
  }
  TORCH_CHECK_VALUE(
      s.numel() == 1, "qat::integer_weight: a per-tensor weight has one scale, got ", s.numel());
  const auto ints = at::round(w / s) + z;
  return at::_make_per_tensor_quantized_tensor(ints.to(dtype), s.item<double>(), z.item<int64_t>());
}

std::tuple<double, int64_t> fixed_qparams(
    double lo, double hi, int64_t quant_min, int64_t quant_max, bool inclusive) {
  TORCH_CHECK_VALUE(
      std::isfinite(lo) && std::isfinite(hi) && lo <= 0 && 0 < hi,
      "qat::fixed_qparams: the output range must be finite with lo <= 0 < hi (a range that "
      "holds zero), got (",
      lo, ", ", hi, ")");
  TORCH_CHECK_VALUE(
      quant_min < quant_max, "qat::fixed_qparams: quant_min must be below quant_max, got [",
      quant_min, ", ", quant_max, "]");
  const auto steps = static_cast<double>(quant_max - quant_min + (inclusive ? 0 : 1));
  return {
      (hi - lo) / steps, quant_min + static_cast<int64_t>(std::nearbyint(-lo * steps / (hi - lo)))};
}

c10::optional<c10::ScalarType> activation_dtype(int64_t quant_min, int64_t quant_max) {
  if (quant_min == 0 && quant_max == 255) {
    return c10::kQUInt8;
  }
  if (quant_min == -128 && quant_max == 127) {
    return c10::kQInt8;
  }
  return c10::nullopt;
}

std::vector<int64_t> same_padding(at::IntArrayRef kernel_size, at::IntArrayRef dilation) {
  TORCH_CHECK_VALUE(
      kernel_size.size() == dilation.size(),
      "qat::same_padding: kernel_size and dilation must give one size per dimension, got ",
      kernel_size, " and ", dilation);
  std::vector<int64_t> sides;
  for (size_t d = 0; d < kernel_size.size(); ++d) {
    TORCH_CHECK_VALUE(
        kernel_size[d] > 0 && dilation[d] > 0,
        "qat::same_padding: kernel_size and dilation must be positive, got ", kernel_size, " and ",
        dilation);
    const auto total = dilation[d] * (kernel_size[d] - 1);
    sides.push_back(total / 2);
    sides.push_back(total - total / 2);
  }
  return sides;
}

int64_t values_per_byte(int64_t bits) {
  return bits <= 4 ? 8 / bits : 1;
}

at::Tensor pack_weight(const at::Tensor& ints, int64_t bits, int64_t quant_min) {
  check_bits("qat::pack_weight", bits);
  const auto ints8 = ints.detach().to(at::kCPU);
  const auto per_byte = values_per_byte(bits);
  if (per_byte == 1) {
    return ints8.to(at::kChar).clone();
  }
  const auto width = field_bits(bits);
  const auto values = ints8.flatten().to(at::kShort) - quant_min;
  if (values.numel() > 0) {
    const auto low = values.min().item<int64_t>();
    const auto high = values.max().item<int64_t>();
    TORCH_CHECK_VALUE(
        low >= 0 && high < (int64_t{1} << width), "qat::pack_weight: weights do not fit ", width,
        " bits above quant_min ", quant_min, " (found ", low + quant_min, " to ", high + quant_min,
        ")");
  }
  const auto pad = (per_byte - values.numel() % per_byte) % per_byte;
  const auto rows = at::cat({values, values.new_zeros({pad})}).reshape({-1, per_byte});
  auto packed = at::zeros({rows.size(0)}, values.options());
  for (int64_t j = 0; j < per_byte; ++j) {
    packed.bitwise_or_(rows.select(1, j).bitwise_left_shift(width * j));
  }
  return packed.to(at::kByte);
}

at::Tensor unpack_weight(
    const at::Tensor& data, int64_t bits, int64_t quant_min, at::IntArrayRef shape) {
  check_bits("qat::unpack_weight", bits);
  const auto per_byte = values_per_byte(bits);
  if (per_byte == 1) {
    return data.to(at::kChar).reshape(shape);
  }
  const auto width = field_bits(bits);
  std::vector<at::Tensor> parts;
  for (int64_t i = 0; i < per_byte; ++i) {
    parts.push_back(data.bitwise_right_shift(width * i).bitwise_and((1 << width) - 1));
  }
  const int64_t numel = c10::multiply_integers(shape);
  const auto values = at::stack(parts, 1).flatten().slice(0, 0, numel).to(at::kShort) + quant_min;
  return values.to(at::kChar).reshape(shape);
}

at::Tensor unsigned_rows(const at::Tensor& weight, int64_t quant_min) {
  TORCH_CHECK_VALUE(
      weight.is_quantized() && weight.qscheme() == at::kPerChannelAffine &&
          weight.q_per_channel_axis() == 0,
      "qat::unsigned_rows: weight must be quantized per channel along axis 0 (one scale per "
      "row)");
  const auto rows = weight.int_repr().to(at::kShort) - quant_min;
  if (rows.numel() > 0) {
    const auto low = rows.min().item<int64_t>();
    const auto high = rows.max().item<int64_t>();
    TORCH_CHECK_VALUE(
        low >= 0 && high <= 255, "qat::unsigned_rows: integers from ", low + quant_min, " to ",
        high + quant_min, " do not fit a byte above quant_min ", quant_min);
  }
  return at::_make_per_channel_quantized_tensor(
      rows.to(at::kByte), weight.q_per_channel_scales(),
      weight.q_per_channel_zero_points() - quant_min, 0);
}

at::Tensor renormalized_table(
    const at::Tensor& weight, c10::optional<double> max_norm, double norm_type) {
  TORCH_CHECK_VALUE(
      weight.dim() == 2, "qat::renormalized_table: weight must be a 2-D table, got shape ",
      weight.sizes());
  auto table = weight.detach();
  if (max_norm.has_value()) {
    table = table.clone();
    at::embedding_renorm_(
        table, at::arange(table.size(0), table.options().dtype(at::kLong)), *max_norm, norm_type);
  }
  return table;
}

}  // namespace qat

TORCH_LIBRARY_FRAGMENT(qat, m) {
  m.def(
      "batch_norm_factor(Tensor? weight, Tensor running_var, float eps) -> Tensor",
      TORCH_FN(qat::batch_norm_factor));
  m.def(
      "fold_bias(Tensor? conv_bias, Tensor? bn_bias, Tensor running_mean, Tensor factor) -> "
      "Tensor",
      TORCH_FN(qat::fold_bias));
  m.def(
      "batch_norm_affine(Tensor? weight, Tensor? bias, Tensor running_mean, Tensor running_var, "
      "float eps) -> (Tensor, Tensor)",
      TORCH_FN(qat::batch_norm_affine));
  m.def(
      "round_bias(Tensor bias, Tensor input_scale, Tensor weight_scale) -> Tensor",
      TORCH_FN(qat::round_bias));
  m.def(
      "requantize(Tensor acc, Tensor? bias, Tensor input_scale, Tensor weight_scale, "
      "Tensor output_scale, int axis) -> Tensor",
      TORCH_FN(qat::requantize));
  m.def(
      "integer_operands(Tensor input, Tensor input_scale, Tensor weight, Tensor weight_scale, "
      "int axis, Tensor? factor=None) -> (Tensor, Tensor)",
      TORCH_FN(qat::integer_operands));
  m.def(
      "integer_weight(Tensor weight, Tensor scale, Tensor zero_point, int quant_min, "
      "int quant_max, bool per_channel, int axis=0) -> Tensor",
      TORCH_FN(qat::integer_weight));
  m.def(
      "fixed_qparams(float lo, float hi, int quant_min, int quant_max, bool inclusive) -> "
      "(float, int)",
      TORCH_FN(qat::fixed_qparams));
  m.def("same_padding(int[] kernel_size, int[] dilation) -> int[]", TORCH_FN(qat::same_padding));
  m.def("values_per_byte(int bits) -> int", TORCH_FN(qat::values_per_byte));
  m.def("pack_weight(Tensor ints, int bits, int quant_min) -> Tensor", TORCH_FN(qat::pack_weight));
  m.def(
      "unpack_weight(Tensor data, int bits, int quant_min, int[] shape) -> Tensor",
      TORCH_FN(qat::unpack_weight));
  m.def("unsigned_rows(Tensor weight, int quant_min) -> Tensor", TORCH_FN(qat::unsigned_rows));
  m.def(
      "renormalized_table(Tensor weight, float? max_norm, float norm_type) -> Tensor",
      TORCH_FN(qat::renormalized_table));
}
