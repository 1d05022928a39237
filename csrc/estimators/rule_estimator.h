#pragma once

// The built-in estimators share one forward (the fake-quantize kernel) and one fused
// backward kernel; a GradientRule says which gradients that kernel computes.

#include <c10/util/Optional.h>
#include <qat/estimator.h>

namespace qat {

struct GradientRule {
  // Recompute from the saved input (needed for in-range scale gradients and EWGS)
  // instead of caching one byte per element in the forward.
  bool save_input = false;
  // Clamped elements send (bound - zero_point) * g to the scale.
  bool scale_grad = false;
  // In-range elements send (round(x/s) - x/s) * g to the scale (LSQ).
  bool scale_grad_inside = false;
  // Clamped elements send -scale * g to a floating-point zero point (LSQ+).
  bool zero_point_grad = false;
  // Default gradient factor 1/sqrt(N * Qp) (LSQ) rather than 1.
  bool lsq_grad_scale = false;
  // Scale in-range input gradients by 1 + delta * sign(g) * (x/s - round(x/s)).
  bool ewgs = false;
};

class RuleEstimator final : public Estimator {
 public:
  explicit RuleEstimator(GradientRule rule) : rule_(rule) {}
  at::Tensor apply(
      const at::Tensor& input, const at::Tensor& scale, const at::Tensor& zero_point,
      const EstimatorArgs& args) const override;

  // Whether the backward needs nothing but the forward's codes (no saved input, no scale
  // or zero-point gradient), so that a caller may compute the forward itself.
  bool needs_only_codes() const;

  // `apply` on the CPU with the forward already computed, as qat::_fake_quantize_forward
  // computes it for these arguments: `output`, and the offsets of the elements it clamped
  // (cpu/clamped_positions.h; nullopt when there were too many or autograd does not record
  // this call).
  at::Tensor apply_computed(
      const at::Tensor& input, const at::Tensor& scale, const at::Tensor& zero_point,
      const EstimatorArgs& args, const at::Tensor& output,
      const c10::optional<at::Tensor>& positions) const;

 private:
  double grad_factor(
      const at::Tensor& input, const at::Tensor& scale, const EstimatorArgs& args) const;
  at::Tensor record(
      const at::Tensor& input, const at::Tensor& scale, const at::Tensor& zero_point,
      const EstimatorArgs& args, const at::Tensor& output,
      const c10::optional<at::Tensor>& positions) const;

  GradientRule rule_;
};

// Registers a rule-based estimator at load time.
#define QAT_REGISTER_RULE_ESTIMATOR(NAME, DESCRIPTION, RULE)                                \
  QAT_REGISTER_ESTIMATOR(                                                                   \
      (::qat::EstimatorInfo{NAME, DESCRIPTION, (RULE).scale_grad, (RULE).zero_point_grad}), \
      std::make_shared<::qat::RuleEstimator>(RULE))

}  // namespace qat
