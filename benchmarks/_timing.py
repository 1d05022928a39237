"""What the benchmarks share: round-robin timing and the optional allocator setting."""

import ctypes
import ctypes.util
import statistics
import time
from typing import Callable, Dict, Tuple


def round_robin_ms(fns: Dict[str, Callable[[], object]], repeats: int,
                   warmup: int = 3) -> Dict[str, Tuple[float, float]]:
    """(median, min) milliseconds per call of each callable, timed round-robin (one call of
    each, repeat) so that a change in the machine's load touches every measurement alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: (statistics.median(values), min(values)) for name, values in times.items()}


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
