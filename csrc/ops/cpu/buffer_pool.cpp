#include "buffer_pool.h"

#include <ATen/ATen.h>
#include <c10/core/CPUAllocator.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <unordered_map>
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
    const auto found = blocks_.find(nbytes);
    if (found != blocks_.end()) {
      for (auto& block : found->second) {
        if (block.storage.use_count() == 1 &&
            static_cast<int64_t>(block.storage.nbytes()) == nbytes) {
          block.last_use = clock_;
          ++hits_;
          return block.storage;
        }
      }
    }
    ++misses_;
    // May erase entries of blocks_: nothing found above is used past this point.
    release_free_blocks(bytes_ + nbytes - limit_);
    if (bytes_ + nbytes > limit_) {
      return c10::Storage();
    }
    c10::Storage storage(
        c10::Storage::use_byte_size_t(), nbytes, c10::GetCPUAllocator(), /*resizable=*/true);
    blocks_[nbytes].push_back({storage, clock_});
    bytes_ += nbytes;
    return storage;
  }

  BufferPoolStats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    BufferPoolStats out;
    for (const auto& entry : blocks_) {
      for (const auto& block : entry.second) {
        ++out.blocks;
        out.bytes += entry.first;
        if (block.storage.use_count() == 1) {
          out.free_bytes += entry.first;
        }
      }
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
    int64_t last_use;
  };

  // Drops free blocks: every stale one, then (stale or not) the least recently used
  // until `excess` bytes are gone. A block in use stays; it is dropped once free.
  void release_free_blocks(int64_t excess) {
    std::vector<std::pair<int64_t, std::pair<int64_t, size_t>>> candidates;
    for (auto& entry : blocks_) {
      auto& blocks = entry.second;
      for (size_t i = 0; i < blocks.size(); ++i) {
        if (blocks[i].storage.use_count() != 1) {
          continue;
        }
        const bool stale = clock_ - blocks[i].last_use > kStaleRequests;
        // A stale block goes first whatever the excess: sort keys below every fresh one.
        candidates.push_back({stale ? -1 : blocks[i].last_use, {entry.first, i}});
      }
    }
    std::sort(candidates.begin(), candidates.end());
    std::unordered_map<int64_t, std::vector<size_t>> doomed;
    for (const auto& candidate : candidates) {
      if (candidate.first >= 0 && excess <= 0) {
        break;
      }
      doomed[candidate.second.first].push_back(candidate.second.second);
      excess -= candidate.second.first;
      bytes_ -= candidate.second.first;
    }
    for (auto& entry : doomed) {
      auto& blocks = blocks_[entry.first];
      std::sort(entry.second.rbegin(), entry.second.rend());
      for (const size_t i : entry.second) {
        blocks.erase(blocks.begin() + static_cast<std::ptrdiff_t>(i));
      }
      if (blocks.empty()) {
        blocks_.erase(entry.first);
      }
    }
  }

  std::mutex mutex_;
  std::unordered_map<int64_t, std::vector<Block>> blocks_;
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

at::Tensor pooled_empty(
    at::IntArrayRef sizes, at::IntArrayRef strides, const at::TensorOptions& options) {
  int64_t extent = 1;
  for (size_t d = 0; d < sizes.size(); ++d) {
    if (sizes[d] == 0) {
      extent = 0;
      break;
    }
    extent += (sizes[d] - 1) * strides[d];
  }
  const int64_t nbytes = extent * static_cast<int64_t>(options.dtype().itemsize());
  c10::Storage storage;
  if (nbytes >= kMinPooledBytes) {
    storage = pool().take(nbytes);
  }
  if (!storage) {
    return at::empty_strided(sizes, strides, options);
  }
  auto tensor = at::detail::make_tensor<c10::TensorImpl>(
      std::move(storage), c10::DispatchKeySet(c10::DispatchKey::CPU), options.dtype());
  tensor.unsafeGetTensorImpl()->set_sizes_and_strides(sizes, strides);
  return tensor;
}

at::Tensor pooled_empty_like(const at::Tensor& like, at::ScalarType dtype) {
  return pooled_empty(like.sizes(), like.strides(), like.options().dtype(dtype));
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
