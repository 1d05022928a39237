"""What the benchmarks share: round-robin timing (qat.mobile's, which the latency helpers
use too) and the optional allocator setting."""

import ctypes
import ctypes.util

from qat.mobile import round_robin_ms, round_robin_samples  # noqa: F401 - the benchmarks' import


def keep_freed_memory() -> bool:
    """Stop glibc from handing large blocks back to the OS after every free (a tuning trick,
    only with a benchmark's --keep-freed-memory).

    By default each new 16 MiB output may be fresh memory, and its page faults then cost
    more than the arithmetic; which op pays depends on what ran before it. Keeping freed
    memory in the heap (as jemalloc or tcmalloc would) applies to every measurement alike."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 32 * 2**20)) and bool(
        libc.mallopt(m_trim_threshold, 2**30))
