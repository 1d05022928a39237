#pragma once

// Vectorized CPU loops of the fake-quantize kernels. fake_quantize_loops_impl.h is
// compiled once per CPU capability (fake_quantize_loops_{default,avx2}.cpp, each with
// its own compiler flags); the kernels call the best one the processor supports.

#include <c10/core/ScalarType.h>

#include <cstdint>
#include <string>

#include "../fake_quantize_common.h"
#include "clamped_positions.h"

namespace qat {
namespace cpu {

struct ForwardLoopArgs {
  const void* input = nullptr;
  void* output = nullptr;
  // Optional per-element code for the backward: 0 inside the range, 1 clamped below,
  // 2 clamped above, 3 NaN. Null when no backward will need it.
  uint8_t* code = nullptr;
  // Or, instead of the codes, the clamped positions.
  ClampedRecord* clamped = nullptr;
  at::ScalarType dtype = at::kFloat;
  detail::ChannelLayout layout;
  const float* scale = nullptr;       // one per channel
  const float* zero_point = nullptr;  // one per channel, integer-valued
  int64_t quant_min = 0;
  int64_t quant_max = 255;
};

struct BackwardLoopArgs {
  const void* grad = nullptr;
  // Exactly one of input / code is set: the learnable estimators recompute from the
  // input, the others read the code cached by the forward.
  const void* input = nullptr;
  const uint8_t* code = nullptr;
  void* grad_input = nullptr;
  at::ScalarType dtype = at::kFloat;
  detail::ChannelLayout layout;
  const float* scale = nullptr;
  const float* zero_point = nullptr;
  int64_t quant_min = 0;
  int64_t quant_max = 255;
  // Scale gradient: clamped elements contribute (bound - zero_point) * g; with
  // scale_grad_inside, in-range elements add (round(x/s) - x/s) * g (LSQ).
  bool scale_grad = false;
  bool scale_grad_inside = false;
  // Zero-point gradient: clamped elements contribute -scale * g (LSQ+).
  bool zero_point_grad = false;
  // EWGS: in-range gradients scaled by 1 + delta * sign(g) * (x/s - round(x/s)).
  double ewgs_delta = 0.0;
  // Outputs, one double per channel, unscaled sums.
  double* grad_scale = nullptr;
  double* grad_zero_point = nullptr;
};

// Range statistics of a float32 tensor: per channel, the min and max of the finite
// values and the count of the others.
struct AminmaxLoopArgs {
  const float* input = nullptr;
  detail::ChannelLayout layout;
  float* min = nullptr;          // one per channel, +inf where no finite value
  float* max = nullptr;          // one per channel, -inf where no finite value
  int64_t* nonfinite = nullptr;  // one per channel
};

// Observe and fake-quantize a float32 tensor whose channels are whole runs of memory
// (layout.outer == 1, layout.inner >= kMinObserveForwardRun: a contiguous weight per output
// channel), one channel at a time: its range is reduced, `choose` turns it into the
// channel's (scale, zero point), and the run is fake-quantized while it is still in cache,
// instead of a second pass over the whole tensor. Channels may be processed concurrently;
// `choose` is called once per channel with its finite min and max (+inf / -inf when it
// has no finite value).
struct ChannelQParams {
  float scale;
  float zero_point;  // integer-valued
};
using ChooseQParams = ChannelQParams (*)(void* context, int64_t channel, float min, float max);

struct ObserveForwardLoopArgs {
  const float* input = nullptr;
  float* output = nullptr;
  // Where the clamped positions go when a backward will need them (as
  // ForwardLoopArgs::clamped); its caller computes codes itself when they overflow.
  ClampedRecord* clamped = nullptr;
  detail::ChannelLayout layout;
  int64_t quant_min = 0;
  int64_t quant_max = 255;
  ChooseQParams choose = nullptr;
  void* context = nullptr;
  int64_t* nonfinite = nullptr;  // one per channel
  // When set, called with each block of `block_channels` channels (fewer at the end of a
  // thread's share) as soon as the block is written, from the thread that wrote it, so
  // that a consumer of the output (a matmul) reads it while it is still in that core's
  // cache. Blocks are disjoint and may be handed over concurrently.
  void (*written)(void* context, int64_t first, int64_t last) = nullptr;
  void* written_context = nullptr;
  int64_t block_channels = 0;
};

// fake_quantize(hardtanh(input, lo, hi)) of a float32 tensor, per tensor, with one code per
// element for the backward: 2 where input <= lo or input >= hi (hardtanh's gradient, exactly
// 0); elsewhere 0 where the level is inside the range (the gradient passes) and 1 where it
// was clamped or is NaN (the gradient is multiplied by 0, as the fake-quantize's is).
struct ClampedForwardLoopArgs {
  const float* input = nullptr;
  float* output = nullptr;
  uint8_t* code = nullptr;
  int64_t numel = 0;
  float scale = 1.0f;
  float zero_point = 0.0f;  // integer-valued
  int64_t quant_min = 0;
  int64_t quant_max = 255;
  float lo = 0.0f;
  float hi = 6.0f;
};

struct ClampedBackwardLoopArgs {
  const float* grad = nullptr;
  const uint8_t* code = nullptr;
  float* grad_input = nullptr;
  int64_t numel = 0;
};

// The shortest channel run that observe_forward_loop takes.
constexpr int64_t kMinObserveForwardRun = 64;

enum class Capability { kDefault, kAvx2 };

// The capability the kernels use: the best the processor supports unless overridden.
Capability capability();
void set_capability(Capability capability);
Capability best_supported_capability();
const char* capability_name(Capability capability);

// The loops of the capability `capability()` selects.
void run_forward_loop(const ForwardLoopArgs& args);
void run_backward_loop(const BackwardLoopArgs& args);
void run_aminmax_loop(const AminmaxLoopArgs& args);
void run_observe_forward_loop(const ObserveForwardLoopArgs& args);
void run_clamped_forward_loop(const ClampedForwardLoopArgs& args);
void run_clamped_backward_loop(const ClampedBackwardLoopArgs& args);

namespace DEFAULT {
void forward_loop(const ForwardLoopArgs& args);
void backward_loop(const BackwardLoopArgs& args);
void aminmax_loop(const AminmaxLoopArgs& args);
void observe_forward_loop(const ObserveForwardLoopArgs& args);
void clamped_forward_loop(const ClampedForwardLoopArgs& args);
void clamped_backward_loop(const ClampedBackwardLoopArgs& args);
}  // namespace DEFAULT
namespace AVX2 {
void forward_loop(const ForwardLoopArgs& args);
void backward_loop(const BackwardLoopArgs& args);
void aminmax_loop(const AminmaxLoopArgs& args);
void observe_forward_loop(const ObserveForwardLoopArgs& args);
void clamped_forward_loop(const ClampedForwardLoopArgs& args);
void clamped_backward_loop(const ClampedBackwardLoopArgs& args);
}  // namespace AVX2

}  // namespace cpu
}  // namespace qat
