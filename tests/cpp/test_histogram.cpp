// Histogram observers' numerics against references computed here: counts from a scalar
// loop, quantiles from torch::quantile of the samples, squared errors by sampling each bin
// densely, and the SQNR that the chosen ranges give on heavy-tailed data.

#include <catch2/catch.hpp>
#include <torch/torch.h>

#include <ATen/core/dispatch/Dispatcher.h>

#include <qat/fake_quantize.h>
#include <qat/observers.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <utility>
#include <vector>

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// Counts of the finite values of `values` (any shape) over [lo, hi], from the definition.
std::vector<double> reference_counts(
    const torch::Tensor& values, double lo, double hi, int64_t bins) {
  const auto flat = values.reshape({-1}).to(torch::kDouble).contiguous();
  const double* p = flat.data_ptr<double>();
  std::vector<double> counts(bins, 0.0);
  for (int64_t i = 0; i < flat.numel(); ++i) {
    const double v = p[i];
    if (!std::isfinite(v)) {
      continue;
    }
    int64_t k = 0;
    if (hi > lo) {
      const double pos = std::floor((v - lo) / (hi - lo) * static_cast<double>(bins));
      k = pos < 0.0 ? 0 : (pos >= bins ? bins - 1 : static_cast<int64_t>(pos));
    }
    counts[k] += 1.0;
  }
  return counts;
}

// The reference per channel of `axis`: [C, bins].
torch::Tensor reference_histogram(
    const torch::Tensor& x, const std::vector<double>& lo, const std::vector<double>& hi,
    int64_t bins, int64_t axis) {
  const int64_t channels = x.size(axis);
  auto out = torch::zeros({channels, bins}, torch::kDouble);
  for (int64_t c = 0; c < channels; ++c) {
    const auto counts = reference_counts(x.select(axis, c), lo[c], hi[c], bins);
    out[c].copy_(torch::tensor(counts, torch::kDouble));
  }
  return out;
}

// Sets the number of intra-op threads for a scope.
class ThreadCount {
 public:
  explicit ThreadCount(int count) : saved_(at::get_num_threads()) { at::set_num_threads(count); }
  ~ThreadCount() { at::set_num_threads(saved_); }
  ThreadCount(const ThreadCount&) = delete;
  ThreadCount& operator=(const ThreadCount&) = delete;

 private:
  int saved_;
};

torch::Tensor values(const std::vector<double>& v) {
  return torch::tensor(v, torch::kFloat);
}

// Sprinkles NaN and +-inf over a float tensor (in place).
void add_nonfinite(torch::Tensor& x) {
  auto flat = x.view({-1});
  const int64_t n = flat.numel();
  for (int64_t i = 0; i < n; i += 97) {
    flat[i] = (i / 97) % 3 == 0 ? kNaN : ((i / 97) % 3 == 1 ? kInf : -kInf);
  }
}

torch::Tensor laplace(int64_t n) {
  const auto sign = torch::randint(0, 2, {n}, torch::kFloat) * 2 - 1;
  return torch::empty({n}).exponential_(1.0) * sign;
}

torch::Tensor student_t(int64_t n, int64_t dof) {
  const auto chi2 = torch::randn({dof, n}).pow(2).sum(0);
  return torch::randn({n}) / torch::sqrt(chi2 / static_cast<double>(dof));
}

// Heavy tails plus a few outliers on both sides.
torch::Tensor with_outliers(torch::Tensor x, double magnitude, int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    x[i * 7919] = (i % 2 == 0 ? 1.0 : -1.0) * magnitude * (1.0 + 0.01 * i);
  }
  return x;
}

// Scale and zero point of [lo, hi] as the observers compute them.
std::pair<double, double> qparams(
    double lo, double hi, int64_t qmin, int64_t qmax, bool symmetric) {
  const auto q = qat::choose_qparams(
      torch::tensor({lo}, torch::kFloat), torch::tensor({hi}, torch::kFloat), qmin, qmax,
      symmetric);
  return {std::get<0>(q).item<double>(), std::get<1>(q).item<double>()};
}

// Expected squared fake-quantization error of a histogram's mass (uniform inside each bin),
// by the midpoint rule on `samples` points per bin.
double sampled_error(
    const std::vector<double>& counts, double hmin, double hmax, double lo, double hi, int64_t qmin,
    int64_t qmax, bool symmetric, int samples = 4000) {
  const auto q = qparams(lo, hi, qmin, qmax, symmetric);
  const double s = q.first;
  const double z = q.second;
  const int64_t bins = static_cast<int64_t>(counts.size());
  const double w = (hmax - hmin) / static_cast<double>(bins);
  double total = 0.0;
  for (int64_t j = 0; j < bins; ++j) {
    if (counts[j] == 0.0) {
      continue;
    }
    double sum = 0.0;
    for (int k = 0; k < samples; ++k) {
      const double x = hmin + w * (static_cast<double>(j) + (k + 0.5) / samples);
      const double level =
          std::min<double>(qmax, std::max<double>(qmin, std::nearbyint(x / s) + z));
      const double e = x - (level - z) * s;
      sum += e * e;
    }
    total += counts[j] * sum / samples;
  }
  return total;
}

double sqnr_db(
    const torch::Tensor& x, double lo, double hi, int64_t qmin, int64_t qmax, bool symmetric) {
  const auto q = qat::choose_qparams(
      torch::tensor({lo}, torch::kFloat), torch::tensor({hi}, torch::kFloat), qmin, qmax,
      symmetric);
  const auto y = qat::fake_quantize(x, std::get<0>(q), std::get<1>(q), qmin, qmax);
  const double signal = x.to(torch::kDouble).pow(2).sum().item<double>();
  const double noise = (x.to(torch::kDouble) - y.to(torch::kDouble)).pow(2).sum().item<double>();
  return 10.0 * std::log10(signal / noise);
}

std::pair<double, double> range_of(
    const torch::Tensor& hist, double hmin, double hmax, const std::string& method,
    double percentile, int64_t qmin, int64_t qmax, bool symmetric) {
  const auto r = qat::histogram_range(
      hist, values({hmin}), values({hmax}), method, percentile, qmin, qmax, symmetric);
  return {std::get<0>(r).item<double>(), std::get<1>(r).item<double>()};
}

}  // namespace

CATCH_TEST_CASE("histogram counts finite values per tensor, edges clamped", "[histogram]") {
  torch::manual_seed(0);
  for (const auto dtype : {torch::kFloat, torch::kDouble, torch::kHalf, torch::kBFloat16}) {
    CATCH_DYNAMIC_SECTION("dtype " << dtype) {
      auto x = (torch::randn({300, 301}) * 2).to(dtype);
      add_nonfinite(x);
      // The range is narrower than the data, so both edge bins collect the clamped values.
      const auto hist = qat::histogram(x, values({-1.5}), values({2.0}), 100);
      CATCH_REQUIRE(hist.sizes() == torch::IntArrayRef{100});
      CATCH_REQUIRE(hist.scalar_type() == torch::kDouble);
      const auto expected = torch::tensor(reference_counts(x, -1.5, 2.0, 100), torch::kDouble);
      CATCH_CHECK(torch::equal(hist, expected));
      const int64_t finite = torch::isfinite(x).sum().item<int64_t>();
      CATCH_CHECK(hist.sum().item<double>() == static_cast<double>(finite));
      const auto xd = x.to(torch::kDouble);
      const auto finite_x = torch::isfinite(xd);
      CATCH_CHECK(hist[0].item<double>() >= ((xd < -1.5) & finite_x).sum().item<double>());
      CATCH_CHECK(hist[99].item<double>() >= ((xd > 2.0) & finite_x).sum().item<double>());
    }
  }
  CATCH_SECTION("a few million elements, counted in parallel chunks") {
    auto x = torch::randn({3, 1000, 1000});
    add_nonfinite(x);
    const auto hist = qat::histogram(x, values({-3.0}), values({3.5}), 2048);
    CATCH_CHECK(
        torch::equal(hist, torch::tensor(reference_counts(x, -3.0, 3.5, 2048), torch::kDouble)));
  }
  CATCH_SECTION("min == max puts everything in the first bin") {
    const auto x = torch::full({10}, 0.25);
    const auto hist = qat::histogram(x, values({0.25}), values({0.25}), 8);
    CATCH_CHECK(hist[0].item<double>() == 10.0);
    CATCH_CHECK(hist.sum().item<double>() == 10.0);
  }
  CATCH_SECTION("empty input and the empty range [+inf, -inf]") {
    CATCH_CHECK(torch::equal(
        qat::histogram(torch::empty({0, 3}), values({0.0}), values({1.0}), 4),
        torch::zeros({4}, torch::kDouble)));
    const auto nan = torch::full({5}, kNaN);
    CATCH_CHECK(torch::equal(
        qat::histogram(nan, values({kInf}), values({-kInf}), 4),
        torch::zeros({4}, torch::kDouble)));
    CATCH_CHECK_THROWS_WITH(
        qat::histogram(torch::ones({5}), values({kInf}), values({-kInf}), 4),
        Catch::Matchers::Contains("empty range"));
  }
}

CATCH_TEST_CASE("histogram counts per channel on any axis and layout", "[histogram]") {
  torch::manual_seed(1);
  // With 4 threads, 3 channels take the chunked path (private histograms, chunk borders in
  // the middle of a channel's run) and 64 the one-task-per-channel path.
  const ThreadCount threads(4);
  for (const int64_t channels : {3, 64}) {
    auto base = torch::randn({61, channels, 31, 33}) * 3;
    add_nonfinite(base);
    const auto channels_last = base.contiguous(torch::MemoryFormat::ChannelsLast);
    std::vector<double> lo(channels);
    std::vector<double> hi(channels);
    for (int64_t c = 0; c < channels; ++c) {
      // Exact in float32, so that the reference sees the bounds the op reads.
      lo[c] = -2.0 - 0.0625 * static_cast<double>(c);
      hi[c] = 1.0 + 0.125 * static_cast<double>(c);
    }
    CATCH_DYNAMIC_SECTION(channels << " channels") {
      for (const auto& x : {base, channels_last, base.transpose(0, 3), base.slice(3, 1, 33, 2)}) {
        const auto expected = reference_histogram(x, lo, hi, 50, 1);
        CATCH_CHECK(torch::equal(qat::histogram(x, values(lo), values(hi), 50, 1), expected));
        CATCH_CHECK(torch::equal(qat::histogram(x, values(lo), values(hi), 50, -3), expected));
      }
    }
  }
  CATCH_SECTION("axis 0 and the last axis, float16") {
    const auto x = torch::randn({4, 9, 6}).to(torch::kHalf);
    const std::vector<double> lo4{-1.0, -0.5, -2.0, 0.0};
    const std::vector<double> hi4{1.0, 0.5, 2.0, 0.0};
    CATCH_CHECK(torch::equal(
        qat::histogram(x, values(lo4), values(hi4), 16, 0),
        reference_histogram(x, lo4, hi4, 16, 0)));
    const std::vector<double> lo6(6, -1.25);
    const std::vector<double> hi6(6, 0.75);
    CATCH_CHECK(torch::equal(
        qat::histogram(x, values(lo6), values(hi6), 16, -1),
        reference_histogram(x, lo6, hi6, 16, 2)));
  }
}

CATCH_TEST_CASE("histogram rejects bad arguments", "[histogram]") {
  using Catch::Matchers::Contains;
  const auto x = torch::randn({4, 3});
  const auto lo = values({-1.0});
  const auto hi = values({1.0});
  CATCH_CHECK_THROWS_WITH(qat::histogram(x, lo, hi, 0), Contains("bins"));
  CATCH_CHECK_THROWS_WITH(qat::histogram(x.to(torch::kInt), lo, hi, 8), Contains("input"));
  CATCH_CHECK_THROWS_WITH(qat::histogram(x, values({-1.0, -1.0}), hi, 8), Contains("min"));
  CATCH_CHECK_THROWS_WITH(qat::histogram(x, lo, hi, 8, 1), Contains("min must have 3"));
  CATCH_CHECK_THROWS_WITH(
      qat::histogram(x, values({-1, -1, -1}), values({1, 1}), 8, 1), Contains("max must have 3"));
  CATCH_CHECK_THROWS_WITH(qat::histogram(x, lo, hi, 8, 2), Contains("axis"));
  CATCH_CHECK_THROWS_WITH(qat::histogram(x, values({kNaN}), hi, 8), Contains("NaN"));
  CATCH_CHECK_THROWS_WITH(qat::histogram(x, values({-kInf}), hi, 8), Contains("finite"));
}

CATCH_TEST_CASE("histogram_rebin moves counts onto a wider range", "[histogram]") {
  torch::manual_seed(2);
  CATCH_SECTION("aligned edges give the exact re-histogram") {
    const auto x = torch::rand({20000});
    const auto old_hist = qat::histogram(x, values({0.0}), values({1.0}), 64);
    const auto rebinned =
        qat::histogram_rebin(old_hist, values({0.0}), values({1.0}), values({-1.0}), values({1.0}));
    CATCH_CHECK(torch::equal(rebinned, qat::histogram(x, values({-1.0}), values({1.0}), 64)));
  }
  CATCH_SECTION("totals are preserved per row, any alignment") {
    const auto x = torch::randn({3, 5000});
    const std::vector<double> omin{-0.3, -1.0, 0.25};
    const std::vector<double> omax{0.7, 1.3, 0.25};
    const std::vector<double> nmin{-1.13, -1.0, -0.5};
    const std::vector<double> nmax{2.9, 1.31, 0.75};
    const auto hist = qat::histogram(x, values(omin), values(omax), 33, 0);
    const auto rebinned =
        qat::histogram_rebin(hist, values(omin), values(omax), values(nmin), values(nmax));
    CATCH_REQUIRE(rebinned.sizes() == hist.sizes());
    CATCH_CHECK(torch::allclose(rebinned.sum(1), hist.sum(1), 1e-12, 0.0));
    CATCH_CHECK(rebinned.min().item<double>() >= 0.0);
    // Row 2 held one value (0.25): it lands in the bin of [-0.5, 0.75] that holds 0.25.
    const auto point = reference_counts(torch::full({1}, 0.25, torch::kDouble), -0.5, 0.75, 33);
    const int64_t k = std::max_element(point.begin(), point.end()) - point.begin();
    CATCH_CHECK(rebinned[2][k].item<double>() == hist[2].sum().item<double>());
    // Mass of the old range stays inside the old range: bins wholly outside it stay empty.
    CATCH_CHECK(rebinned[0][0].item<double>() == 0.0);
    CATCH_CHECK(rebinned[0][32].item<double>() == 0.0);
  }
  CATCH_SECTION("empty rows and bad ranges") {
    const auto zeros = torch::zeros({2, 8}, torch::kDouble);
    CATCH_CHECK(torch::equal(
        qat::histogram_rebin(
            zeros, values({kInf, kInf}), values({-kInf, -kInf}), values({0, 0}), values({1, 1})),
        zeros));
    const auto ones = torch::ones({8}, torch::kDouble);
    using Catch::Matchers::Contains;
    CATCH_CHECK_THROWS_WITH(
        qat::histogram_rebin(ones, values({-1.0}), values({1.0}), values({-0.5}), values({1.0})),
        Contains("contain"));
    CATCH_CHECK_THROWS_WITH(
        qat::histogram_rebin(ones, values({-1.0}), values({1.0, 2.0}), values({-1}), values({1})),
        Contains("old_max"));
    CATCH_CHECK_THROWS_WITH(
        qat::histogram_rebin(
            torch::ones({2, 2, 2}), values({0}), values({1}), values({0}), values({1})),
        Contains("histogram"));
  }
}

CATCH_TEST_CASE("percentile ranges match quantiles of the samples", "[histogram]") {
  torch::manual_seed(3);
  const auto x = torch::randn({200000}) * 2 + 0.5;
  const double lo = x.min().item<double>();
  const double hi = x.max().item<double>();
  const int64_t bins = 2048;
  const double width = (hi - lo) / bins;
  const auto hist = qat::histogram(x, values({lo}), values({hi}), bins);
  const auto xd = x.to(torch::kDouble);
  for (const double p : {99.0, 99.9, 100.0}) {
    CATCH_DYNAMIC_SECTION("percentile " << p) {
      const auto sym = range_of(hist, lo, hi, "percentile", p, -128, 127, true);
      const double t = torch::quantile(xd.abs(), p / 100.0).item<double>();
      CATCH_CHECK(std::max(-sym.first, sym.second) == Approx(t).margin(width));
      CATCH_CHECK(sym.first >= lo);
      CATCH_CHECK(sym.second <= hi);
      const auto affine = range_of(hist, lo, hi, "percentile", p, 0, 255, false);
      CATCH_CHECK(
          affine.first ==
          Approx(torch::quantile(xd, (100 - p) / 200).item<double>()).margin(width));
      CATCH_CHECK(
          affine.second ==
          Approx(torch::quantile(xd, (100 + p) / 200).item<double>()).margin(width));
    }
  }
  CATCH_SECTION("rows are independent") {
    const auto y = torch::stack({x, x * 0.5, x.abs()});
    const auto mins = std::get<0>(y.aminmax(1));
    const auto maxs = std::get<1>(y.aminmax(1));
    const auto hists = qat::histogram(y, mins, maxs, 512, 0);
    const auto both = qat::histogram_range(hists, mins, maxs, "percentile", 99.5, -8, 7, true);
    for (int64_t r = 0; r < 3; ++r) {
      const auto one = qat::histogram_range(
          hists[r], mins.slice(0, r, r + 1), maxs.slice(0, r, r + 1), "percentile", 99.5, -8, 7,
          true);
      CATCH_CHECK(std::get<0>(both)[r].item<float>() == std::get<0>(one).item<float>());
      CATCH_CHECK(std::get<1>(both)[r].item<float>() == std::get<1>(one).item<float>());
    }
  }
}

CATCH_TEST_CASE("mse ranges beat the full range and their neighbours", "[histogram]") {
  // A small skewed histogram with a sparse tail, so that clipping pays off at 4 bits.
  const std::vector<double> counts{1,  0,  0,  2, 5, 9, 20, 45, 90, 160, 260, 300, 240, 150, 90, 50,
                                   30, 20, 12, 8, 5, 3, 2,  1,  1,  0,   0,   1,   0,   0,   0,  1};
  const double hmin = -1.3;
  const double hmax = 2.1;
  const int64_t bins = static_cast<int64_t>(counts.size());
  const double w = (hmax - hmin) / bins;
  const auto edge = [&](int64_t j) { return hmin + w * static_cast<double>(j); };
  const auto hist = torch::tensor(counts, torch::kDouble);

  CATCH_SECTION("symmetric: the best threshold of all edges") {
    for (const auto& q :
         {std::make_pair<int64_t, int64_t>(-8, 7), std::make_pair<int64_t, int64_t>(0, 15)}) {
      const auto r = range_of(hist, hmin, hmax, "mse", 100, q.first, q.second, true);
      const double t = std::max(-r.first, r.second);
      const double chosen = sampled_error(counts, hmin, hmax, -t, t, q.first, q.second, true);
      double best = kInf;
      for (int64_t j = 0; j <= bins; ++j) {
        const double e = std::abs(edge(j));
        if (e > 0.0) {
          best = std::min(best, sampled_error(counts, hmin, hmax, -e, e, q.first, q.second, true));
        }
      }
      const double full = sampled_error(counts, hmin, hmax, hmin, hmax, q.first, q.second, true);
      std::printf(
          "mse symmetric [%lld, %lld]: threshold %.4f of %.4f, error %.5g (full range %.5g, best "
          "edge %.5g)\n",
          static_cast<long long>(q.first), static_cast<long long>(q.second), t, hmax, chosen, full,
          best);
      CATCH_CHECK(t < hmax);
      CATCH_CHECK(chosen <= full);
      CATCH_CHECK(chosen <= best * (1 + 1e-4));
    }
  }
  CATCH_SECTION("affine: no worse than the full range or a one-bin move of either end") {
    for (const auto& q :
         {std::make_pair<int64_t, int64_t>(0, 15), std::make_pair<int64_t, int64_t>(-8, 7)}) {
      const auto r = range_of(hist, hmin, hmax, "mse", 100, q.first, q.second, false);
      const auto err = [&](double lo, double hi) {
        return sampled_error(counts, hmin, hmax, lo, hi, q.first, q.second, false);
      };
      const double chosen = err(r.first, r.second);
      const double full = err(hmin, hmax);
      CATCH_CHECK(r.first >= hmin - 1e-6);
      CATCH_CHECK(r.second <= hmax + 1e-6);
      CATCH_CHECK(r.first <= 0.0);
      CATCH_CHECK(r.second >= 0.0);
      CATCH_CHECK(chosen <= full * (1 + 1e-4));
      for (const double dl : {-w, 0.0, w}) {
        for (const double dh : {-w, 0.0, w}) {
          const double lo = r.first + dl;
          const double hi = r.second + dh;
          if (lo < hmin - 1e-9 || hi > hmax + 1e-9 || lo > 1e-9 || hi < -1e-9) {
            continue;
          }
          CATCH_CHECK(chosen <= err(std::min(lo, 0.0), std::max(hi, 0.0)) * (1 + 1e-4));
        }
      }
      // For the record: how far the greedy search lands from the best pair of edges.
      double best = kInf;
      for (int64_t i = 0; edge(i) < 0.0; ++i) {
        for (int64_t j = bins; edge(j) > 0.0; --j) {
          best = std::min(best, err(edge(i), edge(j)));
        }
      }
      std::printf(
          "mse affine [%lld, %lld]: range [%.4f, %.4f] of [%.4f, %.4f], error %.5g (full range "
          "%.5g, best edge pair %.5g)\n",
          static_cast<long long>(q.first), static_cast<long long>(q.second), r.first, r.second,
          hmin, hmax, chosen, full, best);
      CATCH_CHECK(chosen <= best * 1.05);
    }
  }
}

CATCH_TEST_CASE("entropy clips the outliers of a Laplace sample", "[histogram]") {
  torch::manual_seed(4);
  const auto x = with_outliers(laplace(200000), 40.0, 20);
  const double lo = x.min().item<double>();
  const double hi = x.max().item<double>();
  const auto hist = qat::histogram(x, values({lo}), values({hi}), 2048);
  const auto sym = range_of(hist, lo, hi, "entropy", 100, -128, 127, true);
  CATCH_CHECK(sym.second < 0.5 * hi);
  CATCH_CHECK(sym.first == Approx(-sym.second));
  const auto affine = range_of(hist, lo, hi, "entropy", 100, -128, 127, false);
  CATCH_CHECK(affine.second < 0.5 * hi);
  CATCH_CHECK(affine.first > 0.5 * lo);
  // One-sided data (|x|) uses all 256 levels of uint8.
  const auto a = x.abs();
  const auto one_sided = qat::histogram(a, values({0.0}), values({a.max().item<double>()}), 2048);
  const auto u8 = range_of(one_sided, 0.0, a.max().item<double>(), "entropy", 100, 0, 255, false);
  CATCH_CHECK(u8.first == 0.0);
  CATCH_CHECK(u8.second < 0.5 * a.max().item<double>());
  std::printf(
      "entropy on Laplace + outliers (max %.2f): int8 symmetric %.3f, int8 affine [%.3f, %.3f], "
      "uint8 one-sided %.3f\n",
      hi, sym.second, affine.first, affine.second, u8.second);
}

CATCH_TEST_CASE("clipped ranges raise the SQNR of heavy-tailed data", "[histogram]") {
  torch::manual_seed(5);
  const int64_t n = 1 << 20;
  const std::vector<std::pair<const char*, torch::Tensor>> data{
      {"laplace+outliers", with_outliers(laplace(n), 20.0, 5)},
      {"student-t(6)+outliers", with_outliers(student_t(n, 6), 40.0, 5)}};
  for (const auto& d : data) {
    const auto& x = d.second;
    const double lo = x.min().item<double>();
    const double hi = x.max().item<double>();
    const auto hist = qat::histogram(x, values({lo}), values({hi}), 2048);
    for (const int64_t bits : {8, 4}) {
      for (const bool symmetric : {true, false}) {
        const int64_t qmin = -(int64_t{1} << (bits - 1));
        const int64_t qmax = (int64_t{1} << (bits - 1)) - 1;
        const double full = sqnr_db(x, lo, hi, qmin, qmax, symmetric);
        std::printf(
            "SQNR %-22s %lld-bit %-9s min/max %6.2f dB", d.first, static_cast<long long>(bits),
            symmetric ? "symmetric" : "affine", full);
        for (const char* method : {"percentile", "mse", "entropy"}) {
          const auto r = range_of(hist, lo, hi, method, 99.99, qmin, qmax, symmetric);
          const double db = sqnr_db(x, r.first, r.second, qmin, qmax, symmetric);
          std::printf(", %s %6.2f dB", method, db);
          CATCH_CHECK(db > full);
        }
        std::printf("\n");
      }
    }
  }
}

CATCH_TEST_CASE("histogram_range checks its arguments", "[histogram]") {
  using Catch::Matchers::Contains;
  const auto hist = torch::ones({16}, torch::kDouble);
  const auto lo = values({-1.0});
  const auto hi = values({2.0});
  CATCH_CHECK_THROWS_WITH(
      qat::histogram_range(hist, lo, hi, "kl", 99, -128, 127, true),
      Contains("method") && Contains("percentile") && Contains("mse") && Contains("entropy"));
  CATCH_CHECK_THROWS_WITH(
      qat::histogram_range(hist, lo, hi, "percentile", 0, -128, 127, true),
      Contains("percentile must be in (0, 100]"));
  CATCH_CHECK_THROWS_WITH(
      qat::histogram_range(hist, lo, hi, "percentile", 100.5, -128, 127, true),
      Contains("percentile must be in (0, 100]"));
  CATCH_CHECK_THROWS_WITH(
      qat::histogram_range(hist, lo, hi, "mse", 99, 5, 5, true), Contains("quant_min"));
  CATCH_CHECK_THROWS_WITH(
      qat::histogram_range(hist, values({-1, 0}), hi, "mse", 99, -128, 127, true),
      Contains("hist_min"));
  CATCH_CHECK_THROWS_WITH(
      qat::histogram_range(-hist, lo, hi, "mse", 99, -128, 127, true), Contains("non-negative"));
  CATCH_CHECK_THROWS_WITH(
      qat::histogram_range(
          torch::ones({2, 0}), values({0, 0}), values({1, 1}), "mse", 99, -128, 127, true),
      Contains("at least one bin"));

  CATCH_SECTION("an empty histogram gives its range, widened to 0") {
    for (const char* method : {"percentile", "mse", "entropy"}) {
      const auto r = qat::histogram_range(
          torch::zeros({2, 16}, torch::kDouble), values({0.5, kInf}), values({2.0, -kInf}), method,
          99, 0, 255, false);
      CATCH_CHECK(torch::equal(std::get<0>(r), values({0.0, 0.0})));
      CATCH_CHECK(torch::equal(std::get<1>(r), values({2.0, 0.0})));
    }
  }
  CATCH_SECTION("results stay inside the histogram's range, widened to 0") {
    torch::manual_seed(6);
    const auto x = torch::rand({5000}) * 3 + 1;  // all positive
    const auto h = qat::histogram(x, values({1.0}), values({4.0}), 256);
    for (const char* method : {"percentile", "mse", "entropy"}) {
      for (const bool symmetric : {true, false}) {
        const auto r = range_of(h, 1.0, 4.0, method, 99.9, -8, 7, symmetric);
        CATCH_CHECK(r.first == 0.0);
        CATCH_CHECK(r.second > 0.0);
        CATCH_CHECK(r.second <= 4.0);
      }
    }
  }
}

CATCH_TEST_CASE("histogram operators are registered", "[histogram]") {
  auto& dispatcher = c10::Dispatcher::singleton();
  const auto x = torch::randn({100});
  const auto lo = values({-1.0});
  const auto hi = values({1.0});
  const auto hist = dispatcher.findSchemaOrThrow("qat::histogram", "")
                        .typed<at::Tensor(
                            const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                            c10::optional<int64_t>)>()
                        .call(x, lo, hi, 32, c10::nullopt);
  CATCH_CHECK(torch::equal(hist, qat::histogram(x, lo, hi, 32)));
  const auto rebinned = dispatcher.findSchemaOrThrow("qat::histogram_rebin", "")
                            .typed<at::Tensor(
                                const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&, const at::Tensor&)>()
                            .call(hist, lo, hi, values({-2.0}), hi);
  CATCH_CHECK(torch::equal(rebinned, qat::histogram_rebin(hist, lo, hi, values({-2.0}), hi)));
  const auto range = dispatcher.findSchemaOrThrow("qat::histogram_range", "")
                         .typed<std::tuple<at::Tensor, at::Tensor>(
                             const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             c10::string_view, double, int64_t, int64_t, bool)>()
                         .call(hist, lo, hi, "mse", 99.0, -128, 127, true);
  const auto direct = qat::histogram_range(hist, lo, hi, "mse", 99.0, -128, 127, true);
  CATCH_CHECK(torch::equal(std::get<0>(range), std::get<0>(direct)));
  CATCH_CHECK(torch::equal(std::get<1>(range), std::get<1>(direct)));
}
