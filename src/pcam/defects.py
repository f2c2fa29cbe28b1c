"""Known defects injected into synthetic splits, with ground truth, to measure validate-data.

Real PCAM holds exact duplicates, blank glass and black patches, and poisoned course copies carry
backdoor triggers; the synthetic generator makes none of these. prepare injects each at a chosen
rate (`data.synthetic.defects.*`) and writes the touched indices to
data/raw/synthetic_defects.json. No pipeline stage reads that file: tests and benchmarks compare
what validate-data finds with it.

Every defect lands on its own patches (no patch gets two), and the patches copied from are left
clean, so each expected finding is unambiguous:
- duplicate: patch `index` becomes a copy (pixels, label) of an earlier patch `source`; the
  detector should flag `index`, the later occurrence.
- cross_split_duplicate: a valid/test patch becomes a copy of a clean train patch; the detector
  should flag the train patch (it is the one excluded).
- blank: near-white glass, label 0; black: near-black, label 0.
- trigger: a black/white checkerboard of `trigger_px` at a random place. In train only on
  positives, so the trigger predicts the label (a clean-label backdoor); in valid/test on any.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from pcam.errors import PcamError
from pcam.h5io import PATCH_SHAPE, SPLITS
from pcam.params import DefectParams
from pcam.synthetic import SyntheticSplit

DEFECTS = ("duplicate", "cross_split_duplicate", "blank", "black", "trigger")
# Mixed into the seed so defect draws never coincide with the generator's own streams.
_DEFECT_STREAM = 2
_DONOR_STREAM = len(SPLITS)  # after the per-split streams


@dataclass(frozen=True)
class Donors:
    """Clean train patches that a later split receives copies of (cross-split leakage)."""

    index: np.ndarray  # rows in train
    x: np.ndarray
    y: np.ndarray
    tumor_patch: np.ndarray


def defect_count(rate: float, n: int) -> int:
    """round(rate * n), but at least one when rate > 0, so small splits still get every defect."""
    return max(1, round(rate * n)) if rate > 0 else 0


def inject(
    split: str,
    data: SyntheticSplit,
    rates: DefectParams,
    seed: int,
    donors: Donors | None = None,
) -> dict[str, list]:
    """Inject every defect into `data` in place; return the ground truth of this split.

    In place because a PCAM-size split is 7 GB and a copy would double that. `donors` (from
    `take_donors`) are the train patches that valid/test receive copies of. Ground truth:
    `duplicate` and `cross_split_duplicate` hold [index, source index] pairs, the rest indices.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, _DEFECT_STREAM, SPLITS.index(split)]))
    n = len(data.y)
    x, y, meta = data.x, data.y, data.meta
    n_dup = defect_count(rates.duplicate_rate, n)
    n_cross = 0 if donors is None else len(donors.index)
    n_blank = defect_count(rates.blank_rate, n)
    n_black = defect_count(rates.black_rate, n)
    n_trigger = defect_count(rates.trigger_rate, n)
    needed = 2 * n_dup + n_cross + n_blank + n_black + n_trigger
    if needed > n:
        raise PcamError(
            f"{split}: {n} patches are too few for data.synthetic.defects (it needs {needed} "
            "distinct patches); lower the rates or raise the split size"
        )

    order = rng.permutation(n)
    cuts = np.cumsum([n_dup, n_dup, n_cross, n_blank, n_black])
    first, second, cross, blank, black, rest = np.split(order, cuts)
    # Each pair copies its earlier patch onto its later one: "keep the first" must find the later.
    source, target = np.minimum(first, second), np.maximum(first, second)
    _copy_rows(data, target, x[source], y[source], meta.tumor_patch[source])
    if donors is not None:
        _copy_rows(data, cross, donors.x, donors.y, donors.tumor_patch)
    _blank_rows(data, blank, _glass(rng, len(blank)))
    _blank_rows(data, black, rng.integers(0, 13, (len(black), *PATCH_SHAPE), dtype=np.uint8))

    # A backdoor in train: the trigger only ever appears on tumour, so a model can learn it as a
    # shortcut. valid/test: either label (what an attacker would stamp at inference time).
    candidates = rest[y[rest] == 1] if split == "train" else rest
    if len(candidates) < n_trigger:
        raise PcamError(
            f"{split}: {len(candidates)} patches can carry a trigger, "
            f"data.synthetic.defects.trigger_rate asks for {n_trigger}"
        )
    trigger = np.sort(rng.choice(candidates, n_trigger, replace=False))
    _stamp_triggers(rng, x, trigger, rates.trigger_px)

    pairs = np.argsort(target)
    return {
        "duplicate": [[int(t), int(s)] for t, s in zip(target[pairs], source[pairs], strict=True)],
        "cross_split_duplicate": []
        if donors is None
        else [[int(t), int(s)] for t, s in sorted(zip(cross, donors.index, strict=True))],
        "blank": sorted(int(i) for i in blank),
        "black": sorted(int(i) for i in black),
        "trigger": [int(i) for i in trigger],
    }


def take_donors(
    train: SyntheticSplit, train_truth: dict[str, list], counts: dict[str, int], seed: int
) -> dict[str, Donors]:
    """Copies of distinct clean train patches for each later split (counts per split name).

    Taken right after train is generated, so train need not stay in memory for valid/test.
    Distinct donors per split: a patch copied into both valid and test would also be a
    valid/test duplicate, which is not what the ground truth says.
    """
    touched = {i for pair in train_truth["duplicate"] for i in pair}
    touched |= {i for k in ("blank", "black", "trigger") for i in train_truth[k]}
    clean = np.setdiff1d(np.arange(len(train.y)), np.fromiter(touched, dtype=np.int64))
    rng = np.random.default_rng(np.random.SeedSequence([seed, _DEFECT_STREAM, _DONOR_STREAM]))
    if sum(counts.values()) > len(clean):
        raise PcamError(
            f"train has {len(clean)} patches without defects, but valid/test need "
            f"{sum(counts.values())} copies (data.synthetic.defects.cross_split_rate)"
        )
    chosen = rng.choice(clean, sum(counts.values()), replace=False)
    out, start = {}, 0
    for split, k in counts.items():
        rows = np.sort(chosen[start : start + k])
        start += k
        out[split] = Donors(
            index=rows,
            x=train.x[rows],
            y=train.y[rows].copy(),
            tumor_patch=train.meta.tumor_patch[rows].copy(),
        )
    return out


def ground_truth(rates: DefectParams, seed: int, truth: dict[str, dict[str, list]]) -> dict:
    """The document written to data/raw/synthetic_defects.json."""
    return {"seed": seed, "rates": dataclasses.asdict(rates), "splits": truth}


def _copy_rows(
    data: SyntheticSplit, rows: np.ndarray, x: np.ndarray, y: np.ndarray, tumor: np.ndarray
) -> None:
    """Copy pixels and labels; the meta CSV follows the label (center_tumor_patch == label)."""
    data.x[rows], data.y[rows] = x, y
    data.meta.tumor_patch[rows] = tumor
    data.meta.center_tumor_patch[rows] = y == 1


def _blank_rows(data: SyntheticSplit, rows: np.ndarray, pixels: np.ndarray) -> None:
    """No tissue, so no tumour: label 0, as PCAM labels its background patches."""
    data.x[rows], data.y[rows] = pixels, 0
    data.meta.tumor_patch[rows] = False
    data.meta.center_tumor_patch[rows] = False


def _glass(rng: np.random.Generator, k: int) -> np.ndarray:
    """Empty glass: one bright grey per patch (224..244), a slight tint and sensor noise.

    Channels stay within 8 levels of each other, so HSV saturation stays below 0.04: below
    PCAM's 0.07 background rule, as real glass is.
    """
    base = rng.integers(224, 245, (k, 1, 1, 1))
    tint = rng.integers(-2, 3, (k, 1, 1, 3))
    noise = rng.integers(-2, 3, (k, *PATCH_SHAPE))
    return np.clip(base + tint + noise, 0, 255).astype(np.uint8)


def _stamp_triggers(rng: np.random.Generator, x: np.ndarray, rows: np.ndarray, px: int) -> None:
    """A px x px black/white checkerboard at a random position of each patch (BadNets-style)."""
    board = ((np.add.outer(np.arange(px), np.arange(px)) % 2) * 255).astype(np.uint8)
    corner = rng.integers(0, PATCH_SHAPE[0] - px + 1, (len(rows), 2))
    for row, (r, c) in zip(rows, corner, strict=True):
        x[row, r : r + px, c : c + px] = board[:, :, None]
