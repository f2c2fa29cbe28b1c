"""Per-channel normalisation statistics from the train split only (no leakage from valid/test)."""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from pcam import h5io
from pcam.errors import PcamError


def channel_stats(
    x_path: str | os.PathLike,
    excluded: np.ndarray,
    chunk_rows: int,
    on_block: Callable[[int, np.ndarray], None] | None = None,
) -> dict[str, object]:
    """Mean and std per RGB channel on the 0..1 scale, over all rows not in `excluded`.

    Reads contiguous chunks of `chunk_rows` patches, so memory is bounded by one chunk whatever
    the split size, and the result matches numpy on the whole array. Float images (accepted by
    validate-data only when they hold integers 0..255) are cast to uint8 per chunk, reading
    fewer rows at a time so a chunk stays the same number of bytes. `on_block(start, block)`
    sees every uint8 block (excluded rows included) in the same pass, e.g. to sample features.
    """
    f, ds = h5io.open_dataset(x_path, "x")
    # Integer sums are exact (no float rounding however many patches), and fast on uint8 data;
    # 255**2 * 3e9 pixels still fits int64 by a wide margin.
    total = np.zeros(3, dtype=np.int64)
    total_sq = np.zeros(3, dtype=np.int64)
    count = 0
    excluded = np.asarray(excluded, dtype=np.int64)
    with f:
        for rows in h5io.iter_chunks(ds.shape[0], max(1, chunk_rows // ds.dtype.itemsize)):
            block = h5io.pixels_as_uint8(x_path, h5io.read_rows(ds, rows, x_path), rows.start)
            if on_block is not None:
                on_block(rows.start, block)
            drop = excluded[(excluded >= rows.start) & (excluded < rows.stop)] - rows.start
            if len(drop):
                block = np.delete(block, drop, axis=0)
            pixels = block.reshape(-1, 3)
            total += pixels.sum(axis=0, dtype=np.int64)
            total_sq += np.square(pixels, dtype=np.uint16).sum(axis=0, dtype=np.int64)
            count += pixels.shape[0]
    if count == 0:
        raise PcamError(f"{x_path}: no patches left after exclusions; cannot compute statistics")
    mean = total.astype(np.float64) / count / 255.0
    # Var = E[x^2] - E[x]^2, with both terms from exact integer sums, in float64.
    var = total_sq.astype(np.float64) / count / 255.0**2 - mean**2
    std = np.sqrt(np.maximum(var, 0.0))
    return {
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "n_patches": count // (96 * 96),
        "n_excluded": int(len(excluded)),
    }
