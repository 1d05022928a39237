// PACT (Choi et al. 2018): a learned clipping level alpha = scale * (quant_max - zero_point).
// Inside the range the output is treated as the input itself, so only clamped elements
// teach the clipping level; the cached one-byte code is all the backward reads.
#include "rule_estimator.h"

namespace {
qat::GradientRule pact_rule() {
  qat::GradientRule rule;
  rule.scale_grad = true;
  return rule;
}
}  // namespace

QAT_REGISTER_RULE_ESTIMATOR(
    "pact",
    "PACT (Choi et al. 2018): learned clipping level; STE for the input, scale gradient "
    "(bound - zero_point) from clamped elements only.",
    pact_rule());
