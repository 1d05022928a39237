#pragma once

// The memory that qat's CPU kernels write their outputs into (fake-quantized tensors,
// backward codes, input gradients), kept between training steps.
//
// A QAT step asks for the same buffers every time: one output, one code and one gradient
// per fake-quantize, of the sizes of the model's activations and weights. glibc often
// serves blocks of that size with fresh pages from the OS, and the first write to each
// page then costs more than the fake-quantize arithmetic (measured: a resnet18 QAT step
// took 23k minor page faults, 12.5k with the pool). The pool hands back a block of the
// same byte size once nothing else holds it, so after the first step the kernels write
// into memory that is already mapped. It holds at most `limit` bytes of blocks (in use or
// free), drops a block that no call has wanted for a while, and never makes a step's peak
// larger: every pooled block is one the step would allocate anyway.

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace qat {
namespace cpu {

// An uninitialized CPU tensor like the dense `like` (same sizes and strides) in `dtype`,
// in pooled memory when its size is worth pooling and the pool has room.
at::Tensor pooled_empty_like(const at::Tensor& like, at::ScalarType dtype);

struct BufferPoolStats {
  int64_t blocks = 0;        // blocks the pool holds, in use or free
  int64_t bytes = 0;         // their bytes
  int64_t free_bytes = 0;    // bytes of the blocks nothing else holds
  int64_t limit = 0;         // the most bytes the pool keeps
  int64_t hits = 0;          // requests served from the pool since the process started
  int64_t misses = 0;        // requests of a poolable size that allocated
};

BufferPoolStats buffer_pool_stats();

// Sets the most bytes the pool keeps (0: no pooling) and returns the previous limit;
// blocks beyond the new limit are released once nothing else holds them.
int64_t set_buffer_pool_limit(int64_t bytes);

// Releases every block that nothing else holds (the pool refills on the next steps).
void release_buffers();

}  // namespace cpu
}  // namespace qat
