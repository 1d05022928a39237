#pragma once

// The observers' qparam formulas, once, for float32 (what choose_qparams returns, as
// PyTorch's observers compute it) and float64 (the histogram range search). Internal.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>

namespace qat {
namespace detail {

// Zero point of a symmetric range: 0 when signed, the middle level when unsigned.
inline int64_t symmetric_zero_point(int64_t quant_min, int64_t quant_max) {
  return quant_min < 0 ? 0 : (quant_min + quant_max + 1) / 2;
}

// (scale, zero_point) for the range [lo, hi] (lo <= hi), widened to contain 0, with the
// scale never below float32 epsilon. T is the arithmetic's type.
template <typename T>
std::pair<T, T> qparams_for_range(
    T lo, T hi, int64_t quant_min, int64_t quant_max, bool symmetric) {
  const T eps = static_cast<T>(std::numeric_limits<float>::epsilon());
  const T min_neg = std::min(lo, T(0));
  const T max_pos = std::max(hi, T(0));
  const T steps = static_cast<T>(quant_max - quant_min);
  if (symmetric) {
    const T scale = std::max(std::max(-min_neg, max_pos) / (steps / T(2)), eps);
    return {scale, static_cast<T>(symmetric_zero_point(quant_min, quant_max))};
  }
  const T scale = std::max((max_pos - min_neg) / steps, eps);
  const T zero_point = static_cast<T>(quant_min) - std::nearbyint(min_neg / scale);
  return {
      scale, std::min(std::max(zero_point, static_cast<T>(quant_min)), static_cast<T>(quant_max))};
}

}  // namespace detail
}  // namespace qat
