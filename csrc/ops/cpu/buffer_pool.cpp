#include "buffer_pool.h"

#include <ATen/ATen.h>
#include <c10/core/CPUAllocator.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <vector>

namespace qat {
namespace cpu {

namespace {

// Below this a block comes from malloc's free lists, which already reuse it.
constexpr int64_t kMinPooledBytes = 64 * 1024;
// A free block that this many requests in a row did not take is released: the model,
// its batch size or its mode (train / eval) changed.
constexpr int64_t kStaleRequests = 4096;
// The most bytes kept by default: what a QAT step of a mid-sized model at an ordinary
// batch size asks for, without holding on to a large share of a machine's memory.
constexpr int64_t kDefaultLimit = int64_t{2} << 30;

int64_t initial_limit() {
  // QAT_BUFFER_POOL_BYTES=0 turns pooling off without a code change (e.g. to measure it).
  const char* value = std::getenv("QAT_BUFFER_POOL_BYTES");
  if (value == nullptr || *value == '\0') {
    return kDefaultLimit;
  }
  char* end = nullptr;
  const long long parsed = std::strtoll(value, &end, 10);
  TORCH_CHECK(
      end != nullptr && *end == '\0' && parsed >= 0,
      "qat: QAT_BUFFER_POOL_BYTES must be a non-negative integer (bytes), got '", value, "'");
  return parsed;
}

class BufferPool {
 public:
  // A storage of `nbytes` that nothing else holds, or an undefined one when the pool has
  // none and no room for another.
  c10::Storage take(int64_t nbytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    ++clock_;
    if (bytes_ > limit_) {
      // The limit was lowered while blocks were in use: drop them as they come free.
      release_free_blocks(bytes_ - limit_);
    }
    if (limit_ == 0) {
      return c10::Storage();
    }
    for (auto& block : blocks_) {
      // A user may resize a storage it was handed: its current size must match too.
      if (block.nbytes == nbytes && is_free(block) &&
          static_cast<int64_t>(block.storage.nbytes()) == nbytes) {
        block.last_use = clock_;
        ++hits_;
        return block.storage;
      }
    }
    ++misses_;
    release_free_blocks(bytes_ + nbytes - limit_);
    if (bytes_ + nbytes > limit_) {
      return c10::Storage();
    }
    c10::Storage storage(
        c10::Storage::use_byte_size_t(), nbytes, c10::GetCPUAllocator(), /*resizable=*/true);
    blocks_.push_back({storage, nbytes, clock_});
    bytes_ += nbytes;
    return storage;
  }

  BufferPoolStats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    BufferPoolStats out;
    for (const auto& block : blocks_) {
      ++out.blocks;
      out.bytes += block.nbytes;
      out.free_bytes += is_free(block) ? block.nbytes : 0;
    }
    out.limit = limit_;
    out.hits = hits_;
    out.misses = misses_;
    return out;
  }

  int64_t set_limit(int64_t bytes) {
    TORCH_CHECK(
        bytes >= 0, "qat.set_buffer_pool_limit: bytes must be non-negative (0 turns pooling off), "
        "got ", bytes);
    std::lock_guard<std::mutex> lock(mutex_);
    const int64_t previous = limit_;
    limit_ = bytes;
    release_free_blocks(bytes_ - limit_);
    return previous;
  }

  void release() {
    std::lock_guard<std::mutex> lock(mutex_);
    release_free_blocks(bytes_);
  }

 private:
  struct Block {
    c10::Storage storage;
    int64_t nbytes;  // as allocated: what bytes_ counts
    int64_t last_use;
  };

  static bool is_free(const Block& block) { return block.storage.use_count() == 1; }

  // Drops free blocks: every stale one, then the least recently used until `excess`
  // bytes are gone. A block in use stays; it is dropped once free.
  void release_free_blocks(int64_t excess) {
    const auto key = [&](const Block& b) {
      // Stale blocks sort below every fresh one: they go whatever the excess.
      return clock_ - b.last_use > kStaleRequests ? int64_t{-1} : b.last_use;
    };
    std::vector<size_t> order;
    for (size_t i = 0; i < blocks_.size(); ++i) {
      if (is_free(blocks_[i])) {
        order.push_back(i);
      }
    }
    std::sort(order.begin(), order.end(), [&](size_t a, size_t b) {
      return key(blocks_[a]) < key(blocks_[b]);
    });
    std::vector<bool> dropped(blocks_.size(), false);
    for (const size_t i : order) {
      if (key(blocks_[i]) >= 0 && excess <= 0) {
        break;
      }
      dropped[i] = true;
      excess -= blocks_[i].nbytes;
      bytes_ -= blocks_[i].nbytes;
    }
    size_t kept = 0;
    for (size_t i = 0; i < blocks_.size(); ++i) {
      if (!dropped[i]) {
        blocks_[kept++] = std::move(blocks_[i]);
      }
    }
    blocks_.resize(kept);
  }

  std::mutex mutex_;
  std::vector<Block> blocks_;
  int64_t bytes_ = 0;
  int64_t limit_ = initial_limit();
  int64_t clock_ = 0;
  int64_t hits_ = 0;
  int64_t misses_ = 0;
};

BufferPool& pool() {
  // Never destroyed: kernels may run from other static destructors at exit.
  static auto* instance = new BufferPool();
  return *instance;
}

}  // namespace

at::Tensor pooled_empty_like(const at::Tensor& like, at::ScalarType dtype) {
  // The kernels' tensors are dense (detail::dense): numel elements, whatever the strides.
  TORCH_INTERNAL_ASSERT(like.is_non_overlapping_and_dense());
  const auto options = like.options().dtype(dtype);
  const int64_t nbytes = like.numel() * static_cast<int64_t>(options.dtype().itemsize());
  c10::Storage storage = nbytes >= kMinPooledBytes ? pool().take(nbytes) : c10::Storage();
  if (!storage) {
    return at::empty_strided(like.sizes(), like.strides(), options);
  }
  auto tensor = at::detail::make_tensor<c10::TensorImpl>(
      std::move(storage), c10::DispatchKeySet(c10::DispatchKey::CPU), options.dtype());
  tensor.unsafeGetTensorImpl()->set_sizes_and_strides(like.sizes(), like.strides());
  return tensor;
}

BufferPoolStats buffer_pool_stats() {
  return pool().stats();
}

int64_t set_buffer_pool_limit(int64_t bytes) {
  return pool().set_limit(bytes);
}

void release_buffers() {
  pool().release();
}

}  // namespace cpu
}  // namespace qat

namespace {

std::vector<int64_t> buffer_pool_stats_op() {
  const auto s = qat::cpu::buffer_pool_stats();
  return {s.blocks, s.bytes, s.free_bytes, s.limit, s.hits, s.misses};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(qat, m) {
  m.def("buffer_pool_stats() -> int[]", &buffer_pool_stats_op);
  m.def("set_buffer_pool_limit(int bytes) -> int", &qat::cpu::set_buffer_pool_limit);
  m.def("release_buffers() -> ()", &qat::cpu::release_buffers);
}
