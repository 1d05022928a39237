#include "clamped_positions.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <cstring>
#include <vector>

#include "buffer_pool.h"

namespace qat {
namespace cpu {

c10::optional<at::Tensor> clamped_positions(const at::Tensor& code) {
  TORCH_INTERNAL_ASSERT(
      code.is_cpu() && code.scalar_type() == at::kByte && code.is_non_overlapping_and_dense());
  const uint8_t* data = code.data_ptr<uint8_t>();
  const int64_t n = code.numel();
  const size_t limit = static_cast<size_t>(n / kSparseShare);
  std::vector<int64_t> found;
  // 64 bytes at a time, ORed as words (the compiler vectorizes it): a block of in-range
  // codes is one test.
  constexpr int64_t kBlock = 64;
  int64_t i = 0;
  for (; i + kBlock <= n; i += kBlock) {
    uint64_t any = 0;
    for (int64_t j = 0; j < kBlock; j += 8) {
      uint64_t word;
      std::memcpy(&word, data + i + j, sizeof(word));
      any |= word;
    }
    if (any == 0) {
      continue;
    }
    for (int64_t j = i; j < i + kBlock; ++j) {
      if (data[j] != 0) {
        found.push_back(j);
      }
    }
    if (found.size() > limit) {
      return c10::nullopt;
    }
  }
  for (; i < n; ++i) {
    if (data[i] != 0) {
      found.push_back(i);
    }
  }
  if (found.size() > limit) {
    return c10::nullopt;
  }
  auto positions = at::empty({static_cast<int64_t>(found.size())}, code.options().dtype(at::kLong));
  std::memcpy(positions.data_ptr<int64_t>(), found.data(), found.size() * sizeof(int64_t));
  return positions;
}

at::Tensor mask_clamped(const at::Tensor& grad, const at::Tensor& positions) {
  if (positions.numel() == 0) {
    return grad;
  }
  auto grad_input = pooled_empty_like(grad, grad.scalar_type());
  grad_input.copy_(grad);
  const int64_t* where = positions.data_ptr<int64_t>();
  const int64_t count = positions.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad.scalar_type(), "qat::mask_clamped", [&] {
        const scalar_t* g = grad.data_ptr<scalar_t>();
        scalar_t* out = grad_input.data_ptr<scalar_t>();
        for (int64_t k = 0; k < count; ++k) {
          out[where[k]] = g[where[k]] * scalar_t(0);
        }
      });
  return grad_input;
}

}  // namespace cpu
}  // namespace qat
