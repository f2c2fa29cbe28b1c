"""Slices: features, definitions, scoring that says why instead of reporting NaN."""

from __future__ import annotations

import dataclasses

import numpy as np

from pcam.params import load_params
from pcam.slicing import (
    confident_errors,
    define_slices,
    extreme_fraction,
    patch_features,
    score_slice,
)
from tests.conftest import REPO, make_meta

P = load_params(REPO / "params.yaml").slice


def test_features_separate_dark_bright_glass_and_tissue():
    x = np.zeros((3, 96, 96, 3), dtype=np.uint8)
    x[0] = 30  # dark, grey
    x[1] = 250  # white glass
    x[2] = (200, 80, 160)  # saturated pink/purple tissue
    f = patch_features(x, background_saturation=0.07)
    assert f["intensity"][0] < f["intensity"][2] < f["intensity"][1]
    assert f["tissue"][1] == 0.0 and f["tissue"][2] == 1.0
    assert f["saturation"][2] > 0.5 and f["contrast"][0] < 1e-6


def test_extreme_fraction_picks_lowest_and_highest():
    v = np.arange(100, dtype=float)
    assert np.nonzero(extreme_fraction(v, 0.1, highest=False))[0].tolist() == list(range(10))
    assert np.nonzero(extreme_fraction(v, 0.05, highest=True))[0].tolist() == list(range(95, 100))


def test_define_slices_uses_meta_for_hard_negatives_and_slides():
    n = 8
    y = np.array([1, 0, 1, 0, 1, 0, 1, 0], dtype=np.uint8)
    meta = make_meta(n, y)
    meta = dataclasses.replace(
        meta,
        tumor_patch=meta.tumor_patch | (np.arange(n) == 1),
        wsi=np.array(["a"] * 4 + ["b"] * 4),
    )
    feats = {k: np.linspace(0, 1, n) for k in ("intensity", "contrast", "saturation", "tissue")}
    s = define_slices(feats, meta, P)
    assert np.nonzero(s["hard_negative"])[0].tolist() == [1]
    assert s["slide:a"].sum() == 4 and s["slide:b"].sum() == 4
    assert s["dark"][0] and not s["dark"][-1]
    # without the (optional) meta CSV: the same pixel slices, none of those that need it
    without = define_slices(feats, None, P)
    assert set(without) == {k for k in s if k != "hard_negative" and not k.startswith("slide:")}
    assert all((without[k] == s[k]).all() for k in without)


def test_score_slice_reports_gap_and_refuses_too_small_or_one_class():
    rng = np.random.default_rng(0)
    y = (np.arange(400) % 2).astype(int)
    prob = np.clip(0.3 * y + rng.normal(0.35, 0.2, 400), 0, 1)
    glob = {"roc_auc": 0.9, "f2": 0.8, "sensitivity": 0.9, "specificity": 0.8}
    everything = np.ones(400, dtype=bool)
    s = score_slice(y, prob, 0.5, everything, glob, P, seed=0)
    assert s["f2"]["gap_to_global"] == glob["f2"] - s["f2"]["value"]
    assert s["f2"]["ci_low"] <= s["f2"]["value"] <= s["f2"]["ci_high"]
    small = np.zeros(400, dtype=bool)
    small[:5] = True
    assert "too small" in score_slice(y, prob, 0.5, small, glob, P, 0)["not_scored"]
    negatives_only = y == 0
    one = score_slice(y, prob, 0.5, negatives_only, glob, P, 0)
    assert "roc_auc" not in one and "sensitivity" not in one and "specificity" in one
    assert "roc_auc" in one["not_scored"]
    assert "nan" not in str(one).lower()


def test_confident_errors_most_confident_first():
    y = np.array([1, 1, 1, 0, 0, 0])
    prob = np.array([0.1, 0.3, 0.9, 0.8, 0.6, 0.2])
    fn, fp = confident_errors(y, prob, 0.5, np.ones(6, dtype=bool), k=5)
    assert fn.tolist() == [0, 1] and fp.tolist() == [3, 4]
