// LSQ+ (Bhalgat et al. 2020): LSQ with a learned offset. A floating-point zero point
// receives -scale * g from every clamped element (in-range outputs do not depend on it);
// the same 1/sqrt(N * Qp) factor scales both gradients.
#include "rule_estimator.h"

namespace {
qat::GradientRule lsq_plus_rule() {
  qat::GradientRule rule;
  rule.save_input = true;
  rule.scale_grad = true;
  rule.scale_grad_inside = true;
  rule.zero_point_grad = true;
  rule.lsq_grad_scale = true;
  return rule;
}
}  // namespace

QAT_REGISTER_RULE_ESTIMATOR(
    "lsq_plus",
    "LSQ+ (Bhalgat et al. 2020): learned scale as LSQ and learned offset; a floating-point "
    "zero_point gets -scale per clamped element, both scaled by 1/sqrt(N*Qp).",
    lsq_plus_rule());
