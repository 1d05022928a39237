#pragma once

// The weight observation of qat::fused_observe_fake_quantize, handing the fake-quantized
// weight to a consumer block of output channels by block while each is still in cache
// (qat::fake_quantized_linear's matmul). Internal to the qat library.

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <string>

namespace qat {
namespace detail {

// Called once per block of output channels [first, last) of the fake-quantized weight
// `output` (laid out as the weight), possibly from several threads at once.
class WrittenBlocks {
 public:
  explicit WrittenBlocks(int64_t block_channels) : block_channels(block_channels) {}
  virtual ~WrittenBlocks() = default;
  virtual void consume(const at::Tensor& output, int64_t first, int64_t last) const = 0;
  const int64_t block_channels;
};

// qat::fused_observe_fake_quantize(weight, ..., axis=0, observe=true, fake_quantize=true)
// on its one-pass path (a contiguous float32 CPU weight whose state is sized, an estimator
// whose backward needs only the codes), with `written` called on every block; nullopt,
// with nothing observed or called, where that path does not apply.
c10::optional<at::Tensor> observe_fake_quantize_weight_blocks(
    const char* op, const at::Tensor& weight, at::Tensor& running_min, at::Tensor& running_max,
    at::Tensor& scale, at::Tensor& zero_point, int64_t quant_min, int64_t quant_max,
    c10::optional<double> averaging_constant, bool symmetric, const std::string& estimator,
    const c10::optional<at::Tensor>& nonfinite_count, const WrittenBlocks& written);

// qat::fused_observe_fake_quantize(weight, ..., axis=0, ...) on any path: the weight
// fake-quantized per output channel, as a whole.
at::Tensor observe_fake_quantize_weight(
    const at::Tensor& weight, at::Tensor& running_min, at::Tensor& running_max, at::Tensor& scale,
    at::Tensor& zero_point, int64_t quant_min, int64_t quant_max,
    c10::optional<double> averaging_constant, bool symmetric, bool observe,
    bool fake_quantize_enabled, c10::string_view estimator,
    const c10::optional<at::Tensor>& nonfinite_count);

}  // namespace detail
}  // namespace qat
