#pragma once

// Range statistics and quantization-parameter math: the numerics behind qat's observers.
// Every function is also an operator, torch.ops.qat.<name>, so that Python modules,
// C++ modules and TorchScript share one implementation. Observer state lives in plain
// tensors owned by the caller (module buffers), never in C++ objects.

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <string>
#include <tuple>

namespace qat {

/// (quant_min, quant_max) of a `bits`-wide integer range: signed [-2^(b-1), 2^(b-1)-1] or
/// unsigned [0, 2^b-1]; narrow drops the most negative level ([-127, 127] at 8 bits) or,
/// unsigned, the top one. Bits 2 to 16.
std::pair<int64_t, int64_t> quant_range(int64_t bits, bool is_signed, bool narrow = false);

/// Minimum and maximum of the finite values of `input`, per tensor (shape [1]) or per
/// channel of `axis` (shape [C]), as float32, plus the count of NaN/inf values skipped
/// (int64, same shape). Where no finite value exists, min is +inf and max is -inf, the
/// identities of min/max, so that merging an empty batch changes nothing.
std::tuple<at::Tensor, at::Tensor, at::Tensor> aminmax(
    const at::Tensor& input,
    c10::optional<int64_t> axis = c10::nullopt);

/// Folds a batch's range (from aminmax) into the running range, in place: the union
/// (MinMax) without `averaging_constant`, else an exponential moving average
/// (running += averaging_constant * (batch - running), in float32) that starts at the first
/// batch's range. Entries where the batch had no finite value (min > max) keep theirs. The
/// one update both front ends' observers and the fused fake-quantize operator run.
/// @throws c10::Error unless all four are float32 with one entry each or one per channel,
///         and averaging_constant is in (0, 1].
void merge_range(
    at::Tensor& running_min,
    at::Tensor& running_max,
    const at::Tensor& batch_min,
    const at::Tensor& batch_max,
    c10::optional<double> averaging_constant = c10::nullopt);

/// Scale (float32) and zero point (int32) for the range [min, max], elementwise (per
/// channel when min/max have several entries), as PyTorch's observers compute them: the
/// range is widened to include 0; symmetric uses max(|min|, |max|) / ((qmax - qmin) / 2)
/// with zero point 0 (signed) or (qmin + qmax + 1) / 2 (unsigned); affine uses
/// (max - min) / (qmax - qmin) with zero point qmin - round(min / scale) clamped into
/// range. The scale never goes below float32 epsilon, so an all-zero range gives scale =
/// eps; a row with min > max (nothing observed yet) gives scale 1 and the default zero
/// point.
std::tuple<at::Tensor, at::Tensor> choose_qparams(
    const at::Tensor& min,
    const at::Tensor& max,
    int64_t quant_min,
    int64_t quant_max,
    bool symmetric);

/// Number of bins qat's histogram observers use by default.
constexpr int64_t kDefaultHistogramBins = 2048;

/// Histogram (float64 counts) of the finite values of `input` over [min, max] in `bins`
/// equal bins: shape [bins] per tensor (min/max of one element) or [C, bins] per channel
/// of `axis` (min/max of C elements). Values outside [min, max] count in the edge bins;
/// a row with min == max puts everything in its first bin.
at::Tensor histogram(
    const at::Tensor& input,
    const at::Tensor& min,
    const at::Tensor& max,
    int64_t bins,
    c10::optional<int64_t> axis = c10::nullopt);

/// Re-bins each row of `histogram` from [old_min, old_max] into [new_min, new_max] (a range
/// that contains the old one), spreading each old bin's count over the new bins it
/// overlaps in proportion to the overlap. Total counts are preserved.
at::Tensor histogram_rebin(
    const at::Tensor& histogram,
    const at::Tensor& old_min,
    const at::Tensor& old_max,
    const at::Tensor& new_min,
    const at::Tensor& new_max);

/// The clipping range [min, max] (float32, one entry per row) that a histogram over
/// [hist_min, hist_max] suggests for the integer range [quant_min, quant_max]:
/// - "percentile": symmetric clips |x| at the `percentile`-th percentile; affine takes the
///   (100 - p)/2-th and (100 + p)/2-th percentiles (p in (0, 100]);
/// - "mse": the range that minimizes the expected squared fake-quantization error;
/// - "entropy": the range that minimizes the KL divergence between the clipped and the
///   quantized distributions (TensorRT's calibration).
/// The result never exceeds [hist_min, hist_max] and always contains 0.
std::tuple<at::Tensor, at::Tensor> histogram_range(
    const at::Tensor& histogram,
    const at::Tensor& hist_min,
    const at::Tensor& hist_max,
    const std::string& method,
    double percentile,
    int64_t quant_min,
    int64_t quant_max,
    bool symmetric);

} // namespace qat
