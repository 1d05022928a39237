// Schemas of the qat operators and the estimator-dispatching entry point.
//
// qat::fake_quantize is CompositeImplicitAutograd: it validates its arguments, looks up
// the estimator, and lets the estimator record its own backward. The estimators build
// on two per-device operators, _fake_quantize_forward and _fake_quantize_backward,
// whose CPU and CUDA kernels live in cpu/ and cuda/.

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cmath>

#include <qat/estimator.h>
#include <qat/fake_quantize.h>

#include "fake_quantize_common.h"
#include "fake_quantize_ops.h"

namespace qat {

namespace {

at::Tensor fake_quantize_composite(
    const at::Tensor& input, const at::Tensor& scale, const at::Tensor& zero_point,
    int64_t quant_min, int64_t quant_max, c10::optional<int64_t> axis, c10::string_view estimator,
    c10::optional<double> grad_scale, double ewgs_delta) {
  constexpr const char* op = "qat::fake_quantize";
  EstimatorArgs args;
  args.quant_min = quant_min;
  args.quant_max = quant_max;
  args.axis = detail::check_arguments(op, input, scale, zero_point, quant_min, quant_max, axis);
  TORCH_CHECK(
      !grad_scale.has_value() || (std::isfinite(*grad_scale) && *grad_scale >= 0.0), op,
      ": grad_scale must be finite and non-negative, got ", *grad_scale);
  TORCH_CHECK(
      std::isfinite(ewgs_delta) && ewgs_delta >= 0.0, op,
      ": ewgs_delta must be finite and non-negative, got ", ewgs_delta);
  // Every estimator, built in or registered from Python, gets checked qparam values.
  detail::read_qparams(op, scale, zero_point, quant_min, quant_max);
  args.grad_scale = grad_scale;
  args.ewgs_delta = ewgs_delta;
  // Per-tensor qparams may live on the CPU while the input is on an accelerator.
  const auto device = input.device();
  return EstimatorRegistry::global()
      .get(std::string(estimator.data(), estimator.size()))
      ->apply(input, scale.to(device), zero_point.to(device), args);
}

}  // namespace

at::Tensor fake_quantize(
    const at::Tensor& input, const at::Tensor& scale, const at::Tensor& zero_point,
    int64_t quant_min, int64_t quant_max, c10::optional<int64_t> axis, const std::string& estimator,
    c10::optional<double> grad_scale, double ewgs_delta) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("qat::fake_quantize", "")
                       .typed<decltype(fake_quantize_composite)>();
  return op.call(
      input, scale, zero_point, quant_min, quant_max, axis, estimator, grad_scale, ewgs_delta);
}

const char* version() {
  return QAT_VERSION_STRING;
}

namespace ops {

std::tuple<at::Tensor, at::Tensor> fake_quantize_forward(
    const at::Tensor& input, const at::Tensor& scale, const at::Tensor& zero_point,
    int64_t quant_min, int64_t quant_max, c10::optional<int64_t> axis, bool compute_code) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("qat::_fake_quantize_forward", "")
                       .typed<decltype(fake_quantize_forward)>();
  return op.call(input, scale, zero_point, quant_min, quant_max, axis, compute_code);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quantize_backward(
    const at::Tensor& grad, const at::Tensor& saved, const at::Tensor& scale,
    const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max, c10::optional<int64_t> axis,
    bool scale_grad, bool scale_grad_inside, bool zero_point_grad, double ewgs_delta) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("qat::_fake_quantize_backward", "")
                       .typed<decltype(fake_quantize_backward)>();
  return op.call(
      grad, saved, scale, zero_point, quant_min, quant_max, axis, scale_grad, scale_grad_inside,
      zero_point_grad, ewgs_delta);
}

}  // namespace ops
}  // namespace qat

TORCH_LIBRARY(qat, m) {
  m.def(
      "fake_quantize(Tensor input, Tensor scale, Tensor zero_point, int quant_min, "
      "int quant_max, int? axis=None, str estimator=\"ste\", float? grad_scale=None, "
      "float ewgs_delta=0.001) -> Tensor",
      torch::dispatch(
          c10::DispatchKey::CompositeImplicitAutograd, TORCH_FN(qat::fake_quantize_composite)));
  m.def(
      "_fake_quantize_forward(Tensor input, Tensor scale, Tensor zero_point, int quant_min, "
      "int quant_max, int? axis, bool compute_code) -> (Tensor, Tensor)");
  m.def(
      "_fake_quantize_backward(Tensor grad, Tensor saved, Tensor scale, Tensor zero_point, "
      "int quant_min, int quant_max, int? axis, bool scale_grad, bool scale_grad_inside, "
      "bool zero_point_grad, float ewgs_delta) -> (Tensor, Tensor, Tensor)");
}
