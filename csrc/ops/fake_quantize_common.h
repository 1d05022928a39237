#pragma once

// Argument checking and layout helpers shared by the fake-quantize entry point and
// its per-device kernels. Internal to the qat library.

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>
#include <vector>

namespace qat {
namespace detail {

// Levels are kept in float32 and rounded with the 1.5 * 2^23 trick, which is exact
// for |v| < 2^22; 16-bit ranges stay far inside that.
constexpr int64_t kMaxLevels = 65536;
constexpr int64_t kMinQuantMin = -65536;
constexpr int64_t kMaxQuantMax = 65535;

// Checks that `input` is a defined float32/float64/float16/bfloat16 tensor.
void check_floating_input(const char* op, const at::Tensor& input);

// Checks quant_min < quant_max within the supported 16-bit span.
void check_quant_range(const char* op, int64_t quant_min, int64_t quant_max);

// Checks dtype, range, axis and qparam shapes; returns the axis normalized to
// [0, input.dim()) (or nullopt for per-tensor). `op` prefixes every message.
c10::optional<int64_t> check_arguments(
    const char* op, const at::Tensor& input, const at::Tensor& scale, const at::Tensor& zero_point,
    int64_t quant_min, int64_t quant_max, c10::optional<int64_t> axis);

// Per-channel quantization parameters after validation, one entry per channel:
// the float32 scale and the integer-valued zero point that the kernels use.
struct QParams {
  std::vector<float> scale;
  std::vector<float> zero_point;
};

// Reads and checks the values of scale (> 0, finite) and zero_point (finite, rounded
// half-to-even into [quant_min, quant_max]). Reads through the CPU, so a CUDA qparam
// costs one synchronization.
QParams read_qparams(
    const char* op, const at::Tensor& scale, const at::Tensor& zero_point, int64_t quant_min,
    int64_t quant_max);

// Memory layout of a dense tensor seen as [outer, channels, inner]: the element at
// memory offset m belongs to channel (m / inner) % channels. Per-tensor is channels == 1.
struct ChannelLayout {
  int64_t outer = 1;
  int64_t channels = 1;
  int64_t inner = 1;
};

// `input` must be non-overlapping and dense (any permutation of strides, e.g. channels-last).
ChannelLayout channel_layout(const at::Tensor& input, c10::optional<int64_t> axis);

// `input` itself when its memory is dense, else a contiguous copy: the kernels walk raw
// memory, so a strided view of a larger tensor has to be compacted first.
at::Tensor dense(const at::Tensor& input);

// `grad` (keeping its dtype) laid out with exactly the strides of `like`, a dense
// tensor, copying only when autograd hands over a gradient in another layout.
at::Tensor match_layout(const at::Tensor& grad, const at::Tensor& like);

// The checked, laid-out arguments of a backward kernel.
struct BackwardInputs {
  c10::optional<int64_t> axis;
  QParams qparams;
  // The forward's code (uint8) or its input, dense.
  at::Tensor saved;
  bool from_code = false;
  // The output gradient in the input's dtype and with `saved`'s strides.
  at::Tensor grad;
};

BackwardInputs prepare_backward(
    const char* op, const at::Tensor& grad, const at::Tensor& saved, const at::Tensor& scale,
    const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max, c10::optional<int64_t> axis,
    bool scale_grad_inside, double ewgs_delta);

// (grad_input, grad_scale, grad_zero_point) from per-channel float64 sums: shaped and
// typed like scale, and like zero_point with a floating dtype; undefined sums (neither
// gradient asked for) give undefined gradients.
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_result(
    const at::Tensor& grad_input, const at::Tensor& scale_sums, const at::Tensor& zero_point_sums,
    const at::Tensor& scale, const at::Tensor& zero_point);

}  // namespace detail
}  // namespace qat
