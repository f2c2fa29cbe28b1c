"""validate-data: one test per structural fault, the pixel checks against a plain reference,
duplicates and leakage, exclusions, thresholds and the stage's all-or-nothing outputs."""

from __future__ import annotations

import dataclasses
import json
import re
import runpy
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from pcam import h5io, plots, validation
from pcam.errors import PcamError
from pcam.params import ParamsError, ValidateParams, load_params
from tests.conftest import REPO, make_meta, write_tiny_split

STAGE = REPO / "stages" / "validate_data.py"


def vparams(**changes) -> ValidateParams:
    return dataclasses.replace(load_params(REPO / "params.yaml").validate, **changes)


def write_dataset(path: Path, name: str, data: np.ndarray, **kw) -> None:
    with h5py.File(path, "w") as f:
        f.create_dataset(name, data=data, **kw)


def check(raw: Path, **changes) -> validation.ValidationResult:
    return validation.validate(raw, vparams(**changes))


def fails(raw: Path, *needles: str, **changes) -> str:
    with pytest.raises(PcamError) as err:
        check(raw, **changes)
    msg = str(err.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, msg
    return msg


def xpath(raw: Path, split: str = "valid") -> Path:
    return h5io.split_files(raw, split)[0]


def ypath(raw: Path, split: str = "valid") -> Path:
    return h5io.split_files(raw, split)[1]


def mpath(raw: Path, split: str = "valid") -> Path:
    return h5io.split_files(raw, split)[2]


def patches(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 96, 96, 3), dtype=np.uint8)


# --- structural faults: one test per case -------------------------------------------------


def test_clean_data_passes(tiny_raw):
    result = check(tiny_raw)
    assert {s: v["n"] for s, v in result.exclusions["splits"].items()} == dict.fromkeys(
        h5io.SPLITS, 16
    )
    assert all(not v["excluded"] for v in result.exclusions["splits"].values())


def test_missing_file(tiny_raw):
    xpath(tiny_raw).unlink()
    fails(tiny_raw, "camelyonpatch_level_2_split_valid_x.h5", "file not found")


def test_not_an_hdf5_file(tiny_raw):
    xpath(tiny_raw).write_text("<html>404 Not Found</html>")
    fails(tiny_raw, "split_valid_x.h5", "not a readable HDF5 file")


def test_truncated_hdf5(tiny_raw):
    path = xpath(tiny_raw)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    # A cut-off download: HDF5 compares the file size with the size its superblock records.
    fails(tiny_raw, "split_valid_x.h5", "not a readable HDF5 file", "truncated file")


def test_corrupt_compressed_chunk(tiny_raw):
    path = xpath(tiny_raw)
    write_dataset(path, "x", patches(16), chunks=(4, 96, 96, 3), compression="gzip")
    with h5py.File(path, "r") as f:
        offset = f["x"].id.get_chunk_info_by_coord((8, 0, 0, 0)).byte_offset  # rows 8..11
    raw = bytearray(path.read_bytes())
    raw[offset + 10 : offset + 400] = bytes(390)
    path.write_bytes(bytes(raw))
    # Read 4 rows at a time, the message narrows the damage down to the broken chunk.
    fails(tiny_raw, "split_valid_x.h5", "unreadable at rows 8..11", "filter", chunk_rows=4)


def test_missing_x_dataset(tiny_raw):
    write_dataset(xpath(tiny_raw), "images", patches(16))
    fails(tiny_raw, "split_valid_x.h5", "dataset 'x' missing", "images")


def test_missing_y_dataset(tiny_raw):
    write_dataset(ypath(tiny_raw), "labels", np.zeros((16, 1, 1, 1), np.uint8))
    fails(tiny_raw, "split_valid_y.h5", "dataset 'y' missing")


def test_wrong_patch_size(tiny_raw):
    write_dataset(xpath(tiny_raw), "x", np.zeros((16, 64, 64, 3), np.uint8))
    fails(tiny_raw, "split_valid_x.h5", "shape (16, 64, 64, 3), expected (N, 96, 96, 3)")


def test_four_channels(tiny_raw):
    write_dataset(xpath(tiny_raw), "x", np.zeros((16, 96, 96, 4), np.uint8))
    fails(tiny_raw, "split_valid_x.h5", "shape (16, 96, 96, 4)")


def test_wrong_rank(tiny_raw):
    write_dataset(xpath(tiny_raw), "x", np.zeros((16, 96, 96), np.uint8))
    fails(tiny_raw, "split_valid_x.h5", "shape (16, 96, 96), expected")


def test_y_wrong_shape(tiny_raw):
    write_dataset(ypath(tiny_raw), "y", np.zeros((16, 2), np.uint8))
    fails(tiny_raw, "split_valid_y.h5", "dataset 'y' has shape (16, 2)")


def test_integer_images_of_another_width_refused(tiny_raw):
    write_dataset(xpath(tiny_raw), "x", patches(16).astype(np.int16))
    fails(tiny_raw, "split_valid_x.h5", "dtype int16, expected uint8")


def test_float_images_refused_unless_allowed(tiny_raw):
    write_dataset(xpath(tiny_raw), "x", patches(16).astype(np.float32))
    fails(tiny_raw, "split_valid_x.h5", "dtype float32", "validate.allow_float_images")


def test_float_images_holding_integers_accepted_when_allowed(tiny_raw):
    before = check(tiny_raw)
    x = h5py.File(xpath(tiny_raw), "r")["x"][:]
    write_dataset(xpath(tiny_raw), "x", x.astype(np.float64))
    after = check(tiny_raw, allow_float_images=True, chunk_rows=24)  # 3 float64 rows per read
    assert after.exclusions == before.exclusions
    assert after.report["splits"]["valid"]["storage"][xpath(tiny_raw).name]["dtype"] == "float64"


def test_float_images_scaled_to_unit_range_refused(tiny_raw):
    write_dataset(xpath(tiny_raw), "x", patches(16).astype(np.float32) / 255)
    fails(tiny_raw, "split_valid_x.h5", "at index 0", "integers 0..255", allow_float_images=True)


def test_float_images_out_of_range_refused(tiny_raw):
    x = patches(16).astype(np.float32)
    x[9, 5, 5, 1] = 300.0
    write_dataset(xpath(tiny_raw), "x", x)
    fails(tiny_raw, "value 300.0 at index 9", allow_float_images=True)


def test_nan_in_images(tiny_raw):
    x = patches(16).astype(np.float32)
    x[11, 0, 0, 0] = np.nan
    write_dataset(xpath(tiny_raw), "x", x)
    fails(tiny_raw, "split_valid_x.h5", "non-finite value nan at index 11", allow_float_images=True)


def test_inf_in_labels(tiny_raw):
    y = (np.arange(16) % 2).astype(np.float32).reshape(-1, 1, 1, 1)
    y[6] = np.inf
    write_dataset(ypath(tiny_raw), "y", y)
    fails(tiny_raw, "split_valid_y.h5", "non-finite label inf at index 6", allow_wide_labels=True)


def test_int64_labels_refused_unless_allowed(tiny_raw):
    y = (np.arange(16) % 2).astype(np.int64).reshape(-1, 1, 1, 1)
    write_dataset(ypath(tiny_raw), "y", y)
    fails(tiny_raw, "split_valid_y.h5", "dtype int64", "validate.allow_wide_labels")
    assert check(tiny_raw, allow_wide_labels=True).report["splits"]["valid"]["positives"] == 8


def test_labels_outside_0_1(tiny_raw):
    y = (np.arange(16) % 2).astype(np.uint8).reshape(-1, 1, 1, 1)
    y[13] = 2
    write_dataset(ypath(tiny_raw), "y", y)
    fails(tiny_raw, "split_valid_y.h5", "label 2 at index 13; labels must be 0 or 1")


def test_length_mismatch(tiny_raw):
    write_dataset(ypath(tiny_raw), "y", np.zeros((15, 1, 1, 1), np.uint8))
    fails(tiny_raw, "valid:", "has 16 patches but", "has 15 labels")


def test_empty_split(tiny_raw):
    write_dataset(xpath(tiny_raw), "x", np.zeros((0, 96, 96, 3), np.uint8))
    write_dataset(ypath(tiny_raw), "y", np.zeros((0, 1, 1, 1), np.uint8))
    fails(tiny_raw, "split_valid_x.h5", "split 'valid' is empty")


def test_meta_wrong_columns(tiny_raw):
    mpath(tiny_raw).write_text("y,x,tumor,centre,slide\n" + "0,0,0,0,s\n" * 16)
    fails(tiny_raw, "split_valid_meta.csv", "columns are ['y', 'x'")


def test_meta_wrong_row_count(tiny_raw):
    y = np.zeros(15, np.uint8)
    h5io.write_meta(mpath(tiny_raw), make_meta(15, y))
    fails(tiny_raw, "split_valid_meta.csv", "has 15 rows, expected 16")


def test_meta_missing_skips_what_needs_it(tiny_raw):
    # torchvision's and TFDS's PCAM copies have no meta CSVs: optional, and said so.
    with_meta = check(tiny_raw).report
    mpath(tiny_raw).unlink()
    report = check(tiny_raw).report
    valid = report["splits"]["valid"]
    why = "camelyonpatch_level_2_split_valid_meta.csv absent (the meta CSVs are optional)"
    assert valid["skipped"] == {"meta_label_mismatches": why, "slides": why}
    assert "slides" not in valid and "meta_label_mismatches" not in valid
    assert report["slides_shared"] == {"train_test": []}
    assert report["skipped"] == {"slides_shared": "no meta CSV for valid: slides unknown there"}
    # everything else is as with the CSV
    assert "skipped" not in with_meta and "skipped" not in report["splits"]["train"]
    for key in ("flagged", "excluded", "duplicates", "label_association"):
        assert valid[key] == with_meta["splits"]["valid"][key], key
    assert report["leakage"] == with_meta["leakage"]


def test_every_split_is_checked_before_any_is_read_in_full(tiny_raw, monkeypatch):
    # A broken test CSV must not be found after minutes spent reading train's pixels.
    mpath(tiny_raw, "test").write_text("a,b\n")
    read = []
    real = h5io.read_rows
    monkeypatch.setattr(
        h5io, "read_rows", lambda ds, rows, *a: read.append(ds.name) or real(ds, rows, *a)
    )
    with pytest.raises(PcamError, match="test_meta.csv"):
        check(tiny_raw)
    assert read == ["/y", "/y", "/y"]  # the labels of each split, no pixels


# --- pixel checks ---------------------------------------------------------------------------


def reference_flags(x: np.ndarray, p: ValidateParams) -> dict[str, np.ndarray]:
    """The definitions of the module docstring, written plainly (floats, loops)."""
    f = x.astype(np.float64)
    vmax, vmin = f.max(axis=3), f.min(axis=3)
    sat = np.where(vmax > 0, (vmax - vmin) / np.where(vmax > 0, vmax, 1), 0.0)
    out = {
        "background": sat.max(axis=(1, 2)) < p.background_max_saturation,
        "white": (vmin >= p.white_min).mean(axis=(1, 2)) >= p.blank_pixel_fraction,
        "black": (vmax <= p.black_max).mean(axis=(1, 2)) >= p.blank_pixel_fraction,
        "uniform": vmax.std(axis=(1, 2)) < p.uniform_max_std,
    }
    # Every k x k window: all pixels dark (0) or bright (1), half its neighbour pairs switching.
    k = p.trigger_block_px
    cls = np.where(vmax <= p.trigger_dark_max, 0, np.where(vmin >= p.trigger_bright_min, 1, -1))
    w = np.lib.stride_tricks.sliding_window_view(cls, (k, k), axis=(1, 2))
    flips = (w[..., :, 1:] != w[..., :, :-1]).sum(axis=(-2, -1))
    flips += (w[..., 1:, :] != w[..., :-1, :]).sum(axis=(-2, -1))
    trig = ((w >= 0).all(axis=(-2, -1)) & (flips >= k * (k - 1))).any(axis=(1, 2))
    out["trigger"] = trig
    return out


def crafted_patches() -> tuple[np.ndarray, dict[str, list[int]]]:
    rng = np.random.default_rng(1)
    tissue = rng.integers(60, 200, (96, 96, 3)).astype(np.uint8)
    tissue[..., 1] //= 2  # pink/purple: clearly saturated
    x = np.stack([tissue] * 10)
    x[1] = 235 + rng.integers(-2, 3, (96, 96, 3))  # glass
    x[2] = rng.integers(0, 13, (96, 96, 3))  # black noise: saturated, so not background
    x[3] = 128  # flat grey: uniform and background, neither white nor black
    x[4, 10:14, 20:24] = (np.add.outer(np.arange(4), np.arange(4)) % 2 * 255)[..., None]
    x[5, :, :48], x[5, :, 48:] = 0, 255  # a sharp straight edge: not a trigger
    x[6, 40:43, 40:43] = np.array([0, 255, 0])[None, :, None]  # 3x3 stripes: a trigger
    x[7] = 250
    x[7, 30:34, 30:34] = 0  # a solid black square on white: not looked for (see docstring)
    x[8, 50:60, 50:60] = 255  # tissue with a white square: still tissue
    x[9] = 250
    x[9, :4] = 60  # white with a few rows of tissue-free grey: white holds below 5% of pixels
    expected = {
        "background": [1, 3, 5, 7, 9],  # no colour anywhere, black/white included
        "white": [1, 7, 9],
        "black": [2],
        "uniform": [1, 2, 3],
        "trigger": [4, 6],
    }
    return x, expected


def test_pixel_flags_match_the_plain_definitions():
    p = vparams()
    x, expected = crafted_patches()
    got = validation.pixel_flags(x, p, validation.tissue_lut(p.background_max_saturation))
    ref = reference_flags(x, p)
    for reason in validation.PIXEL_REASONS:
        assert np.flatnonzero(got[reason]).tolist() == expected[reason], reason
        np.testing.assert_array_equal(got[reason], ref[reason], err_msg=reason)


def test_pixel_flags_match_reference_on_synthetic_tissue():
    from pcam.synthetic import generate_split, slide_ids_for

    x = generate_split(64, slide_ids_for("train", 4), 5, 0.2).x
    p = vparams(trigger_dark_max=80, trigger_bright_min=176)  # looser: more windows to compare
    got = validation.pixel_flags(x, p, validation.tissue_lut(p.background_max_saturation))
    ref = reference_flags(x, p)
    for reason in validation.PIXEL_REASONS:
        np.testing.assert_array_equal(got[reason], ref[reason], err_msg=reason)
    assert not any(got[r].any() for r in validation.PIXEL_REASONS)  # tissue is not flagged


@pytest.mark.parametrize("threshold", [0.0, 0.07, 0.5, 1.0])
def test_tissue_lut_equals_hsv_saturation(threshold):
    lut = validation.tissue_lut(threshold)
    v = np.arange(256)[:, None]
    spread = np.arange(256)[None, :]
    valid = spread <= v
    sat = np.where(v > 0, spread / np.maximum(v, 1), 0.0)
    np.testing.assert_array_equal((spread >= lut[v])[valid], (sat >= threshold)[valid])


# --- duplicates, leakage, exclusions ---------------------------------------------------------


def write_split(raw: Path, split: str, x: np.ndarray, y: np.ndarray | None = None) -> None:
    y = (np.arange(len(x)) % 2).astype(np.uint8) if y is None else y
    h5io.write_split(raw, split, x, y, make_meta(len(x), y, f"{split}_slide"))


def excluded(result, split: str) -> dict[int, dict]:
    return {e["index"]: e for e in result.exclusions["splits"][split]["excluded"]}


def test_duplicates_keep_the_first_occurrence(tiny_raw):
    x = patches(16, seed=7)
    x[9], x[12], x[14] = x[3], x[3], x[5]
    write_split(tiny_raw, "train", x)
    result = check(tiny_raw)
    ex = excluded(result, "train")
    assert sorted(ex) == [9, 12, 14]
    assert ex[12] == {
        "index": 12,
        "reason": "duplicate",
        "reasons": ["duplicate"],
        "copy_of": "train:3",
    }
    dup = result.report["splits"]["train"]["duplicates"]
    # labels alternate: x[12] and x[14] carry other labels than the patches they copy
    assert dup == {"rows": 3, "distinct_patches_copied": 2, "conflicting_labels": 2}


def test_cross_split_copies_are_excluded_from_the_earlier_split(tiny_raw):
    train, valid, test = patches(16, 10), patches(16, 11), patches(16, 12)
    valid[2] = train[4]  # train -> valid
    test[7] = train[8]  # train -> test
    test[0] = valid[5]  # valid -> test
    train[10] = train[8]  # a within-train duplicate of a leaked patch: both train copies go
    for split, x in zip(h5io.SPLITS, (train, valid, test), strict=True):
        write_split(tiny_raw, split, x)
    result = check(tiny_raw)
    assert sorted(excluded(result, "train")) == [4, 8, 10]
    assert excluded(result, "train")[8]["copy_of"] == "test:7"
    assert excluded(result, "train")[10]["reasons"] == ["cross_split_duplicate", "duplicate"]
    assert excluded(result, "train")[10]["copy_of"] == "test:7"  # what its first reason says
    assert sorted(excluded(result, "valid")) == [5]
    assert excluded(result, "test") == {}  # test stays untouched
    leak = result.report["leakage"]
    assert leak["train_valid"] == {"rows_train": 1, "rows_valid": 1, "tissue_rows_valid": 1}
    assert leak["train_test"] == {"rows_train": 2, "rows_test": 1, "tissue_rows_test": 1}
    assert leak["valid_test"]["rows_test"] == 1 and leak["tissue_rows_total"] == 3


def test_leakage_above_threshold_fails(tiny_raw):
    train, valid = patches(16, 10), patches(16, 11)
    valid[:3] = train[:3]
    write_split(tiny_raw, "train", train)
    write_split(tiny_raw, "valid", valid)
    assert check(tiny_raw, max_cross_split_duplicates=3).report["leakage"]["tissue_rows_total"] == 3
    fails(
        tiny_raw,
        "leakage: 3",
        "train->valid 3",
        "validate.max_cross_split_duplicates = 2",
        max_cross_split_duplicates=2,
    )


def test_identical_blank_glass_across_splits_is_not_leakage(tiny_raw):
    train, test = patches(16, 10), patches(16, 12)
    train[0] = test[0] = 240  # the same empty glass on two slides
    write_split(tiny_raw, "train", train)
    write_split(tiny_raw, "test", test)
    result = check(tiny_raw, max_cross_split_duplicates=0)
    assert result.report["leakage"]["train_test"] == {
        "rows_train": 1,
        "rows_test": 1,
        "tissue_rows_test": 0,
    }
    assert excluded(result, "train")[0]["reasons"][0] == "cross_split_duplicate"


def test_exclude_picks_the_reasons(tiny_raw):
    x = patches(16, 3)
    x[1] = x[0]
    x[5] = 0
    write_split(tiny_raw, "train", x)
    assert sorted(excluded(check(tiny_raw), "train")) == [1, 5]
    assert sorted(excluded(check(tiny_raw, exclude=("duplicate",)), "train")) == [1]
    result = check(tiny_raw, exclude=())
    assert excluded(result, "train") == {}
    assert result.report["splits"]["train"]["flagged"]["black"] == 1  # still reported


def test_exclude_may_be_an_empty_list_in_params(tmp_path):
    text = (REPO / "params.yaml").read_text()
    # params.yaml keeps lists in block style (DVC's write-back form): the key line and its items.
    block = re.search(r"^  exclude:.*\n(?:  - .*\n)*", text, re.M).group(0)
    path = tmp_path / "params.yaml"
    path.write_text(text.replace(block, "  exclude: []\n"))
    assert load_params(path).validate.exclude == ()
    path.write_text(text.replace(block, "  exclude: [duplicates]\n"))
    with pytest.raises(ParamsError, match=r"validate.exclude\[0\] = 'duplicates'.*'duplicate'"):
        load_params(path)


def test_too_many_exclusions_fail(tiny_raw):
    x = patches(16, 3)
    x[:5] = 255
    write_split(tiny_raw, "test", x)
    fails(tiny_raw, "test: 5 of 16 patches flagged", "white 5", "max_excluded_fraction = 0.25")
    assert check(tiny_raw, max_excluded_fraction=0.5).report["splits"]["test"]["excluded"] == 5


def test_trigger_label_association_is_reported(tiny_raw):
    x, y = patches(64, 4), (np.arange(64) % 2).astype(np.uint8)
    board = (np.add.outer(np.arange(4), np.arange(4)) % 2 * 255).astype(np.uint8)[..., None]
    positives = np.flatnonzero(y)[:12]
    x[positives, :4, :4] = board
    write_split(tiny_raw, "train", x, y)
    assoc = check(tiny_raw).report["splits"]["train"]["label_association"]["trigger"]
    assert assoc["flagged"] == 12 and assoc["positive_fraction"] == 1.0
    assert assoc["positive_fraction_unflagged"] == round(20 / 52, 6)
    assert assoc["fisher_p"] < 1e-3
    assert (
        check(tiny_raw).report["splits"]["valid"]["label_association"]["trigger"]["fisher_p"] == 1.0
    )


def test_slides_and_class_balance(tiny_raw):
    x, y = patches(16, 3), np.array([1] * 6 + [0] * 10, np.uint8)
    meta = make_meta(16, y, "slide_a")
    meta = dataclasses.replace(meta, wsi=np.array(["slide_a"] * 8 + ["valid_slide"] * 8))
    h5io.write_split(tiny_raw, "train", x, y, meta)
    report = check(tiny_raw).report
    assert report["splits"]["train"]["slides"] == {
        "slide_a": {"n": 8, "positives": 6, "positive_fraction": 0.75},
        "valid_slide": {"n": 8, "positives": 0, "positive_fraction": 0.0},
    }
    assert report["slides_shared"] == {
        "train_valid": ["valid_slide"],
        "train_test": [],
        "valid_test": [],
    }


def test_streaming_reads_bounded_chunks_and_chunking_changes_nothing(tiny_raw, monkeypatch):
    x = patches(16, 9)
    x[13] = x[2]
    x[7] = 0
    write_split(tiny_raw, "train", x)
    whole = check(tiny_raw, chunk_rows=64)
    sizes = []
    real = h5io.read_rows
    monkeypatch.setattr(
        h5io,
        "read_rows",
        lambda ds, rows, *a: sizes.append((ds.name, rows.stop - rows.start)) or real(ds, rows, *a),
    )
    small = check(tiny_raw, chunk_rows=3, threads=1)
    assert max(k for name, k in sizes if name == "/x") <= 3
    assert small.exclusions == whole.exclusions and small.report == whole.report


def test_galleries_one_per_reason_at_most_32_every_split_shown(tiny_raw):
    for i, split in enumerate(h5io.SPLITS):
        x = patches(40, 20 + i)
        x[:36] = 0  # black
        write_split(tiny_raw, split, x)
    result = check(tiny_raw, max_excluded_fraction=1.0)
    assert set(result.galleries) == set(validation.REASONS)
    black = result.galleries["black"]
    assert len(black.patches) == 32 and black.patches.dtype == np.uint8
    assert {c.split()[0] for c in black.captions} == set(h5io.SPLITS)
    assert black.title.startswith("black: train 36, valid 36, test 36")
    assert len(result.galleries["trigger"].patches) == 0


def test_duplicate_gallery_shows_the_copies(tiny_raw):
    x = patches(16, 5)
    x[11] = x[4]
    write_split(tiny_raw, "valid", x)
    g = check(tiny_raw).galleries["duplicate"]
    assert g.captions == ["valid 11 y=1\n= valid:4"]
    np.testing.assert_array_equal(g.patches[0], x[4])


# --- the stage's outputs when it passes (its failures: tests/test_bad_inputs.py) -----------


@pytest.fixture
def stage_dir(tmp_path: Path) -> Path:
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    for i, split in enumerate(h5io.SPLITS):
        write_tiny_split(tmp_path / "data" / "raw", split, n=16, seed=i)
    return tmp_path


def test_stage_writes_exclusions_report_and_one_gallery_per_reason(stage_dir, monkeypatch):
    raw = stage_dir / "data" / "raw"
    x = h5py.File(xpath(raw, "train"), "r")["x"][:]
    x[5] = x[2]
    write_split(raw, "train", x)
    drawn = {}
    # Rendering is pcam.plots' job (and slow); here: what the stage hands it, and where.
    monkeypatch.setattr(
        plots, "patch_grid", lambda path, p, captions, title: drawn.update({Path(path): len(p)})
    )
    monkeypatch.chdir(stage_dir)
    runpy.run_path(str(STAGE), run_name="__main__")
    assert drawn == {
        Path("plots/data") / f"{r}.png": int(r == "duplicate") for r in validation.REASONS
    }
    doc = json.loads((stage_dir / "data/validated/exclusions.json").read_text())
    assert doc["splits"]["train"] == {
        "n": 16,
        "excluded": [
            {"index": 5, "reason": "duplicate", "reasons": ["duplicate"], "copy_of": "train:2"}
        ],
    }
    # the headline, what `dvc metrics diff` compares; the full report next to it
    assert json.loads((stage_dir / "metrics/data.json").read_text()) == {
        "train": {"n": 16, "excluded": 1},
        "valid": {"n": 16, "excluded": 0},
        "test": {"n": 16, "excluded": 0},
        "leaked_patches": 0,
    }
    report = json.loads((stage_dir / "metrics/details/data.json").read_text())
    assert report["splits"]["train"]["flagged"]["duplicate"] == 1
    assert (
        report["splits"]["test"]["storage"]["camelyonpatch_level_2_split_test_x.h5"]["compression"]
        == "none"
    )
