"""compute-stats: numpy's answer on the train split minus exclusions, in bounded memory, and
nothing from valid/test."""

from __future__ import annotations

import json
import runpy
import shutil
import tracemalloc
from pathlib import Path

import h5py
import numpy as np
import pytest

from pcam import h5io, plots
from pcam.errors import PcamError
from pcam.stats import channel_stats
from tests.conftest import REPO, make_meta


def write_x(path: Path, x: np.ndarray) -> None:
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=x, chunks=(min(len(x), 8), 96, 96, 3))


def numpy_stats(x: np.ndarray, excluded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    kept = np.delete(x, excluded, axis=0).astype(np.float64) / 255.0
    return kept.mean(axis=(0, 1, 2)), kept.std(axis=(0, 1, 2))


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 1000])
def test_equals_numpy_on_the_whole_array_minus_exclusions(tmp_path, chunk_rows):
    rng = np.random.default_rng(chunk_rows)
    # Skewed per-channel levels: a wrong channel order or a lost chunk shows in every digit.
    x = (rng.beta(2, 5, (100, 96, 96, 3)) * [255, 200, 120]).astype(np.uint8)
    excluded = np.sort(rng.choice(100, 23, replace=False))
    write_x(tmp_path / "x.h5", x)
    stats = channel_stats(tmp_path / "x.h5", excluded, chunk_rows)
    mean, std = numpy_stats(x, excluded)
    np.testing.assert_allclose(stats["mean"], mean, rtol=0, atol=1e-6)
    np.testing.assert_allclose(stats["std"], std, rtol=0, atol=1e-6)
    assert stats["n_patches"] == 77 and stats["n_excluded"] == 23


def test_float_images_holding_integers_give_the_uint8_answer(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (20, 96, 96, 3), dtype=np.uint8)
    write_x(tmp_path / "u8.h5", x)
    write_x(tmp_path / "f64.h5", x.astype(np.float64))
    excluded = np.array([3, 4, 19])
    assert channel_stats(tmp_path / "f64.h5", excluded, 16) == channel_stats(
        tmp_path / "u8.h5", excluded, 16
    )


def test_scaled_float_images_are_refused_not_cast(tmp_path):
    # [0, 1] floats cast to uint8 would give a mean near 0 without a word; the stage must stop.
    x = np.random.default_rng(0).random((10, 96, 96, 3))
    write_x(tmp_path / "f.h5", x)
    with pytest.raises(PcamError, match=r"f\.h5: dataset 'x' has value .* at index 0"):
        channel_stats(tmp_path / "f.h5", np.array([], dtype=np.int64), 16)


def test_memory_is_bounded_by_chunk_rows_not_split_size(tmp_path):
    x = np.random.default_rng(1).integers(0, 256, (400, 96, 96, 3), dtype=np.uint8)
    write_x(tmp_path / "x.h5", x)
    chunk_rows = 8
    chunk_bytes = chunk_rows * 96 * 96 * 3
    del x
    tracemalloc.start()  # numpy reports its buffers to tracemalloc
    try:
        channel_stats(tmp_path / "x.h5", np.arange(0, 400, 3), chunk_rows)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # uint8 chunk + its uint16 squares + the copy without exclusions: ~4 chunks, while the
    # split is 50 chunks.
    assert peak < 6 * chunk_bytes, (peak, chunk_bytes)


def test_no_patch_left_is_a_user_error(tmp_path):
    write_x(tmp_path / "x.h5", np.zeros((3, 96, 96, 3), np.uint8))
    with pytest.raises(PcamError, match="no patches left after exclusions"):
        channel_stats(tmp_path / "x.h5", np.arange(3), 2)


def write_split(raw: Path, split: str, x: np.ndarray) -> None:
    y = (np.arange(len(x)) % 2).astype(np.uint8)
    h5io.write_split(raw, split, x, y, make_meta(len(x), y, f"{split}_slide"))


def run_stages(cwd: Path, monkeypatch) -> bytes:
    """validate-data then compute-stats, the real stage scripts, in `cwd`."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(plots, "patch_grid", lambda *a, **k: None)  # galleries: not the point
    for stage in ("validate_data.py", "compute_stats.py"):
        runpy.run_path(str(REPO / "stages" / stage), run_name="__main__")
    return (cwd / "data" / "stats.json").read_bytes()


def test_valid_and_test_cannot_change_the_statistics(tmp_path, monkeypatch):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    raw = tmp_path / "data" / "raw"
    rng = np.random.default_rng(2)
    train = rng.integers(0, 256, (48, 96, 96, 3), dtype=np.uint8)
    train[7] = train[3]  # a duplicate and a black patch: exclusions are in play
    train[9] = 0
    write_split(raw, "train", train)
    for split in ("valid", "test"):
        write_split(raw, split, rng.integers(0, 256, (16, 96, 96, 3), dtype=np.uint8))
    before = run_stages(tmp_path, monkeypatch)

    # Other valid/test content, other sizes, even other blank patches: stats.json byte-identical.
    for split, level in (("valid", 40), ("test", 250)):
        other = rng.integers(0, level, (24, 96, 96, 3), dtype=np.uint8)
        other[:2] = 255
        write_split(raw, split, other)
    after = run_stages(tmp_path, monkeypatch)
    assert after == before
    kept = np.delete(train, [7, 9], axis=0).astype(np.float64) / 255
    np.testing.assert_allclose(json.loads(after)["mean"], kept.mean(axis=(0, 1, 2)), atol=1e-6)
