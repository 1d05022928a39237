// CPU kernels of qat::_fake_quantize_forward and qat::_fake_quantize_backward.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>

#include "../fake_quantize_common.h"
#include "fake_quantize_loops.h"

namespace qat {
namespace cpu {

const char* capability_name(Capability capability) {
  return capability == Capability::kAvx2 ? "avx2" : "default";
}

Capability best_supported_capability() {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c")) {
    return Capability::kAvx2;
  }
#endif
  return Capability::kDefault;
}

namespace {

// QAT_CPU_CAPABILITY=default forces the portable loops, as ATEN_CPU_CAPABILITY does for ATen.
Capability initial_capability() {
  const char* forced = std::getenv("QAT_CPU_CAPABILITY");
  if (forced != nullptr && std::strcmp(forced, "default") == 0) {
    return Capability::kDefault;
  }
  return best_supported_capability();
}

Capability& current_capability() {
  static Capability value = initial_capability();
  return value;
}

constexpr const char* kForward = "qat::_fake_quantize_forward";
constexpr const char* kBackward = "qat::_fake_quantize_backward";

std::tuple<at::Tensor, at::Tensor> fake_quantize_forward_kernel(
    const at::Tensor& input_arg,
    const at::Tensor& scale,
    const at::Tensor& zero_point,
    int64_t quant_min,
    int64_t quant_max,
    c10::optional<int64_t> axis_arg,
    bool compute_code) {
  const auto axis = detail::check_arguments(
      kForward, input_arg, scale, zero_point, quant_min, quant_max, axis_arg);
  const auto qparams = detail::read_qparams(kForward, scale, zero_point, quant_min, quant_max);
  const at::Tensor input = detail::dense(input_arg);
  at::Tensor output = at::empty_like(input);
  at::Tensor code = at::empty_like(input, input.options().dtype(at::kByte));
  if (!compute_code) {
    code = at::empty({0}, input.options().dtype(at::kByte));
  }
  if (input.numel() == 0) {
    return {output, code};
  }
  ForwardLoopArgs args;
  args.input = input.data_ptr();
  args.output = output.data_ptr();
  args.code = compute_code ? code.data_ptr<uint8_t>() : nullptr;
  args.dtype = input.scalar_type();
  args.layout = detail::channel_layout(input, axis);
  args.scale = qparams.scale.data();
  args.zero_point = qparams.zero_point.data();
  args.quant_min = quant_min;
  args.quant_max = quant_max;
  if (capability() == Capability::kAvx2) {
    AVX2::forward_loop(args);
  } else {
    DEFAULT::forward_loop(args);
  }
  return {output, code};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quantize_backward_kernel(
    const at::Tensor& grad_arg,
    const at::Tensor& saved_arg,
    const at::Tensor& scale,
    const at::Tensor& zero_point,
    int64_t quant_min,
    int64_t quant_max,
    c10::optional<int64_t> axis_arg,
    bool scale_grad,
    bool scale_grad_inside,
    bool zero_point_grad,
    double ewgs_delta) {
  const bool from_code = saved_arg.scalar_type() == at::kByte;
  TORCH_CHECK(
      !from_code || (!scale_grad_inside && ewgs_delta == 0.0),
      kBackward, ": in-range scale gradients and EWGS need the saved input, not the code");
  TORCH_CHECK(
      grad_arg.sizes() == saved_arg.sizes(), kBackward, ": grad has shape ", grad_arg.sizes(),
      " but the saved tensor has shape ", saved_arg.sizes());
  // The code carries no dtype of its own: the gradient's dtype is checked instead.
  const at::Tensor& typed = from_code ? grad_arg : saved_arg;
  const auto axis = detail::check_arguments(
      kBackward, typed, scale, zero_point, quant_min, quant_max, axis_arg);
  const auto qparams = detail::read_qparams(kBackward, scale, zero_point, quant_min, quant_max);
  const at::Tensor saved = detail::dense(saved_arg);
  const at::Tensor grad = detail::match_layout(grad_arg.to(typed.scalar_type()), saved);
  at::Tensor grad_input = at::empty_like(grad);
  const int64_t channels = static_cast<int64_t>(qparams.scale.size());
  at::Tensor scale_sums = at::zeros({channels}, at::kDouble);
  at::Tensor zero_point_sums = at::zeros({channels}, at::kDouble);
  if (grad.numel() > 0) {
    BackwardLoopArgs args;
    args.grad = grad.data_ptr();
    args.input = from_code ? nullptr : saved.data_ptr();
    args.code = from_code ? saved.data_ptr<uint8_t>() : nullptr;
    args.grad_input = grad_input.data_ptr();
    args.dtype = grad.scalar_type();
    args.layout = detail::channel_layout(saved, axis);
    args.scale = qparams.scale.data();
    args.zero_point = qparams.zero_point.data();
    args.quant_min = quant_min;
    args.quant_max = quant_max;
    args.scale_grad = scale_grad;
    args.scale_grad_inside = scale_grad_inside;
    args.zero_point_grad = zero_point_grad;
    args.ewgs_delta = ewgs_delta;
    args.grad_scale = scale_sums.data_ptr<double>();
    args.grad_zero_point = zero_point_sums.data_ptr<double>();
    if (capability() == Capability::kAvx2) {
      AVX2::backward_loop(args);
    } else {
      DEFAULT::backward_loop(args);
    }
  }
  const auto float_options = scale.options().dtype(
      at::isFloatingType(zero_point.scalar_type()) ? zero_point.scalar_type() : at::kFloat);
  return {
      grad_input,
      scale_sums.to(scale.options()).reshape(scale.sizes()),
      zero_point_sums.to(float_options).reshape(zero_point.sizes())};
}

} // namespace

Capability capability() {
  return current_capability();
}

void set_capability(Capability capability) {
  TORCH_CHECK(
      capability == Capability::kDefault || capability <= best_supported_capability(),
      "qat: this processor does not support the ", capability_name(capability), " kernels");
  current_capability() = capability;
}

} // namespace cpu
} // namespace qat

TORCH_LIBRARY_IMPL(qat, CPU, m) {
  m.impl("_fake_quantize_forward", &qat::cpu::fake_quantize_forward_kernel);
  m.impl("_fake_quantize_backward", &qat::cpu::fake_quantize_backward_kernel);
}
