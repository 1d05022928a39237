#pragma once

// Typed handles on the internal per-device operators that the estimators build on.
// Internal to the qat library.

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace qat {
namespace ops {

// Fake-quantizes `input`; with compute_code also returns one byte per element telling
// the backward where the element fell (0 in range, 1 below, 2 above, 3 NaN), else an
// empty code tensor.
std::tuple<at::Tensor, at::Tensor> fake_quantize_forward(
    const at::Tensor& input, const at::Tensor& scale, const at::Tensor& zero_point,
    int64_t quant_min, int64_t quant_max, c10::optional<int64_t> axis, bool compute_code);

// Gradients of a fake-quantize call from `saved`: the code of the forward (uint8) or the
// input itself (floating point, needed for in-range scale gradients and EWGS).
// Returns (grad_input, grad_scale, grad_zero_point); the last two are unscaled sums
// shaped like scale: zero for one not requested when the other is, undefined (None in
// Python) when neither is.
std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quantize_backward(
    const at::Tensor& grad, const at::Tensor& saved, const at::Tensor& scale,
    const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max, c10::optional<int64_t> axis,
    bool scale_grad, bool scale_grad_inside, bool zero_point_grad, double ewgs_delta);

}  // namespace ops
}  // namespace qat
