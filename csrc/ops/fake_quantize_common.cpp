#include "fake_quantize_common.h"

#include <ATen/ATen.h>
#include <c10/util/irange.h>

#include <cmath>

namespace qat {
namespace detail {

void check_floating_input(const char* op, const at::Tensor& input) {
  TORCH_CHECK(input.defined(), op, ": input is undefined");
  // The kernels read values; a meta tensor has none (fails deep inside a copy otherwise).
  TORCH_CHECK(
      !input.is_meta(), op, ": meta tensors are not supported; input is on the meta device");
  const auto dtype = input.scalar_type();
  TORCH_CHECK(
      dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
      op, ": input must be a floating-point tensor (float32, float64, float16 or bfloat16), got ",
      dtype);
}

void check_quant_range(const char* op, int64_t quant_min, int64_t quant_max) {
  TORCH_CHECK(
      quant_min < quant_max, op, ": quant_min (", quant_min, ") must be less than quant_max (",
      quant_max, ")");
  TORCH_CHECK(
      quant_max - quant_min < kMaxLevels && quant_min >= kMinQuantMin && quant_max <= kMaxQuantMax,
      op, ": the range [quant_min, quant_max] = [", quant_min, ", ", quant_max,
      "] is wider than 16 bits; at most ", kMaxLevels, " levels within [", kMinQuantMin, ", ",
      kMaxQuantMax, "] are supported");
}

c10::optional<int64_t> check_arguments(
    const char* op, const at::Tensor& input, const at::Tensor& scale, const at::Tensor& zero_point,
    int64_t quant_min, int64_t quant_max, c10::optional<int64_t> axis) {
  check_floating_input(op, input);
  TORCH_CHECK(
      scale.defined() && at::isFloatingType(scale.scalar_type()), op,
      ": scale must be a floating-point tensor, got ",
      scale.defined() ? c10::toString(scale.scalar_type()) : "an undefined tensor");
  TORCH_CHECK(
      zero_point.defined() && zero_point.scalar_type() != at::kBool &&
          !at::isComplexType(zero_point.scalar_type()),
      op, ": zero_point must be an integer or floating-point tensor");
  check_quant_range(op, quant_min, quant_max);
  TORCH_CHECK(
      !scale.is_meta() && !zero_point.is_meta(), op,
      ": meta tensors are not supported; scale or zero_point is on the meta device");

  if (!axis.has_value()) {
    TORCH_CHECK(
        scale.numel() == 1, op, ": per-tensor quantization (axis=None) needs one scale, got ",
        scale.numel());
    TORCH_CHECK(
        zero_point.numel() == 1, op,
        ": per-tensor quantization (axis=None) needs one zero_point, got ", zero_point.numel());
    return c10::nullopt;
  }
  const int64_t dim = input.dim();
  TORCH_CHECK(dim > 0, op, ": per-channel quantization needs an input with at least one dimension");
  const int64_t a = *axis;
  TORCH_CHECK(
      a >= -dim && a < dim, op, ": axis ", a, " is out of range for an input with ", dim,
      " dimensions (expected an axis in [", -dim, ", ", dim - 1, "])");
  const int64_t normalized = a < 0 ? a + dim : a;
  const int64_t channels = input.size(normalized);
  TORCH_CHECK(
      scale.dim() <= 1 && scale.numel() == channels, op,
      ": scale must be 1-D with one entry per channel of axis ", a, " (", channels, "), got shape ",
      scale.sizes());
  TORCH_CHECK(
      zero_point.dim() <= 1 && zero_point.numel() == channels, op,
      ": zero_point must be 1-D with one entry per channel of axis ", a, " (", channels,
      "), got shape ", zero_point.sizes());
  return normalized;
}

namespace {

// The values of a small tensor as doubles. A CPU tensor is read where it lies: this runs
// several times per fake-quantize call, where converting copies would cost more than the
// arithmetic on a small activation.
std::vector<double> values_of(const at::Tensor& t) {
  const auto src = t.detach();
  std::vector<double> out(static_cast<size_t>(src.numel()));
  const auto read = [&out](const at::Tensor& cpu) {
    AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, cpu.scalar_type(), "values_of", [&] {
      const scalar_t* p = cpu.data_ptr<scalar_t>();
      for (size_t i = 0; i < out.size(); ++i) {
        out[i] = static_cast<double>(p[i]);
      }
    });
  };
  if (src.is_cpu() && src.is_contiguous()) {
    read(src);
  } else {
    read(src.to(at::kCPU).contiguous());
  }
  return out;
}

}  // namespace

QParams read_qparams(
    const char* op, const at::Tensor& scale, const at::Tensor& zero_point, int64_t quant_min,
    int64_t quant_max) {
  const auto s = values_of(scale);
  const auto z = values_of(zero_point);
  const double* sp = s.data();
  const double* zp = z.data();
  QParams q;
  q.scale.resize(s.size());
  q.zero_point.resize(z.size());
  for (const auto i : c10::irange(s.size())) {
    // Kernels use the float32 scale, as PyTorch's fake-quant ops do.
    const float sf = static_cast<float>(sp[i]);
    TORCH_CHECK(
        std::isfinite(sp[i]) && sf > 0.0f && std::isfinite(1.0f / sf), op,
        ": scale must be positive and finite (and its float32 reciprocal finite), got scale[", i,
        "] = ", sp[i]);
    q.scale[i] = sf;
  }
  for (const auto i : c10::irange(z.size())) {
    TORCH_CHECK(
        std::isfinite(zp[i]), op, ": zero_point must be finite, got zero_point[", i, "] = ", zp[i]);
    const double rounded = std::nearbyint(zp[i]);
    TORCH_CHECK(
        rounded >= static_cast<double>(quant_min) && rounded <= static_cast<double>(quant_max), op,
        ": zero_point[", i, "] = ", zp[i], " is outside [quant_min, quant_max] = [", quant_min,
        ", ", quant_max, "]");
    q.zero_point[i] = static_cast<float>(rounded);
  }
  return q;
}

ChannelLayout channel_layout(const at::Tensor& input, c10::optional<int64_t> axis) {
  ChannelLayout layout;
  if (!axis.has_value()) {
    layout.inner = input.numel();
    return layout;
  }
  layout.channels = input.size(*axis);
  if (layout.channels == 1) {
    // One channel is per-tensor: a single run instead of one per element.
    layout.inner = input.numel();
    return layout;
  }
  layout.inner = input.stride(*axis);
  const int64_t block = layout.inner * layout.channels;
  layout.outer = block == 0 ? 0 : input.numel() / block;
  return layout;
}

at::Tensor dense(const at::Tensor& input) {
  return input.is_non_overlapping_and_dense() ? input : input.contiguous();
}

at::Tensor match_layout(const at::Tensor& grad, const at::Tensor& like) {
  if (grad.strides() == like.strides()) {
    return grad;
  }
  return at::empty_strided(like.sizes(), like.strides(), grad.options()).copy_(grad);
}

BackwardInputs prepare_backward(
    const char* op, const at::Tensor& grad, const at::Tensor& saved, const at::Tensor& scale,
    const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max, c10::optional<int64_t> axis,
    bool scale_grad_inside, double ewgs_delta) {
  BackwardInputs in;
  in.from_code = saved.scalar_type() == at::kByte;
  TORCH_CHECK(
      !in.from_code || (!scale_grad_inside && ewgs_delta == 0.0), op,
      ": in-range scale gradients and EWGS need the saved input, not the code");
  TORCH_CHECK(
      grad.sizes() == saved.sizes(), op, ": grad has shape ", grad.sizes(),
      " but the saved tensor has shape ", saved.sizes());
  TORCH_CHECK(
      grad.device() == saved.device(), op,
      ": grad and the saved tensor must be on one device, got ", grad.device(), " and ",
      saved.device());
  // The code carries no dtype of its own: the gradient's dtype is checked instead.
  const at::Tensor& typed = in.from_code ? grad : saved;
  in.axis = check_arguments(op, typed, scale, zero_point, quant_min, quant_max, axis);
  in.qparams = read_qparams(op, scale, zero_point, quant_min, quant_max);
  in.saved = dense(saved);
  in.grad = match_layout(grad.to(typed.scalar_type()), in.saved);
  return in;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_result(
    const at::Tensor& grad_input, const at::Tensor& scale_sums, const at::Tensor& zero_point_sums,
    const at::Tensor& scale, const at::Tensor& zero_point) {
  if (!scale_sums.defined()) {
    return {grad_input, at::Tensor(), at::Tensor()};  // neither gradient was asked for
  }
  const auto zero_point_options = scale.options().dtype(
      at::isFloatingType(zero_point.scalar_type()) ? zero_point.scalar_type() : at::kFloat);
  return {
      grad_input, scale_sums.to(scale.options()).reshape(scale.sizes()),
      zero_point_sums.to(zero_point_options).reshape(zero_point.sizes())};
}

}  // namespace detail
}  // namespace qat
