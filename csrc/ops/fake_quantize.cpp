// Schemas of the qat operators and the estimator-dispatching entry point.
//
// qat::fake_quantize is CompositeImplicitAutograd: it validates its arguments, looks up
// the estimator, and lets the estimator record its own backward. The estimators build
// on two per-device operators, _fake_quantize_forward and _fake_quantize_backward,
// whose CPU and CUDA kernels live in cpu/ and cuda/.

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <torch/library.h>

#include <cmath>
#include <sstream>
#include <string>

#include <qat/estimator.h>
#include <qat/fake_quantize.h>

#include "fake_quantize_common.h"
#include "fake_quantize_ops.h"

namespace qat {

namespace {

std::string describe(const at::Tensor& t) {
  std::ostringstream out;
  out << "shape " << t.sizes() << ", " << t.scalar_type() << " on " << t.device();
  return out.str();
}

// A scale or zero point that requires grad gets none from an estimator that does not
// learn it; PyTorch's learnable fake-quantize raises there too, instead of training
// nothing without a word.
void check_learns(
    const char* op, const EstimatorRegistry& registry, const std::string& name,
    bool scale_requires_grad, bool zero_point_requires_grad) {
  const auto info = registry.info(name);
  const bool scale_missed = scale_requires_grad && !info.learns_scale;
  if (!scale_missed && !(zero_point_requires_grad && !info.learns_zero_point)) {
    return;
  }
  std::ostringstream learners;
  for (const auto& other : registry.names()) {
    const auto other_info = registry.info(other);
    if (scale_missed ? other_info.learns_scale : other_info.learns_zero_point) {
      learners << (learners.tellp() > 0 ? ", " : "") << other;
    }
  }
  const char* what = scale_missed ? "scale" : "zero_point";
  TORCH_CHECK(
      false, op, ": ", what, " requires grad, but estimator '", name, "' does not learn the ", what,
      " (no gradient would reach it); use an estimator that does (", learners.str(), ") or pass a ",
      what, " that does not require grad");
}

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
  const std::string name(estimator.data(), estimator.size());
  auto& registry = EstimatorRegistry::global();
  const auto chosen = registry.get(name);
  if (at::GradMode::is_enabled() && (scale.requires_grad() || zero_point.requires_grad())) {
    check_learns(op, registry, name, scale.requires_grad(), zero_point.requires_grad());
  }
  // Per-tensor qparams may live on the CPU while the input is on an accelerator.
  const auto device = input.device();
  auto output = chosen->apply(input, scale.to(device), zero_point.to(device), args);
  // A registered estimator is user code: what it returns must stand in for the input.
  TORCH_CHECK(
      output.defined() && output.sizes() == input.sizes() &&
          output.scalar_type() == input.scalar_type() && output.device() == input.device(),
      op, ": estimator '", name, "' returned ",
      output.defined() ? describe(output) : std::string("an undefined tensor"), " for an input of ",
      describe(input),
      "; it must return a tensor of the input's shape, "
      "dtype and device");
  return output;
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
