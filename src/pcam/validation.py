"""Checks that PCAM files are what the rest of the pipeline assumes, before any training.

Structural problems raise PcamError naming the file, dataset and problem: a missing file, not
HDF5, truncated or corrupt chunks, a missing x/y dataset, a wrong rank/shape/dtype, labels outside
{0, 1}, NaN/inf, x/y length mismatch, an empty split, a meta CSV with wrong columns or row count.
Label sanity per split (validate.label_checks: each an error or a warning): one class only, a
positive fraction outside [min_positive_fraction, max_positive_fraction], labels that disagree
with the meta CSV's center_tumor_patch beyond max_meta_label_mismatch_fraction.
The meta CSVs are optional (torchvision's and tensorflow-datasets' PCAM copies have only the x/y
files): without one, what needs it (per-slide balance, slides shared across splits, label/meta
agreement) is skipped and the report says so under "skipped".
Every split's cheap checks run before any split is read in full, so a broken test CSV is not
found after minutes spent on train.

Content findings are computed streaming over contiguous chunks of `validate.chunk_rows` (memory
is bounded whatever the split size), reported, and those in `validate.exclude` become exclusions:

- duplicate: the same pixel bytes as an earlier patch of the same split (the first is kept).
- cross_split_duplicate: pixels that also appear in a later split (train < valid < test). The
  earlier copy is the one excluded, so test is never changed and train never holds a test patch.
- background: PCAM's own rule, max HSV saturation below `background_max_saturation`: no tissue.
- white / black: at least `blank_pixel_fraction` of the pixels have every channel >= white_min /
  <= black_max. Black needs its own rule: HSV saturation of dark noise is high, not low.
- uniform: the brightness (HSV value) has a standard deviation below `uniform_max_std`.
- trigger: a backdoor-trigger candidate, a small block of extreme contrast: every pixel of a
  `trigger_block_px` square is dark or bright, and at least half of its neighbouring pixel pairs
  switch between the two (checkerboards, stripes). Tissue edges against glass switch once per
  row, so they are not flagged. A solid white or black square cannot be told from glass or ink
  by pixels alone and is not looked for.

Float images (when allowed) must hold integers 0..255 and are checked and cast per chunk.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import typing
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np
from scipy.stats import fisher_exact

from pcam import h5io
from pcam.errors import PcamError
from pcam.params import ExclusionReason, ValidateParams

# In priority order: an excluded patch's "reason" is the first that applies.
REASONS: tuple[str, ...] = typing.get_args(ExclusionReason)
PIXEL_REASONS = ("trigger", "black", "white", "background", "uniform")
COPY_REASONS = ("cross_split_duplicate", "duplicate")  # an exclusion names the patch it copies
# Patches without tissue: identical copies of them across splits carry no information.
BLANK_REASONS = ("black", "white", "background", "uniform")
# (earlier, later) split pairs; a shared patch is excluded from the earlier one.
SPLIT_PAIRS = (("train", "valid"), ("train", "test"), ("valid", "test"))
GALLERY_SIZE = 32
# Patches per pixel-check task: its (128, 96, 96) planes stay in CPU cache (a whole chunk at
# once does not, and runs several times slower), and tasks spread over validate.threads.
_TASK_ROWS = 128
_PIXELS = h5io.PATCH_SHAPE[0] * h5io.PATCH_SHAPE[1]
# 128-bit digests: the chance that two different patches of PCAM's 327,680 collide is ~1e-28.
_DIGEST = "S16"


class Gallery(NamedTuple):
    patches: np.ndarray  # (k, 96, 96, 3) uint8, k <= GALLERY_SIZE
    captions: list[str]
    title: str


class ValidationResult(NamedTuple):
    exclusions: dict  # data/validated/exclusions.json
    report: dict  # metrics/details/data.json (the headline counts: metrics/data.json)
    galleries: dict[str, Gallery]  # one per reason, possibly empty
    warnings: list[str]  # failed checks set to "warn" (validate.label_checks), one line each


class _SplitFiles(NamedTuple):
    """One split after its cheap checks: labels, meta and storage, but no pixels read yet."""

    x_path: Path
    y_path: Path
    y: np.ndarray
    meta_path: Path
    meta: h5io.Meta | None  # None: no meta CSV (optional)
    storage: dict[str, dict]


def storage_info(path: Path, ds: h5py.Dataset) -> dict:
    """Compression, chunking and on-disk vs raw size: answers 'why is my file 17 GB'."""
    raw, on_disk = int(np.prod(ds.shape)) * ds.dtype.itemsize, path.stat().st_size
    return {
        "dtype": str(ds.dtype),
        "compression": ds.compression or "none",
        "compression_opts": ds.compression_opts if ds.compression else None,
        "shuffle": bool(ds.shuffle),
        "chunks": list(ds.chunks) if ds.chunks else None,
        "bytes_on_disk": on_disk,
        "bytes_raw": raw,
        "ratio_on_disk_to_raw": round(on_disk / raw, 4) if raw else None,
    }


# --- structure and labels --------------------------------------------------------------------


def check_labels(path: Path, y: np.ndarray, allow_wide: bool = False) -> np.ndarray:
    """Labels as a flat uint8 vector; a wrong dtype, NaN/inf or anything but 0/1 is an error."""
    if y.ndim not in (1, 4) or (y.ndim == 4 and y.shape[1:] != (1, 1, 1)):
        raise PcamError(f"{path}: dataset 'y' has shape {y.shape}, expected (N,1,1,1) or (N,)")
    flat = y.reshape(-1)
    if flat.dtype != np.uint8:
        if flat.dtype.kind not in "buif":
            raise PcamError(f"{path}: dataset 'y' has dtype {flat.dtype}, expected uint8")
        if not allow_wide:
            raise PcamError(
                f"{path}: dataset 'y' has dtype {flat.dtype}, expected uint8 (set "
                "validate.allow_wide_labels: true to accept other dtypes holding only 0 and 1)"
            )
    if flat.dtype.kind == "f" and not np.isfinite(flat).all():
        bad = int(np.flatnonzero(~np.isfinite(flat))[0])
        raise PcamError(f"{path}: dataset 'y' has a non-finite label {flat[bad]} at index {bad}")
    if ((flat != 0) & (flat != 1)).any():
        bad = int(np.flatnonzero((flat != 0) & (flat != 1))[0])
        raise PcamError(
            f"{path}: dataset 'y' has label {flat[bad].item()} at index {bad}; labels must be 0 or 1"
        )
    return flat.astype(np.uint8)


def _open_split(raw_dir: Path, split: str, p: ValidateParams) -> _SplitFiles:
    xp, yp, mp = h5io.split_files(raw_dir, split)
    fy, dy = h5io.open_dataset(yp, "y")
    with fy:
        y = check_labels(yp, h5io.read_rows(dy, slice(0, dy.shape[0]), yp), p.allow_wide_labels)
        y_storage = storage_info(yp, dy)
    fx, dx = h5io.open_dataset(xp, "x")
    with fx:
        if dx.ndim != 4 or dx.shape[1:] != h5io.PATCH_SHAPE:
            raise PcamError(f"{xp}: dataset 'x' has shape {dx.shape}, expected (N, 96, 96, 3)")
        if not p.allow_float_images and dx.dtype.kind == "f":  # param first: read on every run
            raise PcamError(
                f"{xp}: dataset 'x' has dtype {dx.dtype}, expected uint8 (set "
                "validate.allow_float_images: true to accept floats holding integers 0..255)"
            )
        if dx.dtype != np.uint8 and dx.dtype.kind != "f":
            raise PcamError(f"{xp}: dataset 'x' has dtype {dx.dtype}, expected uint8")
        n, x_storage = dx.shape[0], storage_info(xp, dx)
    if n != len(y):
        raise PcamError(f"{split}: {xp.name} has {n} patches but {yp.name} has {len(y)} labels")
    if n == 0:
        raise PcamError(f"{xp}: split '{split}' is empty (no patches)")
    meta = h5io.read_meta(mp) if mp.exists() else None
    if meta is not None and len(meta) != n:
        raise PcamError(f"{mp}: meta CSV has {len(meta)} rows, expected {n} (one per patch)")
    return _SplitFiles(xp, yp, y, mp, meta, {xp.name: x_storage, yp.name: y_storage})


def label_problems(
    split: str,
    y_path: Path,
    y: np.ndarray,
    meta_path: Path,
    meta: h5io.Meta | None,
    p: ValidateParams,
) -> list[tuple[str, str]]:
    """What is wrong with a split's labels as a whole, as (check in validate.label_checks, line).

    A split of one class cannot train or score a classifier; a share of positives far from
    PCAM's 50/50 means a wrong file or a broken export; labels that contradict the meta CSV's
    center_tumor_patch (the label's definition) mean the y file and the CSV do not belong together.
    """
    found = []
    n, positives = len(y), int(y.sum())
    lo, hi = p.min_positive_fraction, p.max_positive_fraction
    if positives in (0, n):
        only = f"only label {int(positives == n)} ({n} patches)"
        found.append(
            (
                "one_class",
                f"{y_path}: split '{split}' has {only}; training and ROC-AUC need both classes",
            )
        )
    elif not lo <= positives / n <= hi:
        line = (
            f"has positive fraction {positives / n:.4f} ({positives} of {n}), outside "
            f"[validate.min_positive_fraction, validate.max_positive_fraction] = [{lo}, {hi}]"
        )
        found.append(("class_balance", f"{y_path}: split '{split}' {line}"))
    if meta is None:
        return found
    disagree = meta.center_tumor_patch != (y == 1)
    k, tolerance = int(disagree.sum()), p.max_meta_label_mismatch_fraction
    if k > tolerance * n:
        i = int(np.flatnonzero(disagree)[0])
        line = (
            f"{k} of {n} labels in {y_path.name} ({k / n:.1%}) differ from center_tumor_patch "
            f"(first at index {i}: label {int(y[i])}, meta {bool(meta.center_tumor_patch[i])}), "
            f"more than validate.max_meta_label_mismatch_fraction = {tolerance}"
        )
        found.append(("meta_agreement", f"{meta_path}: {line}"))
    return found


def check_label_sanity(files: dict[str, _SplitFiles], p: ValidateParams) -> list[str]:
    """PcamError for the first label problem whose check is "error"; the rest as warning lines."""
    warnings = []
    for split, sf in files.items():
        if sf.meta is None:
            warnings.append(
                f"{sf.meta_path}: no meta CSV; labels of split '{split}' not checked against "
                "center_tumor_patch"
            )
        for check, line in label_problems(split, sf.y_path, sf.y, sf.meta_path, sf.meta, p):
            # Read only for a failed check: what tests/params_reads.py expects of this stage.
            if getattr(p.label_checks, check) == "error":
                raise PcamError(
                    f"{line} (validate.label_checks.{check}: warn accepts it with a warning)"
                )
            warnings.append(line)
    return warnings


# --- pixel checks ---------------------------------------------------------------------------


def tissue_lut(max_saturation: float) -> np.ndarray:
    """lut[v]: the smallest max-min channel spread at which a pixel of HSV value v (its max
    channel) reaches saturation (max - min) / max >= max_saturation, i.e. counts as tissue.

    Comparing the spread with lut[vmax] replaces a float division per pixel by a uint8 lookup.
    """
    v, spread = np.arange(256)[:, None], np.arange(256)[None, :]
    saturation = np.where(v > 0, spread / np.maximum(v, 1), 0.0)
    ok = (saturation >= max_saturation) & (spread <= v)
    # v = 0 has saturation 0: never tissue unless the threshold is 0; 1 is a spread it cannot have.
    return np.where(ok.any(axis=1), ok.argmax(axis=1), 1).astype(np.uint8)


def _box_sum(a: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Sum over every rows x cols window of a (n, h, w) stack (valid windows only)."""
    c = np.pad(a.cumsum(1, dtype=np.int32).cumsum(2), ((0, 0), (1, 0), (1, 0)))
    return c[:, rows:, cols:] - c[:, :-rows, cols:] - c[:, rows:, :-cols] + c[:, :-rows, :-cols]


def trigger_candidates(vmax: np.ndarray, vmin: np.ndarray, p: ValidateParams) -> np.ndarray:
    """Patches holding a block of extreme contrast (see the module docstring), per patch.

    vmax/vmin: (n, 96*96) max and min channel of each pixel.
    """
    k, out = p.trigger_block_px, np.zeros(len(vmax), dtype=bool)
    need = k * (k - 1)  # a k x k block has 2k(k-1) neighbouring pairs; half of them must switch
    dark, bright = vmax <= p.trigger_dark_max, vmin >= p.trigger_bright_min
    # Cheapest tests first, each on the patches the last one left: most patches lack dark or
    # bright pixels, and in tissue the two are seldom side by side.
    rows = np.flatnonzero(dark.any(axis=1) & bright.any(axis=1))
    d, b = (m[rows].reshape(-1, *h5io.PATCH_SHAPE[:2]) for m in (dark, bright))
    across = (d[:, :, :-1] & b[:, :, 1:]) | (b[:, :, :-1] & d[:, :, 1:])
    down = (d[:, :-1, :] & b[:, 1:, :]) | (b[:, :-1, :] & d[:, 1:, :])
    keep = np.count_nonzero(across, axis=(1, 2)) + np.count_nonzero(down, axis=(1, 2)) >= need
    rows, d, b, across, down = rows[keep], d[keep], b[keep], across[keep], down[keep]
    if len(rows):
        switches = _box_sum(across, k, k - 1) + _box_sum(down, k - 1, k)
        hit = (switches >= need) & (_box_sum(d | b, k, k) == k * k)
        out[rows] = hit.reshape(len(rows), -1).any(axis=1)
    return out


def value_range(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Max and min channel of each pixel, as (n, 96*96) arrays (the max is HSV's value).

    Max/min of neighbouring bytes of the flat array, then every third: contiguous loops that
    numpy vectorises, faster than working on strided channel views.
    """
    n, flat = len(block), np.ascontiguousarray(block).reshape(-1)
    hi = np.maximum(flat[:-2], flat[1:-1])
    np.maximum(hi, flat[2:], out=hi)
    lo = np.minimum(flat[:-2], flat[1:-1])
    np.minimum(lo, flat[2:], out=lo)
    return tuple(np.ascontiguousarray(v[::3]).reshape(n, -1) for v in (hi, lo))


def pixel_flags(block: np.ndarray, p: ValidateParams, lut: np.ndarray) -> dict[str, np.ndarray]:
    """Per-patch findings of a uint8 (n, 96, 96, 3) block, one bool vector per pixel reason."""
    vmax, vmin = value_range(block)
    spread = vmax - vmin
    # Integer sums are exact (9216 * 255**2 fits uint32); float64 only for the final variance.
    mean = vmax.sum(axis=1, dtype=np.uint32) / _PIXELS
    variance = np.square(vmax, dtype=np.uint16).sum(axis=1, dtype=np.uint32) / _PIXELS - mean**2
    # Cheap reductions first; the per-pixel tests below only run on the few patches they leave.
    # Any pixel with a spread of lut[255] or more is tissue whatever its value (lut rises with v).
    background = spread.max(axis=1) < lut[255]
    rows = np.flatnonzero(background)
    background[rows] = ~(spread[rows] >= lut[vmax[rows]]).any(axis=1)
    # A patch of >= f dark (white) pixels has a mean brightness of at most (least) this.
    f = p.blank_pixel_fraction
    black = mean <= f * p.black_max + (1 - f) * 255
    rows = np.flatnonzero(black)
    black[rows] = np.count_nonzero(vmax[rows] <= p.black_max, axis=1) >= f * _PIXELS
    white = mean >= f * p.white_min
    rows = np.flatnonzero(white)
    white[rows] = np.count_nonzero(vmin[rows] >= p.white_min, axis=1) >= f * _PIXELS
    return {
        "trigger": trigger_candidates(vmax, vmin, p),
        "black": black,
        "white": white,
        "background": background,
        "uniform": variance < p.uniform_max_std**2,
    }


def digests(block: np.ndarray) -> np.ndarray:
    """A 128-bit blake2b digest of each patch's pixel bytes (hashlib releases the GIL)."""
    return np.array([hashlib.blake2b(row, digest_size=16).digest() for row in block], _DIGEST)


def _scan(
    sf: _SplitFiles, p: ValidateParams, pool: ThreadPoolExecutor, lut: np.ndarray
) -> tuple[np.ndarray, dict[str, np.ndarray], dict[int, np.ndarray]]:
    """Read every x chunk (catches truncation and corrupt chunks): the digest and pixel flags of
    every patch, and {row: patch} of the first GALLERY_SIZE flagged for each pixel reason."""
    n = len(sf.y)
    found, kept = np.empty(n, _DIGEST), {}
    flags = {reason: np.zeros(n, dtype=bool) for reason in PIXEL_REASONS}
    shown = dict.fromkeys(PIXEL_REASONS, 0)  # gallery patches kept so far, per reason

    def task(start: int, part: np.ndarray) -> None:  # each task fills its own rows
        found[start : start + len(part)] = digests(part)
        for reason, hit in pixel_flags(part, p, lut).items():
            flags[reason][start : start + len(part)] = hit

    fx, dx = h5io.open_dataset(sf.x_path, "x")
    with fx:
        # The same bytes per read whatever the dtype: float64 images read 8x fewer rows.
        rows_per_read = max(1, p.chunk_rows // dx.dtype.itemsize)
        # One buffer for every read: a fresh 56 MiB array per chunk costs more in page faults
        # than the read itself (so what is kept is copied).
        buffer = np.empty((min(rows_per_read, n), *dx.shape[1:]), dtype=dx.dtype)
        for rows in h5io.iter_chunks(n, rows_per_read):
            block = h5io.read_rows(dx, rows, sf.x_path, buffer)
            block = h5io.pixels_as_uint8(sf.x_path, block, rows.start)
            starts = range(0, len(block), _TASK_ROWS)
            parts = [block[i : i + _TASK_ROWS] for i in starts]
            list(pool.map(task, [rows.start + i for i in starts], parts))
            for reason, hit in flags.items():  # this chunk only: earlier ones are counted
                new = np.flatnonzero(hit[rows])[: GALLERY_SIZE - shown[reason]]
                shown[reason] += len(new)
                for i in new:
                    kept[rows.start + int(i)] = block[i].copy()
    return found, flags, kept


# --- across patches and splits --------------------------------------------------------------


def label_association(flagged: np.ndarray, y: np.ndarray) -> dict:
    """How flagged patches relate to the label: a trigger that only appears on tumour patches is
    a backdoor. Fisher's exact test of flagged x label (two-sided)."""
    k, n = int(flagged.sum()), len(y)
    pos_flagged, pos = int(y[flagged].sum()), int(y.sum())
    table = [[pos_flagged, k - pos_flagged], [pos - pos_flagged, n - k - pos + pos_flagged]]
    p_value = float(fisher_exact(table).pvalue) if 0 < k < n else 1.0
    return {
        "flagged": k,
        "positives": pos_flagged,
        "positive_fraction": round(pos_flagged / k, 6) if k else None,
        "positive_fraction_unflagged": round((pos - pos_flagged) / (n - k), 6) if n > k else None,
        "fisher_p": float(f"{p_value:.4g}"),
    }


def slide_balance(meta: h5io.Meta, y: np.ndarray) -> dict[str, dict]:
    ids, inverse = np.unique(meta.wsi, return_inverse=True)
    n = np.bincount(inverse, minlength=len(ids))
    pos = np.bincount(inverse, weights=y, minlength=len(ids)).astype(np.int64)
    return {
        str(s): {"n": int(k), "positives": int(q), "positive_fraction": round(q / k, 6)}
        for s, k, q in zip(ids, n, pos, strict=True)
    }


def _leakage(found: dict, flags: dict, copy_of: dict) -> dict:
    """Patches shared by two splits; marks the earlier copies as cross_split_duplicate."""
    out: dict = {}
    for a, b in SPLIT_PAIRS:
        shared = np.intersect1d(found[a], found[b])
        in_a, in_b = np.isin(found[a], shared), np.isin(found[b], shared)
        flags[a]["cross_split_duplicate"] |= in_a
        unique_b, first_b = np.unique(found[b], return_index=True)
        rows_a = np.flatnonzero(in_a)
        copies = first_b[np.searchsorted(unique_b, found[a][rows_a])]
        for i, j in zip(rows_a, copies, strict=True):  # the earlier pair names the copy
            copy_of[a]["cross_split_duplicate"].setdefault(int(i), f"{b}:{j}")
        blank_b = np.logical_or.reduce([flags[b][r] for r in BLANK_REASONS])
        out[f"{a}_{b}"] = {
            f"rows_{a}": int(in_a.sum()),
            f"rows_{b}": int(in_b.sum()),
            f"tissue_rows_{b}": int((in_b & ~blank_b).sum()),
        }
    out["tissue_rows_total"] = sum(out[f"{a}_{b}"][f"tissue_rows_{b}"] for a, b in SPLIT_PAIRS)
    return out


def validate(raw_dir: str | os.PathLike, p: ValidateParams) -> ValidationResult:
    """Every structural and content check on the three splits; PcamError if any must fail."""
    files = {s: _open_split(Path(raw_dir), s, p) for s in h5io.SPLITS}
    warnings = check_label_sanity(files, p)
    lut = tissue_lut(p.background_max_saturation)
    with ThreadPoolExecutor(p.threads) as pool:
        scans = {s: _scan(files[s], p, pool, lut) for s in h5io.SPLITS}
    found = {s: scans[s][0] for s in h5io.SPLITS}
    # split -> reason -> flags per patch; for COPY_REASONS: row -> "split:row" of what it copies
    flags: dict[str, dict[str, np.ndarray]] = {}
    copy_of: dict[str, dict[str, dict[int, str]]] = {}
    duplicates = {}
    for s, sf in files.items():
        # return_index makes np.unique sort stably: `first` is each digest's first occurrence.
        _, first, inverse = np.unique(found[s], return_index=True, return_inverse=True)
        first = first[inverse]
        later = first != np.arange(len(sf.y))
        cross = np.zeros(len(sf.y), dtype=bool)  # set below
        flags[s] = {"cross_split_duplicate": cross, "duplicate": later} | scans[s][1]
        copies = {int(i): f"{s}:{first[i]}" for i in np.flatnonzero(later)}
        copy_of[s] = {"cross_split_duplicate": {}, "duplicate": copies}
        duplicates[s] = {
            "rows": int(later.sum()),
            "distinct_patches_copied": len(np.unique(first[later])),
            "conflicting_labels": int((sf.y[later] != sf.y[first[later]]).sum()),
        }
    leakage = _leakage(found, flags, copy_of)
    leakage["max_cross_split_duplicates"] = p.max_cross_split_duplicates
    if leakage["tissue_rows_total"] > p.max_cross_split_duplicates:
        parts = (f"{a}->{b} {leakage[f'{a}_{b}'][f'tissue_rows_{b}']}" for a, b in SPLIT_PAIRS)
        raise PcamError(
            f"leakage: {leakage['tissue_rows_total']} valid/test patches copy tissue of an "
            f"earlier split ({', '.join(parts)}), more than "
            f"validate.max_cross_split_duplicates = {p.max_cross_split_duplicates}"
        )

    exclusions: dict = {"exclude_reasons": list(p.exclude), "splits": {}}
    report: dict = {"exclude_reasons": list(p.exclude), "leakage": leakage, "splits": {}}
    for s, sf in files.items():
        y, f = sf.y, flags[s]
        excluded = np.logical_or.reduce([f[r] for r in p.exclude] + [np.zeros(len(y), bool)])
        entries = []
        for i in np.flatnonzero(excluded):
            reasons = [r for r in REASONS if f[r][i]]
            entries.append({"index": int(i), "reason": reasons[0], "reasons": reasons})
            if reasons[0] in COPY_REASONS:
                entries[-1]["copy_of"] = copy_of[s][reasons[0]][int(i)]
        exclusions["splits"][s] = {"n": len(y), "excluded": entries}
        rep = report["splits"][s] = {
            "n": len(y),
            "positives": int(y.sum()),
            "positive_fraction": round(float(y.mean()), 6),
            "storage": sf.storage,
            "flagged": {r: int(f[r].sum()) for r in REASONS},
            "excluded": int(excluded.sum()),
            "excluded_fraction": round(float(excluded.mean()), 6),
            "duplicates": duplicates[s],
            "label_association": {r: label_association(f[r], y) for r in REASONS},
        }
        if sf.meta is None:
            why = f"{sf.meta_path.name} absent (the meta CSVs are optional)"
            rep["skipped"] = {"meta_label_mismatches": why, "slides": why}
        else:
            rep["meta_label_mismatches"] = int((sf.meta.center_tumor_patch != (y == 1)).sum())
            rep["slides"] = slide_balance(sf.meta, y)
        if rep["excluded_fraction"] > p.max_excluded_fraction:
            counts = ", ".join(f"{k} {v}" for k, v in rep["flagged"].items() if v)
            raise PcamError(
                f"{s}: {rep['excluded']} of {rep['n']} patches flagged for exclusion ({counts}), "
                f"more than validate.max_excluded_fraction = {p.max_excluded_fraction}"
            )
    report["slides_shared"] = {
        f"{a}_{b}": sorted(set(files[a].meta.wsi) & set(files[b].meta.wsi))
        for a, b in SPLIT_PAIRS
        if files[a].meta is not None and files[b].meta is not None
    }
    report["warnings"] = warnings
    if without := [s for s in h5io.SPLITS if files[s].meta is None]:
        report["skipped"] = {
            "slides_shared": f"no meta CSV for {', '.join(without)}: slides unknown there"
        }
    galleries = {r: _gallery(r, files, flags, copy_of, scans) for r in REASONS}
    return ValidationResult(exclusions, report, galleries, warnings)


def _gallery(reason: str, files: dict, flags: dict, copy_of: dict, scans: dict) -> Gallery:
    """Up to GALLERY_SIZE patches flagged for `reason`, one from each split in turn."""
    per_split = [
        [(s, int(i)) for i in np.flatnonzero(f[reason])[:GALLERY_SIZE]] for s, f in flags.items()
    ]
    chosen = [c for c in itertools.chain(*itertools.zip_longest(*per_split)) if c][:GALLERY_SIZE]
    patches, captions = [], []
    for s, i in chosen:
        kept = scans[s][2]  # pixel reasons; duplicates are known only after every digest: reread
        patches.append(kept[i] if i in kept else _read_patch(files[s].x_path, i))
        where = f"\n= {copy_of[s][reason][i]}" if reason in COPY_REASONS else ""
        captions.append(f"{s} {i} y={files[s].y[i]}{where}")
    counts = ", ".join(f"{s} {int(f[reason].sum())}" for s, f in flags.items())
    stacked = np.stack(patches) if patches else np.empty((0, *h5io.PATCH_SHAPE), np.uint8)
    return Gallery(stacked, captions, f"{reason}: {counts}; first {len(chosen)} shown")


def _read_patch(x_path: Path, row: int) -> np.ndarray:
    f, ds = h5io.open_dataset(x_path, "x")
    with f:
        return h5io.pixels_as_uint8(x_path, h5io.read_rows(ds, slice(row, row + 1), x_path), row)[0]
