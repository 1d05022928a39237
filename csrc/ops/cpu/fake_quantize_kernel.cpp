// CPU kernels of qat::_fake_quantize_forward and qat::_fake_quantize_backward.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>

#include "../fake_quantize_common.h"
#include "buffer_pool.h"
#include "fake_quantize_loops.h"

namespace qat {
namespace cpu {

const char* capability_name(Capability capability) {
  return capability == Capability::kAvx2 ? "avx2" : "default";
}

Capability best_supported_capability() {
#if defined(QAT_AVX2_LOOPS)
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

// The forward with codes (compute_code), positions (record) or neither, into `out` when
// given (the output of the same forward, rewritten with the same values).
std::tuple<at::Tensor, at::Tensor> run_forward(
    const at::Tensor& input_arg, const at::Tensor& scale, const at::Tensor& zero_point,
    int64_t quant_min, int64_t quant_max, c10::optional<int64_t> axis_arg, bool compute_code,
    ClampedRecord* record, const at::Tensor& out = at::Tensor()) {
  const auto axis = detail::check_arguments(
      kForward, input_arg, scale, zero_point, quant_min, quant_max, axis_arg);
  const auto qparams = detail::read_qparams(kForward, scale, zero_point, quant_min, quant_max);
  const at::Tensor input = detail::dense(input_arg);
  at::Tensor output = out.defined() ? out : pooled_empty_like(input, input.scalar_type());
  at::Tensor code = compute_code ? pooled_empty_like(input, at::kByte)
                                 : at::empty({0}, input.options().dtype(at::kByte));
  if (input.numel() == 0) {
    return {output, code};
  }
  ForwardLoopArgs args;
  args.input = input.data_ptr();
  args.output = output.data_ptr();
  args.code = compute_code ? code.data_ptr<uint8_t>() : nullptr;
  args.clamped = record;
  args.dtype = input.scalar_type();
  args.layout = detail::channel_layout(input, axis);
  args.scale = qparams.scale.data();
  args.zero_point = qparams.zero_point.data();
  args.quant_min = quant_min;
  args.quant_max = quant_max;
  run_forward_loop(args);
  return {output, code};
}

std::tuple<at::Tensor, at::Tensor> fake_quantize_forward_kernel(
    const at::Tensor& input, const at::Tensor& scale, const at::Tensor& zero_point,
    int64_t quant_min, int64_t quant_max, c10::optional<int64_t> axis, bool compute_code) {
  return run_forward(input, scale, zero_point, quant_min, quant_max, axis, compute_code, nullptr);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quantize_backward_kernel(
    const at::Tensor& grad_arg, const at::Tensor& saved_arg, const at::Tensor& scale,
    const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max,
    c10::optional<int64_t> axis_arg, bool scale_grad, bool scale_grad_inside, bool zero_point_grad,
    double ewgs_delta) {
  const auto in = detail::prepare_backward(
      kBackward, grad_arg, saved_arg, scale, zero_point, quant_min, quant_max, axis_arg,
      scale_grad_inside, ewgs_delta);
  at::Tensor grad_input = pooled_empty_like(in.grad, in.grad.scalar_type());
  const int64_t channels = static_cast<int64_t>(in.qparams.scale.size());
  // Only asked-for sums are made: a backward that wants neither (the common case of a
  // fixed scale) returns undefined ones and allocates nothing for them.
  const bool reduce = scale_grad || zero_point_grad;
  at::Tensor scale_sums = reduce ? at::zeros({channels}, at::kDouble) : at::Tensor();
  at::Tensor zero_point_sums = reduce ? at::zeros({channels}, at::kDouble) : at::Tensor();
  if (in.grad.numel() > 0) {
    BackwardLoopArgs args;
    args.grad = in.grad.data_ptr();
    args.input = in.from_code ? nullptr : in.saved.data_ptr();
    args.code = in.from_code ? in.saved.data_ptr<uint8_t>() : nullptr;
    args.grad_input = grad_input.data_ptr();
    args.dtype = in.grad.scalar_type();
    args.layout = detail::channel_layout(in.saved, in.axis);
    args.scale = in.qparams.scale.data();
    args.zero_point = in.qparams.zero_point.data();
    args.quant_min = quant_min;
    args.quant_max = quant_max;
    args.scale_grad = scale_grad;
    args.scale_grad_inside = scale_grad_inside;
    args.zero_point_grad = zero_point_grad;
    args.ewgs_delta = ewgs_delta;
    args.grad_scale = reduce ? scale_sums.data_ptr<double>() : nullptr;
    args.grad_zero_point = reduce ? zero_point_sums.data_ptr<double>() : nullptr;
    run_backward_loop(args);
  }
  return detail::backward_result(grad_input, scale_sums, zero_point_sums, scale, zero_point);
}

}  // namespace

std::pair<at::Tensor, c10::optional<at::Tensor>> fake_quantize_forward_positions(
    const at::Tensor& input, const at::Tensor& scale, const at::Tensor& zero_point,
    int64_t quant_min, int64_t quant_max, c10::optional<int64_t> axis) {
  ClampedRecord record;
  auto output = std::get<0>(
      run_forward(input, scale, zero_point, quant_min, quant_max, axis, false, &record));
  return {output, positions_of(record)};
}

at::Tensor fake_quantize_codes(
    const at::Tensor& input, const at::Tensor& scale, const at::Tensor& zero_point,
    int64_t quant_min, int64_t quant_max, c10::optional<int64_t> axis, const at::Tensor& output) {
  return std::get<1>(
      run_forward(input, scale, zero_point, quant_min, quant_max, axis, true, nullptr, output));
}

Capability capability() {
  return current_capability();
}

// The loop `name` of the capability in use. Only the portable loops exist when the build
// had no AVX2 support (CMakeLists.txt).
#if defined(QAT_AVX2_LOOPS)
#define QAT_CAPABILITY_LOOP(name, args) \
  (capability() == Capability::kAvx2 ? AVX2::name(args) : DEFAULT::name(args))
#else
#define QAT_CAPABILITY_LOOP(name, args) DEFAULT::name(args)
#endif

void run_forward_loop(const ForwardLoopArgs& args) {
  QAT_CAPABILITY_LOOP(forward_loop, args);
}

void run_backward_loop(const BackwardLoopArgs& args) {
  QAT_CAPABILITY_LOOP(backward_loop, args);
}

void run_aminmax_loop(const AminmaxLoopArgs& args) {
  QAT_CAPABILITY_LOOP(aminmax_loop, args);
}

void run_observe_forward_loop(const ObserveForwardLoopArgs& args) {
  QAT_CAPABILITY_LOOP(observe_forward_loop, args);
}

void run_clamped_forward_loop(const ClampedForwardLoopArgs& args) {
  QAT_CAPABILITY_LOOP(clamped_forward_loop, args);
}

void run_clamped_backward_loop(const ClampedBackwardLoopArgs& args) {
  QAT_CAPABILITY_LOOP(clamped_backward_loop, args);
}

#undef QAT_CAPABILITY_LOOP

void set_capability(Capability capability) {
  TORCH_CHECK(
      capability == Capability::kDefault || capability <= best_supported_capability(),
      "qat: this processor does not support the ", capability_name(capability), " kernels");
  current_capability() = capability;
}

}  // namespace cpu
}  // namespace qat

TORCH_LIBRARY_IMPL(qat, CPU, m) {
  m.impl("_fake_quantize_forward", &qat::cpu::fake_quantize_forward_kernel);
  m.impl("_fake_quantize_backward", &qat::cpu::fake_quantize_backward_kernel);
}
