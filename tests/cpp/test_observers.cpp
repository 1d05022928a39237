// Range statistics and qparam math against references computed here with plain loops
// and PyTorch's own observer formulas.

#include <catch2/catch.hpp>
#include <torch/torch.h>

#include <qat/qat.h>

#include <cmath>
#include <limits>

namespace {

// Min / max / non-finite count of one channel, with a scalar loop.
struct Stats {
  float min = std::numeric_limits<float>::infinity();
  float max = -std::numeric_limits<float>::infinity();
  int64_t nonfinite = 0;
};

std::vector<Stats> reference_stats(const torch::Tensor& x, c10::optional<int64_t> axis) {
  const auto moved =
      axis.has_value() ? x.movedim(*axis, 0).contiguous() : x.reshape({1, -1}).contiguous();
  const auto rows = moved.reshape({moved.size(0), -1}).to(torch::kFloat);
  std::vector<Stats> out(rows.size(0));
  for (int64_t c = 0; c < rows.size(0); ++c) {
    for (int64_t i = 0; i < rows.size(1); ++i) {
      const float v = rows[c][i].item<float>();
      if (!std::isfinite(v)) {
        ++out[c].nonfinite;
        continue;
      }
      out[c].min = std::min(out[c].min, v);
      out[c].max = std::max(out[c].max, v);
    }
  }
  return out;
}

}  // namespace

CATCH_TEST_CASE("aminmax skips and counts non-finite values on every axis", "[observers]") {
  torch::manual_seed(6);
  auto x = torch::randn({3, 5, 7, 71}) * 3;
  x.index_put_({0, 1, 2, 3}, std::numeric_limits<float>::quiet_NaN());
  x.index_put_({2, 4, 6, 70}, std::numeric_limits<float>::infinity());
  x.index_put_({1, 0, 0, 0}, -std::numeric_limits<float>::infinity());
  x.select(1, 3).fill_(std::numeric_limits<float>::quiet_NaN());  // a channel with nothing finite
  for (const auto& axis : std::vector<c10::optional<int64_t>>{c10::nullopt, 0, 1, 2, 3, -1}) {
    for (const auto& input :
         {x, x.contiguous(torch::MemoryFormat::ChannelsLast), x.to(torch::kDouble)}) {
      const auto result = qat::aminmax(input, axis);
      const auto expected = reference_stats(input, axis);
      CATCH_INFO("axis " << (axis.has_value() ? *axis : 99));
      CATCH_REQUIRE(std::get<0>(result).numel() == static_cast<int64_t>(expected.size()));
      for (size_t c = 0; c < expected.size(); ++c) {
        CATCH_CHECK(std::get<0>(result)[c].item<float>() == expected[c].min);
        CATCH_CHECK(std::get<1>(result)[c].item<float>() == expected[c].max);
        CATCH_CHECK(std::get<2>(result)[c].item<int64_t>() == expected[c].nonfinite);
      }
    }
  }
  const auto empty = qat::aminmax(torch::empty({0, 4}), 1);
  CATCH_CHECK(std::isinf(std::get<0>(empty)[0].item<float>()));
  CATCH_CHECK(std::get<2>(empty).sum().item<int64_t>() == 0);
}

CATCH_TEST_CASE("choose_qparams follows PyTorch's observer formulas", "[observers]") {
  const auto lo = torch::tensor({-1.0f, 0.0f, 0.5f, -3.0f, 1.0f});
  const auto hi = torch::tensor({3.0f, 0.0f, 2.0f, -1.0f, -1.0f});
  const float eps = std::numeric_limits<float>::epsilon();
  {
    const auto q = qat::choose_qparams(lo, hi, 0, 255, false);
    // affine: scale = (max(hi,0) - min(lo,0)) / 255, zp = 0 - round(min(lo,0) / scale)
    const std::vector<float> scale{4.0f / 255, eps, 2.0f / 255, 3.0f / 255, 1.0f};
    const std::vector<int> zp{
        static_cast<int>(-std::nearbyint(-1.0f / (4.0f / 255))), 0, 0, 255, 0};
    for (int i = 0; i < 5; ++i) {
      CATCH_CHECK(std::get<0>(q)[i].item<float>() == Approx(scale[i]).epsilon(1e-6));
      CATCH_CHECK(std::get<1>(q)[i].item<int>() == zp[i]);
    }
  }
  {
    const auto q = qat::choose_qparams(lo, hi, -128, 127, true);
    // symmetric signed: scale = max(|lo|, |hi|) / 127.5, zero point 0
    CATCH_CHECK(std::get<0>(q)[0].item<float>() == Approx(3.0f / 127.5f));
    CATCH_CHECK(std::get<0>(q)[3].item<float>() == Approx(3.0f / 127.5f));
    CATCH_CHECK(std::get<1>(q).abs().sum().item<int>() == 0);
    const auto u = qat::choose_qparams(lo, hi, 0, 255, true);
    CATCH_CHECK(std::get<1>(u)[0].item<int>() == 128);
  }
  // Nothing observed yet (min > max): scale 1.
  CATCH_CHECK(std::get<0>(qat::choose_qparams(lo, hi, 0, 255, false))[4].item<float>() == 1.0f);
  CATCH_CHECK_THROWS_WITH(
      qat::choose_qparams(lo, hi, 5, 5, false), Catch::Matchers::Contains("quant_min"));
}

CATCH_TEST_CASE("quant_range gives signed, unsigned and narrow ranges", "[observers]") {
  CATCH_CHECK(qat::quant_range(8, true) == std::make_pair<int64_t, int64_t>(-128, 127));
  CATCH_CHECK(qat::quant_range(8, true, true) == std::make_pair<int64_t, int64_t>(-127, 127));
  CATCH_CHECK(qat::quant_range(4, false) == std::make_pair<int64_t, int64_t>(0, 15));
  CATCH_CHECK(qat::quant_range(2, true) == std::make_pair<int64_t, int64_t>(-2, 1));
  CATCH_CHECK_THROWS_WITH(qat::quant_range(1, true), Catch::Matchers::Contains("bits"));
}

CATCH_TEST_CASE("the fused op observes, updates qparams and fake-quantizes", "[observers]") {
  torch::manual_seed(7);
  const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("qat::fused_observe_fake_quantize", "")
          .typed<at::Tensor(
              const at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&, int64_t,
              int64_t, c10::optional<int64_t>, c10::optional<double>, bool, bool, bool,
              c10::string_view, const c10::optional<at::Tensor>&, bool, bool)>();
  auto run_min = torch::empty({0});
  auto run_max = torch::empty({0});
  auto scale = torch::empty({0});
  auto zp = torch::empty({0}, torch::kInt);
  auto count = torch::zeros({}, torch::kLong);
  const double k = 0.25;
  std::vector<float> ema_lo(4), ema_hi(4);
  for (int step = 0; step < 3; ++step) {
    const auto x = torch::randn({8, 4, 16}) * (step + 1);
    const auto y = op.call(
        x, run_min, run_max, scale, zp, -128, 127, 1, k, true, true, true, "ste", count, false,
        false);
    for (int c = 0; c < 4; ++c) {
      const float lo = x.select(1, c).min().item<float>();
      const float hi = x.select(1, c).max().item<float>();
      ema_lo[c] = step == 0 ? lo : ema_lo[c] + static_cast<float>(k) * (lo - ema_lo[c]);
      ema_hi[c] = step == 0 ? hi : ema_hi[c] + static_cast<float>(k) * (hi - ema_hi[c]);
      CATCH_CHECK(run_min[c].item<float>() == Approx(ema_lo[c]).epsilon(1e-6));
      CATCH_CHECK(run_max[c].item<float>() == Approx(ema_hi[c]).epsilon(1e-6));
    }
    const auto expected_q = qat::choose_qparams(run_min, run_max, -128, 127, true);
    CATCH_CHECK(torch::equal(scale, std::get<0>(expected_q)));
    CATCH_CHECK(
        torch::equal(y, torch::fake_quantize_per_channel_affine(x, scale, zp, 1, -128, 127)));
  }
  // observe=false keeps the state; fake_quantize=false returns the input's values.
  CATCH_CHECK(count.item<int64_t>() == 0);
  const auto frozen = run_min.clone();
  auto x = torch::randn({8, 4, 16}) * 10;
  const auto y = op.call(
      x, run_min, run_max, scale, zp, -128, 127, 1, k, true, false, false, "ste", count, false,
      false);
  CATCH_CHECK(torch::equal(run_min, frozen));
  CATCH_CHECK(torch::equal(y, x));
  // NaN and inf are left out of the range and counted: x * 0 keeps the NaN and turns the
  // inf into NaN, so two batches count four.
  x.index_put_({0, 2, 5}, std::numeric_limits<float>::quiet_NaN());
  x.index_put_({3, 1, 0}, std::numeric_limits<float>::infinity());
  op.call(
      x * 0, run_min, run_max, scale, zp, -128, 127, 1, k, true, true, true, "ste", count, false,
      false);
  op.call(
      x, run_min, run_max, scale, zp, -128, 127, 1, c10::nullopt, true, true, true, "ste", count,
      false, false);
  CATCH_CHECK(count.item<int64_t>() == 4);
  CATCH_CHECK(std::isfinite(run_max.max().item<float>()));
  CATCH_CHECK(std::isfinite(run_min.min().item<float>()));
}
