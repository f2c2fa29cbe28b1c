"""Keep freed memory in the process instead of returning it to the kernel (glibc only).

PyTorch on CPU frees and re-allocates the same multi-megabyte buffers (batches, activations,
gradients) every step. glibc serves blocks above its mmap threshold with fresh mmap()s and
gives them back on free, so every step page-faults its memory in again: on CPU that costs
about as much as the data path's own work and a large share of a training step (the benchmark
stage's `train_loop_vs_premade` and `train_step` rows time both with this module in place).
Raising the mmap and trim thresholds makes glibc reuse the freed blocks.
The results are unchanged; only where the bytes live differs.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's ceiling on 64-bit
_TRIM_THRESHOLD = 2**30


def keep_freed_memory() -> bool:
    """Apply the thresholds; False (and nothing changed) where libc is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1
    return bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1 and ok)
