"""Shared fixtures: tiny PCAM-format data written by the project's own writer."""

from __future__ import annotations

from pathlib import Path

import pcam  # noqa: F401  (first: the tests run with the CPU numerics pinned, as the stages do)

# isort: split
import numpy as np
import pytest

from pcam import h5io

REPO = Path(__file__).resolve().parents[1]


def make_meta(n: int, y: np.ndarray, slide: str = "slide_0") -> h5io.Meta:
    return h5io.Meta(
        coord_y=np.arange(n, dtype=np.int64) * 96,
        coord_x=np.zeros(n, dtype=np.int64),
        tumor_patch=y.astype(bool),
        center_tumor_patch=y.astype(bool),
        wsi=np.array([slide] * n),
    )


def write_tiny_split(raw_dir: Path, split: str, n: int = 16, seed: int = 0) -> tuple:
    """Random-pixel split with alternating labels: enough for structure, not for learning."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, 96, 96, 3), dtype=np.uint8)
    y = (np.arange(n) % 2).astype(np.uint8)
    h5io.write_split(raw_dir, split, x, y, make_meta(n, y, f"{split}_slide"))
    return x, y


@pytest.fixture
def tiny_raw(tmp_path: Path) -> Path:
    raw = tmp_path / "raw"
    for i, split in enumerate(h5io.SPLITS):
        write_tiny_split(raw, split, n=16, seed=i)
    return raw
