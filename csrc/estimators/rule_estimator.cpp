#include "rule_estimator.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cmath>

#include "../ops/cpu/clamped_positions.h"
#include "../ops/fake_quantize_common.h"
#include "../ops/fake_quantize_ops.h"

namespace qat {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

c10::IValue optional_int(c10::optional<int64_t> value) {
  return value.has_value() ? c10::IValue(*value) : c10::IValue();
}

// Whether a rule's backward needs nothing but the forward's codes (no saved input, no
// scale or zero-point gradient, no EWGS).
bool only_codes(const GradientRule& rule) {
  return !rule.save_input && !rule.scale_grad && !rule.zero_point_grad && !rule.ewgs;
}

// One entry per forward argument of RuleFunction; the non-tensor ones get none.
variable_list gradients(at::Tensor input, at::Tensor scale, at::Tensor zero_point) {
  return {std::move(input), std::move(scale), std::move(zero_point), at::Tensor(),
          at::Tensor(),     at::Tensor(),     at::Tensor()};
}

class RuleFunction : public torch::autograd::Function<RuleFunction> {
 public:
  static at::Tensor forward(
      AutogradContext* ctx, const at::Tensor& input, const at::Tensor& scale,
      const at::Tensor& zero_point, const EstimatorArgs& args, const GradientRule& rule,
      double grad_factor, const std::tuple<at::Tensor, at::Tensor>* computed) {
    auto result = computed != nullptr ? *computed
                                      : ops::fake_quantize_forward(
                                            input, scale, zero_point, args.quant_min,
                                            args.quant_max, args.axis, !rule.save_input);
    const auto& code = std::get<1>(result);
    if (only_codes(rule) && code.is_cpu()) {
      // The gradient is g where the code is 0 and needs nothing else: with few clamped
      // elements their positions are the whole record (cpu/clamped_positions.h), and no
      // qparams are kept.
      if (auto positions = cpu::clamped_positions(code)) {
        ctx->save_for_backward({*positions});
        ctx->saved_data["strides"] = code.strides().vec();
        return std::get<0>(result);
      }
    }
    // Observers overwrite their scale and zero point in place on the next forward, which
    // may come before this backward (gradient accumulation, a module called twice): keep
    // the values this forward used. Learned qparams change only in optimizer steps.
    const auto keep = [](const at::Tensor& t) { return t.requires_grad() ? t : t.clone(); };
    ctx->save_for_backward(
        {rule.save_input ? input : std::get<1>(result), keep(scale), keep(zero_point)});
    ctx->saved_data["quant_min"] = args.quant_min;
    ctx->saved_data["quant_max"] = args.quant_max;
    ctx->saved_data["axis"] = optional_int(args.axis);
    ctx->saved_data["scale_grad"] = rule.scale_grad;
    ctx->saved_data["scale_grad_inside"] = rule.scale_grad_inside;
    ctx->saved_data["zero_point_grad"] =
        rule.zero_point_grad && at::isFloatingType(zero_point.scalar_type());
    ctx->saved_data["ewgs_delta"] = rule.ewgs ? args.ewgs_delta : 0.0;
    ctx->saved_data["grad_factor"] = grad_factor;
    return std::get<0>(result);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    TORCH_CHECK(
        !at::GradMode::is_enabled(),
        "qat::fake_quantize: double backward (create_graph=True) is not supported");
    const auto saved = ctx->get_saved_variables();
    if (ctx->saved_data.find("strides") != ctx->saved_data.end()) {
      // Positions are memory offsets in the forward's layout: the gradient is laid out so.
      const auto strides = ctx->saved_data["strides"].toIntVector();
      const auto& grad = grad_outputs[0];
      const auto laid_out =
          grad.strides() == at::IntArrayRef(strides)
              ? grad
              : at::empty_strided(grad.sizes(), strides, grad.options()).copy_(grad);
      return gradients(cpu::mask_clamped(laid_out, saved[0]), at::Tensor(), at::Tensor());
    }
    const auto axis_value = ctx->saved_data["axis"];
    const c10::optional<int64_t> axis =
        axis_value.isNone() ? c10::nullopt : c10::optional<int64_t>(axis_value.toInt());
    const bool want_scale = ctx->saved_data["scale_grad"].toBool() && ctx->needs_input_grad(1);
    const bool want_zero_point =
        ctx->saved_data["zero_point_grad"].toBool() && ctx->needs_input_grad(2);
    auto grads = ops::fake_quantize_backward(
        grad_outputs[0], saved[0], saved[1], saved[2], ctx->saved_data["quant_min"].toInt(),
        ctx->saved_data["quant_max"].toInt(), axis, want_scale,
        want_scale && ctx->saved_data["scale_grad_inside"].toBool(), want_zero_point,
        ctx->saved_data["ewgs_delta"].toDouble());
    const double factor = ctx->saved_data["grad_factor"].toDouble();
    at::Tensor grad_scale = want_scale ? std::get<1>(grads).mul_(factor) : at::Tensor();
    at::Tensor grad_zero_point = want_zero_point ? std::get<2>(grads).mul_(factor) : at::Tensor();
    return gradients(std::get<0>(grads), grad_scale, grad_zero_point);
  }
};

// LSQ's gradient scale 1/sqrt(N * Qp): N elements share each scale, Qp is the number of
// positive levels.
double lsq_grad_factor(const at::Tensor& input, const at::Tensor& scale, const EstimatorArgs& a) {
  const double per_scale = std::max<double>(
      1.0, static_cast<double>(input.numel()) / std::max<int64_t>(1, scale.numel()));
  const double positive_levels =
      static_cast<double>(a.quant_max > 0 ? a.quant_max : a.quant_max - a.quant_min);
  return 1.0 / std::sqrt(per_scale * positive_levels);
}

bool tracks_grad(const at::Tensor& input, const at::Tensor& scale, const at::Tensor& zero_point) {
  return at::GradMode::is_enabled() &&
         (input.requires_grad() || scale.requires_grad() || zero_point.requires_grad());
}

}  // namespace

double RuleEstimator::grad_factor(
    const at::Tensor& input, const at::Tensor& scale, const EstimatorArgs& args) const {
  if (args.grad_scale.has_value()) {
    return *args.grad_scale;
  }
  return rule_.lsq_grad_scale ? lsq_grad_factor(input, scale, args) : 1.0;
}

at::Tensor RuleEstimator::apply(
    const at::Tensor& input, const at::Tensor& scale, const at::Tensor& zero_point,
    const EstimatorArgs& args) const {
  if (!tracks_grad(input, scale, zero_point)) {
    // Inference: no graph, no cached code.
    return std::get<0>(ops::fake_quantize_forward(
        input, scale, zero_point, args.quant_min, args.quant_max, args.axis, false));
  }
  return RuleFunction::apply(
      input, scale, zero_point, args, rule_, grad_factor(input, scale, args), nullptr);
}

bool RuleEstimator::needs_only_codes() const {
  return only_codes(rule_);
}

at::Tensor RuleEstimator::apply_computed(
    const at::Tensor& input, const at::Tensor& scale, const at::Tensor& zero_point,
    const EstimatorArgs& args, const at::Tensor& output, const at::Tensor& code) const {
  TORCH_INTERNAL_ASSERT(needs_only_codes());
  if (!tracks_grad(input, scale, zero_point)) {
    return output;
  }
  TORCH_INTERNAL_ASSERT(code.defined());
  const std::tuple<at::Tensor, at::Tensor> computed{output, code};
  return RuleFunction::apply(
      input, scale, zero_point, args, rule_, grad_factor(input, scale, args), &computed);
}

}  // namespace qat
