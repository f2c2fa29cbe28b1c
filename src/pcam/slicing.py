"""Slices of the test split where the model may fail silently (the seeds' "dark slice")."""

from __future__ import annotations

import numpy as np

from pcam.metrics import fbeta_at


def mean_intensity(x_uint8: np.ndarray) -> np.ndarray:
    """Per-patch mean over pixels and channels, 0..255."""
    return x_uint8.reshape(len(x_uint8), -1).mean(axis=1, dtype=np.float64)


def bottom_fraction(values: np.ndarray, fraction: float) -> np.ndarray:
    """Boolean mask of the `fraction` of items with the lowest values (ties broken by index)."""
    k = max(1, int(round(fraction * len(values))))
    order = np.argsort(values, kind="stable")
    mask = np.zeros(len(values), dtype=bool)
    mask[order[:k]] = True
    return mask


def slice_f2(y: np.ndarray, prob: np.ndarray, threshold: float, mask: np.ndarray) -> dict:
    return {
        "n": int(mask.sum()),
        "prevalence": float(y[mask].mean()),
        "f2": fbeta_at(y[mask], prob[mask], threshold, beta=2.0),
    }
