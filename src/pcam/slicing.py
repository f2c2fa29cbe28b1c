"""Slices of the test split where a model can fail silently (the seeds' users found one whose F2
on the darkest slides lay far below its global F2). A slice is a boolean mask over the test
predictions, defined by image features or the meta CSV, never by the model itself.
"""

from __future__ import annotations

import numpy as np

from pcam import h5io
from pcam.metrics import CI_METRICS, metrics_with_ci
from pcam.params import SliceParams

FEATURE_CHUNK_ROWS = 2048


def patch_features(x_uint8: np.ndarray, background_saturation: float) -> dict[str, np.ndarray]:
    """Per-patch mean intensity, contrast, mean HSV saturation and tissue fraction, in chunks
    (bounded memory at PCAM scale); pixels below `background_saturation` count as glass."""
    out = {k: np.empty(len(x_uint8)) for k in ("intensity", "contrast", "saturation", "tissue")}
    for rows in h5io.iter_chunks(len(x_uint8), FEATURE_CHUNK_ROWS):
        x = x_uint8[rows].astype(np.float32) / 255.0
        grey = x.mean(axis=3)
        hi, lo = x.max(axis=3), x.min(axis=3)
        sat = np.where(hi > 0, (hi - lo) / np.maximum(hi, 1e-6), 0.0)
        out["intensity"][rows] = grey.mean(axis=(1, 2))
        out["contrast"][rows] = grey.std(axis=(1, 2))
        out["saturation"][rows] = sat.mean(axis=(1, 2))
        out["tissue"][rows] = (sat >= background_saturation).mean(axis=(1, 2))
    return out


def extreme_fraction(values: np.ndarray, fraction: float, highest: bool) -> np.ndarray:
    """Mask of the `fraction` of items with the lowest (or highest) values; ties by index."""
    k = max(1, int(round(fraction * len(values))))
    order = np.argsort(-values if highest else values, kind="stable")
    mask = np.zeros(len(values), dtype=bool)
    mask[order[:k]] = True
    return mask


# Slices that need the (optional) meta CSV: tumour outside the centre, and the slide ids.
META_SLICES = ("hard_negative", "slide:*")


def define_slices(
    features: dict[str, np.ndarray], meta: h5io.Meta | None, p: SliceParams
) -> dict[str, np.ndarray]:
    """Named masks over the test patches (prediction order); without `meta`, no META_SLICES."""
    slices = {
        "dark": extreme_fraction(features["intensity"], p.dark_fraction, highest=False),
        "bright": extreme_fraction(features["intensity"], p.bright_fraction, highest=True),
        "low_contrast": extreme_fraction(features["contrast"], p.low_contrast_fraction, False),
        "high_saturation": extreme_fraction(
            features["saturation"], p.high_saturation_fraction, highest=True
        ),
        "mostly_background": features["tissue"] < p.max_tissue_fraction,
    }
    if meta is None:
        return slices
    # Tumour in the patch but not in the centre: negatives that look positive.
    slices["hard_negative"] = meta.tumor_patch & ~meta.center_tumor_patch
    for wsi in sorted(set(meta.wsi.tolist())):
        slices[f"slide:{wsi}"] = meta.wsi == wsi
    return slices


def score_slice(
    y: np.ndarray,
    prob: np.ndarray,
    threshold: float,
    mask: np.ndarray,
    global_metrics: dict[str, float],
    p: SliceParams,
    seed: int,
) -> dict:
    """Size, prevalence, metrics with bootstrap CIs and the gap to global. A metric the slice
    cannot support (too few of a class) is left out and named in `not_scored`, never NaN."""
    n, positives = int(mask.sum()), int(y[mask].sum())
    out: dict = {"n": n, "positives": positives, "prevalence": positives / n if n else 0.0}
    if n < p.min_size:
        out["not_scored"] = f"too small: {n} patches < slice.min_size {p.min_size}"
        return out
    scored = metrics_with_ci(y[mask], prob[mask], threshold, p.bootstrap_resamples, seed)
    negatives = n - positives
    need = {
        "roc_auc": min(positives, negatives),
        "f2": positives,
        "sensitivity": positives,
        "specificity": negatives,
    }
    skipped = []
    for name in CI_METRICS:
        if need[name] < p.min_per_class or name not in scored:
            skipped.append(name)
            continue
        out[name] = {**scored[name], "gap_to_global": global_metrics[name] - scored[name]["value"]}
    if skipped:
        out["not_scored"] = (
            f"{', '.join(skipped)}: fewer than slice.min_per_class={p.min_per_class} "
            f"patches of a class needed ({positives} positive, {negatives} negative)"
        )
    return out


def confident_errors(
    y: np.ndarray, prob: np.ndarray, threshold: float, mask: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the k most confident false negatives and false positives inside `mask`."""
    pred = prob >= threshold
    fn = np.nonzero(mask & (y == 1) & ~pred)[0]
    fp = np.nonzero(mask & (y == 0) & pred)[0]
    fn = fn[np.argsort(prob[fn], kind="stable")][:k]  # lowest probability first
    fp = fp[np.argsort(-prob[fp], kind="stable")][:k]  # highest probability first
    return fn, fp
