// CUDA kernels of qat::_fake_quantize_forward and qat::_fake_quantize_backward.
//
// They reproduce the CPU loops (cpu/fake_quantize_loops_impl.h) element for element. The
// CPU build forbids contracting a*b+c into a fused multiply-add, and nvcc contracts by
// default, so every product and sum goes through the round-to-nearest intrinsics, which
// are never fused. Only the scale / zero-point sums differ, by rounding: they are
// accumulated in double in another order.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../fake_quantize_common.h"

namespace qat {
namespace cuda {
namespace {

constexpr const char* kForward = "qat::_fake_quantize_forward";
constexpr const char* kBackward = "qat::_fake_quantize_backward";

// Threads per block; a power of two, as the block reduction needs.
constexpr int kThreads = 256;
// Resident blocks per multiprocessor, times this, bound the grid of the grid-stride loops.
constexpr int64_t kWaves = 4;
// The reducing backward splits each channel into slices of about this many elements and
// keeps at most kMaxTasks (channel, slice) partial sums. Both depend on the shapes only,
// so the sums do not depend on the device.
constexpr int64_t kElementsPerTask = 8 * kThreads;
constexpr int64_t kMaxTasks = 65536;

__device__ __forceinline__ float mul(float a, float b) {
  return __fmul_rn(a, b);
}
__device__ __forceinline__ double mul(double a, double b) {
  return __dmul_rn(a, b);
}
__device__ __forceinline__ float add(float a, float b) {
  return __fadd_rn(a, b);
}
__device__ __forceinline__ double add(double a, double b) {
  return __dadd_rn(a, b);
}
__device__ __forceinline__ float sub(float a, float b) {
  return __fsub_rn(a, b);
}
__device__ __forceinline__ double sub(double a, double b) {
  return __dsub_rn(a, b);
}
__device__ __forceinline__ float round_half_even(float v) {
  return rintf(v);
}
__device__ __forceinline__ double round_half_even(double v) {
  return rint(v);
}

// Constants of one channel in the math type M (float32, or float64 for double inputs),
// stored as four consecutive values per channel. lo/hi are the clamping bounds relative
// to the zero point: quant_min - zero_point and quant_max - zero_point.
template <typename M>
struct Channel {
  M scale, inv_scale, lo, hi;
};

template <typename M>
__device__ __forceinline__ Channel<M> load_channel(const M* params, int64_t c) {
  const M* p = params + 4 * c;
  return {p[0], p[1], p[2], p[3]};
}

// The channel of the element at memory offset m (see detail::ChannelLayout).
__device__ __forceinline__ int64_t channel_of(int64_t m, int64_t channels, int64_t inner) {
  return channels == 1 ? 0 : (m / inner) % channels;
}

// v = x / s clamped to [lo - 1, hi + 1] (comparisons with NaN are false, so NaN stays NaN)
// and r = round-half-even(v). rint gives -0 for v in [-0.5, 0), where the CPU's rounding
// trick gives +0; adding +0 makes them agree, and so the sign of a zero output.
template <typename M>
__device__ __forceinline__ void levels(M x, const Channel<M>& c, M& v, M& r) {
  const M lo = sub(c.lo, M(1));
  const M hi = add(c.hi, M(1));
  v = mul(x, c.inv_scale);
  v = v < lo ? lo : (v > hi ? hi : v);
  r = add(round_half_even(v), M(0));
}

template <typename T, typename M>
__global__ void forward_cuda_kernel(
    const T* __restrict__ input, T* __restrict__ output, uint8_t* __restrict__ code,
    const M* __restrict__ params, int64_t numel, int64_t channels, int64_t inner) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t m = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; m < numel;
       m += stride) {
    const Channel<M> c = load_channel(params, channel_of(m, channels, inner));
    M v, r;
    levels(static_cast<M>(input[m]), c, v, r);
    const M q = r < c.lo ? c.lo : (r > c.hi ? c.hi : r);
    output[m] = static_cast<T>(mul(q, c.scale));
    if (code != nullptr) {
      code[m] = r < c.lo ? 1 : (r > c.hi ? 2 : (r != r ? 3 : 0));
    }
  }
}

template <typename M>
struct BackwardFlags {
  bool scale_grad;
  bool scale_grad_inside;
  bool zero_point_grad;
  bool ewgs;
  M ewgs_delta;
};

// Gradient of one element: dx for the input, ds and dz its terms of the scale and
// zero-point sums. 0/1 factors multiply, as in the CPU loops, so that an infinite
// gradient gives the same NaN.
template <typename M>
struct ElementGrad {
  M dx, ds, dz;
};

// From the code cached by the forward (ste, pact).
template <typename M>
__device__ __forceinline__ ElementGrad<M> backward_from_code(
    M g, uint8_t code, const Channel<M>& c, const BackwardFlags<M>& f) {
  const M below = M(code == 1);
  const M above = M(code == 2);
  ElementGrad<M> e{mul(g, M(code == 0)), M(0), M(0)};
  if (f.scale_grad) {
    e.ds = mul(g, add(mul(below, c.lo), mul(above, c.hi)));
  }
  if (f.zero_point_grad) {
    e.dz = mul(mul(g, add(below, above)), c.scale);
  }
  return e;
}

// From the saved input (lsq, lsq_plus, ewgs). NaN inputs are in no class: their dx is
// g * 0 and their residual r - v never reaches the sums.
template <typename M>
__device__ __forceinline__ ElementGrad<M> backward_from_input(
    M g, M x, const Channel<M>& c, const BackwardFlags<M>& f) {
  M v, r;
  levels(x, c, v, r);
  const bool inside = r >= c.lo && r <= c.hi;
  const M below = M(r < c.lo);
  const M above = M(r > c.hi);
  ElementGrad<M> e{M(0), M(0), M(0)};
  if (f.ewgs) {
    const M sign = sub(M(g > M(0)), M(g < M(0)));
    const M factor = add(M(1), mul(mul(f.ewgs_delta, sign), sub(v, r)));
    e.dx = inside ? mul(g, factor) : M(0);
  } else {
    e.dx = mul(g, M(inside));
  }
  if (f.scale_grad) {
    e.ds = mul(g, add(mul(below, c.lo), mul(above, c.hi)));
    if (f.scale_grad_inside) {
      e.ds = add(e.ds, inside ? mul(g, sub(r, v)) : M(0));
    }
  }
  if (f.zero_point_grad) {
    e.dz = mul(mul(g, add(below, above)), c.scale);
  }
  return e;
}

template <typename T, typename M>
__device__ __forceinline__ ElementGrad<M> backward_element(
    const T* grad, const T* input, const uint8_t* code, int64_t m, const Channel<M>& c,
    const BackwardFlags<M>& f) {
  const M g = static_cast<M>(grad[m]);
  return code != nullptr ? backward_from_code(g, code[m], c, f)
                         : backward_from_input(g, static_cast<M>(input[m]), c, f);
}

// Input gradient only, in memory order.
template <typename T, typename M>
__global__ void backward_cuda_kernel(
    const T* __restrict__ grad, const T* __restrict__ input, const uint8_t* __restrict__ code,
    T* __restrict__ grad_input, const M* __restrict__ params, BackwardFlags<M> flags, int64_t numel,
    int64_t channels, int64_t inner) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t m = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; m < numel;
       m += stride) {
    const Channel<M> c = load_channel(params, channel_of(m, channels, inner));
    grad_input[m] = static_cast<T>(backward_element(grad, input, code, m, c, flags).dx);
  }
}

// Input gradient plus scale / zero-point sums. Task t covers slice t % slices of channel
// t / slices (the channel's elements in [outer, inner] order); its block sums the terms in
// double in a fixed order and writes one partial sum per task.
template <typename T, typename M>
__global__ void backward_reduce_cuda_kernel(
    const T* __restrict__ grad, const T* __restrict__ input, const uint8_t* __restrict__ code,
    T* __restrict__ grad_input, const M* __restrict__ params, BackwardFlags<M> flags, int64_t outer,
    int64_t channels, int64_t inner, int64_t slices, double* __restrict__ scale_partials,
    double* __restrict__ zero_point_partials) {
  __shared__ double scale_shared[kThreads];
  __shared__ double zero_point_shared[kThreads];
  const int64_t per_channel = outer * inner;
  const int64_t chunk = (per_channel + slices - 1) / slices;
  const int64_t tasks = channels * slices;
  for (int64_t t = blockIdx.x; t < tasks; t += gridDim.x) {
    const int64_t ch = t / slices;
    const int64_t begin = (t % slices) * chunk;
    const int64_t end = begin + chunk < per_channel ? begin + chunk : per_channel;
    const Channel<M> c = load_channel(params, ch);
    double scale_sum = 0.0;
    double zero_point_sum = 0.0;
    for (int64_t k = begin + threadIdx.x; k < end; k += blockDim.x) {
      const int64_t o = outer == 1 ? 0 : k / inner;
      const int64_t m = (o * channels + ch) * inner + (k - o * inner);
      const ElementGrad<M> e = backward_element(grad, input, code, m, c, flags);
      grad_input[m] = static_cast<T>(e.dx);
      scale_sum += static_cast<double>(e.ds);
      zero_point_sum += static_cast<double>(e.dz);
    }
    scale_shared[threadIdx.x] = scale_sum;
    zero_point_shared[threadIdx.x] = zero_point_sum;
    __syncthreads();
    for (unsigned int half = kThreads / 2; half > 0; half /= 2) {
      if (threadIdx.x < half) {
        scale_shared[threadIdx.x] += scale_shared[threadIdx.x + half];
        zero_point_shared[threadIdx.x] += zero_point_shared[threadIdx.x + half];
      }
      __syncthreads();
    }
    if (threadIdx.x == 0) {
      scale_partials[t] = scale_shared[0];
      zero_point_partials[t] = zero_point_shared[0];
    }
    // The shared buffers are reused by the block's next task.
    __syncthreads();
  }
}

// Per-channel constants in M on `device`, computed as the CPU loops do: the reciprocal in
// float32, the bounds from the integer-valued float zero point.
template <typename M>
at::Tensor channel_params(
    const detail::QParams& q, int64_t quant_min, int64_t quant_max, const at::Device& device) {
  const int64_t channels = static_cast<int64_t>(q.scale.size());
  const auto dtype = std::is_same<M, double>::value ? at::kDouble : at::kFloat;
  at::Tensor host = at::empty({channels, 4}, at::TensorOptions().dtype(dtype));
  M* p = host.data_ptr<M>();
  for (int64_t c = 0; c < channels; ++c) {
    const float inv = 1.0f / q.scale[c];
    p[4 * c + 0] = static_cast<M>(q.scale[c]);
    p[4 * c + 1] = static_cast<M>(inv);
    p[4 * c + 2] = static_cast<M>(static_cast<float>(quant_min) - q.zero_point[c]);
    p[4 * c + 3] = static_cast<M>(static_cast<float>(quant_max) - q.zero_point[c]);
  }
  // A copy from pageable memory is staged before cudaMemcpyAsync returns, so `host` may
  // go away while the copy is in flight.
  return host.to(host.options().device(device), /*non_blocking=*/true);
}

int64_t grid_size(int64_t blocks) {
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  const int64_t resident = static_cast<int64_t>(props->multiProcessorCount) *
                           std::max(1, props->maxThreadsPerMultiProcessor / kThreads);
  return std::max<int64_t>(1, std::min(blocks, resident * kWaves));
}

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

std::tuple<at::Tensor, at::Tensor> fake_quantize_forward_kernel(
    const at::Tensor& input_arg, const at::Tensor& scale, const at::Tensor& zero_point,
    int64_t quant_min, int64_t quant_max, c10::optional<int64_t> axis_arg, bool compute_code) {
  const auto axis = detail::check_arguments(
      kForward, input_arg, scale, zero_point, quant_min, quant_max, axis_arg);
  TORCH_CHECK(
      input_arg.is_cuda(), kForward, ": input must be a CUDA tensor, got one on ",
      input_arg.device());
  const c10::cuda::CUDAGuard device_guard(input_arg.device());
  const auto qparams = detail::read_qparams(kForward, scale, zero_point, quant_min, quant_max);
  // The kernel walks raw memory: dense keeps a channels-last input as it is, and the
  // outputs share its strides.
  const at::Tensor input = detail::dense(input_arg);
  at::Tensor output = at::empty_like(input);
  at::Tensor code = compute_code ? at::empty_like(input, input.options().dtype(at::kByte))
                                 : at::empty({0}, input.options().dtype(at::kByte));
  const int64_t numel = input.numel();
  if (numel == 0) {
    return {output, code};
  }
  const auto layout = detail::channel_layout(input, axis);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto grid = static_cast<unsigned int>(grid_size(ceil_div(numel, kThreads)));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "qat_fake_quantize_forward_cuda", [&] {
        using M = at::opmath_type<scalar_t>;
        const at::Tensor params = channel_params<M>(qparams, quant_min, quant_max, input.device());
        forward_cuda_kernel<scalar_t, M><<<grid, kThreads, 0, stream>>>(
            input.data_ptr<scalar_t>(), output.data_ptr<scalar_t>(),
            compute_code ? code.data_ptr<uint8_t>() : nullptr, params.data_ptr<M>(), numel,
            layout.channels, layout.inner);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return {output, code};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quantize_backward_kernel(
    const at::Tensor& grad_arg, const at::Tensor& saved_arg, const at::Tensor& scale,
    const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max,
    c10::optional<int64_t> axis_arg, bool scale_grad, bool scale_grad_inside, bool zero_point_grad,
    double ewgs_delta) {
  TORCH_CHECK(
      saved_arg.is_cuda(), kBackward, ": the saved tensor must be on a CUDA device, got ",
      saved_arg.device());
  const c10::cuda::CUDAGuard device_guard(saved_arg.device());
  const auto in = detail::prepare_backward(
      kBackward, grad_arg, saved_arg, scale, zero_point, quant_min, quant_max, axis_arg,
      scale_grad_inside, ewgs_delta);
  const bool from_code = in.from_code;
  const auto& qparams = in.qparams;
  const at::Tensor& saved = in.saved;
  const at::Tensor& grad = in.grad;
  const auto axis = in.axis;
  at::Tensor grad_input = at::empty_like(grad);
  const int64_t channels = static_cast<int64_t>(qparams.scale.size());
  const auto sum_options = grad.options().dtype(at::kDouble);
  const int64_t numel = grad.numel();
  const bool reduce = scale_grad || zero_point_grad;
  if (numel == 0) {
    const auto none = reduce ? at::zeros({channels}, sum_options) : at::Tensor();
    return detail::backward_result(grad_input, none, none, scale, zero_point);
  }
  const auto layout = detail::channel_layout(saved, axis);
  const int64_t per_channel = layout.outer * layout.inner;
  const int64_t slices =
      std::max<int64_t>(1, std::min(ceil_div(per_channel, kElementsPerTask), kMaxTasks / channels));
  at::Tensor partials = reduce ? at::empty({2, channels, slices}, sum_options) : at::Tensor();
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad.scalar_type(), "qat_fake_quantize_backward_cuda", [&] {
        using M = at::opmath_type<scalar_t>;
        const at::Tensor params = channel_params<M>(qparams, quant_min, quant_max, grad.device());
        const BackwardFlags<M> flags{
            scale_grad, scale_grad_inside, zero_point_grad, ewgs_delta != 0.0,
            static_cast<M>(ewgs_delta)};
        const scalar_t* input_ptr = from_code ? nullptr : saved.data_ptr<scalar_t>();
        const uint8_t* code_ptr = from_code ? saved.data_ptr<uint8_t>() : nullptr;
        if (reduce) {
          double* scale_partials = partials.data_ptr<double>();
          const auto grid = static_cast<unsigned int>(grid_size(channels * slices));
          backward_reduce_cuda_kernel<scalar_t, M><<<grid, kThreads, 0, stream>>>(
              grad.data_ptr<scalar_t>(), input_ptr, code_ptr, grad_input.data_ptr<scalar_t>(),
              params.data_ptr<M>(), flags, layout.outer, layout.channels, layout.inner, slices,
              scale_partials, scale_partials + channels * slices);
        } else {
          const auto grid = static_cast<unsigned int>(grid_size(ceil_div(numel, kThreads)));
          backward_cuda_kernel<scalar_t, M><<<grid, kThreads, 0, stream>>>(
              grad.data_ptr<scalar_t>(), input_ptr, code_ptr, grad_input.data_ptr<scalar_t>(),
              params.data_ptr<M>(), flags, numel, layout.channels, layout.inner);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  if (!reduce) {
    return detail::backward_result(grad_input, at::Tensor(), at::Tensor(), scale, zero_point);
  }
  const at::Tensor sums = partials.sum(2);
  // The zero point receives minus the sum of the clamped elements' g * scale; 0 - sum
  // keeps an empty sum at +0, as the CPU kernel does.
  return detail::backward_result(grad_input, sums[0], at::rsub(sums[1], 0.0), scale, zero_point);
}

}  // namespace
}  // namespace cuda
}  // namespace qat

TORCH_LIBRARY_IMPL(qat, CUDA, m) {
  m.impl("_fake_quantize_forward", &qat::cuda::fake_quantize_forward_kernel);
  m.impl("_fake_quantize_backward", &qat::cuda::fake_quantize_backward_kernel);
}
