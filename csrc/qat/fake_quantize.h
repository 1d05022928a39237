#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <string>

namespace qat {

/// Simulates integer quantization of `input` in floating point.
///
/// The forward pass equals `dequantize(quantize(input))` bit for bit, with
/// round-half-to-even as in `torch.quantize_per_tensor`:
/// `(clamp(nearbyint(x / scale) + zero_point, quant_min, quant_max) - zero_point) * scale`.
/// The backward pass is defined by the named straight-through estimator (see
/// estimator.h and `EstimatorRegistry::global().names()`).
///
/// @param input floating-point tensor (float32, float64, float16 or bfloat16); math is
///        in float32 (float64 for float64 input) and the result has the input's dtype.
/// @param scale positive, finite step size: one element, or one per channel of `axis`.
/// @param zero_point integer (or float, rounded half-to-even) offset in
///        [quant_min, quant_max], shaped like `scale`.
/// @param quant_min smallest integer level, e.g. -128 for signed int8.
/// @param quant_max largest integer level, e.g. 127; at most 2^16 levels in all.
/// @param axis channel axis for per-channel quantization (negative counts from the
///        end), or nullopt for per-tensor.
/// @param estimator registered estimator name: "ste", "lsq", "lsq_plus", "pact", "ewgs", ...
/// @param grad_scale factor on the scale / zero-point gradients; nullopt uses the
///        estimator's default (1/sqrt(N * quant_max) for LSQ, 1 for PACT).
/// @param ewgs_delta EWGS gradient-scaling factor delta (ignored by other estimators).
at::Tensor fake_quantize(
    const at::Tensor& input, const at::Tensor& scale, const at::Tensor& zero_point,
    int64_t quant_min, int64_t quant_max, c10::optional<int64_t> axis = c10::nullopt,
    const std::string& estimator = "ste", c10::optional<double> grad_scale = c10::nullopt,
    double ewgs_delta = 1e-3);

/// `fake_quantize(hardtanh(input, lo, hi), ...)` per tensor with the "ste" estimator, in one
/// pass forward and one backward on CPU float32: the gradient is hardtanh's (exactly 0
/// outside (lo, hi)) times the straight-through mask inside. lo < hi, both finite.
at::Tensor fake_quantize_clamped(
    const at::Tensor& input, const at::Tensor& scale, const at::Tensor& zero_point,
    int64_t quant_min, int64_t quant_max, double lo, double hi);

/// Version of the qat library, e.g. "0.1.0".
const char* version();

}  // namespace qat
