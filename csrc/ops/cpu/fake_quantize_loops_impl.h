// Body of the vectorized fake-quantize loops, included once per CPU capability with
// CPU_CAPABILITY set (DEFAULT or AVX2), so every definition lands in its own namespace.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "fake_quantize_loops.h"

namespace qat {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

// Elements per task of at::parallel_for: large enough that two threads do not pay
// more in scheduling than they save on a tensor of a few hundred kilobytes.
constexpr int64_t kGrain = 32768;
// Channels whose memory runs are shorter than this are walked with per-element
// parameters instead of one run per channel.
constexpr int64_t kMinUniformRun = 64;
// Per-element parameter tables repeat the channel pattern up to at least this length,
// so that each contiguous stretch of work is long enough to vectorize.
constexpr int64_t kMinPeriod = 256;
// Float partial sums are moved into doubles this often, bounding rounding error.
constexpr int64_t kFlushEvery = 512;
// Backward reductions use a fixed chunking of the tensor, so results do not depend on
// the number of threads.
constexpr int64_t kMaxChunks = 64;

// Adding and subtracting 1.5 * 2^mantissa rounds to the nearest integer, ties to even
// (the default IEEE mode, as nearbyint), for |v| < 2^(mantissa-1).
template <typename T>
struct RoundMagic;
template <>
struct RoundMagic<float> {
  static constexpr float value = 12582912.0f;
};
template <>
struct RoundMagic<double> {
  static constexpr double value = 6755399441055744.0;
};

// Constants of one channel in the math type M. lo/hi are the clamping bounds relative
// to the zero point: quant_min - zero_point and quant_max - zero_point.
template <typename M>
struct Channel {
  M scale, inv_scale, lo, hi;
};

template <typename M>
Channel<M> make_channel(float scale, float zero_point, int64_t quant_min, int64_t quant_max) {
  // As PyTorch's kernels: the reciprocal is taken in float32, then x * inv_scale in M.
  const float inv = 1.0f / scale;
  return {
      static_cast<M>(scale), static_cast<M>(inv),
      static_cast<M>(static_cast<float>(quant_min) - zero_point),
      static_cast<M>(static_cast<float>(quant_max) - zero_point)};
}

// One channel for a whole run of elements.
template <typename M>
struct UniformParams {
  using Vec = Vectorized<M>;
  Vec scale, inv_scale, lo, hi;
  explicit UniformParams(const Channel<M>& c)
      : scale(c.scale), inv_scale(c.inv_scale), lo(c.lo), hi(c.hi) {}
  Vec get_scale(int64_t, int64_t) const { return scale; }
  Vec get_inv_scale(int64_t, int64_t) const { return inv_scale; }
  Vec get_lo(int64_t, int64_t) const { return lo; }
  Vec get_hi(int64_t, int64_t) const { return hi; }
  UniformParams shifted(int64_t) const { return *this; }
};

// Parameters that change from element to element (channels with short memory runs).
template <typename M>
struct ElementwiseParams {
  using Vec = Vectorized<M>;
  const M* scale;
  const M* inv_scale;
  const M* lo;
  const M* hi;
  Vec get_scale(int64_t i, int64_t n) const { return Vec::loadu(scale + i, n); }
  Vec get_inv_scale(int64_t i, int64_t n) const { return Vec::loadu(inv_scale + i, n); }
  Vec get_lo(int64_t i, int64_t n) const { return Vec::loadu(lo + i, n); }
  Vec get_hi(int64_t i, int64_t n) const { return Vec::loadu(hi + i, n); }
  ElementwiseParams shifted(int64_t i) const { return {scale + i, inv_scale + i, lo + i, hi + i}; }
};

// max(v, lo) and min(v, hi) that keep a NaN v as NaN, in one instruction where the
// processor's max/min already return their second operand on NaN.
template <typename M>
inline Vectorized<M> raise_to(const Vectorized<M>& v, const Vectorized<M>& lo) {
  return Vectorized<M>::blendv(v, lo, v < lo);
}
template <typename M>
inline Vectorized<M> lower_to(const Vectorized<M>& v, const Vectorized<M>& hi) {
  return Vectorized<M>::blendv(v, hi, v > hi);
}
#if defined(CPU_CAPABILITY_AVX2)
template <>
inline Vectorized<float> raise_to(const Vectorized<float>& v, const Vectorized<float>& lo) {
  return _mm256_max_ps(lo, v);
}
template <>
inline Vectorized<float> lower_to(const Vectorized<float>& v, const Vectorized<float>& hi) {
  return _mm256_min_ps(hi, v);
}
template <>
inline Vectorized<double> raise_to(const Vectorized<double>& v, const Vectorized<double>& lo) {
  return _mm256_max_pd(lo, v);
}
template <>
inline Vectorized<double> lower_to(const Vectorized<double>& v, const Vectorized<double>& hi) {
  return _mm256_min_pd(hi, v);
}
#endif

// v = x / s clamped to [lo - 1, hi + 1] (NaN stays NaN) and r = round-half-even(v).
// Clamping first keeps the rounding trick exact, and since rounding is monotonic,
// clamp(round(v), lo, hi) equals round(clamp(v, lo, hi)) for the integer bounds.
template <typename M>
inline void levels(
    const Vectorized<M>& x, const Vectorized<M>& inv_scale, const Vectorized<M>& lo,
    const Vectorized<M>& hi, Vectorized<M>& v, Vectorized<M>& r) {
  using Vec = Vectorized<M>;
  const Vec one(M(1));
  const Vec magic(RoundMagic<M>::value);
  v = lower_to(raise_to(x * inv_scale, lo - one), hi + one);
  r = (v + magic) - magic;
}

// Codes are converted between bytes and the math type a block at a time: with a
// fixed trip count the compiler vectorizes the conversion loops.
constexpr int64_t kCodeBlock = 64;

template <typename M, typename P>
void forward_run_portable(const M* x, M* out, uint8_t* code, int64_t n, const P& p) {
  using Vec = Vectorized<M>;
  constexpr int64_t W = Vec::size();
  static_assert(kCodeBlock % W == 0, "code blocks hold whole vectors");
  M codes[kCodeBlock];
  for (int64_t b = 0; b < n; b += kCodeBlock) {
    const int64_t block = std::min(kCodeBlock, n - b);
    for (int64_t j = 0; j < block; j += W) {
      const int64_t i = b + j;
      const int64_t m = std::min<int64_t>(W, n - i);
      const Vec lo = p.get_lo(i, m);
      const Vec hi = p.get_hi(i, m);
      Vec v, r;
      levels(Vec::loadu(x + i, m), p.get_inv_scale(i, m), lo, hi, v, r);
      (lower_to(raise_to(r, lo), hi) * p.get_scale(i, m)).store(out + i, m);
      if (code != nullptr) {
        (r.lt(lo) + Vec(M(2)) * r.gt(hi) + Vec(M(3)) * r.ne(r)).store(codes + j);
      }
    }
    if (code == nullptr) {
      continue;
    }
    if (block == kCodeBlock) {
      for (int64_t j = 0; j < kCodeBlock; ++j) {
        code[b + j] = static_cast<uint8_t>(static_cast<int32_t>(codes[j]));
      }
    } else {
      for (int64_t j = 0; j < block; ++j) {
        code[b + j] = static_cast<uint8_t>(static_cast<int32_t>(codes[j]));
      }
    }
  }
}

// Scale / zero-point partial sums of one uniform run, flushed into doubles.
template <typename M>
struct UniformAccumulator {
  using Vec = Vectorized<M>;
  Vec scale_sum{M(0)};
  Vec zero_point_sum{M(0)};
  int64_t pending = 0;
  double scale_total = 0.0;
  double zero_point_total = 0.0;

  void add(int64_t, int64_t, const Vec& ds, const Vec& dz) {
    scale_sum = scale_sum + ds;
    zero_point_sum = zero_point_sum + dz;
    if (++pending == kFlushEvery) {
      flush();
    }
  }
  void flush() {
    M buf[Vec::size()];
    scale_sum.store(buf);
    for (const M value : buf) {
      scale_total += value;
    }
    zero_point_sum.store(buf);
    for (const M value : buf) {
      zero_point_total += value;
    }
    scale_sum = Vec(M(0));
    zero_point_sum = Vec(M(0));
    pending = 0;
  }
  UniformAccumulator& shifted(int64_t) { return *this; }
};

// Per-position partial sums for elementwise parameters; folded into channels later.
template <typename M>
struct ElementwiseAccumulator {
  using Vec = Vectorized<M>;
  M* scale_sum;
  M* zero_point_sum;
  void add(int64_t i, int64_t n, const Vec& ds, const Vec& dz) {
    (Vec::loadu(scale_sum + i, n) + ds).store(scale_sum + i, n);
    (Vec::loadu(zero_point_sum + i, n) + dz).store(zero_point_sum + i, n);
  }
  ElementwiseAccumulator shifted(int64_t i) const { return {scale_sum + i, zero_point_sum + i}; }
};

struct BackwardFlags {
  bool scale_grad;
  bool scale_grad_inside;
  bool zero_point_grad;
  double ewgs_delta;
};

// Backward from the cached code (ste, pact): reads g and one byte per element; clamped
// elements feed the scale and zero-point sums as in backward_input_run.
template <typename M, typename P, typename A>
void backward_code_run_portable(
    const M* g, const uint8_t* code, M* dx, int64_t n, const P& p, A&& acc,
    const BackwardFlags& f) {
  using Vec = Vectorized<M>;
  constexpr int64_t W = Vec::size();
  const Vec zero(M(0));
  M codes[kCodeBlock];
  for (int64_t b = 0; b < n; b += kCodeBlock) {
    const int64_t block = std::min(kCodeBlock, n - b);
    if (block == kCodeBlock) {
      for (int64_t j = 0; j < kCodeBlock; ++j) {
        codes[j] = static_cast<M>(static_cast<int32_t>(code[b + j]));
      }
    } else {
      for (int64_t j = 0; j < block; ++j) {
        codes[j] = static_cast<M>(static_cast<int32_t>(code[b + j]));
      }
    }
    for (int64_t j = 0; j < block; j += W) {
      const int64_t i = b + j;
      const int64_t m = std::min<int64_t>(W, n - i);
      const Vec c = Vec::loadu(codes + j, m);
      const Vec gv = Vec::loadu(g + i, m);
      (gv * c.eq(zero)).store(dx + i, m);
      if (f.scale_grad || f.zero_point_grad) {
        const Vec below = c.eq(Vec(M(1)));
        const Vec above = c.eq(Vec(M(2)));
        const Vec ds = f.scale_grad ? gv * (below * p.get_lo(i, m) + above * p.get_hi(i, m)) : zero;
        const Vec dz = f.zero_point_grad ? gv * (below + above) * p.get_scale(i, m) : zero;
        acc.add(i, m, ds, dz);
      }
    }
  }
}

#if defined(CPU_CAPABILITY_AVX2)
// float32 codes straight from the comparison masks, packed eight to a 64-bit store,
// and read back as lane masks: a few integer instructions instead of conversions.

// Eight 32-bit lanes holding codes 0..3, stored as eight bytes.
inline void store_code_lanes8(const __m256i code, uint8_t* dst) {
  const __m128i words =
      _mm_packs_epi32(_mm256_castsi256_si128(code), _mm256_extracti128_si256(code, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(dst), _mm_packus_epi16(words, words));
}

inline void store_codes8(const __m256 r, const __m256 lo, const __m256 hi, uint8_t* dst) {
  const __m256i below = _mm256_castps_si256(_mm256_cmp_ps(r, lo, _CMP_LT_OQ));
  const __m256i above = _mm256_castps_si256(_mm256_cmp_ps(r, hi, _CMP_GT_OQ));
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(r, r, _CMP_UNORD_Q));
  if (_mm256_testz_si256(
          _mm256_or_si256(_mm256_or_si256(below, above), nan), _mm256_set1_epi32(-1))) {
    // Nothing clamped among the eight, as almost everywhere: eight zero bytes.
    _mm_storel_epi64(reinterpret_cast<__m128i*>(dst), _mm_setzero_si128());
    return;
  }
  store_code_lanes8(
      _mm256_or_si256(
          _mm256_or_si256(
              _mm256_and_si256(below, _mm256_set1_epi32(1)),
              _mm256_and_si256(above, _mm256_set1_epi32(2))),
          _mm256_and_si256(nan, _mm256_set1_epi32(3))),
      dst);
}

inline __m256i load_codes8(const uint8_t* src) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src)));
}

inline __m256 lanes_equal(const __m256i codes, int value) {
  return _mm256_castsi256_ps(_mm256_cmpeq_epi32(codes, _mm256_set1_epi32(value)));
}

// round-half-even(x / s) in one instruction (as nearbyint, in the default rounding mode).
// Where levels clamps first so that its rounding trick stays exact, this rounds any value
// exactly and keeps NaN and the infinities, so clamping the result to [lo, hi] gives the
// same level, and the result is outside [lo, hi] (or NaN) exactly where levels' r is.
inline Vectorized<float> rounded_levels(
    const Vectorized<float>& x, const Vectorized<float>& inv_scale) {
  return _mm256_round_ps(x * inv_scale, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

// Stores a vector of output; with Stream, around the caches where `dst` is aligned (a
// non-temporal store), which saves reading each line of the output before it is written.
// The writer then needs a store fence before another thread reads the output.
template <bool Stream>
inline void store_output(const Vectorized<float>& v, float* dst) {
  if constexpr (Stream) {
    if ((reinterpret_cast<uintptr_t>(dst) & 31) == 0) {
      _mm256_stream_ps(dst, v);
      return;
    }
  }
  v.store(dst);
}

// With `code` null, the forward alone (inference, calibration).
template <bool Stream, typename P>
void forward_run_fast(const float* x, float* out, uint8_t* code, int64_t n, const P& p) {
  using Vec = Vectorized<float>;
  constexpr int64_t W = Vec::size();
  const int64_t full = n - n % W;
  for (int64_t i = 0; i < full; i += W) {
    const Vec lo = p.get_lo(i, W);
    const Vec hi = p.get_hi(i, W);
    const Vec r = rounded_levels(Vec::loadu(x + i), p.get_inv_scale(i, W));
    store_output<Stream>(lower_to(raise_to(r, lo), hi) * p.get_scale(i, W), out + i);
    if (code != nullptr) {
      store_codes8(r, lo, hi, code + i);
    }
  }
  forward_run_portable(
      x + full, out + full, code ? code + full : nullptr, n - full, p.shifted(full));
}

// The forward without codes, appending the offsets (from `base`) of the elements clamped or
// NaN to `found` as it goes: one comparison per vector (a level differs from itself clamped
// exactly where its code would be nonzero, and NaN differs from everything), instead of the
// codes' three comparisons and store. A channel of a min/max-observed weight clamps its
// extreme, so nearly every block of a weight has one: found in the same pass, the block is
// not computed again with codes and scanned. The comparisons of a group of vectors are
// merged and tested once, and only a group with a lane set is read again (from L1) for its
// offsets: the loop over the values makes no call, so it keeps its constants in registers.
template <bool Stream, typename P>
void forward_run_fast_positions(
    const float* x, float* out, int64_t n, const P& p, int64_t base, std::vector<int64_t>& found) {
  using Vec = Vectorized<float>;
  constexpr int64_t W = Vec::size();
  constexpr int64_t kGroup = 8 * W;
  const int64_t full = n - n % W;
  // The level kept at i, and whether it differs from the rounded one (clamped, or NaN).
  const auto level = [&](int64_t i, Vec& kept) {
    const Vec r = rounded_levels(Vec::loadu(x + i), p.get_inv_scale(i, W));
    kept = lower_to(raise_to(r, p.get_lo(i, W)), p.get_hi(i, W));
    return _mm256_cmp_ps(r, kept, _CMP_NEQ_UQ);
  };
  for (int64_t g = 0; g < full; g += kGroup) {
    const int64_t group_end = std::min(full, g + kGroup);
    __m256 any = _mm256_setzero_ps();
    for (int64_t i = g; i < group_end; i += W) {
      Vec kept;
      any = _mm256_or_ps(any, level(i, kept));
      store_output<Stream>(kept * p.get_scale(i, W), out + i);
    }
    if (_mm256_testz_ps(any, any)) {
      continue;
    }
    for (int64_t i = g; i < group_end; i += W) {
      Vec kept;
      const int lanes = _mm256_movemask_ps(level(i, kept));
      for (int j = 0; lanes >> j != 0; ++j) {
        if ((lanes >> j) & 1) {
          found.push_back(base + i + j);
        }
      }
    }
  }
  uint8_t tail[W] = {};
  forward_run_portable(x + full, out + full, tail, n - full, p.shifted(full));
  for (int64_t j = 0; j < n - full; ++j) {
    if (tail[j] != 0) {
      found.push_back(base + full + j);
    }
  }
}

template <typename P, typename A>
void backward_code_run_fast(
    const float* g, const uint8_t* code, float* dx, int64_t n, const P& p, A&& acc,
    const BackwardFlags& f) {
  using Vec = Vectorized<float>;
  constexpr int64_t W = Vec::size();
  const Vec zero(0.0f);
  const Vec one(1.0f);
  const int64_t full = n - n % W;
  for (int64_t i = 0; i < full; i += W) {
    const __m256i codes = load_codes8(code + i);
    const Vec gv = Vec::loadu(g + i);
    // g * 1 or g * 0, as ATen's g * mask, so a NaN gradient stays NaN everywhere.
    (gv * Vec(_mm256_and_ps(lanes_equal(codes, 0), one))).store(dx + i);
    if (f.scale_grad || f.zero_point_grad) {
      const __m256 below = lanes_equal(codes, 1);
      const __m256 above = lanes_equal(codes, 2);
      const Vec ds = f.scale_grad ? gv * Vec(_mm256_or_ps(
                                             _mm256_and_ps(below, p.get_lo(i, W)),
                                             _mm256_and_ps(above, p.get_hi(i, W))))
                                  : zero;
      const Vec dz = f.zero_point_grad
                         ? gv * Vec(_mm256_and_ps(_mm256_or_ps(below, above), p.get_scale(i, W)))
                         : zero;
      acc.add(i, W, ds, dz);
    }
  }
  backward_code_run_portable(
      g + full, code + full, dx + full, n - full, p.shifted(full), acc.shifted(full), f);
}
#endif

// Stream: write the output around the caches where the vector loop can (store_output).
template <typename M, bool Stream = false, typename P>
void forward_run(const M* x, M* out, uint8_t* code, int64_t n, const P& p) {
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same<M, float>::value) {
    return forward_run_fast<Stream>(x, out, code, n, p);
  }
#endif
  forward_run_portable(x, out, code, n, p);
}

template <typename M, typename P, typename A>
void backward_code_run(
    const M* g, const uint8_t* code, M* dx, int64_t n, const P& p, A&& acc,
    const BackwardFlags& f) {
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same<M, float>::value) {
    return backward_code_run_fast(g, code, dx, n, p, acc, f);
  }
#endif
  backward_code_run_portable(g, code, dx, n, p, acc, f);
}

// Backward from the input (lsq, lsq_plus, ewgs): recomputes the levels in one pass.
template <typename M, typename P, typename A>
void backward_input_run(
    const M* g, const M* x, M* dx, int64_t n, const P& p, A&& acc, const BackwardFlags& f) {
  using Vec = Vectorized<M>;
  constexpr int64_t W = Vec::size();
  const Vec zero(M(0));
  const Vec one(M(1));
  const Vec delta(static_cast<M>(f.ewgs_delta));
  const bool ewgs = f.ewgs_delta != 0.0;
  for (int64_t i = 0; i < n; i += W) {
    const int64_t m = std::min<int64_t>(W, n - i);
    const Vec lo = p.get_lo(i, m);
    const Vec hi = p.get_hi(i, m);
    const Vec gv = Vec::loadu(g + i, m);
    Vec v, r;
    levels(Vec::loadu(x + i, m), p.get_inv_scale(i, m), lo, hi, v, r);
    // Bit masks (all ones where true) select; 1.0/0.0 values multiply. NaN inputs are
    // in no class, and blends keep their NaN residual out of the sums.
    const Vec inside_mask = (r >= lo) & (r <= hi);
    const Vec below = r.lt(lo);
    const Vec above = r.gt(hi);
    if (ewgs) {
      const Vec sign = gv.gt(zero) - gv.lt(zero);
      const Vec scaled = gv * (one + delta * sign * (v - r));
      Vec::blendv(zero, scaled, inside_mask).store(dx + i, m);
    } else {
      (gv * (inside_mask & one)).store(dx + i, m);
    }
    if (f.scale_grad || f.zero_point_grad) {
      Vec ds = zero;
      Vec dz = zero;
      if (f.scale_grad) {
        ds = gv * (below * lo + above * hi);
        if (f.scale_grad_inside) {
          ds = ds + Vec::blendv(zero, gv * (r - v), inside_mask);
        }
      }
      if (f.zero_point_grad) {
        dz = gv * (below + above) * p.get_scale(i, m);
      }
      acc.add(i, m, ds, dz);
    }
  }
}

// Float16 / bfloat16 go through float32 buffers: math in float32, storage in the
// input's dtype.
constexpr int64_t kConvertBlock = 512;

template <typename T>
const float* widen(const T* src, float* buf, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    buf[j] = static_cast<float>(src[j]);
  }
  return buf;
}

template <typename T>
void narrow(const float* buf, T* dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    dst[j] = static_cast<T>(buf[j]);
  }
}

template <typename T, typename M, bool Stream = false, typename P>
void forward_any(const T* x, T* out, uint8_t* code, int64_t n, const P& p) {
  if constexpr (std::is_same<T, M>::value) {
    forward_run<M, Stream>(x, out, code, n, p);
  } else {
    M xb[kConvertBlock];
    M ob[kConvertBlock];
    for (int64_t i = 0; i < n; i += kConvertBlock) {
      const int64_t m = std::min(kConvertBlock, n - i);
      forward_run<M>(widen(x + i, xb, m), ob, code ? code + i : nullptr, m, p.shifted(i));
      narrow(ob, out + i, m);
    }
  }
}

// Elements per block of forward_positions: its codes stay in L1.
constexpr int64_t kPositionBlock = 512;

// forward_any, with the offsets (from `base`) of the elements clamped or NaN appended to
// `found` instead of their codes stored: each block's codes go to a buffer that is scanned
// while in cache. Returns false, leaving the rest of the output computed but the positions
// incomplete, once `found` holds more than `limit`.
template <typename T, typename M, bool Stream = false, typename P>
bool forward_positions(
    const T* x, T* out, int64_t n, const P& p, int64_t base, size_t limit,
    std::vector<int64_t>& found) {
  alignas(8) uint8_t codes[kPositionBlock];
  bool complete = true;
  for (int64_t b = 0; b < n; b += kPositionBlock) {
    const int64_t m = std::min(kPositionBlock, n - b);
    if (!complete) {
      forward_any<T, M, Stream>(x + b, out + b, nullptr, m, p.shifted(b));
      continue;
    }
#if defined(CPU_CAPABILITY_AVX2)
    if constexpr (std::is_same<T, float>::value && std::is_same<M, float>::value) {
      forward_run_fast_positions<Stream>(x + b, out + b, m, p.shifted(b), base + b, found);
      complete = found.size() <= limit;
      continue;
    }
#endif
    forward_any<T, M, Stream>(x + b, out + b, codes, m, p.shifted(b));
    std::fill(codes + m, codes + ((m + 7) & ~int64_t(7)), uint8_t(0));
    for (int64_t w = 0; w < m; w += 8) {
      uint64_t word;
      std::memcpy(&word, codes + w, sizeof(word));
      if (word == 0) {
        continue;
      }
      for (int64_t j = w; j < std::min(m, w + 8); ++j) {
        if (codes[j] != 0) {
          found.push_back(base + b + j);
        }
      }
    }
    complete = found.size() <= limit;
  }
  return complete;
}

// One piece of a forward loop's work, [begin, end) of the tensor: `each(run)` calls
// run(pos, len, params) for its stretches, which are fake-quantized with codes (or none),
// or with their clamped positions gathered into `record`.
template <typename T, typename M, bool Stream = false, typename Each>
void forward_piece(
    const T* x, T* out, uint8_t* code, ClampedRecord* record, int64_t begin, int64_t end,
    Each&& each) {
  if (record == nullptr) {
    each([&](int64_t pos, int64_t len, const auto& params) {
      forward_any<T, M, Stream>(x + pos, out + pos, code ? code + pos : nullptr, len, params);
    });
    return;
  }
  const auto limit = static_cast<size_t>(std::max((end - begin) / kSparseShare, kMinPositions));
  std::vector<int64_t> found;
  bool complete = true;
  each([&](int64_t pos, int64_t len, const auto& params) {
    if (complete) {
      complete =
          forward_positions<T, M, Stream>(x + pos, out + pos, len, params, pos, limit, found);
    } else {
      forward_any<T, M, Stream>(x + pos, out + pos, nullptr, len, params);
    }
  });
  if (complete) {
    record->add(begin, std::move(found));
  } else {
    record->overflow();
  }
}

template <typename T, typename M, typename P, typename A>
void backward_any(
    const T* g, const T* x, const uint8_t* code, T* dx, int64_t n, const P& p, A&& acc,
    const BackwardFlags& f) {
  if constexpr (std::is_same<T, M>::value) {
    if (code != nullptr) {
      backward_code_run<M>(g, code, dx, n, p, acc, f);
    } else {
      backward_input_run<M>(g, x, dx, n, p, acc, f);
    }
  } else {
    M gb[kConvertBlock];
    M xb[kConvertBlock];
    M db[kConvertBlock];
    for (int64_t i = 0; i < n; i += kConvertBlock) {
      const int64_t m = std::min(kConvertBlock, n - i);
      const M* gm = widen(g + i, gb, m);
      auto&& sub = acc.shifted(i);
      if (code != nullptr) {
        backward_code_run<M>(gm, code + i, db, m, p.shifted(i), sub, f);
      } else {
        backward_input_run<M>(gm, widen(x + i, xb, m), db, m, p.shifted(i), sub, f);
      }
      narrow(db, dx + i, m);
    }
  }
}

// Tables of per-element parameters that repeat the channel pattern with a period that
// is a multiple of channels * inner and at least kMinPeriod long.
template <typename M>
struct PeriodicTables {
  int64_t period = 0;
  int64_t pattern = 0;  // channels * inner
  int64_t inner = 1;
  std::vector<M> scale, inv_scale, lo, hi;

  PeriodicTables(const std::vector<Channel<M>>& channels, int64_t inner_) : inner(inner_) {
    pattern = static_cast<int64_t>(channels.size()) * inner;
    period = pattern * ((kMinPeriod + pattern - 1) / pattern);
    scale.resize(period);
    inv_scale.resize(period);
    lo.resize(period);
    hi.resize(period);
    // Channel by channel, a run of `inner` equal values each: an integer division per
    // element cost more than the fake-quantize itself on a depthwise weight.
    int64_t k = 0;
    while (k < period) {
      for (const auto& c : channels) {
        std::fill_n(scale.begin() + k, inner, c.scale);
        std::fill_n(inv_scale.begin() + k, inner, c.inv_scale);
        std::fill_n(lo.begin() + k, inner, c.lo);
        std::fill_n(hi.begin() + k, inner, c.hi);
        k += inner;
      }
    }
  }
  ElementwiseParams<M> at(int64_t phase) const {
    return {scale.data() + phase, inv_scale.data() + phase, lo.data() + phase, hi.data() + phase};
  }
};

// Calls f(begin, length, channel) for the pieces of [begin, end) that lie in one
// channel's run of memory.
template <typename F>
void for_each_uniform_run(const detail::ChannelLayout& l, int64_t begin, int64_t end, F&& f) {
  int64_t pos = begin;
  while (pos < end) {
    const int64_t run = pos / l.inner;
    const int64_t stop = std::min(end, (run + 1) * l.inner);
    f(pos, stop - pos, run % l.channels);
    pos = stop;
  }
}

// Calls f(begin, length, phase) for the pieces of [begin, end) that do not wrap the
// period of the parameter tables.
template <typename F>
void for_each_period(int64_t period, int64_t begin, int64_t end, F&& f) {
  int64_t pos = begin;
  while (pos < end) {
    const int64_t phase = pos % period;
    const int64_t stop = std::min(end, pos + (period - phase));
    f(pos, stop - pos, phase);
    pos = stop;
  }
}

template <typename M>
std::vector<Channel<M>> make_channels(
    const float* scale, const float* zero_point, int64_t channels, int64_t quant_min,
    int64_t quant_max) {
  std::vector<Channel<M>> out(channels);
  for (int64_t c = 0; c < channels; ++c) {
    out[c] = make_channel<M>(scale[c], zero_point[c], quant_min, quant_max);
  }
  return out;
}

bool use_uniform_runs(const detail::ChannelLayout& l) {
  return l.channels == 1 || l.inner >= kMinUniformRun;
}

template <typename T, typename M>
void forward_typed(const ForwardLoopArgs& a) {
  const auto& l = a.layout;
  const int64_t numel = l.outer * l.channels * l.inner;
  const T* x = static_cast<const T*>(a.input);
  T* out = static_cast<T*>(a.output);
  uint8_t* code = a.code;
  const auto channels =
      make_channels<M>(a.scale, a.zero_point, l.channels, a.quant_min, a.quant_max);
  if (use_uniform_runs(l)) {
    at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
      forward_piece<T, M>(x, out, code, a.clamped, begin, end, [&](auto&& run) {
        for_each_uniform_run(l, begin, end, [&](int64_t pos, int64_t len, int64_t c) {
          run(pos, len, UniformParams<M>(channels[c]));
        });
      });
    });
    return;
  }
  const PeriodicTables<M> tables(channels, l.inner);
  at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
    forward_piece<T, M>(x, out, code, a.clamped, begin, end, [&](auto&& run) {
      for_each_period(tables.period, begin, end, [&](int64_t pos, int64_t len, int64_t phase) {
        run(pos, len, tables.at(phase));
      });
    });
  });
}

template <typename T, typename M>
void backward_typed(const BackwardLoopArgs& a) {
  const auto& l = a.layout;
  const int64_t numel = l.outer * l.channels * l.inner;
  const T* g = static_cast<const T*>(a.grad);
  const T* x = static_cast<const T*>(a.input);
  const uint8_t* code = a.code;
  T* dx = static_cast<T*>(a.grad_input);
  const BackwardFlags flags{a.scale_grad, a.scale_grad_inside, a.zero_point_grad, a.ewgs_delta};
  const auto channels =
      make_channels<M>(a.scale, a.zero_point, l.channels, a.quant_min, a.quant_max);
  const int64_t num_chunks =
      std::max<int64_t>(1, std::min<int64_t>(kMaxChunks, (numel + kGrain - 1) / kGrain));
  const int64_t chunk = (numel + num_chunks - 1) / num_chunks;
  const int64_t C = l.channels;
  // Per chunk and channel, so that the final sum runs in a fixed order.
  std::vector<double> scale_sums(num_chunks * C, 0.0);
  std::vector<double> zero_point_sums(num_chunks * C, 0.0);

  if (use_uniform_runs(l)) {
    at::parallel_for(0, num_chunks, 1, [&](int64_t first, int64_t last) {
      for (int64_t k = first; k < last; ++k) {
        const int64_t begin = k * chunk;
        const int64_t end = std::min(numel, begin + chunk);
        for_each_uniform_run(l, begin, end, [&](int64_t pos, int64_t len, int64_t c) {
          UniformAccumulator<M> acc;
          backward_any<T, M>(
              g + pos, x ? x + pos : nullptr, code ? code + pos : nullptr, dx + pos, len,
              UniformParams<M>(channels[c]), acc, flags);
          acc.flush();
          scale_sums[k * C + c] += acc.scale_total;
          zero_point_sums[k * C + c] += acc.zero_point_total;
        });
      }
    });
  } else {
    const PeriodicTables<M> tables(channels, l.inner);
    const int64_t P = tables.period;
    const bool reduce = flags.scale_grad || flags.zero_point_grad;
    at::parallel_for(0, num_chunks, 1, [&](int64_t first, int64_t last) {
      std::vector<M> scale_acc(reduce ? P : 0);
      std::vector<M> zero_point_acc(reduce ? P : 0);
      for (int64_t k = first; k < last; ++k) {
        std::fill(scale_acc.begin(), scale_acc.end(), M(0));
        std::fill(zero_point_acc.begin(), zero_point_acc.end(), M(0));
        const int64_t begin = k * chunk;
        const int64_t end = std::min(numel, begin + chunk);
        for_each_period(P, begin, end, [&](int64_t pos, int64_t len, int64_t phase) {
          ElementwiseAccumulator<M> acc{
              reduce ? scale_acc.data() + phase : nullptr,
              reduce ? zero_point_acc.data() + phase : nullptr};
          backward_any<T, M>(
              g + pos, x ? x + pos : nullptr, code ? code + pos : nullptr, dx + pos, len,
              tables.at(phase), acc, flags);
        });
        for (int64_t phase = 0; reduce && phase < P;) {
          for (int64_t c = 0; c < C; ++c) {
            for (int64_t j = 0; j < l.inner; ++j, ++phase) {
              scale_sums[k * C + c] += scale_acc[phase];
              zero_point_sums[k * C + c] += zero_point_acc[phase];
            }
          }
        }
      }
    });
  }
  for (int64_t c = 0; c < C; ++c) {
    double s = 0.0;
    double z = 0.0;
    for (int64_t k = 0; k < num_chunks; ++k) {
      s += scale_sums[k * C + c];
      z += zero_point_sums[k * C + c];
    }
    if (a.grad_scale != nullptr) {
      a.grad_scale[c] = s;
    }
    if (a.grad_zero_point != nullptr) {
      // 0 - z rather than -z: no contribution gives +0, not -0.
      a.grad_zero_point[c] = 0.0 - z;
    }
  }
}

// Min / max of the finite values of a run with one channel (or, with elementwise
// accumulators, of every position of a periodic pattern). x - x is 0 exactly for finite
// x, NaN for NaN and inf; non-finite lanes are replaced by the identities and counted.
struct AminmaxVectors {
  Vectorized<float> min{std::numeric_limits<float>::infinity()};
  Vectorized<float> max{-std::numeric_limits<float>::infinity()};
  Vectorized<float> nonfinite{0.0f};
};

inline void aminmax_step(const Vectorized<float>& x, AminmaxVectors& a) {
  using Vec = Vectorized<float>;
  const Vec finite = (x - x) == Vec(0.0f);
  a.min = at::vec::minimum(a.min, Vec::blendv(a.min, x, finite));
  a.max = at::vec::maximum(a.max, Vec::blendv(a.max, x, finite));
  a.nonfinite = a.nonfinite + (Vec(1.0f) - (finite & Vec(1.0f)));
}

struct ChannelStats {
  float min = std::numeric_limits<float>::infinity();
  float max = -std::numeric_limits<float>::infinity();
  int64_t nonfinite = 0;
  void merge(float lo, float hi, int64_t count) {
    min = std::min(min, lo);
    max = std::max(max, hi);
    nonfinite += count;
  }
};

// Lane counts are exact in float32 up to 2^24; runs are folded well before that.
constexpr int64_t kAminmaxFold = 1 << 20;

#if defined(CPU_CAPABILITY_AVX2)
// The usual case, finite data, at half the instructions of aminmax_step: min / max that
// skip a NaN by operand order (_mm256_min_ps(v, m) returns m when v is NaN) and a NaN
// flag, four accumulators deep. Returns false, having merged nothing, when the run holds
// a NaN or an infinity; the exact loop then counts them.
bool aminmax_finite_run(const float* x, int64_t n, ChannelStats& out) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  __m256 lo[4], hi[4], nan[4];
  for (int j = 0; j < 4; ++j) {
    lo[j] = _mm256_set1_ps(kInf);
    hi[j] = _mm256_set1_ps(-kInf);
    nan[j] = _mm256_setzero_ps();
  }
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    for (int j = 0; j < 4; ++j) {
      const __m256 v = _mm256_loadu_ps(x + i + 8 * j);
      lo[j] = _mm256_min_ps(v, lo[j]);
      hi[j] = _mm256_max_ps(v, hi[j]);
      nan[j] = _mm256_or_ps(nan[j], _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
  }
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    lo[0] = _mm256_min_ps(v, lo[0]);
    hi[0] = _mm256_max_ps(v, hi[0]);
    nan[0] = _mm256_or_ps(nan[0], _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  const __m256 any_nan = _mm256_or_ps(_mm256_or_ps(nan[0], nan[1]), _mm256_or_ps(nan[2], nan[3]));
  if (_mm256_movemask_ps(any_nan) != 0) {
    return false;
  }
  alignas(32) float lows[8];
  alignas(32) float highs[8];
  _mm256_store_ps(lows, _mm256_min_ps(_mm256_min_ps(lo[0], lo[1]), _mm256_min_ps(lo[2], lo[3])));
  _mm256_store_ps(highs, _mm256_max_ps(_mm256_max_ps(hi[0], hi[1]), _mm256_max_ps(hi[2], hi[3])));
  float low = kInf;
  float high = -kInf;
  for (int j = 0; j < 8; ++j) {
    low = std::min(low, lows[j]);
    high = std::max(high, highs[j]);
  }
  for (; i < n; ++i) {
    if (std::isnan(x[i])) {
      return false;
    }
    low = std::min(low, x[i]);
    high = std::max(high, x[i]);
  }
  if (!(std::isfinite(low) && std::isfinite(high))) {
    return false;  // an infinity, or an empty run
  }
  out.merge(low, high, 0);
  return true;
}
#endif

void aminmax_uniform_run(const float* x, int64_t n, ChannelStats& out) {
  using Vec = Vectorized<float>;
  constexpr int64_t W = Vec::size();
#if defined(CPU_CAPABILITY_AVX2)
  if (aminmax_finite_run(x, n, out)) {
    return;
  }
#endif
  for (int64_t begin = 0; begin < n; begin += kAminmaxFold) {
    const int64_t len = std::min(kAminmaxFold, n - begin);
    AminmaxVectors a;
    int64_t i = 0;
    for (; i + W <= len; i += W) {
      aminmax_step(Vec::loadu(x + begin + i), a);
    }
    float lo[W], hi[W], cnt[W];
    a.min.store(lo);
    a.max.store(hi);
    a.nonfinite.store(cnt);
    for (int64_t j = 0; j < W; ++j) {
      out.merge(lo[j], hi[j], static_cast<int64_t>(cnt[j]));
    }
    for (; i < len; ++i) {
      const float v = x[begin + i];
      if (std::isfinite(v)) {
        out.merge(v, v, 0);
      } else {
        out.merge(
            std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(), 1);
      }
    }
  }
}

// Folds x[0, n) into per-position accumulators lo/hi/cnt (position k takes x[k]).
void aminmax_elementwise(const float* x, int64_t n, float* lo, float* hi, float* cnt) {
  using Vec = Vectorized<float>;
  constexpr int64_t W = Vec::size();
  for (int64_t i = 0; i < n; i += W) {
    const int64_t m = std::min<int64_t>(W, n - i);
    AminmaxVectors a{Vec::loadu(lo + i, m), Vec::loadu(hi + i, m), Vec::loadu(cnt + i, m)};
    // Lanes past m load as 0 and are never stored back.
    aminmax_step(Vec::loadu(x + i, m), a);
    a.min.store(lo + i, m);
    a.max.store(hi + i, m);
    a.nonfinite.store(cnt + i, m);
  }
}

}  // namespace

void forward_loop(const ForwardLoopArgs& args) {
  switch (args.dtype) {
    case at::kFloat:
      return forward_typed<float, float>(args);
    case at::kDouble:
      return forward_typed<double, double>(args);
    case at::kHalf:
      return forward_typed<c10::Half, float>(args);
    case at::kBFloat16:
      return forward_typed<c10::BFloat16, float>(args);
    default:
      TORCH_CHECK(false, "qat::fake_quantize: unsupported dtype ", args.dtype);
  }
}

void backward_loop(const BackwardLoopArgs& args) {
  switch (args.dtype) {
    case at::kFloat:
      return backward_typed<float, float>(args);
    case at::kDouble:
      return backward_typed<double, double>(args);
    case at::kHalf:
      return backward_typed<c10::Half, float>(args);
    case at::kBFloat16:
      return backward_typed<c10::BFloat16, float>(args);
    default:
      TORCH_CHECK(false, "qat::fake_quantize backward: unsupported dtype ", args.dtype);
  }
}

void aminmax_loop(const AminmaxLoopArgs& a) {
  const auto& l = a.layout;
  const int64_t numel = l.outer * l.channels * l.inner;
  const int64_t C = l.channels;
  const int64_t num_chunks =
      std::max<int64_t>(1, std::min<int64_t>(kMaxChunks, (numel + kGrain - 1) / kGrain));
  const int64_t chunk = (numel + num_chunks - 1) / num_chunks;
  std::vector<ChannelStats> stats(num_chunks * C);
  if (use_uniform_runs(l)) {
    at::parallel_for(0, num_chunks, 1, [&](int64_t first, int64_t last) {
      for (int64_t k = first; k < last; ++k) {
        const int64_t begin = k * chunk;
        const int64_t end = std::min(numel, begin + chunk);
        for_each_uniform_run(l, begin, end, [&](int64_t pos, int64_t len, int64_t c) {
          aminmax_uniform_run(a.input + pos, len, stats[k * C + c]);
        });
      }
    });
  } else {
    // One accumulator per position of the channel pattern, repeated to a vector-friendly
    // period as the fake-quantize tables are.
    const int64_t pattern = C * l.inner;
    const int64_t period = pattern * ((kMinPeriod + pattern - 1) / pattern);
    at::parallel_for(0, num_chunks, 1, [&](int64_t first, int64_t last) {
      std::vector<float> lo(period), hi(period), cnt(period);
      for (int64_t k = first; k < last; ++k) {
        std::fill(lo.begin(), lo.end(), std::numeric_limits<float>::infinity());
        std::fill(hi.begin(), hi.end(), -std::numeric_limits<float>::infinity());
        std::fill(cnt.begin(), cnt.end(), 0.0f);
        const int64_t begin = k * chunk;
        const int64_t end = std::min(numel, begin + chunk);
        for_each_period(period, begin, end, [&](int64_t pos, int64_t len, int64_t phase) {
          aminmax_elementwise(
              a.input + pos, len, lo.data() + phase, hi.data() + phase, cnt.data() + phase);
        });
        // The period is whole patterns: walk it channel by channel, without a division
        // per position.
        for (int64_t phase = 0; phase < period;) {
          for (int64_t c = 0; c < C; ++c) {
            auto& channel = stats[k * C + c];
            for (int64_t j = 0; j < l.inner; ++j, ++phase) {
              channel.merge(lo[phase], hi[phase], static_cast<int64_t>(cnt[phase]));
            }
          }
        }
      }
    });
  }
  for (int64_t c = 0; c < C; ++c) {
    ChannelStats total;
    for (int64_t k = 0; k < num_chunks; ++k) {
      const auto& s = stats[k * C + c];
      total.merge(s.min, s.max, s.nonfinite);
    }
    a.min[c] = total.min;
    a.max[c] = total.max;
    a.nonfinite[c] = total.nonfinite;
  }
}

namespace {

// Bytes of the next channel a thread asks the caches for while it works on the current one.
constexpr int64_t kPrefetchBytes = 64 * 1024;
// An output at least this large is written around the caches when no consumer takes its
// blocks as they are written: a weight that size is not in a core's cache any more when the
// layer reads it (resnet18's 45 MB of conv weights, fold by fold), and the store saves
// reading each line before writing it (resnet18's 20 folds with the prefetch above, torch
// 1.13: 7.4 -> 4.4 ms a step). A smaller one is left in cache for the layer.
constexpr int64_t kMinStreamedBytes = 1024 * 1024;

template <bool Stream>
void observe_forward_channels(const ObserveForwardLoopArgs& a) {
  const auto& l = a.layout;
  const bool blocked = a.written != nullptr && a.block_channels > 0;
  const int64_t grain = blocked ? a.block_channels : std::max<int64_t>(1, kGrain / l.inner);
  const int64_t prefetch = std::min<int64_t>(kPrefetchBytes, l.inner * int64_t(sizeof(float)));
  at::parallel_for(0, l.channels, grain, [&](int64_t first, int64_t last) {
    const int64_t block = blocked ? a.block_channels : last - first;
    for (int64_t begin = first; begin < last; begin += block) {
      const int64_t end = std::min(last, begin + block);
      forward_piece<float, float, Stream>(
          a.input, a.output, nullptr, a.clamped, begin * l.inner, end * l.inner, [&](auto&& run) {
            for (int64_t c = begin; c < end; ++c) {
              // Each channel is read twice (its range, then its values) and written once:
              // the next one's reads start while this one is written.
              if (c + 1 < end) {
                const char* next = reinterpret_cast<const char*>(a.input + (c + 1) * l.inner);
                for (int64_t k = 0; k < prefetch; k += 64) {
                  __builtin_prefetch(next + k, 0, 2);
                }
              }
              ChannelStats stats;
              aminmax_uniform_run(a.input + c * l.inner, l.inner, stats);
              a.nonfinite[c] = stats.nonfinite;
              const auto q = a.choose(a.context, c, stats.min, stats.max);
              run(c * l.inner, l.inner,
                  UniformParams<float>(
                      make_channel<float>(q.scale, q.zero_point, a.quant_min, a.quant_max)));
            }
          });
#if defined(CPU_CAPABILITY_AVX2)
      if constexpr (Stream) {
        _mm_sfence();
      }
#endif
      if (a.written != nullptr) {
        a.written(a.written_context, begin, end);
      }
    }
  });
}

}  // namespace

void observe_forward_loop(const ObserveForwardLoopArgs& a) {
  const auto& l = a.layout;
  TORCH_INTERNAL_ASSERT(l.outer == 1 && l.inner >= kMinObserveForwardRun);
  if (a.written == nullptr && l.channels * l.inner * int64_t(sizeof(float)) >= kMinStreamedBytes) {
    return observe_forward_channels<true>(a);
  }
  observe_forward_channels<false>(a);
}

namespace {

// fake_quantize(hardtanh(x, lo, hi)) over n elements, with the backward's code per element
// when `code` is not null: 0 the gradient passes, 1 it is multiplied by 0 as the
// fake-quantize's is (the level was clamped, or NaN), 2 exactly 0 (x <= lo or x >= hi, as
// hardtanh's backward selects; NaN is inside).
inline void clamped_forward_run_portable(
    const float* x, float* out, uint8_t* code, int64_t n, const UniformParams<float>& p,
    float lo_bound, float hi_bound) {
  using Vec = Vectorized<float>;
  constexpr int64_t W = Vec::size();
  const Vec lo(lo_bound);
  const Vec hi(hi_bound);
  const Vec outside(2.0f);
  float codes[kCodeBlock];
  for (int64_t b = 0; b < n; b += kCodeBlock) {
    const int64_t block = std::min(kCodeBlock, n - b);
    for (int64_t j = 0; j < block; j += W) {
      const int64_t i = b + j;
      const int64_t m = std::min<int64_t>(W, block - j);
      const Vec xv = Vec::loadu(x + i, m);
      Vec v, r;
      // hardtanh keeps NaN (raise_to / lower_to), and so does the fake-quantize.
      levels(lower_to(raise_to(xv, lo), hi), p.inv_scale, p.lo, p.hi, v, r);
      const Vec kept = lower_to(raise_to(r, p.lo), p.hi);
      (kept * p.scale).store(out + i, m);
      if (code != nullptr) {
        Vec::blendv(r.ne(kept), outside, (xv <= lo) | (xv >= hi)).store(codes + j);
      }
    }
    if (code != nullptr) {
      for (int64_t j = 0; j < block; ++j) {
        code[b + j] = static_cast<uint8_t>(codes[j]);
      }
    }
  }
}

// g * 1 or g * 0 for codes 0 and 1 (a NaN gradient stays NaN, as the fake-quantize's
// backward leaves it), exactly 0 for code 2 (as hardtanh's backward selects).
inline void clamped_backward_run_portable(
    const float* g, const uint8_t* code, float* dx, int64_t n) {
  using Vec = Vectorized<float>;
  constexpr int64_t W = Vec::size();
  const Vec zero(0.0f);
  const Vec outside(2.0f);
  float codes[kCodeBlock];
  for (int64_t b = 0; b < n; b += kCodeBlock) {
    const int64_t block = std::min(kCodeBlock, n - b);
    for (int64_t j = 0; j < block; ++j) {
      codes[j] = static_cast<float>(code[b + j]);
    }
    for (int64_t j = 0; j < block; j += W) {
      const int64_t i = b + j;
      const int64_t m = std::min<int64_t>(W, block - j);
      const Vec c = Vec::loadu(codes + j, m);
      Vec::blendv(Vec::loadu(g + i, m) * c.eq(zero), zero, c == outside).store(dx + i, m);
    }
  }
}

#if defined(CPU_CAPABILITY_AVX2)
// The same with whole vectors and the codes packed from the comparison masks: the portable
// form converts the codes one by one (forward with codes, 0.79M values: 415 us that way,
// 244 us this way).
inline void clamped_forward_run_fast(
    const float* x, float* out, uint8_t* code, int64_t n, const UniformParams<float>& p,
    float lo_bound, float hi_bound) {
  using Vec = Vectorized<float>;
  constexpr int64_t W = Vec::size();
  const int64_t full = n - n % W;
  const Vec lo(lo_bound);
  const Vec hi(hi_bound);
  for (int64_t i = 0; i < full; i += W) {
    const Vec xv = Vec::loadu(x + i);
    Vec v, r;
    levels(lower_to(raise_to(xv, lo), hi), p.inv_scale, p.lo, p.hi, v, r);
    const Vec kept = lower_to(raise_to(r, p.lo), p.hi);
    (kept * p.scale).store(out + i);
    if (code == nullptr) {
      continue;
    }
    const __m256 levelled = _mm256_cmp_ps(r, kept, _CMP_NEQ_UQ);
    const __m256 outside =
        _mm256_or_ps(_mm256_cmp_ps(xv, lo, _CMP_LE_OQ), _mm256_cmp_ps(xv, hi, _CMP_GE_OQ));
    const __m256 marked = _mm256_or_ps(levelled, outside);
    if (_mm256_testz_ps(marked, marked)) {
      _mm_storel_epi64(reinterpret_cast<__m128i*>(code + i), _mm_setzero_si128());
      continue;
    }
    store_code_lanes8(
        _mm256_castps_si256(_mm256_blendv_ps(
            _mm256_and_ps(levelled, _mm256_castsi256_ps(_mm256_set1_epi32(1))),
            _mm256_castsi256_ps(_mm256_set1_epi32(2)), outside)),
        code + i);
  }
  clamped_forward_run_portable(
      x + full, out + full, code ? code + full : nullptr, n - full, p, lo_bound, hi_bound);
}

inline void clamped_backward_run_fast(const float* g, const uint8_t* code, float* dx, int64_t n) {
  const int64_t full = n - n % 8;
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 zero = _mm256_setzero_ps();
  for (int64_t i = 0; i < full; i += 8) {
    const __m256i c = load_codes8(code + i);
    const __m256 passed =
        _mm256_mul_ps(_mm256_loadu_ps(g + i), _mm256_and_ps(lanes_equal(c, 0), one));
    _mm256_storeu_ps(dx + i, _mm256_blendv_ps(passed, zero, lanes_equal(c, 2)));
  }
  clamped_backward_run_portable(g + full, code + full, dx + full, n - full);
}
#endif

inline void clamped_forward_run(
    const float* x, float* out, uint8_t* code, int64_t n, const UniformParams<float>& p, float lo,
    float hi) {
#if defined(CPU_CAPABILITY_AVX2)
  return clamped_forward_run_fast(x, out, code, n, p, lo, hi);
#endif
  clamped_forward_run_portable(x, out, code, n, p, lo, hi);
}

inline void clamped_backward_run(const float* g, const uint8_t* code, float* dx, int64_t n) {
#if defined(CPU_CAPABILITY_AVX2)
  return clamped_backward_run_fast(g, code, dx, n);
#endif
  clamped_backward_run_portable(g, code, dx, n);
}

}  // namespace

void clamped_forward_loop(const ClampedForwardLoopArgs& a) {
  const UniformParams<float> p(
      make_channel<float>(a.scale, a.zero_point, a.quant_min, a.quant_max));
  at::parallel_for(0, a.numel, kGrain, [&](int64_t begin, int64_t end) {
    clamped_forward_run(
        a.input + begin, a.output + begin, a.code ? a.code + begin : nullptr, end - begin, p, a.lo,
        a.hi);
  });
}

void clamped_backward_loop(const ClampedBackwardLoopArgs& a) {
  at::parallel_for(0, a.numel, kGrain, [&](int64_t begin, int64_t end) {
    clamped_backward_run(a.grad + begin, a.code + begin, a.grad_input + begin, end - begin);
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace qat
