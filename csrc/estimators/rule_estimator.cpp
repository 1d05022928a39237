#include "rule_estimator.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/variable.h>

#include <cmath>
#include <memory>
#include <type_traits>
#include <utility>

#include "../ops/cpu/buffer_pool.h"
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

// Whether `grad` is referenced by nothing but the caller's handle, its storage by nothing
// but it (and, for a view, its otherwise unreferenced base, as mm's backward hands a
// Linear weight its gradient): then writing into it changes no other tensor.
bool held_alone(const at::Tensor& grad) {
  if (grad.use_count() != 1) {
    return false;
  }
  const auto* view = torch::autograd::impl::get_view_autograd_meta(grad);
  if (view == nullptr) {
    return grad.storage().use_count() == 1;
  }
  // A view for forward-mode AD only has no base to count: left alone.
  return view->has_bw_view() && view->get_backward_view().base_.use_count() == 1 &&
         grad.storage().use_count() == 2;
}

// The backward of a straight-through fake-quantize whose forward clamped few elements
// (cpu/clamped_positions.h): the gradient passes unchanged except at their positions. An
// autograd node of its own rather than a Function: the engine moves the incoming gradient
// into apply(), so when nothing else holds it (the usual case: a conv's or linear's fresh
// weight gradient) the positions are written into it and no copy is made, as
// AccumulateGrad steals a gradient.
class ClampedPositionsBackward : public torch::autograd::Node {
 public:
  ClampedPositionsBackward(at::Tensor positions, std::vector<int64_t> strides)
      : positions_(std::move(positions)), strides_(std::move(strides)) {}

  std::string name() const override {
    return "qat::FakeQuantizeBackward";
  }

  variable_list apply(variable_list&& grads) override {
    TORCH_CHECK(
        !at::GradMode::is_enabled(),
        "qat::fake_quantize: double backward (create_graph=True) is not supported");
    TORCH_CHECK(
        positions_.defined(),
        "qat::fake_quantize: its backward was already run and freed (retain_graph=True keeps "
        "it for a second backward)");
    at::Tensor grad = std::move(grads[0]);
    if (grad.defined() && positions_.numel() > 0) {
      // Positions are memory offsets in the forward's layout: the gradient written into
      // must be laid out so.
      if (grad.strides() != at::IntArrayRef(strides_)) {
        grad = at::empty_strided(grad.sizes(), strides_, grad.options()).copy_(grad);
      } else if (!held_alone(grad)) {
        grad = cpu::pooled_empty_like(grad, grad.scalar_type()).copy_(grad);
      }
      cpu::mask_clamped_(grad, positions_);
    }
    return {std::move(grad), at::Tensor(), at::Tensor()};
  }

  void release_variables() override {
    positions_.reset();
  }

 private:
  at::Tensor positions_;
  std::vector<int64_t> strides_;
};

// Autograd holds its nodes by std::shared_ptr in PyTorch 1.13 and by c10::intrusive_ptr
// in 2.15 (changed in 2026): a node is made as whichever an Edge holds.
using NodeHandle = decltype(torch::autograd::Edge::function);

template <typename T, typename... Args>
NodeHandle make_node(Args&&... args) {
  if constexpr (std::is_same_v<NodeHandle, std::shared_ptr<torch::autograd::Node>>) {
    return std::make_shared<T>(std::forward<Args>(args)...);
  } else {
    return c10::make_intrusive<T>(std::forward<Args>(args)...);
  }
}

// The forward's output (computed without a graph) with the backward above as its history.
at::Tensor with_clamped_positions(
    const at::Tensor& input, const at::Tensor& scale, const at::Tensor& zero_point,
    at::Tensor output, at::Tensor positions, at::IntArrayRef strides) {
  TORCH_INTERNAL_ASSERT(!output.requires_grad());
  const auto node = make_node<ClampedPositionsBackward>(std::move(positions), strides.vec());
  node->set_next_edges(torch::autograd::collect_next_edges(input, scale, zero_point));
  torch::autograd::set_history(output, node);
  return output;
}

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

// The autograd record of a CPU forward computed without a graph: the clamped positions
// where they are the whole record, else RuleFunction with the codes (computed here: rare, a
// tensor clamped in more than one element in 64).
at::Tensor RuleEstimator::record(
    const at::Tensor& input, const at::Tensor& scale, const at::Tensor& zero_point,
    const EstimatorArgs& args, const at::Tensor& output,
    const c10::optional<at::Tensor>& positions) const {
  if (positions.has_value()) {
    return with_clamped_positions(input, scale, zero_point, output, *positions, output.strides());
  }
  std::tuple<at::Tensor, at::Tensor> result;
  {
    const at::AutoGradMode no_graph(false);
    result = {output, cpu::fake_quantize_codes(
                          input, scale, zero_point, args.quant_min, args.quant_max, args.axis,
                          output)};
  }
  return RuleFunction::apply(
      input, scale, zero_point, args, rule_, grad_factor(input, scale, args), &result);
}

at::Tensor RuleEstimator::apply(
    const at::Tensor& input, const at::Tensor& scale, const at::Tensor& zero_point,
    const EstimatorArgs& args) const {
  if (!tracks_grad(input, scale, zero_point)) {
    // Inference: no graph, no cached code.
    return std::get<0>(ops::fake_quantize_forward(
        input, scale, zero_point, args.quant_min, args.quant_max, args.axis, false));
  }
  if (!needs_only_codes() || !input.is_cpu()) {
    return RuleFunction::apply(
        input, scale, zero_point, args, rule_, grad_factor(input, scale, args), nullptr);
  }
  std::pair<at::Tensor, c10::optional<at::Tensor>> result;
  {
    const at::AutoGradMode no_graph(false);
    result = cpu::fake_quantize_forward_positions(
        input, scale, zero_point, args.quant_min, args.quant_max, args.axis);
  }
  return record(input, scale, zero_point, args, result.first, result.second);
}

bool RuleEstimator::needs_only_codes() const {
  return only_codes(rule_);
}

at::Tensor RuleEstimator::apply_computed(
    const at::Tensor& input, const at::Tensor& scale, const at::Tensor& zero_point,
    const EstimatorArgs& args, const at::Tensor& output,
    const c10::optional<at::Tensor>& positions) const {
  TORCH_INTERNAL_ASSERT(needs_only_codes() && input.is_cpu());
  if (!tracks_grad(input, scale, zero_point)) {
    return output;
  }
  return record(input, scale, zero_point, args, output, positions);
}

}  // namespace qat
