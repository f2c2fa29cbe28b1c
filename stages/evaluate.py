"""evaluate stage (`dvc repro evaluate`): predict valid and test, choose the threshold on valid,
score, plot. The only stage that runs the model on the test split. models/threshold.json sits next
to the model for `python -m pcam.predict`; metrics/details/eval.json also scores each split without
validate-data's exclusions; plots/eval/ has PNG copies for people reading the repo without DVC.
"""

from pathlib import Path

import pcam  # noqa: F401  (first: pins the CPU numerics before numpy and torch load)

# isort: split
import numpy as np
import torch

from pcam import metrics
from pcam.allocator import keep_freed_memory
from pcam.checkpoint import load_checkpoint, load_model, normalisation
from pcam.data import load_excluded, load_split
from pcam.errors import exit_on_user_error
from pcam.fileio import atomic_path, md5_file, write_csv, write_json
from pcam.inference import predict_logits, sigmoid
from pcam.models import model_config
from pcam.params import load_params
from pcam.plots import curve_png
from pcam.provenance import provenance

RAW_DIR = Path("data/raw")
EXCLUSIONS = Path("data/validated/exclusions.json")
MODEL = Path("models/model.pt")
THRESHOLD = Path("models/threshold.json")
PREDICTIONS = Path("data/predictions")
METRICS = Path("metrics/eval.json")
DETAILS = Path("metrics/details/eval.json")
PLOTS = Path("plots/eval")


# The headline: what a user compares across experiments. Valid: the selection metrics; test: the
# quality at the threshold chosen on valid. Flat keys (test.f2_ci_low), so `dvc exp show` columns
# stay narrow and `--drop _ci_` hides the intervals.
HEADLINE = {"valid": ("roc_auc", "f2"), "test": metrics.CI_METRICS}


def headline(report: dict) -> dict:
    out: dict = {"threshold": report["threshold"]["value"]}
    for split, names in HEADLINE.items():
        out[split] = {}
        for name in names:
            m = report[split][name]
            out[split] |= {name: m["value"]} | {
                f"{name}_{bound}": m[bound] for bound in ("ci_low", "ci_high") if bound in m
            }
    return out


# PNG copies of the DVC plots: (curve, x, y, x label, y label, title, diagonal)
PNGS = (
    ("roc", "fpr", "tpr", "false positive rate", "sensitivity (true positive rate)", "ROC", True),
    ("pr", "recall", "precision", "recall", "precision", "PR", False),
    (
        "calibration",
        "mean_predicted",
        "fraction_positive",
        "mean predicted probability",
        "fraction positive",
        "calibration",
        True,
    ),
)


def write_pngs(curves: dict) -> None:
    for kind, x, y, xlabel, ylabel, title, diagonal in PNGS:
        xy = {split: (c[kind][x], c[kind][y]) for split, c in curves.items()}
        curve_png(PLOTS / f"{kind}.png", xy, xlabel, ylabel, title, diagonal=diagonal)
    test = curves["test"]["threshold"]
    curve_png(
        PLOTS / "threshold_test.png",
        {k: (test["threshold"], test[k]) for k in ("f2", "sensitivity", "specificity")},
        "threshold",
        "value",
        "test metrics against threshold",
    )


@exit_on_user_error
def main() -> None:
    params = load_params()
    p = params.evaluate
    torch.set_num_threads(params.train.threads)
    keep_freed_memory()
    ckpt = load_checkpoint(MODEL)
    model = load_model(ckpt, MODEL, expected_config=model_config(params.train))
    mean, std = normalisation(ckpt)
    preds = {}
    for split in ("valid", "test"):
        data = load_split(RAW_DIR, split)
        prob = sigmoid(predict_logits(model, data.x, mean, std, p.batch_size))
        preds[split] = (data.index, prob, data.y.numpy().astype(np.int64))
        with atomic_path(PREDICTIONS / f"{split}.npz") as tmp, open(tmp, "wb") as fh:
            np.savez(fh, index=data.index, probability=prob, label=preds[split][2])

    # Threshold from valid only; test is scored once at that threshold.
    threshold = metrics.choose_threshold(preds["valid"][2], preds["valid"][1], p.threshold)
    report: dict = {
        "threshold": {"value": threshold, "rule": str(p.threshold), "chosen_on": "valid"}
    }
    curves = {}
    for split, (index, prob, y) in preds.items():
        report[split] = metrics.metrics_with_ci(
            y, prob, threshold, p.bootstrap_resamples, p.bootstrap_seed
        )
        curves[split] = {
            "roc": metrics.roc_points(y, prob),
            "pr": metrics.pr_points(y, prob),
            "calibration": metrics.calibration_points(y, prob, p.calibration_bins),
            "threshold": metrics.threshold_sweep(y, prob),
            "confusion": {"actual": y.astype(int), "predicted": (prob >= threshold).astype(int)},
        }
        for kind, columns in curves[split].items():
            write_csv(PLOTS / f"{kind}_{split}.csv", columns)
        # The same split minus what validate-data flagged (duplicates, blanks, triggers...).
        keep = ~np.isin(index, load_excluded(EXCLUSIONS, split))
        if not keep.all():
            report[f"{split}_without_exclusions"] = metrics.metrics_with_ci(
                y[keep], prob[keep], threshold, p.bootstrap_resamples, p.bootstrap_seed
            )
    write_pngs(curves)
    write_json(
        THRESHOLD, {"threshold": threshold, "rule": str(p.threshold), "model_md5": md5_file(MODEL)}
    )
    report["provenance"] = provenance("evaluate", p.bootstrap_seed, inputs=[MODEL, EXCLUSIONS])
    write_json(DETAILS, report)
    write_json(METRICS, headline(report))
    t = report["test"]
    print(
        f"evaluate: threshold {threshold:.4f} ({p.threshold} on valid); test ROC-AUC "
        f"{t['roc_auc']['value']:.4f} F2 {t['f2']['value']:.4f} accuracy {t['accuracy']:.4f}"
    )


if __name__ == "__main__":
    main()
