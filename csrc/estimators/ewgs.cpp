// Element-wise gradient scaling (Lee et al. 2021): each in-range gradient is scaled by
// 1 + delta * sign(g) * (x/s - round(x/s)), nudging values toward the level the rounding
// picked. Scale and zero point get no gradient.
#include "rule_estimator.h"

namespace {
qat::GradientRule ewgs_rule() {
  qat::GradientRule rule;
  rule.save_input = true;
  rule.ewgs = true;
  return rule;
}
}  // namespace

QAT_REGISTER_RULE_ESTIMATOR(
    "ewgs",
    "EWGS (Lee et al. 2021): in-range gradients scaled by 1 + delta*sign(g)*(x/s - round(x/s)) "
    "(delta = ewgs_delta), zero outside. No scale or zero-point gradient.",
    ewgs_rule());
