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
import os
import typing
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from scipy.stats import fisher_exact

from pcam import h5io
from pcam.errors import PcamError
from pcam.params import ExclusionReason, ValidateParams

# In priority order: an excluded patch's "reason" is the first that applies.
REASONS: tuple[str, ...] = typing.get_args(ExclusionReason)
PIXEL_REASONS = ("trigger", "black", "white", "background", "uniform")
# Patches without tissue: identical copies of them across splits carry no information.
BLANK_REASONS = ("black", "white", "background", "uniform")
# (earlier, later) split pairs; a shared patch is excluded from the earlier one.
SPLIT_PAIRS = (("train", "valid"), ("train", "test"), ("valid", "test"))
GALLERY_SIZE = 32
# What a split's report holds only when its meta CSV exists (otherwise listed under "skipped").
META_CHECKS = ("meta_label_mismatches", "slides")
# Patches per pixel-check task: its (128, 96, 96) planes stay in CPU cache (a whole chunk at
# once does not, and runs several times slower), and tasks spread over validate.threads.
_TASK_ROWS = 128
_PIXELS = h5io.PATCH_SHAPE[0] * h5io.PATCH_SHAPE[1]
# 128-bit digests: the chance that two different patches of PCAM's 327,680 collide is ~1e-28.
_DIGEST_BYTES = 16


@dataclass(frozen=True)
class Gallery:
    patches: np.ndarray  # (k, 96, 96, 3) uint8, k <= GALLERY_SIZE
    captions: list[str]
    title: str


@dataclass(frozen=True)
class ValidationResult:
    exclusions: dict  # data/validated/exclusions.json
    report: dict  # metrics/details/data.json (the headline counts: metrics/data.json)
    galleries: dict[str, Gallery]  # one per reason, possibly empty
    warnings: list[str]  # failed checks set to "warn" (validate.label_checks), one line each


def storage_info(path: Path, ds: h5py.Dataset) -> dict:
    """Compression, chunking and on-disk vs raw size: answers 'why is my file 17 GB'."""
    raw = int(np.prod(ds.shape)) * ds.dtype.itemsize
    on_disk = path.stat().st_size
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


# --- structure ------------------------------------------------------------------------------


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
    bad_mask = (flat != 0) & (flat != 1)
    if bad_mask.any():
        bad = int(np.flatnonzero(bad_mask)[0])
        raise PcamError(
            f"{path}: dataset 'y' has label {flat[bad].item()} at index {bad}; labels must be 0 or 1"
        )
    return flat.astype(np.uint8)


def check_image_dataset(path: Path, ds: h5py.Dataset, allow_float: bool) -> None:
    if ds.ndim != 4 or ds.shape[1:] != h5io.PATCH_SHAPE:
        raise PcamError(f"{path}: dataset 'x' has shape {ds.shape}, expected (N, 96, 96, 3)")
    if ds.dtype == np.uint8:
        return
    if ds.dtype.kind == "f" and not allow_float:
        raise PcamError(
            f"{path}: dataset 'x' has dtype {ds.dtype}, expected uint8 (set "
            "validate.allow_float_images: true to accept floats holding integers 0..255)"
        )
    if ds.dtype.kind != "f":
        raise PcamError(f"{path}: dataset 'x' has dtype {ds.dtype}, expected uint8")


@dataclass(frozen=True)
class _SplitFiles:
    """One split after its cheap checks: labels, meta and storage, but no pixels read yet."""

    x_path: Path
    y_path: Path
    y: np.ndarray
    meta_path: Path
    meta: h5io.Meta | None  # None: no meta CSV (optional)
    storage: dict[str, dict]


def _open_split(raw_dir: Path, split: str, allow_float: bool, allow_wide: bool) -> _SplitFiles:
    xp, yp, mp = h5io.split_files(raw_dir, split)
    fy, dy = h5io.open_dataset(yp, "y")
    with fy:
        y = check_labels(yp, h5io.read_rows(dy, slice(0, dy.shape[0]), yp), allow_wide)
        y_storage = storage_info(yp, dy)
    fx, dx = h5io.open_dataset(xp, "x")
    with fx:
        check_image_dataset(xp, dx, allow_float)
        n = dx.shape[0]
        x_storage = storage_info(xp, dx)
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
    if positives in (0, n):
        found.append(
            (
                "one_class",
                f"{y_path}: split '{split}' has only label {int(positives == n)} ({n} patches); "
                "training and ROC-AUC need both classes",
            )
        )
    elif not p.min_positive_fraction <= positives / n <= p.max_positive_fraction:
        found.append(
            (
                "class_balance",
                f"{y_path}: split '{split}' has positive fraction {positives / n:.4f} "
                f"({positives} of {n}), outside [validate.min_positive_fraction, "
                f"validate.max_positive_fraction] = [{p.min_positive_fraction}, "
                f"{p.max_positive_fraction}]",
            )
        )
    if meta is None:
        return found
    disagree = meta.center_tumor_patch != (y == 1)
    k = int(disagree.sum())
    if k > p.max_meta_label_mismatch_fraction * n:
        first = int(np.flatnonzero(disagree)[0])
        found.append(
            (
                "meta_agreement",
                f"{meta_path}: {k} of {n} labels in {y_path.name} ({k / n:.1%}) differ from "
                f"center_tumor_patch (first at index {first}: label {int(y[first])}, meta "
                f"{bool(meta.center_tumor_patch[first])}), more than "
                f"validate.max_meta_label_mismatch_fraction = {p.max_meta_label_mismatch_fraction}",
            )
        )
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
            if getattr(p.label_checks, check) == "error":
                raise PcamError(
                    f"{line} (validate.label_checks.{check}: warn accepts it with a warning)"
                )
            warnings.append(line)
    return warnings


def _read_chunks(
    files: _SplitFiles, chunk_rows: int, on_chunk: Callable[[int, np.ndarray], None] | None
) -> None:
    """Read every x chunk (catches truncation and corrupt chunks) and hand it to on_chunk.

    The block handed over is reused for the next chunk: on_chunk must copy what it keeps.
    """
    fx, dx = h5io.open_dataset(files.x_path, "x")
    with fx:
        # The same bytes per read whatever the dtype: float64 images read 8x fewer rows.
        rows_per_read = max(1, chunk_rows // dx.dtype.itemsize)
        # One buffer for every read: a fresh 56 MiB array per chunk costs more in page faults
        # than the read itself.
        buffer = np.empty((min(rows_per_read, dx.shape[0]), *dx.shape[1:]), dtype=dx.dtype)
        for rows in h5io.iter_chunks(dx.shape[0], rows_per_read):
            block = h5io.pixels_as_uint8(
                files.x_path, h5io.read_rows(dx, rows, files.x_path, buffer), rows.start
            )
            if on_chunk is not None:
                on_chunk(rows.start, block)


# --- pixel checks ---------------------------------------------------------------------------


def tissue_lut(max_saturation: float) -> np.ndarray:
    """lut[v]: the smallest max-min channel spread at which a pixel of HSV value v (its max
    channel) reaches saturation (max - min) / max >= max_saturation, i.e. counts as tissue.

    Comparing the spread with lut[vmax] replaces a float division per pixel by a uint8 lookup.
    """
    v = np.arange(256)[:, None]
    spread = np.arange(256)[None, :]
    saturation = np.where(v > 0, spread / np.maximum(v, 1), 0.0)
    ok = (saturation >= max_saturation) & (spread <= v)
    # v = 0 has saturation 0: never tissue unless the threshold is 0; 1 is a spread it cannot have.
    return np.where(ok.any(axis=1), ok.argmax(axis=1), 1).astype(np.uint8)


def _box_sum(a: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Sum over every rows x cols window of a (n, h, w) uint8 stack (valid windows only)."""
    n, h, w = a.shape
    down = np.zeros((n, h - rows + 1, w), dtype=np.uint16)
    for i in range(rows):
        down += a[:, i : h - rows + 1 + i]
    out = np.zeros((n, h - rows + 1, w - cols + 1), dtype=np.uint16)
    for j in range(cols):
        out += down[:, :, j : w - cols + 1 + j]
    return out


def trigger_candidates(vmax: np.ndarray, vmin: np.ndarray, p: ValidateParams) -> np.ndarray:
    """Patches holding a block of extreme contrast (see the module docstring), per patch.

    vmax/vmin: (n, 96*96) max and min channel of each pixel.
    """
    n, k = len(vmax), p.trigger_block_px
    # A k x k block has 2k(k-1) neighbouring pairs; half of them must switch.
    need = k * (k - 1)
    out = np.zeros(n, dtype=bool)
    dark = vmax <= p.trigger_dark_max
    bright = vmin >= p.trigger_bright_min
    # Cheapest tests first, each on the patches the last one left: most patches lack dark or
    # bright pixels, and in tissue the two are seldom side by side.
    rows = np.flatnonzero(dark.any(axis=1) & bright.any(axis=1))
    shape = (-1, *h5io.PATCH_SHAPE[:2])
    d, b = dark[rows].reshape(shape), bright[rows].reshape(shape)
    across = (d[:, :, :-1] & b[:, :, 1:]) | (b[:, :, :-1] & d[:, :, 1:])
    down = (d[:, :-1, :] & b[:, 1:, :]) | (b[:, :-1, :] & d[:, 1:, :])
    count = np.count_nonzero(across, axis=(1, 2)) + np.count_nonzero(down, axis=(1, 2))
    keep = count >= need
    rows, d, b, across, down = rows[keep], d[keep], b[keep], across[keep], down[keep]
    if len(rows) == 0:
        return out
    switches = _box_sum(across.view(np.uint8), k, k - 1) + _box_sum(down.view(np.uint8), k - 1, k)
    hit = (switches >= need) & (_box_sum((d | b).view(np.uint8), k, k) == k * k)
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
    return np.ascontiguousarray(hi[::3]).reshape(n, -1), np.ascontiguousarray(lo[::3]).reshape(
        n, -1
    )


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
    return np.array(
        [hashlib.blake2b(row, digest_size=_DIGEST_BYTES).digest() for row in block],
        dtype=f"S{_DIGEST_BYTES}",
    )


@dataclass
class _Findings:
    """What the chunk scan of one split accumulates: digests, pixel flags, gallery patches."""

    digests: np.ndarray
    flags: dict[str, np.ndarray]
    # Per pixel reason: the first GALLERY_SIZE flagged (index, patch).
    gallery: dict[str, list[tuple[int, np.ndarray]]]


def _scan_content(
    files: _SplitFiles, p: ValidateParams, pool: ThreadPoolExecutor, lut: np.ndarray
) -> _Findings:
    n = len(files.y)
    found = _Findings(
        digests=np.empty(n, dtype=f"S{_DIGEST_BYTES}"),
        flags={reason: np.zeros(n, dtype=bool) for reason in PIXEL_REASONS},
        gallery={reason: [] for reason in PIXEL_REASONS},
    )

    def task(part: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        return digests(part), pixel_flags(part, p, lut)

    def on_chunk(start: int, block: np.ndarray) -> None:
        parts = [block[i : i + _TASK_ROWS] for i in range(0, len(block), _TASK_ROWS)]
        offset = start
        for digest, flags in pool.map(task, parts):
            rows = slice(offset, offset + len(digest))
            found.digests[rows] = digest
            for reason, hit in flags.items():
                found.flags[reason][rows] = hit
                kept = found.gallery[reason]
                for i in np.flatnonzero(hit)[: GALLERY_SIZE - len(kept)]:
                    kept.append((offset + int(i), block[offset - start + i].copy()))
            offset += len(digest)

    _read_chunks(files, p.chunk_rows, on_chunk)
    return found


# --- across patches and splits --------------------------------------------------------------


def first_occurrence(d: np.ndarray) -> np.ndarray:
    """For each row, the first row with the same digest (itself when it is the first)."""
    # return_index makes np.unique sort stably, so it returns the first occurrence.
    _, first, inverse = np.unique(d, return_index=True, return_inverse=True)
    return first[inverse]


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


def _leakage(
    found: dict[str, _Findings],
    flags: dict[str, dict[str, np.ndarray]],
    copy_of: dict[str, dict[str, dict[int, str]]],
) -> dict:
    """Patches shared by two splits; marks the earlier copies as cross_split_duplicate."""
    out: dict = {}
    for a, b in SPLIT_PAIRS:
        da, db = found[a].digests, found[b].digests
        shared = np.intersect1d(da, db)
        in_a, in_b = np.isin(da, shared), np.isin(db, shared)
        flags[a]["cross_split_duplicate"] |= in_a
        unique_b, first_b = np.unique(db, return_index=True)
        rows_a = np.flatnonzero(in_a)
        for i, j in zip(rows_a, first_b[np.searchsorted(unique_b, da[rows_a])], strict=True):
            copy_of[a]["cross_split_duplicate"].setdefault(int(i), f"{b}:{int(j)}")
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
    raw_dir = Path(raw_dir)
    files = {
        s: _open_split(raw_dir, s, p.allow_float_images, p.allow_wide_labels) for s in h5io.SPLITS
    }
    warnings = check_label_sanity(files, p)
    lut = tissue_lut(p.background_max_saturation)
    with ThreadPoolExecutor(p.threads) as pool:
        found = {s: _scan_content(files[s], p, pool, lut) for s in h5io.SPLITS}

    flags: dict[str, dict[str, np.ndarray]] = {}
    # split -> reason -> row -> "split:row" it copies (what the exclusion and gallery show)
    copy_of: dict[str, dict[str, dict[int, str]]] = {
        s: {"duplicate": {}, "cross_split_duplicate": {}} for s in h5io.SPLITS
    }
    duplicates: dict[str, dict] = {}
    for s in h5io.SPLITS:
        n, y = len(files[s].y), files[s].y
        first = first_occurrence(found[s].digests)
        later = first != np.arange(n)
        flags[s] = {"cross_split_duplicate": np.zeros(n, dtype=bool), "duplicate": later}
        flags[s].update(found[s].flags)
        for i in np.flatnonzero(later):
            copy_of[s]["duplicate"][int(i)] = f"{s}:{int(first[i])}"
        duplicates[s] = {
            "rows": int(later.sum()),
            "distinct_patches_copied": int(len(np.unique(first[later]))),
            "conflicting_labels": int((y[later] != y[first[later]]).sum()),
        }
    leakage = _leakage(found, flags, copy_of)
    leakage["max_cross_split_duplicates"] = p.max_cross_split_duplicates

    exclusions: dict = {"exclude_reasons": list(p.exclude), "splits": {}}
    report: dict = {"exclude_reasons": list(p.exclude), "leakage": leakage, "splits": {}}
    for s in h5io.SPLITS:
        sf, y = files[s], files[s].y
        excluded = np.logical_or.reduce([flags[s][r] for r in p.exclude] + [np.zeros(len(y), bool)])
        exclusions["splits"][s] = {
            "n": len(y),
            "excluded": _entries(flags[s], excluded, copy_of[s]),
        }
        report["splits"][s] = {
            "n": len(y),
            "positives": int(y.sum()),
            "positive_fraction": round(float(y.mean()), 6),
            "storage": sf.storage,
            "flagged": {r: int(flags[s][r].sum()) for r in REASONS},
            "excluded": int(excluded.sum()),
            "excluded_fraction": round(float(excluded.mean()), 6),
            "duplicates": duplicates[s],
            "label_association": {r: label_association(flags[s][r], y) for r in REASONS},
        }
        if sf.meta is None:
            report["splits"][s]["skipped"] = {
                k: f"{sf.meta_path.name} absent (the meta CSVs are optional)" for k in META_CHECKS
            }
        else:
            report["splits"][s]["meta_label_mismatches"] = int(
                (sf.meta.center_tumor_patch != (y == 1)).sum()
            )
            report["splits"][s]["slides"] = slide_balance(sf.meta, y)
    report["slides_shared"] = {
        f"{a}_{b}": sorted(set(files[a].meta.wsi) & set(files[b].meta.wsi))
        for a, b in SPLIT_PAIRS
        if files[a].meta is not None and files[b].meta is not None
    }
    report["warnings"] = warnings
    without = [s for s in h5io.SPLITS if files[s].meta is None]
    if without:
        report["skipped"] = {
            "slides_shared": f"no meta CSV for {', '.join(without)}: slides unknown there"
        }
    _check_thresholds(report, p)
    galleries = _galleries(files, found, flags, copy_of)
    return ValidationResult(exclusions, report, galleries, warnings)


def _entries(
    flags: dict[str, np.ndarray], excluded: np.ndarray, copy_of: dict[str, dict[int, str]]
) -> list:
    entries = []
    for i in np.flatnonzero(excluded):
        reasons = [r for r in REASONS if flags[r][i]]
        entry = {"index": int(i), "reason": reasons[0], "reasons": reasons}
        if reasons[0] in copy_of:
            entry["copy_of"] = copy_of[reasons[0]][int(i)]
        entries.append(entry)
    return entries


def _check_thresholds(report: dict, p: ValidateParams) -> None:
    leak = report["leakage"]
    if leak["tissue_rows_total"] > p.max_cross_split_duplicates:
        parts = ", ".join(
            f"{a}->{b} {leak[f'{a}_{b}'][f'tissue_rows_{b}']}" for a, b in SPLIT_PAIRS
        )
        raise PcamError(
            f"leakage: {leak['tissue_rows_total']} valid/test patches copy tissue of an earlier "
            f"split ({parts}), more than validate.max_cross_split_duplicates = "
            f"{p.max_cross_split_duplicates}"
        )
    for s, r in report["splits"].items():
        if r["excluded_fraction"] > p.max_excluded_fraction:
            counts = ", ".join(f"{k} {v}" for k, v in r["flagged"].items() if v)
            raise PcamError(
                f"{s}: {r['excluded']} of {r['n']} patches flagged for exclusion ({counts}), "
                f"more than validate.max_excluded_fraction = {p.max_excluded_fraction}"
            )


def _round_robin(per_split: dict[str, list], k: int) -> list:
    """Up to k items taking one from each split in turn, so every split is shown."""
    picked, queues = [], [list(v) for v in per_split.values()]
    while len(picked) < k and any(queues):
        for q in queues:
            if q and len(picked) < k:
                picked.append(q.pop(0))
    return picked


def _galleries(
    files: dict[str, _SplitFiles],
    found: dict[str, _Findings],
    flags: dict[str, dict[str, np.ndarray]],
    copy_of: dict[str, dict[str, dict[int, str]]],
) -> dict[str, Gallery]:
    out = {}
    for reason in REASONS:
        if reason in PIXEL_REASONS:
            per_split = {s: [(s, i, x) for i, x in found[s].gallery[reason]] for s in found}
            chosen = _round_robin(per_split, GALLERY_SIZE)
        else:
            # Duplicates are known only after every digest: read the few shown patches again.
            per_split = {
                s: [(s, int(i)) for i in np.flatnonzero(flags[s][reason])[:GALLERY_SIZE]]
                for s in found
            }
            picked = _round_robin(per_split, GALLERY_SIZE)
            chosen = [(s, i, _read_patch(files[s].x_path, i)) for s, i in picked]
        captions = []
        for s, i, _ in chosen:
            where = f"\n= {copy_of[s][reason][i]}" if reason in copy_of[s] else ""
            captions.append(f"{s} {i} y={files[s].y[i]}{where}")
        counts = ", ".join(f"{s} {int(flags[s][reason].sum())}" for s in found)
        patches = np.stack([x for _, _, x in chosen]) if chosen else np.empty((0, 96, 96, 3))
        out[reason] = Gallery(
            patches.astype(np.uint8), captions, f"{reason}: {counts}; first {len(chosen)} shown"
        )
    return out


def _read_patch(x_path: Path, row: int) -> np.ndarray:
    f, ds = h5io.open_dataset(x_path, "x")
    with f:
        return h5io.pixels_as_uint8(x_path, h5io.read_rows(ds, slice(row, row + 1), x_path), row)[0]
