"""Throughput and latency measurements. Measured, never estimated; the stage never asserts a speed."""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_inference(
    model: nn.Module, batch_size: int, warmup: int, repeats: int, device: torch.device
) -> dict[str, float]:
    """Latency of one forward pass at `batch_size` on resident random input.

    Warm-up iterations are excluded (allocator, kernel selection); each timed pass is bracketed by
    a device synchronize so asynchronous CUDA work is counted where it happens.
    """
    model.eval().to(device)
    x = torch.randn(batch_size, 3, 96, 96, device=device).contiguous(
        memory_format=torch.channels_last
    )
    for _ in range(warmup):
        model(x)
    _sync(device)
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(x)
        _sync(device)
        seconds.append(time.perf_counter() - t0)
    s = np.asarray(seconds)
    return {
        "batch_size": batch_size,
        "images_per_s": float(batch_size / np.median(s)),
        "latency_ms_p50": float(np.percentile(s, 50) * 1e3),
        "latency_ms_p95": float(np.percentile(s, 95) * 1e3),
        "latency_ms_min": float(s.min() * 1e3),
        "repeats": repeats,
    }
