// Histograms behind qat's histogram observers: counting the finite values of a tensor into
// equal bins, re-binning counts onto a wider range, and choosing a clipping range from the
// counts (percentile, least squared error, least KL divergence).
//
// Only `histogram` reads the (possibly large, possibly accelerator-resident) input, in one
// parallel pass on the CPU. The counts are small ([bins] or [C, bins], float64), so what
// follows is scalar CPU code over one row at a time. Inside a bin the mass is taken to be
// uniform: quantiles interpolate linearly, re-binning splits a count in proportion to the
// overlap, and the squared error integrates over the bin.

#include <qat/observers.h>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "ops/fake_quantize_common.h"
#include "qparams_math.h"

namespace qat {
namespace {

// Elements one task of the counting pass handles at least: enough that a thread's private
// histogram is worth its merge.
constexpr int64_t kCountGrain = 32768;
// Doubles that the private histograms of the counting pass may take in all (128 MiB).
constexpr int64_t kPrivateCountBudget = int64_t{1} << 24;

// The entries of a min or max tensor, one per histogram row, as doubles.
std::vector<double> read_row_values(
    const char* op, const char* name, const at::Tensor& values, int64_t rows, const char* what) {
  TORCH_CHECK(values.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(
      at::isFloatingType(values.scalar_type()), op, ": ", name,
      " must be a floating-point tensor, got ", values.scalar_type());
  TORCH_CHECK(
      values.dim() <= 1 && values.numel() == rows, op, ": ", name, " must have ", rows,
      rows == 1 ? " element" : " elements", " (", what, "), got shape ", values.sizes());
  const auto cpu = values.detach().to(at::kCPU, at::kDouble).contiguous();
  const double* data = cpu.data_ptr<double>();
  return std::vector<double>(data, data + rows);
}

// Edge j (0..bins) of `bins` equal bins over [lo, hi], exact at both ends.
inline double bin_edge(double lo, double hi, int64_t bins, int64_t j) {
  return j == bins ? hi : lo + (hi - lo) * static_cast<double>(j) / static_cast<double>(bins);
}

// ---------------------------------------------------------------------------------------
// Counting

// Where the finite values of one row (channel) go.
struct RowBins {
  double min = 0.0;
  // max - min; zero puts every value in bin 0.
  double width = 0.0;
  // min > max: the identity range of an observation without finite values, so none may come.
  bool empty = false;
};

inline int64_t bin_of(double v, const RowBins& row, int64_t bins) {
  if (row.width == 0.0) {
    return 0;
  }
  const double pos = std::floor((v - row.min) / row.width * static_cast<double>(bins));
  if (pos < 0.0) {
    return 0;
  }
  return pos >= static_cast<double>(bins) ? bins - 1 : static_cast<int64_t>(pos);
}

// Counts the finite elements at memory offsets [begin, end) of `data` into `counts`
// ([channels, bins]); returns a channel with an empty range that met a finite value, or -1.
template <typename scalar_t>
int64_t count_span(
    const scalar_t* data, int64_t begin, int64_t end, const detail::ChannelLayout& layout,
    const std::vector<RowBins>& rows, int64_t bins, double* counts) {
  int64_t bad = -1;
  if (begin >= end) {
    return bad;
  }
  // Walk runs of `inner` elements of one channel; the channel advances by one per run.
  const int64_t run = begin / layout.inner;
  int64_t c = run % layout.channels;
  int64_t stop = std::min(end, (run + 1) * layout.inner);
  int64_t m = begin;
  while (true) {
    const RowBins& row = rows[c];
    double* out = counts + c * bins;
    for (; m < stop; ++m) {
      const double v = static_cast<double>(data[m]);
      if (!std::isfinite(v)) {
        continue;
      }
      if (row.empty) {
        bad = c;
        continue;
      }
      out[bin_of(v, row, bins)] += 1.0;
    }
    if (m >= end) {
      return bad;
    }
    c = c + 1 == layout.channels ? 0 : c + 1;
    stop = std::min(end, stop + layout.inner);
  }
}

template <typename scalar_t>
void count_all(
    const at::Tensor& input, const detail::ChannelLayout& layout, const std::vector<RowBins>& rows,
    int64_t bins, double* counts) {
  const scalar_t* data = input.data_ptr<scalar_t>();
  const int64_t numel = input.numel();
  const int64_t channels = layout.channels;
  const int64_t threads = at::get_num_threads();
  std::vector<int64_t> bad;

  if (channels >= threads && channels > 1) {
    // Enough channels to keep every thread busy: each task owns whole rows of the result,
    // and walks, per outer index, one contiguous block of its channels.
    bad.assign(channels, -1);
    at::parallel_for(0, channels, 1, [&](int64_t first, int64_t last) {
      for (const auto o : c10::irange(layout.outer)) {
        const int64_t base = o * channels * layout.inner;
        const int64_t b = count_span(
            data, base + first * layout.inner, base + last * layout.inner, layout, rows, bins,
            counts);
        if (b >= 0) {
          bad[b] = b;
        }
      }
    });
  } else {
    // Few rows: split the memory into chunks, count each into a private histogram, and sum
    // the private histograms in chunk order.
    const int64_t row_size = channels * bins;
    const int64_t chunks = std::max<int64_t>(
        1, std::min(
               {threads, (numel + kCountGrain - 1) / kCountGrain,
                kPrivateCountBudget / std::max<int64_t>(row_size, 1)}));
    std::vector<double> partial(chunks == 1 ? 0 : chunks * row_size, 0.0);
    bad.assign(chunks, -1);
    at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
      for (const auto k : c10::irange(first, last)) {
        double* out = chunks == 1 ? counts : partial.data() + k * row_size;
        bad[k] =
            count_span(data, numel * k / chunks, numel * (k + 1) / chunks, layout, rows, bins, out);
      }
    });
    if (chunks > 1) {
      for (const auto k : c10::irange(chunks)) {
        const double* part = partial.data() + k * row_size;
        for (const auto i : c10::irange(row_size)) {
          counts[i] += part[i];
        }
      }
    }
  }
  for (const int64_t b : bad) {
    TORCH_CHECK(
        b < 0, "qat::histogram: channel ", b,
        " has finite values but an empty range (min > max); pass the range of the values");
  }
}

// ---------------------------------------------------------------------------------------
// Re-binning

// Adds `mass`, spread uniformly over [a, b], to `bins` equal bins over [lo, lo + width] in
// proportion to the overlap (a zero-width [a, b] lands in the bin that `histogram` would
// pick). The last bin touched takes what is left, so the mass is added in full.
void spread(double a, double b, double mass, double lo, double width, int64_t bins, double* out) {
  const double n = static_cast<double>(bins);
  const auto position = [&](double x) {
    return width == 0.0 ? 0.0 : std::min(n, std::max(0.0, (x - lo) / width * n));
  };
  const double u0 = position(a);
  const double u1 = position(b);
  if (!(u1 > u0)) {
    out[std::min<int64_t>(static_cast<int64_t>(u0), bins - 1)] += mass;
    return;
  }
  const int64_t first = std::min<int64_t>(static_cast<int64_t>(u0), bins - 1);
  const int64_t last = std::min<int64_t>(static_cast<int64_t>(std::ceil(u1)), bins) - 1;
  double left = mass;
  for (int64_t k = first; k < last; ++k) {
    const double part =
        mass * (std::min(u1, static_cast<double>(k + 1)) - std::max(u0, static_cast<double>(k))) /
        (u1 - u0);
    out[k] += part;
    left -= part;
  }
  out[last] += left;
}

// ---------------------------------------------------------------------------------------
// Range selection

// One histogram row: counts over equal bins of [min, max], their edges, and prefix sums of
// the mass and of its first two moments.
class RowDistribution {
 public:
  RowDistribution(const double* counts, int64_t bins, double min, double max)
      : counts_(counts),
        bins_(bins),
        min_(min),
        max_(max),
        edges_(bins + 1),
        prefix_(bins + 1, 0.0),
        first_(bins + 1, 0.0),
        second_(bins + 1, 0.0) {
    for (const auto j : c10::irange(bins + 1)) {
      edges_[j] = bin_edge(min, max, bins, j);
    }
    for (const auto j : c10::irange(bins)) {
      const double c = counts[j];
      const double mid = 0.5 * (edges_[j] + edges_[j + 1]);
      const double w = edges_[j + 1] - edges_[j];
      prefix_[j + 1] = prefix_[j] + c;
      first_[j + 1] = first_[j] + c * mid;
      second_[j + 1] = second_[j] + c * (mid * mid + w * w / 12.0);
    }
  }

  int64_t bins() const { return bins_; }
  double count(int64_t j) const { return counts_[j]; }
  double total() const { return prefix_[bins_]; }
  double min() const { return min_; }
  double max() const { return max_; }
  double edge(int64_t j) const { return edges_[j]; }

  // Number of leading bins that lie wholly at or below x.
  int64_t bins_below(double x) const {
    return std::upper_bound(edges_.begin() + 1, edges_.end(), x) - (edges_.begin() + 1);
  }
  // First bin from which on all bins lie wholly at or above x.
  int64_t first_bin_above(double x) const {
    return std::lower_bound(edges_.begin(), edges_.end() - 1, x) - edges_.begin();
  }

  // Sum over bins [begin, end) of count * mean of (x - v)^2 over the bin.
  double squared_distance(int64_t begin, int64_t end, double v) const {
    if (begin >= end) {
      return 0.0;
    }
    const double mass = prefix_[end] - prefix_[begin];
    const double first = first_[end] - first_[begin];
    const double second = second_[end] - second_[begin];
    return std::max(0.0, second - 2.0 * v * first + v * v * mass);
  }

  // Mass at or below x.
  double cdf(double x) const {
    if (x <= min_) {
      return 0.0;
    }
    if (x >= max_) {
      return total();
    }
    const double u = (x - min_) / (max_ - min_) * static_cast<double>(bins_);
    const int64_t j = std::min<int64_t>(static_cast<int64_t>(u), bins_ - 1);
    return prefix_[j] + counts_[j] * std::min(1.0, u - static_cast<double>(j));
  }

  // Smallest x with cdf(x) >= mass.
  double quantile(double mass) const {
    if (mass <= 0.0) {
      int64_t j = 0;
      while (j + 1 < bins_ && counts_[j] == 0.0) {
        ++j;
      }
      return edge(j);
    }
    const auto it = std::lower_bound(prefix_.begin() + 1, prefix_.end(), mass);
    const int64_t j = std::min<int64_t>(it - (prefix_.begin() + 1), bins_ - 1);
    const double inside =
        counts_[j] > 0.0 ? std::min(1.0, std::max(0.0, (mass - prefix_[j]) / counts_[j])) : 1.0;
    return edge(j) + (edge(j + 1) - edge(j)) * inside;
  }

  // Smallest t >= 0 with at least `mass` in [-t, t], found by bisection: cdf(t) - cdf(-t)
  // is piecewise linear with breaks on two interleaved grids.
  double magnitude_quantile(double mass) const {
    double lo = 0.0;
    double hi = std::max(std::abs(min_), std::abs(max_));
    for (int it = 0; it < 200; ++it) {
      const double mid = lo + (hi - lo) / 2.0;
      if (mid <= lo || mid >= hi) {
        break;
      }
      if (cdf(mid) - cdf(-mid) >= mass) {
        hi = mid;
      } else {
        lo = mid;
      }
    }
    return hi;
  }

 private:
  const double* counts_;
  int64_t bins_;
  double min_;
  double max_;
  std::vector<double> edges_;
  std::vector<double> prefix_;
  std::vector<double> first_;
  std::vector<double> second_;
};

// The integer grid that choose_qparams gives [lo, hi] (lo <= 0 <= hi): levels
// lowest + k * scale, k = 0 .. quant_max - quant_min.
struct Grid {
  double scale;
  double lowest;
  double highest;
};

Grid grid_for(double lo, double hi, int64_t quant_min, int64_t quant_max, bool symmetric) {
  const auto q = detail::qparams_for_range<double>(lo, hi, quant_min, quant_max, symmetric);
  return {
      q.first, (static_cast<double>(quant_min) - q.second) * q.first,
      (static_cast<double>(quant_max) - q.second) * q.first};
}

// Integral of (x - v)^2 over [x0, x1], in a form that keeps its precision for short spans
// far from v.
inline double clamped_integral(double x0, double x1, double v) {
  const double d = x1 - x0;
  const double m = 0.5 * (x0 + x1) - v;
  return d * (m * m + d * d / 12.0);
}

// Integral over [u0, u1] (in steps, u0 <= u1) of (u - round(u))^2: 1/12 per whole cell,
// plus the cubes of the partial cells at both ends.
inline double rounding_integral(double u0, double u1) {
  const double n0 = std::floor(u0 + 0.5);
  const double n1 = std::floor(u1 + 0.5);
  const double d0 = u0 - n0;
  const double d1 = u1 - n1;
  return (n1 - n0) / 12.0 + (d1 * d1 * d1 - d0 * d0 * d0) / 3.0;
}

// Expected squared error of fake-quantizing the row's mass on `grid`, times the total mass:
// values past the end levels clamp, the rest round to the nearest level. Bins wholly past an
// end level are summed from the prefix moments; only the bins in between are visited.
double squared_error(const RowDistribution& row, const Grid& grid) {
  const int64_t below = row.bins_below(grid.lowest);
  const int64_t above = std::max(below, row.first_bin_above(grid.highest));
  const double s = grid.scale;
  const double inv_s = 1.0 / s;
  double sum = row.squared_distance(0, below, grid.lowest) +
               row.squared_distance(above, row.bins(), grid.highest);
  for (int64_t j = below; j < above; ++j) {
    const double c = row.count(j);
    if (c == 0.0) {
      continue;
    }
    const double a = row.edge(j);
    const double b = row.edge(j + 1);
    double integral = 0.0;
    if (a < grid.lowest) {
      integral += clamped_integral(a, std::min(b, grid.lowest), grid.lowest);
    }
    if (b > grid.highest) {
      integral += clamped_integral(std::max(a, grid.highest), b, grid.highest);
    }
    const double x0 = std::max(a, grid.lowest);
    const double x1 = std::min(b, grid.highest);
    if (x1 > x0) {
      integral +=
          s * s * s * rounding_integral((x0 - grid.lowest) * inv_s, (x1 - grid.lowest) * inv_s);
    }
    sum += c * integral / (b - a);
  }
  return sum;
}

// Symmetric: the magnitude threshold, among the bin edges' magnitudes, with the least error.
// Ties keep the wider range.
double mse_symmetric(const RowDistribution& row, int64_t quant_min, int64_t quant_max) {
  const double magnitude = std::max(std::abs(row.min()), std::abs(row.max()));
  std::vector<double> thresholds;
  thresholds.reserve(row.bins() + 1);
  for (const auto j : c10::irange(row.bins() + 1)) {
    const double t = std::abs(row.edge(j));
    if (t > 0.0 && t <= magnitude) {
      thresholds.push_back(t);
    }
  }
  std::sort(thresholds.begin(), thresholds.end());
  thresholds.erase(std::unique(thresholds.begin(), thresholds.end()), thresholds.end());
  double best_t = magnitude;
  double best = std::numeric_limits<double>::infinity();
  for (const double t : thresholds) {
    const double e = squared_error(row, grid_for(-t, t, quant_min, quant_max, true));
    if (e <= best) {
      best = e;
      best_t = t;
    }
  }
  return best_t;
}

// Affine: both ends move over the bin edges (and 0). A greedy path from the full range
// shrinks, one bin per step, whichever end lowers the error more, and remembers the best
// range seen (O(bins) ranges of O(bins) each); a descent over single-bin moves of either end
// then makes the result no worse than its neighbours.
std::pair<double, double> mse_affine(
    const RowDistribution& row, int64_t quant_min, int64_t quant_max) {
  std::vector<double> lows;
  std::vector<double> highs{0.0};
  for (const auto j : c10::irange(row.bins() + 1)) {
    const double e = row.edge(j);
    if (e < 0.0) {
      lows.push_back(e);
    } else if (e > 0.0) {
      highs.push_back(e);
    }
  }
  lows.push_back(0.0);
  const int64_t nl = static_cast<int64_t>(lows.size());
  const int64_t nh = static_cast<int64_t>(highs.size());
  const auto error = [&](int64_t l, int64_t h) {
    if (l < 0 || l >= nl || h < 0 || h >= nh || !(highs[h] > lows[l])) {
      return std::numeric_limits<double>::infinity();
    }
    return squared_error(row, grid_for(lows[l], highs[h], quant_min, quant_max, false));
  };

  // A coarse grid over both ends first: shrinking one end at a time can lock onto a
  // lopsided range on heavy tails. Then single-bin moves refine the best grid point.
  constexpr int64_t kGridPoints = 64;
  const auto grid_index = [](int64_t k, int64_t n) {
    return kGridPoints <= 1 || n <= 1 ? 0 : k * (n - 1) / (kGridPoints - 1);
  };
  int64_t best_l = 0;
  int64_t best_h = nh - 1;
  double best = error(best_l, best_h);
  for (int64_t a = 0; a < kGridPoints; ++a) {
    for (int64_t b = 0; b < kGridPoints; ++b) {
      const int64_t l = grid_index(a, nl);
      const int64_t h = grid_index(b, nh);
      const double e = error(l, h);
      if (e < best) {
        best = e;
        best_l = l;
        best_h = h;
      }
    }
  }

  while (true) {
    const int64_t moves[4][2] = {{-1, 0}, {1, 0}, {0, -1}, {0, 1}};
    int64_t next_l = best_l;
    int64_t next_h = best_h;
    double next = best;
    for (const auto& move : moves) {
      const double e = error(best_l + move[0], best_h + move[1]);
      if (e < next) {
        next = e;
        next_l = best_l + move[0];
        next_h = best_h + move[1];
      }
    }
    if (next_l == best_l && next_h == best_h) {
      break;
    }
    best = next;
    best_l = next_l;
    best_h = next_h;
  }
  return {lows[best_l], highs[best_h]};
}

// The row's distribution of |x| as `bins` equal bins over [0, magnitude].
std::vector<double> magnitude_histogram(const RowDistribution& row, double magnitude) {
  const int64_t bins = row.bins();
  std::vector<double> out(bins, 0.0);
  for (const auto j : c10::irange(bins)) {
    const double c = row.count(j);
    if (c == 0.0) {
      continue;
    }
    const double a = row.edge(j);
    const double b = row.edge(j + 1);
    if (a >= 0.0) {
      spread(a, b, c, 0.0, magnitude, bins, out.data());
    } else if (b <= 0.0) {
      spread(-b, -a, c, 0.0, magnitude, bins, out.data());
    } else {
      spread(0.0, -a, c * -a / (b - a), 0.0, magnitude, bins, out.data());
      spread(0.0, b, c * b / (b - a), 0.0, magnitude, bins, out.data());
    }
  }
  return out;
}

// TensorRT's entropy calibration on a histogram of |x|: for each candidate number i of
// leading bins (levels .. bins), P is those bins with the mass beyond them added to the
// last one, Q is the same bins merged into `levels` groups and spread back evenly over the
// non-empty bins of each group; the i with the least KL(P || Q) wins, the largest on ties.
int64_t entropy_bins(const std::vector<double>& counts, int64_t levels) {
  const int64_t bins = static_cast<int64_t>(counts.size());
  if (levels >= bins) {
    return bins;
  }
  std::vector<double> suffix(bins + 1, 0.0);
  std::vector<double> log_counts(bins, 0.0);
  for (int64_t k = bins - 1; k >= 0; --k) {
    suffix[k] = suffix[k + 1] + counts[k];
    if (counts[k] > 0.0) {
      log_counts[k] = std::log(counts[k]);
    }
  }
  const double total = suffix[0];
  std::vector<double> group_mass(levels);
  std::vector<int64_t> group_size(levels);
  std::vector<double> group_log(levels);
  int64_t best_i = bins;
  double best = std::numeric_limits<double>::infinity();
  for (int64_t i = levels; i <= bins; ++i) {
    const double kept = total - suffix[i];
    // Q is empty, or zero where P holds the clipped mass: an infinite divergence.
    if (!(kept > 0.0) || (counts[i - 1] == 0.0 && suffix[i] > 0.0)) {
      continue;
    }
    std::fill(group_mass.begin(), group_mass.end(), 0.0);
    std::fill(group_size.begin(), group_size.end(), 0);
    for (const auto k : c10::irange(i)) {
      if (counts[k] != 0.0) {
        const int64_t g = k * levels / i;
        group_mass[g] += counts[k];
        group_size[g] += 1;
      }
    }
    for (const auto g : c10::irange(levels)) {
      group_log[g] =
          group_size[g] > 0 ? std::log(group_mass[g] / static_cast<double>(group_size[g])) : 0.0;
    }
    // With P and Q in counts (P sums to total, Q to kept):
    // KL = sum(p * (log p - log q)) / total + log(kept / total).
    double sum = 0.0;
    for (const auto k : c10::irange(i - 1)) {
      if (counts[k] > 0.0) {
        sum += counts[k] * (log_counts[k] - group_log[k * levels / i]);
      }
    }
    const double last = counts[i - 1] + suffix[i];
    if (last > 0.0) {
      sum += last * (std::log(last) - group_log[(i - 1) * levels / i]);
    }
    const double divergence = sum / total + std::log(kept / total);
    if (divergence <= best) {
      best = divergence;
      best_i = i;
    }
  }
  return best_i;
}

enum class RangeMethod { kPercentile, kMse, kEntropy };

// [lo, hi] for one row with mass, within [min(hist_min, 0), max(hist_max, 0)].
std::pair<double, double> row_range(
    const RowDistribution& row, RangeMethod method, double percentile, int64_t quant_min,
    int64_t quant_max, bool symmetric) {
  const double lowest = std::min(row.min(), 0.0);
  const double highest = std::max(row.max(), 0.0);
  if (row.max() == row.min()) {
    // All mass sits on one value: nothing to clip.
    return {lowest, highest};
  }
  const auto magnitude_range = [&](double t) {
    return std::make_pair(std::max(-t, lowest), std::min(t, highest));
  };
  if (method == RangeMethod::kPercentile) {
    if (symmetric) {
      return magnitude_range(row.magnitude_quantile(percentile / 100.0 * row.total()));
    }
    return {
        std::min(row.quantile((100.0 - percentile) / 200.0 * row.total()), 0.0),
        std::max(row.quantile((100.0 + percentile) / 200.0 * row.total()), 0.0)};
  }
  if (method == RangeMethod::kMse) {
    if (symmetric) {
      return magnitude_range(mse_symmetric(row, quant_min, quant_max));
    }
    return mse_affine(row, quant_min, quant_max);
  }
  // Entropy: the quantized side has half the levels unless affine data is one-sided.
  const int64_t levels = quant_max - quant_min + 1;
  const bool one_sided = lowest == 0.0 || highest == 0.0;
  const double magnitude = std::max(-lowest, highest);
  const auto counts = magnitude_histogram(row, magnitude);
  const int64_t i = entropy_bins(counts, symmetric || !one_sided ? levels / 2 : levels);
  return magnitude_range(bin_edge(0.0, magnitude, row.bins(), i));
}

// Checks a histogram argument ([bins] or [C, bins], floating point) and returns its rows as
// a contiguous CPU float64 [rows, bins] tensor.
at::Tensor read_histogram(const char* op, const at::Tensor& histogram) {
  TORCH_CHECK(histogram.defined(), op, ": histogram is undefined");
  TORCH_CHECK(
      histogram.dim() == 1 || histogram.dim() == 2, op,
      ": histogram must be [bins] or [channels, bins], got shape ", histogram.sizes());
  TORCH_CHECK(
      at::isFloatingType(histogram.scalar_type()), op,
      ": histogram must be a floating-point tensor, got ", histogram.scalar_type());
  TORCH_CHECK(
      histogram.size(-1) >= 1, op, ": histogram must have at least one bin, got shape ",
      histogram.sizes());
  return histogram.detach()
      .to(at::kCPU, at::kDouble)
      .reshape({-1, histogram.size(-1)})
      .contiguous();
}

const char* rows_description(const at::Tensor& histogram) {
  return histogram.dim() == 1 ? "one for the per-tensor histogram" : "one per row of the histogram";
}

bool all_zero(const double* counts, int64_t bins) {
  return std::all_of(counts, counts + bins, [](double c) { return c == 0.0; });
}

}  // namespace

at::Tensor histogram(
    const at::Tensor& input, const at::Tensor& min, const at::Tensor& max, int64_t bins,
    c10::optional<int64_t> axis) {
  constexpr const char* op = "qat::histogram";
  detail::check_floating_input(op, input);
  TORCH_CHECK(bins >= 1, op, ": bins must be at least 1, got ", bins);

  c10::optional<int64_t> dim;
  int64_t rows = 1;
  if (axis.has_value()) {
    const int64_t ndim = input.dim();
    TORCH_CHECK(
        *axis >= -ndim && *axis < ndim, op, ": axis ", *axis, " is out of range for an input with ",
        ndim, " dimensions (expected an axis in [", -ndim, ", ", ndim - 1, "])");
    dim = *axis < 0 ? *axis + ndim : *axis;
    rows = input.size(*dim);
  }
  const char* what = axis.has_value() ? "one per channel of axis" : "one for axis=None";
  const auto mins = read_row_values(op, "min", min, rows, what);
  const auto maxs = read_row_values(op, "max", max, rows, what);

  std::vector<RowBins> row_bins(rows);
  for (const auto c : c10::irange(rows)) {
    TORCH_CHECK(
        !std::isnan(mins[c]) && !std::isnan(maxs[c]), op, ": min and max must not be NaN, got [",
        mins[c], ", ", maxs[c], "] for row ", c);
    RowBins& row = row_bins[c];
    row.empty = mins[c] > maxs[c];
    if (!row.empty) {
      row.min = mins[c];
      row.width = maxs[c] - mins[c];
      TORCH_CHECK(
          std::isfinite(row.width), op, ": min and max must be finite, got [", mins[c], ", ",
          maxs[c], "] for row ", c);
    }
  }

  auto counts = at::zeros({rows, bins}, at::TensorOptions().dtype(at::kDouble));
  if (input.numel() > 0) {
    // The pass reads raw memory of any dense layout (channels-last included).
    const auto x = detail::dense(input.detach().to(at::kCPU));
    const auto layout = detail::channel_layout(x, dim);
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, input.scalar_type(), "qat::histogram",
        [&] { count_all<scalar_t>(x, layout, row_bins, bins, counts.data_ptr<double>()); });
  }
  if (!axis.has_value()) {
    counts = counts.reshape({bins});
  }
  return counts.to(input.device());
}

at::Tensor histogram_rebin(
    const at::Tensor& histogram, const at::Tensor& old_min, const at::Tensor& old_max,
    const at::Tensor& new_min, const at::Tensor& new_max) {
  constexpr const char* op = "qat::histogram_rebin";
  const auto counts = read_histogram(op, histogram);
  const int64_t rows = counts.size(0);
  const int64_t bins = counts.size(1);
  const char* what = rows_description(histogram);
  const auto omin = read_row_values(op, "old_min", old_min, rows, what);
  const auto omax = read_row_values(op, "old_max", old_max, rows, what);
  const auto nmin = read_row_values(op, "new_min", new_min, rows, what);
  const auto nmax = read_row_values(op, "new_max", new_max, rows, what);

  auto result = at::zeros({rows, bins}, at::TensorOptions().dtype(at::kDouble));
  const double* in = counts.data_ptr<double>();
  double* out = result.data_ptr<double>();
  for (const auto r : c10::irange(rows)) {
    const double* h = in + r * bins;
    double* o = out + r * bins;
    // An empty row may carry any range, the identity [+inf, -inf] included.
    if (all_zero(h, bins)) {
      continue;
    }
    TORCH_CHECK(
        std::isfinite(omin[r]) && std::isfinite(omax[r]) && omin[r] <= omax[r], op,
        ": old_min and old_max must be finite with old_min <= old_max, got [", omin[r], ", ",
        omax[r], "] for row ", r);
    TORCH_CHECK(
        std::isfinite(nmin[r]) && std::isfinite(nmax[r]) && nmin[r] <= omin[r] &&
            nmax[r] >= omax[r],
        op, ": [new_min, new_max] must be finite and contain [old_min, old_max], got [", nmin[r],
        ", ", nmax[r], "] and [", omin[r], ", ", omax[r], "] for row ", r);
    const double new_width = nmax[r] - nmin[r];
    if (omax[r] == omin[r]) {
      // A zero-width histogram holds one value, omin.
      double mass = 0.0;
      for (const auto j : c10::irange(bins)) {
        mass += h[j];
      }
      spread(omin[r], omin[r], mass, nmin[r], new_width, bins, o);
      continue;
    }
    for (const auto j : c10::irange(bins)) {
      if (h[j] != 0.0) {
        spread(
            bin_edge(omin[r], omax[r], bins, j), bin_edge(omin[r], omax[r], bins, j + 1), h[j],
            nmin[r], new_width, bins, o);
      }
    }
  }
  return result.reshape(histogram.sizes()).to(histogram.device());
}

std::tuple<at::Tensor, at::Tensor> histogram_range(
    const at::Tensor& histogram, const at::Tensor& hist_min, const at::Tensor& hist_max,
    const std::string& method, double percentile, int64_t quant_min, int64_t quant_max,
    bool symmetric) {
  constexpr const char* op = "qat::histogram_range";
  RangeMethod kind = RangeMethod::kPercentile;
  if (method == "mse") {
    kind = RangeMethod::kMse;
  } else if (method == "entropy") {
    kind = RangeMethod::kEntropy;
  } else {
    TORCH_CHECK(
        method == "percentile", op, ": unknown method \"", method,
        "\"; expected one of \"percentile\", \"mse\", \"entropy\"");
    TORCH_CHECK(
        percentile > 0.0 && percentile <= 100.0, op,
        ": percentile must be in (0, 100] for method \"percentile\", got ", percentile);
  }
  detail::check_quant_range(op, quant_min, quant_max);

  const auto counts = read_histogram(op, histogram);
  const int64_t rows = counts.size(0);
  const int64_t bins = counts.size(1);
  const char* what = rows_description(histogram);
  const auto mins = read_row_values(op, "hist_min", hist_min, rows, what);
  const auto maxs = read_row_values(op, "hist_max", hist_max, rows, what);
  const double* data = counts.data_ptr<double>();

  std::vector<char> has_mass(rows);
  for (const auto r : c10::irange(rows)) {
    const double* h = data + r * bins;
    for (const auto j : c10::irange(bins)) {
      TORCH_CHECK(
          std::isfinite(h[j]) && h[j] >= 0.0, op,
          ": histogram counts must be finite and non-negative, got ", h[j], " in row ", r, ", bin ",
          j);
    }
    has_mass[r] = !all_zero(h, bins);
    if (has_mass[r]) {
      TORCH_CHECK(
          std::isfinite(mins[r]) && std::isfinite(maxs[r]) && mins[r] <= maxs[r] &&
              std::isfinite(maxs[r] - mins[r]),
          op, ": hist_min and hist_max must be finite with hist_min <= hist_max, got [", mins[r],
          ", ", maxs[r], "] for row ", r);
    }
  }

  auto lo = at::empty({rows}, at::TensorOptions().dtype(at::kFloat));
  auto hi = at::empty({rows}, at::TensorOptions().dtype(at::kFloat));
  float* lo_data = lo.data_ptr<float>();
  float* hi_data = hi.data_ptr<float>();
  at::parallel_for(0, rows, 1, [&](int64_t first, int64_t last) {
    for (const auto r : c10::irange(first, last)) {
      std::pair<double, double> range{std::min(mins[r], 0.0), std::max(maxs[r], 0.0)};
      if (has_mass[r]) {
        const RowDistribution row(data + r * bins, bins, mins[r], maxs[r]);
        range = row_range(row, kind, percentile, quant_min, quant_max, symmetric);
      }
      lo_data[r] = static_cast<float>(range.first);
      hi_data[r] = static_cast<float>(range.second);
    }
  });
  const auto device = histogram.device();
  return {lo.to(device), hi.to(device)};
}

}  // namespace qat

namespace {

std::tuple<at::Tensor, at::Tensor> histogram_range_op(
    const at::Tensor& histogram, const at::Tensor& hist_min, const at::Tensor& hist_max,
    c10::string_view method, double percentile, int64_t quant_min, int64_t quant_max,
    bool symmetric) {
  return qat::histogram_range(
      histogram, hist_min, hist_max, std::string(method.data(), method.size()), percentile,
      quant_min, quant_max, symmetric);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(qat, m) {
  m.def(
      "histogram(Tensor input, Tensor min, Tensor max, int bins, int? axis=None) -> Tensor",
      TORCH_FN(qat::histogram));
  m.def(
      "histogram_rebin(Tensor histogram, Tensor old_min, Tensor old_max, Tensor new_min, "
      "Tensor new_max) -> Tensor",
      TORCH_FN(qat::histogram_rebin));
  m.def(
      "histogram_range(Tensor histogram, Tensor hist_min, Tensor hist_max, str method, "
      "float percentile, int quant_min, int quant_max, bool symmetric) -> (Tensor, Tensor)",
      TORCH_FN(histogram_range_op));
}
