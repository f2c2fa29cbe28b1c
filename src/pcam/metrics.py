"""Classification metrics (scikit-learn wherever it has them), threshold choice and bootstrap CIs."""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve

# Probabilities are clipped before NLL so a confident mistake costs a lot but not infinity.
_EPS = 1e-7
CI_METRICS = ("roc_auc", "f2", "sensitivity", "specificity")


def choose_threshold(y: np.ndarray, prob: np.ndarray, rule: str | float) -> float:
    """Decision threshold from the *validation* split: never call this with test data.

    Rules: f2/f1 (maximise F-beta), youden (maximise sensitivity + specificity - 1),
    sensitivity@s (the highest threshold whose sensitivity is >= s), or a fixed number.
    """
    if isinstance(rule, float):
        return rule
    if rule in ("f1", "f2"):
        beta = 1.0 if rule == "f1" else 2.0
        precision, recall, thresholds = skm.precision_recall_curve(y, prob)
        # The last precision/recall pair has no threshold (recall 0 by convention); drop it.
        p, r = precision[:-1], recall[:-1]
        with np.errstate(divide="ignore", invalid="ignore"):
            f = np.where(p + r > 0, (1 + beta**2) * p * r / (beta**2 * p + r), 0.0)
        return float(thresholds[int(np.argmax(f))])
    fpr, tpr, thresholds = skm.roc_curve(y, prob, drop_intermediate=False)
    finite = np.isfinite(thresholds)  # roc_curve prepends +inf as "predict nothing positive"
    fpr, tpr, thresholds = fpr[finite], tpr[finite], thresholds[finite]
    if rule == "youden":
        return float(thresholds[int(np.argmax(tpr - fpr))])
    if rule.startswith("sensitivity@"):
        target = float(rule.split("@", 1)[1])
        ok = np.nonzero(tpr >= target)[0]  # thresholds decrease, so the first hit is the highest
        return float(thresholds[ok[0]])
    raise ValueError(f"unknown threshold rule {rule!r}")


def expected_calibration_error(y: np.ndarray, prob: np.ndarray, n_bins: int = 15) -> float:
    """ECE, equal-width bins; sklearn's calibration_curve gives the points but not the weights."""
    bins = np.minimum((prob * n_bins).astype(int), n_bins - 1)
    counts = np.bincount(bins, minlength=n_bins)
    pos = np.bincount(bins, weights=y, minlength=n_bins)
    conf = np.bincount(bins, weights=prob, minlength=n_bins)
    nz = counts > 0
    return float(np.sum(np.abs(pos[nz] - conf[nz])) / len(y))


def classification_metrics(y: np.ndarray, prob: np.ndarray, threshold: float) -> dict[str, float]:
    """All point metrics at `threshold`. Ranking metrics need both classes present."""
    y = np.asarray(y).astype(int)
    pred = (prob >= threshold).astype(int)
    out = {
        "n": int(len(y)),
        "prevalence": float(y.mean()) if len(y) else float("nan"),
        "accuracy": skm.accuracy_score(y, pred),
        "sensitivity": skm.recall_score(y, pred, pos_label=1, zero_division=0.0),
        "specificity": skm.recall_score(y, pred, pos_label=0, zero_division=0.0),
        "precision": skm.precision_score(y, pred, zero_division=0.0),
        "f1": skm.f1_score(y, pred, zero_division=0.0),
        "f2": skm.fbeta_score(y, pred, beta=2.0, zero_division=0.0),
        "brier": skm.brier_score_loss(y, prob, labels=[0, 1]),
        "nll": skm.log_loss(y, np.clip(prob, _EPS, 1 - _EPS), labels=[0, 1]),
        "ece": expected_calibration_error(y, prob),
    }
    if len(np.unique(y)) == 2:
        out["roc_auc"] = skm.roc_auc_score(y, prob)
        out["pr_auc"] = skm.average_precision_score(y, prob)
        out["balanced_accuracy"] = skm.balanced_accuracy_score(y, pred)
    return {k: float(v) if not isinstance(v, int) else v for k, v in out.items()}


def metrics_with_ci(
    y: np.ndarray, prob: np.ndarray, threshold: float, resamples: int, seed: int
) -> dict:
    """classification_metrics, the CI_METRICS nested as {value, ci_low, ci_high}: the keys
    `dvc metrics diff` shows read test.roc_auc.value, test.f2.ci_low, ..."""
    out: dict = classification_metrics(y, prob, threshold)
    cis = bootstrap_ci(y, prob, threshold, resamples, seed)
    for name in CI_METRICS:
        if name in out:
            out[name] = {"value": out[name], **cis.get(name, {})}
    return out


def rates(tp: int, fp: int, fn: int, tn: int) -> dict[str, float]:
    """Sensitivity, specificity (NaN when undefined) and F2 from confusion counts: by hand where
    sklearn would be called hundreds of times (tests compare them with sklearn)."""
    return {
        "sensitivity": tp / (tp + fn) if tp + fn else np.nan,
        "specificity": tn / (tn + fp) if tn + fp else np.nan,
        "f2": 5 * tp / (5 * tp + 4 * fn + fp) if tp + fn + fp else 0.0,
    }


def roc_auc_by_ranks(positive: np.ndarray, prob: np.ndarray) -> float:
    """skm.roc_auc_score as the Mann-Whitney statistic (ties count half; tests compare them),
    without its input validation, which made the bootstrap's thousands of calls take seconds."""
    n_pos = int(positive.sum())
    rank_sum = float(rankdata(prob)[positive].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * (len(positive) - n_pos))


def bootstrap_ci(
    y: np.ndarray, prob: np.ndarray, threshold: float, resamples: int, seed: int
) -> dict[str, dict[str, float]]:
    """95% percentile-bootstrap intervals of CI_METRICS, resampling patches (seeded). Resamples
    with a single class cannot score ROC-AUC and are skipped for it."""
    rng = np.random.default_rng(seed)
    y = np.asarray(y).astype(int)
    pred = prob >= threshold
    samples: dict[str, list[float]] = {k: [] for k in CI_METRICS}
    for _ in range(resamples):
        idx = rng.integers(0, len(y), len(y))
        predb, pos, neg = pred[idx], y[idx] == 1, y[idx] == 0
        values = rates(
            np.sum(predb & pos), np.sum(predb & neg), np.sum(~predb & pos), np.sum(~predb & neg)
        )
        if pos.any() and neg.any():
            values["roc_auc"] = roc_auc_by_ranks(pos, prob[idx])
        for k in CI_METRICS:
            if np.isfinite(values.get(k, np.nan)):
                samples[k].append(float(values[k]))
    out = {}
    for k, vals in samples.items():
        if len(vals) >= 2:
            lo, hi = np.percentile(vals, [2.5, 97.5])
            out[k] = {"ci_low": float(lo), "ci_high": float(hi)}
    return out


def roc_points(y: np.ndarray, prob: np.ndarray) -> dict[str, np.ndarray]:
    fpr, tpr, thr = skm.roc_curve(y, prob)
    # roc_curve starts at threshold +inf ("nothing positive"); written out as Infinity it breaks
    # DVC's Vega rendering (example-repos-dev#225). 1.0 predicts nothing positive just the same.
    return {"fpr": fpr, "tpr": tpr, "threshold": np.where(np.isfinite(thr), thr, 1.0)}


def pr_points(y: np.ndarray, prob: np.ndarray) -> dict[str, np.ndarray]:
    precision, recall, thr = skm.precision_recall_curve(y, prob)
    # The final point (recall 0, precision 1) has no threshold; 1.0 stands for "nothing positive".
    return {"recall": recall, "precision": precision, "threshold": np.append(thr, 1.0)}


def calibration_points(y: np.ndarray, prob: np.ndarray, bins: int) -> dict[str, np.ndarray]:
    frac_pos, mean_pred = calibration_curve(y, prob, n_bins=bins, strategy="uniform")
    return {"mean_predicted": mean_pred, "fraction_positive": frac_pos}


def threshold_sweep(y: np.ndarray, prob: np.ndarray, steps: int = 101) -> dict[str, np.ndarray]:
    """F2, sensitivity and specificity (undefined: 0) at evenly spaced thresholds in [0, 1]."""
    grid = np.linspace(0.0, 1.0, steps)
    rows = {"threshold": grid, "f2": [], "sensitivity": [], "specificity": []}
    for t in grid:
        tn, fp, fn, tp = skm.confusion_matrix(y, prob >= t, labels=[0, 1]).ravel()
        for k, v in rates(tp, fp, fn, tn).items():
            rows[k].append(0.0 if np.isnan(v) else v)
    return {k: np.asarray(v, dtype=np.float64) for k, v in rows.items()}
