#include "clamped_positions.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>


namespace qat {
namespace cpu {

namespace {

// Bytes per piece of the scan that one thread takes.
constexpr int64_t kPiece = 256 * 1024;

// Appends the offsets of the nonzero bytes of data[begin, end) to `found`, counting them
// into `total` too; stops once `total` passes `limit`.
void scan(
    const uint8_t* data, int64_t begin, int64_t end, int64_t limit, std::vector<int64_t>& found,
    std::atomic<int64_t>& total) {
  // 64 bytes at a time, ORed as words (the compiler vectorizes it): a block of in-range
  // codes is one test.
  constexpr int64_t kBlock = 64;
  int64_t i = begin;
  while (i < end) {
    const int64_t stop = std::min(end, i + kBlock);
    uint64_t any = 0;
    if (stop - i == kBlock) {
      for (int64_t j = i; j < stop; j += 8) {
        uint64_t word;
        std::memcpy(&word, data + j, sizeof(word));
        any |= word;
      }
    } else {
      for (int64_t j = i; j < stop; ++j) {
        any |= data[j];
      }
    }
    if (any != 0) {
      // Usually one clamped value in the block (a weight's per-channel extreme): look
      // only into the nonzero words.
      const size_t before = found.size();
      for (int64_t w = i; w < stop; w += 8) {
        const int64_t word_end = std::min(stop, w + 8);
        if (word_end - w == 8) {
          uint64_t word;
          std::memcpy(&word, data + w, sizeof(word));
          if (word == 0) {
            continue;
          }
        }
        for (int64_t j = w; j < word_end; ++j) {
          if (data[j] != 0) {
            found.push_back(j);
          }
        }
      }
      const auto added = static_cast<int64_t>(found.size() - before);
      if (total.fetch_add(added) + added > limit) {
        return;
      }
    }
    i = stop;
  }
}

}  // namespace

c10::optional<at::Tensor> clamped_positions(const at::Tensor& code) {
  TORCH_INTERNAL_ASSERT(
      code.is_cpu() && code.scalar_type() == at::kByte && code.is_non_overlapping_and_dense());
  const uint8_t* data = code.data_ptr<uint8_t>();
  const int64_t n = code.numel();
  const int64_t limit = n / kSparseShare;
  const int64_t pieces = std::max<int64_t>(1, (n + kPiece - 1) / kPiece);
  std::vector<std::vector<int64_t>> found(pieces);
  std::atomic<int64_t> total{0};
  const auto scan_pieces = [&](int64_t first, int64_t last) {
    for (int64_t p = first; p < last && total.load() <= limit; ++p) {
      scan(data, p * kPiece, std::min(n, (p + 1) * kPiece), limit, found[p], total);
    }
  };
  if (pieces == 1) {
    scan_pieces(0, 1);  // most activations: no parallel region to enter
  } else {
    at::parallel_for(0, pieces, 1, scan_pieces);
  }
  if (total.load() > limit) {
    return c10::nullopt;
  }
  auto positions = at::empty({total.load()}, code.options().dtype(at::kLong));
  int64_t* out = positions.data_ptr<int64_t>();
  for (const auto& piece : found) {
    out = std::copy(piece.begin(), piece.end(), out);
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
