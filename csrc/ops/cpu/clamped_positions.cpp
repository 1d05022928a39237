#include "clamped_positions.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>

namespace qat {
namespace cpu {

c10::optional<at::Tensor> positions_of(ClampedRecord& record) {
  if (record.overflowed()) {
    return c10::nullopt;
  }
  auto& pieces = record.pieces_;
  std::sort(pieces.begin(), pieces.end(), [](const auto& a, const auto& b) {
    return a.first < b.first;
  });
  int64_t total = 0;
  for (const auto& piece : pieces) {
    total += static_cast<int64_t>(piece.second.size());
  }
  auto positions = at::empty({total}, at::kLong);
  int64_t* out = positions.data_ptr<int64_t>();
  for (const auto& piece : pieces) {
    out = std::copy(piece.second.begin(), piece.second.end(), out);
  }
  return positions;
}

void mask_clamped_(const at::Tensor& grad, const at::Tensor& positions) {
  const int64_t* where = positions.data_ptr<int64_t>();
  const int64_t count = positions.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad.scalar_type(), "qat::mask_clamped_", [&] {
        scalar_t* g = grad.data_ptr<scalar_t>();
        for (int64_t k = 0; k < count; ++k) {
          g[where[k]] = g[where[k]] * scalar_t(0);
        }
      });
}

}  // namespace cpu
}  // namespace qat
