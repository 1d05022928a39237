// The fake-quantize kernels against a scalar reference written here from the
// definition: out = (clamp(nearbyint(x * (1/s)) + z, qmin, qmax) - z) * s.

#include <catch2/catch.hpp>
#include <torch/torch.h>

#include <qat/qat.h>

#include <cmath>
#include <limits>

#include "ops/cpu/fake_quantize_loops.h"

namespace {

// One element, in double unless the input is float-like, where x * (1/s) is float math.
double reference_element(double x, float s, double z, int64_t qmin, int64_t qmax, bool wide) {
  const float inv = 1.0f / s;
  const double v =
      wide ? x * static_cast<double>(inv) : static_cast<double>(static_cast<float>(x) * inv);
  if (std::isnan(v)) {
    return std::numeric_limits<double>::quiet_NaN();
  }
  const double q = std::min<double>(qmax, std::max<double>(qmin, std::nearbyint(v) + z));
  return (q - z) * static_cast<double>(s);
}

// Reference over a whole tensor, channel by channel along `axis` (or per tensor).
torch::Tensor reference(
    const torch::Tensor& x, const torch::Tensor& scale, const torch::Tensor& zp, int64_t qmin,
    int64_t qmax, c10::optional<int64_t> axis) {
  const bool wide = x.scalar_type() == torch::kDouble;
  auto xd = x.to(torch::kDouble).contiguous();
  auto out = torch::empty_like(xd);
  const auto s = scale.to(torch::kFloat).contiguous();
  const auto z = zp.to(torch::kDouble).contiguous();
  const int64_t dim = x.dim();
  const int64_t ax = axis.has_value() ? (*axis < 0 ? *axis + dim : *axis) : -1;
  const int64_t inner = ax >= 0 ? xd.stride(ax) : xd.numel();
  const int64_t channels = ax >= 0 ? x.size(ax) : 1;
  const double* xp = xd.data_ptr<double>();
  double* op = out.data_ptr<double>();
  for (int64_t i = 0; i < xd.numel(); ++i) {
    const int64_t c = ax >= 0 ? (i / inner) % channels : 0;
    op[i] =
        reference_element(xp[i], s.data_ptr<float>()[c], z.data_ptr<double>()[c], qmin, qmax, wide);
  }
  return out.to(x.scalar_type());
}

// Runs a test body once with each CPU capability the processor supports.
template <typename F>
void for_each_capability(F&& body) {
  const auto best = qat::cpu::best_supported_capability();
  for (const auto cap : {qat::cpu::Capability::kDefault, qat::cpu::Capability::kAvx2}) {
    if (cap == qat::cpu::Capability::kAvx2 && best != cap) {
      continue;
    }
    qat::cpu::set_capability(cap);
    CATCH_DYNAMIC_SECTION("capability " << qat::cpu::capability_name(cap)) {
      body();
    }
  }
  qat::cpu::set_capability(best);
}

bool same(const torch::Tensor& a, const torch::Tensor& b) {
  // NaN == NaN here: both sides must agree on where NaN is.
  return a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type() &&
         torch::equal(
             torch::nan_to_num(a, 1e30, 2e30, -2e30), torch::nan_to_num(b, 1e30, 2e30, -2e30)) &&
         torch::equal(torch::isnan(a), torch::isnan(b));
}

}  // namespace

CATCH_TEST_CASE("per-tensor forward equals the scalar reference", "[forward]") {
  for_each_capability([] {
    torch::manual_seed(1);
    for (const auto dtype : {torch::kFloat, torch::kDouble, torch::kHalf, torch::kBFloat16}) {
      for (const auto& range : std::vector<std::pair<int64_t, int64_t>>{
               {-128, 127}, {0, 255}, {-127, 127}, {-8, 7}, {0, 3}, {-2, 1}, {0, 65535}}) {
        // Odd length exercises the vector tail; exact halves exercise ties.
        auto x = (torch::randn({1037}) * 20).to(dtype);
        const auto s = torch::tensor({0.0625f});
        x.slice(0, 0, 64).copy_((torch::arange(64) - 32.5) * 0.0625);
        const auto zp = torch::tensor({(range.first + range.second) / 2}, torch::kInt);
        const auto out = qat::fake_quantize(x, s, zp, range.first, range.second);
        CATCH_INFO("dtype " << dtype << " range [" << range.first << ", " << range.second << "]");
        CATCH_CHECK(same(out, reference(x, s, zp, range.first, range.second, c10::nullopt)));
      }
    }
  });
}

CATCH_TEST_CASE("per-channel forward equals the reference on every axis and layout", "[forward]") {
  for_each_capability([] {
    torch::manual_seed(2);
    const auto x = torch::randn({3, 5, 7, 67}) * 4;
    for (int64_t axis = -4; axis < 4; ++axis) {
      const int64_t channels = x.size(axis);
      const auto s = torch::rand({channels}) * 0.1 + 0.01;
      const auto zp = torch::randint(-20, 20, {channels}, torch::kInt);
      const auto expected = reference(x, s, zp, -128, 127, axis);
      CATCH_INFO("axis " << axis);
      CATCH_CHECK(same(qat::fake_quantize(x, s, zp, -128, 127, axis), expected));
      // Channels-last memory and a transposed view give the same values.
      const auto cl = x.contiguous(torch::MemoryFormat::ChannelsLast);
      const auto out_cl = qat::fake_quantize(cl, s, zp, -128, 127, axis);
      CATCH_CHECK(out_cl.is_contiguous(torch::MemoryFormat::ChannelsLast));
      CATCH_CHECK(same(out_cl.contiguous(), expected));
      const auto strided = x.transpose(0, 3).contiguous().transpose(0, 3);
      CATCH_CHECK(same(qat::fake_quantize(strided, s, zp, -128, 127, axis).contiguous(), expected));
      const auto sliced = torch::randn({3, 5, 7, 134}).slice(3, 0, 134, 2);
      CATCH_CHECK(same(
          qat::fake_quantize(sliced, s, zp, -128, 127, axis),
          reference(sliced.contiguous(), s, zp, -128, 127, axis)));
    }
  });
}

CATCH_TEST_CASE("NaN propagates; infinities saturate; empty tensors pass through", "[forward]") {
  for_each_capability([] {
    const float inf = std::numeric_limits<float>::infinity();
    const auto x = torch::tensor({std::nanf(""), inf, -inf, 1.0f});
    const auto out = qat::fake_quantize(x, torch::tensor({0.5f}), torch::tensor({3}), 0, 15);
    CATCH_CHECK(std::isnan(out[0].item<float>()));
    CATCH_CHECK(out[1].item<float>() == (15 - 3) * 0.5f);
    CATCH_CHECK(out[2].item<float>() == (0 - 3) * 0.5f);
    CATCH_CHECK(out[3].item<float>() == 1.0f);
    const auto empty = torch::empty({0, 4});
    CATCH_CHECK(
        qat::fake_quantize(empty, torch::tensor({1.0f}), torch::tensor({0}), 0, 255).sizes() ==
        empty.sizes());
    CATCH_CHECK(
        qat::fake_quantize(empty, torch::ones({4}), torch::zeros({4}), 0, 255, 1).numel() == 0);
  });
}

CATCH_TEST_CASE("STE gradient is one inside the range and zero where clamped", "[backward]") {
  for_each_capability([] {
    torch::manual_seed(3);
    for (const auto dtype : {torch::kFloat, torch::kDouble, torch::kHalf}) {
      const auto x = (torch::randn({4, 6, 33}) * 3).to(dtype).requires_grad_();
      const auto s = torch::rand({6}) * 0.05 + 0.01;
      const auto zp = torch::randint(-3, 3, {6}, torch::kInt);
      const auto g = torch::randn({4, 6, 33}).to(dtype);
      qat::fake_quantize(x, s, zp, -8, 7, 1).backward(g);
      // x * (1/s): the reciprocal in float32, the product in the input's math type.
      const auto math = dtype == torch::kDouble ? torch::kDouble : torch::kFloat;
      const auto inv = (1.0 / s.to(torch::kFloat)).to(math).view({1, 6, 1});
      const auto v = x.detach().to(math) * inv;
      const auto q = torch::round(v) + zp.view({1, 6, 1});
      const auto inside = (q >= -8) & (q <= 7);
      CATCH_INFO("dtype " << dtype);
      CATCH_CHECK(torch::equal(x.grad(), (g * inside).to(dtype)));
    }
  });
}

CATCH_TEST_CASE("bad arguments name the argument", "[errors]") {
  const auto x = torch::randn({2, 3});
  const auto s = torch::tensor({0.1f});
  const auto z = torch::tensor({0});
  using Catch::Matchers::Contains;
  CATCH_CHECK_THROWS_WITH(qat::fake_quantize(x, -s, z, 0, 255), Contains("scale"));
  CATCH_CHECK_THROWS_WITH(qat::fake_quantize(x, s * NAN, z, 0, 255), Contains("scale"));
  CATCH_CHECK_THROWS_WITH(qat::fake_quantize(x, s, z + 300, 0, 255), Contains("zero_point"));
  CATCH_CHECK_THROWS_WITH(qat::fake_quantize(x, s, z, 5, 5), Contains("quant_min"));
  CATCH_CHECK_THROWS_WITH(qat::fake_quantize(x, s, z, 0, 1 << 17), Contains("16 bits"));
  CATCH_CHECK_THROWS_WITH(
      qat::fake_quantize(x.to(torch::kInt), s, z, 0, 255), Contains("floating-point"));
  CATCH_CHECK_THROWS_WITH(
      qat::fake_quantize(x, torch::ones({2}), torch::zeros({2}), 0, 255, 1),
      Contains("one entry per channel"));
  CATCH_CHECK_THROWS_WITH(
      qat::fake_quantize(x, torch::ones({3}), torch::zeros({3}), 0, 255, 2),
      Contains("axis 2 is out of range"));
  CATCH_CHECK_THROWS_WITH(
      qat::fake_quantize(x, s, z, 0, 255, c10::nullopt, "nope"),
      Contains("known estimators: ewgs, lsq, lsq_plus, pact, ste"));
}
