// Learned step size quantization (Esser et al. 2020): the scale learns from
// round(x/s) - x/s inside the range and from the clamping bound outside it, with the
// gradient scaled by 1/sqrt(N * Qp) so that the step size trains at the weights' pace.
#include "rule_estimator.h"

namespace {
qat::GradientRule lsq_rule() {
  qat::GradientRule rule;
  rule.save_input = true;
  rule.scale_grad = true;
  rule.scale_grad_inside = true;
  rule.lsq_grad_scale = true;
  return rule;
}
}  // namespace

QAT_REGISTER_RULE_ESTIMATOR(
    "lsq",
    "Learned step size (Esser et al. 2020): STE for the input; scale gradient "
    "round(x/s) - x/s in range, (bound - zero_point) outside, scaled by 1/sqrt(N*Qp).",
    lsq_rule());
