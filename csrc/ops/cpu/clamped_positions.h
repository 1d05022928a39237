#pragma once

// The straight-through gradient from the few elements a forward clamped.
//
// The straight-through estimator's gradient is g where the forward kept the value and
// g * 0 where it clamped it (or saw a NaN). Usually almost nothing is clamped: a weight
// observed by a min/max observer clamps about one value per channel (its extreme, which
// the symmetric scale puts half a step past the top level), an activation with a moving
// average range clamps the batch's outliers, a ReLU6 or sigmoid output with its fixed range
// nothing. Then the forward finds the positions of those elements as it goes (a block at
// a time, in cache) instead of storing one code byte per element, and the backward sets
// them in a copy of g instead of a masked pass that reads g and the codes (measured on a
// 1024x3072 weight: 0.81 ms masked, 0.50 ms copied, and nothing to copy where the backward
// may write into the incoming gradient).

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <atomic>
#include <cstdint>
#include <mutex>
#include <utility>
#include <vector>

namespace qat {
namespace cpu {

// At most one clamped element per kSparseShare is kept as positions; with more, the codes
// (one byte per element) are the smaller record.
constexpr int64_t kSparseShare = 64;

// A piece of work keeps up to kMinPositions positions however small it is (8 KiB of
// offsets): a small tensor's record is small either way, and its backward stays the
// positions node instead of a second, coded forward pass and the codes' autograd Function.
// A depthwise conv's 3x3 weight clamps one value in nine (each channel's extreme).
constexpr int64_t kMinPositions = 1024;

// The memory offsets of the elements a forward clamped (or found NaN), gathered by the
// loop's pieces of work instead of one code byte per element. A piece
// that finds more than one per kSparseShare of its elements gives up and marks the record
// overflowed: the caller then computes the codes.
class ClampedRecord {
 public:
  // Offsets found by the piece of work that starts at offset `first`, in increasing order.
  void add(int64_t first, std::vector<int64_t> found) {
    const std::lock_guard<std::mutex> lock(mutex_);
    pieces_.emplace_back(first, std::move(found));
  }
  void overflow() { overflowed_ = true; }
  bool overflowed() const { return overflowed_; }

 private:
  friend c10::optional<at::Tensor> positions_of(ClampedRecord& record);
  std::mutex mutex_;
  std::vector<std::pair<int64_t, std::vector<int64_t>>> pieces_;
  std::atomic<bool> overflowed_{false};
};

// The offsets of `record` as a sorted int64 tensor; nullopt when it overflowed.
c10::optional<at::Tensor> positions_of(ClampedRecord& record);

// The CPU forward of qat::_fake_quantize_forward (a dense CPU input), with the memory
// offsets of the clamped elements (in the output's layout) instead of the codes: (output,
// positions), positions nullopt when there are too many (fake_quantize_codes gives the codes).
std::pair<at::Tensor, c10::optional<at::Tensor>> fake_quantize_forward_positions(
    const at::Tensor& input, const at::Tensor& scale, const at::Tensor& zero_point,
    int64_t quant_min, int64_t quant_max, c10::optional<int64_t> axis);

// The codes of the forward that gave `output` (dense, as that forward made it), computed
// again with it; `output` is rewritten with the same values rather than allocated anew.
at::Tensor fake_quantize_codes(
    const at::Tensor& input, const at::Tensor& scale, const at::Tensor& zero_point,
    int64_t quant_min, int64_t quant_max, c10::optional<int64_t> axis, const at::Tensor& output);

// The straight-through input gradient written into `grad` (dense, laid out as the
// forward's codes): grad * 0 at `positions` (so that a NaN gradient stays NaN, as ATen's
// g * mask); the other elements are g * 1 already.
void mask_clamped_(const at::Tensor& grad, const at::Tensor& positions);

}  // namespace cpu
}  // namespace qat
