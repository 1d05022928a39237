// Estimator gradients against finite differences in float64, and the registry.
//
// An estimator's scale / zero-point gradient is the exact derivative of a surrogate in
// which the rounding residual and the in/out-of-range class of every element are frozen
// at the evaluation point (the straight-through assumption):
//   in range:  y = s * (x/s + c),           c = round(x/s0) - x/s0 fixed   (LSQ)
//              y = x                                                        (PACT)
//   clamped:   y = s * (bound - z)          bound = quant_min or quant_max
// Central differences of sum(g * y) must match the gradient the op returns.

#include <catch2/catch.hpp>
#include <torch/torch.h>

#include <qat/qat.h>

#include <cmath>

namespace {

struct Frozen {
  torch::Tensor inside, below, above, residual;
};

Frozen freeze(const torch::Tensor& x, double s, double z, int64_t qmin, int64_t qmax) {
  const auto v = x / s;
  const auto q = torch::round(v) + z;
  return {(q >= qmin) & (q <= qmax), q<qmin, q> qmax, torch::round(v) - v};
}

// sum(g * y) of the surrogate at (s, z), classes and residuals taken from `f`.
double surrogate(
    const torch::Tensor& x, const torch::Tensor& g, const Frozen& f, double s, double z,
    int64_t qmin, int64_t qmax, bool lsq_inside) {
  const auto in = lsq_inside ? s * (x / s + f.residual) : x;
  const auto y = torch::where(
      f.inside, in,
      torch::where(
          f.below, torch::full_like(x, s * (qmin - z)), torch::full_like(x, s * (qmax - z))));
  return (g * y).sum().item<double>();
}

struct Case {
  const char* estimator;
  bool lsq_inside;
  bool zero_point;
};

}  // namespace

CATCH_TEST_CASE(
    "scale and zero-point gradients match finite differences of the surrogate",
    "[estimators][gradients]") {
  torch::manual_seed(4);
  const int64_t qmin = -8;
  const int64_t qmax = 7;
  const double s0 = 0.25;
  const double z0 = 2.0;
  const auto x = torch::randn({2000}, torch::kDouble) * 1.5;
  const auto g = torch::randn({2000}, torch::kDouble);
  const double h = 1e-7;
  for (const Case c :
       {Case{"lsq", true, false}, Case{"lsq_plus", true, true}, Case{"pact", false, false}}) {
    CATCH_DYNAMIC_SECTION(c.estimator) {
      auto s = torch::tensor({s0}, torch::kDouble).requires_grad_();
      auto z = torch::tensor({z0}, torch::kDouble).requires_grad_(c.zero_point);
      const auto xr = x.clone().requires_grad_();
      qat::fake_quantize(xr, s, z, qmin, qmax, c10::nullopt, c.estimator, 1.0).backward(g);
      const auto f = freeze(x, s0, z0, qmin, qmax);
      const double fd_s = (surrogate(x, g, f, s0 + h, z0, qmin, qmax, c.lsq_inside) -
                           surrogate(x, g, f, s0 - h, z0, qmin, qmax, c.lsq_inside)) /
                          (2 * h);
      CATCH_CHECK(s.grad().item<double>() == Approx(fd_s).epsilon(1e-6));
      if (c.zero_point) {
        const double fd_z = (surrogate(x, g, f, s0, z0 + h, qmin, qmax, c.lsq_inside) -
                             surrogate(x, g, f, s0, z0 - h, qmin, qmax, c.lsq_inside)) /
                            (2 * h);
        CATCH_CHECK(z.grad().item<double>() == Approx(fd_z).epsilon(1e-6));
      }
      // Both the in-range and the clamped terms were exercised.
      CATCH_CHECK(f.inside.any().item<bool>());
      CATCH_CHECK((f.below | f.above).any().item<bool>());
    }
  }
}

CATCH_TEST_CASE(
    "per-channel scale gradients match finite differences channel by channel",
    "[estimators][gradients]") {
  torch::manual_seed(5);
  const auto x = torch::randn({6, 3, 50}, torch::kDouble) * 2;
  const auto g = torch::randn({6, 3, 50}, torch::kDouble);
  const std::vector<double> scales{0.1, 0.3, 0.05};
  auto s = torch::tensor(scales, torch::kDouble).requires_grad_();
  const auto z = torch::tensor({0, 1, -2}, torch::kInt);
  qat::fake_quantize(x, s, z, -16, 15, 1, "lsq", 1.0).backward(g);
  const double h = 1e-7;
  for (int64_t c = 0; c < 3; ++c) {
    const auto xc = x.select(1, c);
    const auto gc = g.select(1, c);
    const double zc = z[c].item<double>();
    const auto f = freeze(xc, scales[c], zc, -16, 15);
    const double fd = (surrogate(xc, gc, f, scales[c] + h, zc, -16, 15, true) -
                       surrogate(xc, gc, f, scales[c] - h, zc, -16, 15, true)) /
                      (2 * h);
    CATCH_CHECK(s.grad()[c].item<double>() == Approx(fd).epsilon(1e-6));
  }
}

CATCH_TEST_CASE("LSQ scales its gradient by 1/sqrt(N * Qp) unless told otherwise", "[estimators]") {
  const auto x = torch::randn({4, 100}, torch::kDouble);
  auto grad_with = [&](c10::optional<double> factor) {
    auto s = torch::tensor({0.2}, torch::kDouble).requires_grad_();
    qat::fake_quantize(x, s, torch::tensor({0}), -128, 127, c10::nullopt, "lsq", factor)
        .sum()
        .backward();
    return s.grad().item<double>();
  };
  CATCH_CHECK(grad_with(c10::nullopt) == Approx(grad_with(1.0) / std::sqrt(400.0 * 127.0)));
}

CATCH_TEST_CASE(
    "EWGS scales in-range gradients by 1 + delta * sign(g) * (x/s - round(x/s))", "[estimators]") {
  const auto x = torch::randn({500}, torch::kDouble) * 2;
  const auto g = torch::randn({500}, torch::kDouble);
  const auto xr = x.clone().requires_grad_();
  const double s = 0.1;
  const double delta = 0.2;
  qat::fake_quantize(
      xr, torch::tensor({s}), torch::tensor({0}), -16, 15, c10::nullopt, "ewgs", c10::nullopt,
      delta)
      .backward(g);
  const auto v = x * static_cast<double>(1.0f / static_cast<float>(s));
  const auto inside = (torch::round(v) >= -16) & (torch::round(v) <= 15);
  const auto expected = torch::where(
      inside, g * (1 + delta * torch::sign(g) * (v - torch::round(v))), torch::zeros_like(g));
  CATCH_CHECK(torch::allclose(xr.grad(), expected, 1e-12, 1e-12));
}

CATCH_TEST_CASE(
    "estimators without learned qparams refuse a scale that requires grad", "[estimators]") {
  for (const char* name : {"ste", "ewgs"}) {
    auto s = torch::tensor({0.2}).requires_grad_();
    const auto x = torch::randn({10}).requires_grad_();
    // No gradient would reach the scale: refused, naming the estimators that learn it.
    CATCH_CHECK_THROWS_WITH(
        qat::fake_quantize(x, s, torch::tensor({0}), 0, 255, c10::nullopt, name),
        Catch::Contains(
            std::string("scale requires grad, but estimator '") + name +
            "' does not learn the scale") &&
            Catch::Contains("(lsq, lsq_plus, pact)"));
    qat::fake_quantize(x, s.detach(), torch::tensor({0}), 0, 255, c10::nullopt, name)
        .sum()
        .backward();
    CATCH_CHECK(x.grad().defined());
  }
}

namespace {

// Halves the incoming gradient everywhere: a user-defined rule registered from C++.
class HalfGradient final : public qat::Estimator {
 public:
  at::Tensor apply(
      const at::Tensor& input, const at::Tensor& scale, const at::Tensor& zp,
      const qat::EstimatorArgs& args) const override {
    const auto fq = qat::fake_quantize(
        input.detach(), scale, zp, args.quant_min, args.quant_max, args.axis, "ste");
    return fq + 0.5 * (input - input.detach());
  }
};

QAT_REGISTER_ESTIMATOR(
    (qat::EstimatorInfo{"test_half_gradient", "halves gradients", false, false}),
    std::make_shared<HalfGradient>());

}  // namespace

CATCH_TEST_CASE("the registry lists, finds, extends and refuses", "[registry]") {
  auto& registry = qat::EstimatorRegistry::global();
  for (const char* name : {"ste", "lsq", "lsq_plus", "pact", "ewgs", "test_half_gradient"}) {
    CATCH_CHECK(registry.contains(name));
  }
  CATCH_CHECK(registry.info("lsq").learns_scale);
  CATCH_CHECK(registry.info("lsq_plus").learns_zero_point);
  CATCH_CHECK_FALSE(registry.info("ste").learns_scale);

  const auto x = torch::randn({8}).requires_grad_();
  qat::fake_quantize(
      x, torch::tensor({0.1f}), torch::tensor({0}), -128, 127, c10::nullopt, "test_half_gradient")
      .sum()
      .backward();
  CATCH_CHECK(torch::equal(x.grad(), torch::full({8}, 0.5f)));

  CATCH_CHECK_THROWS_WITH(
      registry.add({"ste", "again", false, false}, std::make_shared<HalfGradient>()),
      Catch::Matchers::Contains("already registered"));
  CATCH_CHECK_THROWS_WITH(registry.get("missing"), Catch::Matchers::Contains("known estimators"));
  registry.add({"temporary", "", false, false}, std::make_shared<HalfGradient>());
  CATCH_CHECK(registry.remove("temporary"));
  CATCH_CHECK_FALSE(registry.contains("temporary"));
  CATCH_CHECK_FALSE(registry.remove("temporary"));
}

CATCH_TEST_CASE("double backward is refused", "[estimators]") {
  const auto x = torch::randn({5}).requires_grad_();
  const auto y = qat::fake_quantize(x, torch::tensor({0.1f}), torch::tensor({0}), 0, 255);
  CATCH_CHECK_THROWS_WITH(
      torch::autograd::grad({y.sum()}, {x}, {}, true, true),
      Catch::Matchers::Contains("double backward"));
}
