"""Splits resident in memory as uint8 (4x smaller than float32), read once in large contiguous
slices; normalisation and augmentation per batch as tensor ops. Per-sample h5py reads behind a
DataLoader starve the model (the seeds' GPU ran slower than their CPU)."""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pcam import h5io
from pcam.errors import PcamError

READ_CHUNK_ROWS = 4096
STREAM_BLOCK_ROWS = 4096  # 108 MiB of uint8 per block; two are cached


@dataclass(frozen=True)
class Split:
    """One split in memory: x (N,96,96,3) uint8 NHWC, y (N,) uint8, and the original indices."""

    name: str
    x: torch.Tensor | StreamedX
    y: torch.Tensor
    index: np.ndarray  # row of each sample in the original file (survives exclusions)

    def __len__(self) -> int:
        return len(self.y)


def read_x(path: str | os.PathLike, rows: np.ndarray | None = None) -> np.ndarray:
    """Read an x file into one uint8 array with contiguous slices; `rows` keeps a sorted subset."""
    f, ds = h5io.open_dataset(path, "x")
    with f:
        h5io.check_x_dataset(path, ds)
        keep = np.arange(ds.shape[0]) if rows is None else np.asarray(rows)
        out = np.empty((len(keep),) + h5io.PATCH_SHAPE, dtype=np.uint8)
        if len(keep) == 0:
            return out
        if keep[-1] >= ds.shape[0]:
            raise PcamError(f"{path}: row {keep[-1]} requested, the file has {ds.shape[0]}")
        done = 0
        first, stop = int(keep[0]), int(keep[-1]) + 1
        for start in range(first, stop, READ_CHUNK_ROWS):
            # Read a whole contiguous window, then select: fast even when some rows are excluded.
            window = slice(start, min(stop, start + READ_CHUNK_ROWS))
            sel = keep[(keep >= window.start) & (keep < window.stop)]
            if len(sel):
                block = h5io.read_rows(ds, window, path)[sel - window.start]
                out[done : done + len(sel)] = h5io.pixels_as_uint8(path, block, window.start)
                done += len(sel)
    return out


class StreamedX:
    """An x split too large for data.memory_budget_gb, indexed like the resident uint8 tensor and
    read from HDF5 in blocks of `block_rows`; the two most recent blocks are cached, so a
    block-ordered epoch (training.epoch_order) reads each block once."""

    def __init__(self, path: Path, rows: np.ndarray, block_rows: int):
        self.path, self.rows, self.block_rows = path, rows, block_rows
        self.shape = (len(rows),) + h5io.PATCH_SHAPE
        self._block = functools.lru_cache(maxsize=2)(self._read_block)

    def __len__(self) -> int:
        return len(self.rows)

    def _read_block(self, b: int) -> torch.Tensor:
        lo = b * self.block_rows
        return torch.from_numpy(read_x(self.path, self.rows[lo : lo + self.block_rows]))

    def __getitem__(self, positions) -> torch.Tensor:
        if isinstance(positions, slice):
            positions = torch.arange(len(self))[positions]
        positions = torch.as_tensor(positions, dtype=torch.long).cpu()
        out = torch.empty((len(positions),) + h5io.PATCH_SHAPE, dtype=torch.uint8)
        blocks = positions // self.block_rows
        for b in torch.unique(blocks).tolist():
            sel = (blocks == b).nonzero().flatten()
            out[sel] = self._block(b)[positions[sel] - b * self.block_rows]
        return out


def load_excluded(exclusions_path: str | os.PathLike | None, split: str) -> np.ndarray:
    """Indices of `split` that validate-data excluded (its exclusions.json)."""
    if exclusions_path is None:
        return np.empty(0, dtype=np.int64)
    doc = json.loads(Path(exclusions_path).read_text())
    entries = doc["splits"].get(split, {}).get("excluded", [])
    return np.asarray(sorted({e["index"] for e in entries}), dtype=np.int64)


def load_split(
    raw_dir: str | os.PathLike,
    split: str,
    exclusions_path: str | os.PathLike | None = None,
    memory_budget_gb: float | None = None,
) -> Split:
    """One split minus the indices validate-data excluded: resident in memory, or streamed when
    its uint8 size exceeds `memory_budget_gb`."""
    xp, yp, _ = h5io.split_files(raw_dir, split)
    y_all = h5io.read_labels(yp)
    excluded = load_excluded(exclusions_path, split)
    keep = np.setdiff1d(np.arange(len(y_all)), excluded)
    size_gb = len(keep) * int(np.prod(h5io.PATCH_SHAPE)) / 1e9
    if memory_budget_gb is not None and size_gb > memory_budget_gb:
        x = StreamedX(Path(xp), keep, STREAM_BLOCK_ROWS)
    else:
        x = torch.from_numpy(read_x(xp, keep))
    return Split(split, x, torch.from_numpy(y_all[keep]), keep)


def load_stats(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    doc = json.loads(Path(path).read_text())
    return tuple(torch.tensor(doc[k], dtype=torch.float32) for k in ("mean", "std"))


def normalise(
    x_uint8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, gain: torch.Tensor | None = None
) -> torch.Tensor:
    """uint8 NHWC batch -> standardised float32 NCHW (channels_last), `gain` the optional
    per-sample colour jitter (n,1,1,3), mean/std per channel on the 0..1 scale.

    ((x / 255) * gain - mean) / std is x * gain / (255 std) - mean / std: one addcmul pass that
    also converts, instead of four full-size temporaries (the training hot path). The factors
    are tiled along an image row (W*3 values): a broadcast over an innermost dimension of 3 runs
    element by element on CPU, several times slower. The permute is free: NHWC storage viewed as
    NCHW is the channels_last layout fast convolution kernels want.
    """
    n, h, w, c = x_uint8.shape
    mean, std = mean.to(x_uint8.device), std.to(x_uint8.device)
    scale = (1.0 / (255.0 * std)).reshape(1, 1, c)
    if gain is not None:
        scale = gain.reshape(n, 1, c) * scale
    row_scale = scale.repeat(1, 1, w)
    row_bias = (-mean / std).repeat(w)
    out = torch.addcmul(row_bias, x_uint8.reshape(n, h, w * c), row_scale)
    return out.view(n, h, w, c).permute(0, 3, 1, 2)


def draw_flip_rotate(generator: torch.Generator, n: int, flips: bool, rot90: bool, device):
    """One code in 0..7 per sample: bit 2 = flip, bits 0-1 = number of 90-degree turns. Drawn
    even when a switch is off, so later draws do not depend on which augmentations are on."""
    codes = torch.randint(0, 8, (n,), generator=generator, device=device)
    if not flips:
        codes &= 3
    if not rot90:
        codes &= 4
    return codes


def group_by_code(codes: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """A stable order grouping a batch by code, and each code's group size: gathered in this
    order, `flip_rotate` works on contiguous slices (one pass, not a gather/scatter per code).
    A batch is a set: its order changes only the summation order of the loss."""
    order = torch.sort(codes, stable=True).indices
    return order, torch.bincount(codes, minlength=8).tolist()


def flip_rotate(x_uint8: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Flip/rotate a uint8 NHWC batch grouped by code: the first counts[0] patches get code 0,
    the next counts[1] code 1, ... Label-preserving: tissue has no canonical orientation."""
    if sum(counts) != len(x_uint8):
        raise ValueError(f"flip_rotate: {sum(counts)} codes for a batch of {len(x_uint8)}")
    out = torch.empty_like(x_uint8)
    start = 0
    for code, count in enumerate(counts):
        part = x_uint8[start : start + count]
        if code & 4:
            part = part.flip(2)
        if code & 3:
            part = torch.rot90(part, k=code & 3, dims=(1, 2))
        out[start : start + count] = part
        start += count
    return out


def draw_color_jitter(generator: torch.Generator, n: int, strength: float, device) -> torch.Tensor:
    """Per-sample gains (n,1,1,3), brightness in [1-s, 1+s] times per-channel [1-s/2, 1+s/2]:
    stain variation between slides. Applied in `normalise` without clamping (a pixel may end
    slightly above white), which saves a full pass over the batch."""
    u = torch.rand((n, 1, 1, 4), generator=generator, device=device) * 2 - 1
    return (1 + strength * u[..., :1]) * (1 + 0.5 * strength * u[..., 1:])
