// Straight-through estimator (Bengio et al. 2013; the rule of Jacob et al. 2018): the
// gradient passes unchanged where the input fell inside the clamping range and is zero
// where it was clamped. Scale and zero point get no gradient.
#include "rule_estimator.h"

namespace {
constexpr qat::GradientRule kSte{};
}  // namespace

QAT_REGISTER_RULE_ESTIMATOR(
    "ste",
    "Straight-through estimator: gradient passes inside the clamping range, zero outside "
    "(Jacob et al. 2018). No scale or zero-point gradient.",
    kSte);
