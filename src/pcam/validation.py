"""Checks that PCAM files are what the rest of the pipeline assumes, before any training.

Structural problems (missing/corrupt files, wrong shapes or dtypes, labels outside {0,1}, length
mismatches, bad meta CSVs) raise PcamError naming the file, dataset and problem. Content findings
(duplicates, blank patches, ...) are reported and turned into exclusions instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from pcam import h5io
from pcam.errors import PcamError

SCAN_CHUNK_ROWS = 4096


@dataclass(frozen=True)
class SplitReport:
    split: str
    n: int
    positives: int
    storage: dict[str, dict]


def storage_info(path: Path, ds: h5py.Dataset) -> dict:
    """Compression, chunking and on-disk vs raw size: answers 'why is my file 17 GB'."""
    raw = int(np.prod(ds.shape)) * ds.dtype.itemsize
    on_disk = path.stat().st_size
    return {
        "compression": ds.compression or "none",
        "compression_opts": ds.compression_opts if ds.compression else None,
        "chunks": list(ds.chunks) if ds.chunks else None,
        "bytes_on_disk": on_disk,
        "bytes_raw": raw,
        "ratio_on_disk_to_raw": round(on_disk / raw, 4) if raw else None,
    }


def check_labels(path: Path, y: np.ndarray) -> np.ndarray:
    """Labels as a flat uint8 vector; anything but 0/1 is an error naming the first bad index."""
    if y.ndim not in (1, 4) or (y.ndim == 4 and y.shape[1:] != (1, 1, 1)):
        raise PcamError(f"{path}: dataset 'y' has shape {y.shape}, expected (N,1,1,1) or (N,)")
    flat = y.reshape(-1)
    if flat.dtype.kind == "f" and not np.isfinite(flat).all():
        bad = int(np.nonzero(~np.isfinite(flat))[0][0])
        raise PcamError(f"{path}: dataset 'y' has a non-finite value at index {bad}")
    if flat.dtype.kind not in "uib" and flat.dtype.kind != "f":
        raise PcamError(f"{path}: dataset 'y' has dtype {flat.dtype}, expected uint8")
    bad_mask = (flat != 0) & (flat != 1)
    if bad_mask.any():
        bad = int(np.nonzero(bad_mask)[0][0])
        raise PcamError(
            f"{path}: dataset 'y' has label {flat[bad]!r} at index {bad}; labels must be 0 or 1"
        )
    if flat.dtype != np.uint8:
        raise PcamError(f"{path}: dataset 'y' has dtype {flat.dtype}, expected uint8")
    return flat.astype(np.uint8)


def scan_split(
    raw_dir: str | os.PathLike,
    split: str,
    on_chunk: Callable[[int, np.ndarray], None] | None = None,
) -> SplitReport:
    """Check one split's three files and read every x chunk (catches truncation and bad chunks).

    `on_chunk(start_row, block)` sees each contiguous uint8 block, for content checks.
    """
    xp, yp, mp = h5io.split_files(raw_dir, split)
    fy, dy = h5io.open_dataset(yp, "y")
    with fy:
        y = check_labels(yp, h5io.read_rows(dy, slice(0, dy.shape[0]), yp))
        y_storage = storage_info(yp, dy)
    fx, dx = h5io.open_dataset(xp, "x")
    with fx:
        if dx.ndim != 4 or dx.shape[1:] != h5io.PATCH_SHAPE:
            raise PcamError(f"{xp}: dataset 'x' has shape {dx.shape}, expected (N, 96, 96, 3)")
        if dx.dtype != np.uint8:
            raise PcamError(f"{xp}: dataset 'x' has dtype {dx.dtype}, expected uint8")
        n = dx.shape[0]
        if n == 0:
            raise PcamError(f"{xp}: split '{split}' is empty")
        if n != len(y):
            raise PcamError(f"{split}: {xp.name} has {n} patches but {yp.name} has {len(y)} labels")
        for rows in h5io.iter_chunks(n, SCAN_CHUNK_ROWS):
            block = h5io.read_rows(dx, rows, xp)
            if on_chunk is not None:
                on_chunk(rows.start, block)
        x_storage = storage_info(xp, dx)
    meta = h5io.read_meta(mp)
    if len(meta) != n:
        raise PcamError(f"{mp}: meta CSV has {len(meta)} rows, expected {n} (one per patch)")
    return SplitReport(
        split=split,
        n=n,
        positives=int(y.sum()),
        storage={xp.name: x_storage, yp.name: y_storage},
    )
