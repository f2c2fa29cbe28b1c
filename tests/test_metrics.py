"""Metrics: threshold rules on valid, sklearn agreement, bootstrap intervals."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from pcam.metrics import (
    bootstrap_ci,
    choose_threshold,
    classification_metrics,
    expected_calibration_error,
    metrics_with_ci,
    pr_points,
    rates,
    roc_auc_by_ranks,
    roc_points,
    threshold_sweep,
)


@pytest.fixture(scope="module")
def scores():
    rng = np.random.default_rng(0)
    y = (rng.random(2000) < 0.4).astype(int)
    prob = np.clip(0.35 * y + rng.normal(0.35, 0.2, size=2000), 0, 1)
    return y, prob


def fbeta(y, prob, t, beta):
    return skm.fbeta_score(y, prob >= t, beta=beta, zero_division=0.0)


@pytest.mark.parametrize(("rule", "beta"), [("f2", 2.0), ("f1", 1.0)])
def test_fbeta_rule_maximises_fbeta_over_all_thresholds(scores, rule, beta):
    y, prob = scores
    t = choose_threshold(y, prob, rule)
    candidates = np.quantile(prob, np.linspace(0, 1, 120))
    assert fbeta(y, prob, t, beta) >= max(fbeta(y, prob, c, beta) for c in candidates) - 1e-12


def test_youden_and_sensitivity_rules(scores):
    y, prob = scores
    t = choose_threshold(y, prob, "youden")

    def j(c):
        pred = prob >= c
        return skm.recall_score(y, pred) + skm.recall_score(y, pred, pos_label=0) - 1

    candidates = np.quantile(prob, np.linspace(0, 1, 120))
    assert j(t) >= max(j(c) for c in candidates) - 1e-12
    t95 = choose_threshold(y, prob, "sensitivity@0.95")
    assert skm.recall_score(y, prob >= t95) >= 0.95
    # the highest such threshold: the next higher score falls below 0.95
    assert skm.recall_score(y, prob >= np.min(prob[prob > t95])) < 0.95
    assert choose_threshold(y, prob, 0.3) == 0.3


def test_point_metrics_equal_sklearn(scores):
    y, prob = scores
    m = classification_metrics(y, prob, 0.5)
    pred = prob >= 0.5
    assert m["roc_auc"] == skm.roc_auc_score(y, prob)
    assert m["pr_auc"] == skm.average_precision_score(y, prob)
    assert m["f2"] == skm.fbeta_score(y, pred, beta=2)
    assert m["specificity"] == skm.recall_score(y, pred, pos_label=0)
    assert m["brier"] == skm.brier_score_loss(y, prob)
    assert m["balanced_accuracy"] == skm.balanced_accuracy_score(y, pred)


def test_ece_zero_for_perfect_calibration_and_large_for_overconfidence():
    rng = np.random.default_rng(1)
    prob = rng.random(50_000)
    y = (rng.random(50_000) < prob).astype(int)
    assert expected_calibration_error(y, prob) < 0.01
    assert expected_calibration_error(y, np.where(prob > 0.5, 1.0, 0.0)) > 0.2


def test_bootstrap_ci_brackets_point_and_is_seeded(scores):
    y, prob = scores
    ci = bootstrap_ci(y, prob, 0.5, resamples=200, seed=0)
    point = classification_metrics(y, prob, 0.5)
    for name in ("roc_auc", "f2", "sensitivity", "specificity"):
        assert ci[name]["ci_low"] < point[name] < ci[name]["ci_high"], name
    # seeded: same seed, same interval
    assert bootstrap_ci(y, prob, 0.5, 200, 0) == ci


def test_hand_counted_rates_equal_sklearn():
    rng = np.random.default_rng(3)
    cases = [rng.integers(0, 2, 40) for _ in range(20)] + [np.zeros(40, int), np.ones(40, int)]
    for i, y in enumerate(cases):
        pred = rng.random(40) < [0.0, 0.5, 1.0][i % 3]  # includes "nothing / everything positive"
        tn, fp, fn, tp = skm.confusion_matrix(y, pred, labels=[0, 1]).ravel()
        got = rates(tp, fp, fn, tn)
        assert got["f2"] == pytest.approx(skm.fbeta_score(y, pred, beta=2.0, zero_division=0.0))
        for name, label in (("sensitivity", 1), ("specificity", 0)):
            if (y == label).any():
                expected = skm.recall_score(y, pred, pos_label=label, zero_division=0.0)
                assert got[name] == pytest.approx(expected), name
            else:
                assert np.isnan(got[name]), name


def test_rank_auc_equals_sklearn_with_and_without_ties():
    rng = np.random.default_rng(4)
    for n, levels in ((40, None), (300, None), (200, 5), (64, 2)):
        y = rng.integers(0, 2, n)
        y[:2] = [0, 1]
        prob = rng.random(n) if levels is None else rng.integers(0, levels, n) / levels
        expected = skm.roc_auc_score(y, prob)
        assert roc_auc_by_ranks(y == 1, prob) == pytest.approx(expected, abs=1e-12), (n, levels)


def test_metrics_with_ci_nests_value_and_interval(scores):
    y, prob = scores
    m = metrics_with_ci(y, prob, 0.5, 50, 0)
    assert m["roc_auc"]["value"] == skm.roc_auc_score(y, prob)
    assert m["f2"]["ci_low"] <= m["f2"]["value"] <= m["f2"]["ci_high"]
    assert isinstance(m["accuracy"], float)


def test_curves_have_no_infinite_thresholds(scores):
    y, prob = scores
    for pts in (roc_points(y, prob), pr_points(y, prob)):
        assert np.isfinite(pts["threshold"]).all()
        assert len({len(v) for v in pts.values()}) == 1
    sweep = threshold_sweep(y, prob, steps=11)
    assert sweep["sensitivity"][0] == 1.0 and sweep["specificity"][0] == 0.0


def test_single_class_slice_has_no_ranking_metrics():
    m = classification_metrics(np.ones(10, dtype=int), np.linspace(0, 1, 10), 0.5)
    assert "roc_auc" not in m and m["sensitivity"] == 0.5
