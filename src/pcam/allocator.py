"""Keep freed memory in the process instead of returning it to the kernel (glibc only).

PyTorch on CPU frees and re-allocates the same multi-megabyte buffers every step; glibc serves
blocks above its mmap threshold with fresh mmap()s and unmaps them on free, so every step
page-faults its memory in again, a large share of a CPU training step (the benchmark's
`train_loop_vs_premade` and `train_step` rows run with this in place). Results are unchanged.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's ceiling on 64-bit


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds; False (and nothing changed) on another libc."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1
    return bool(mallopt(_M_TRIM_THRESHOLD, 2**30) == 1 and ok)
