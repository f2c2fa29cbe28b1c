"""evaluate stage: predictions for valid and test, threshold chosen on valid, metrics and plots.

Run by DVC (`dvc repro evaluate`). The only stage that touches the test split with the model.
Outputs: data/predictions/{valid,test}.npz, models/threshold.json, metrics/eval.json, plots/eval/.
"""

import hashlib
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_curve

from pcam.checkpoint import load_checkpoint, load_model
from pcam.data import load_split
from pcam.errors import exit_on_user_error
from pcam.fileio import atomic_path, write_json
from pcam.inference import predict_logits, sigmoid
from pcam.metrics import choose_threshold, classification_metrics
from pcam.params import load_params
from pcam.plots import curve_png

RAW_DIR = Path("data/raw")
MODEL = Path("models/model.pt")
THRESHOLD = Path("models/threshold.json")
PREDICTIONS = Path("data/predictions")
METRICS = Path("metrics/eval.json")
PLOTS = Path("plots/eval")


def write_predictions(path: Path, index: np.ndarray, prob: np.ndarray, label: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, index=index, probability=prob, label=label)


def roc_csv(path: Path, y: np.ndarray, prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    fpr, tpr, thr = roc_curve(y, prob)
    # roc_curve starts at threshold +inf; written as JSON/CSV "inf" it breaks DVC's Vega rendering.
    thr = np.where(np.isfinite(thr), thr, 1.0)
    with atomic_path(path) as tmp:
        lines = ["fpr,tpr,threshold"] + [
            f"{a:.6f},{b:.6f},{c:.6f}" for a, b, c in zip(fpr, tpr, thr, strict=True)
        ]
        tmp.write_text("\n".join(lines) + "\n")
    return fpr, tpr


@exit_on_user_error
def main() -> None:
    p = load_params().evaluate
    torch.set_num_threads(load_params().train.threads)
    ckpt = load_checkpoint(MODEL)
    model = load_model(ckpt, MODEL)
    mean = torch.tensor(ckpt["normalisation"]["mean"])
    std = torch.tensor(ckpt["normalisation"]["std"])
    preds = {}
    for split in ("valid", "test"):
        data = load_split(RAW_DIR, split)
        prob = sigmoid(predict_logits(model, data.x, mean, std, p.batch_size))
        preds[split] = (data.index, prob, data.y.numpy())
    threshold = choose_threshold(preds["valid"][2], preds["valid"][1], p.threshold)
    report = {"threshold": {"value": threshold, "rule": str(p.threshold), "chosen_on": "valid"}}
    curves = {}
    for split, (index, prob, y) in preds.items():
        report[split] = classification_metrics(y, prob, threshold)
        write_predictions(PREDICTIONS / f"{split}.npz", index, prob, y)
        curves[split] = roc_csv(PLOTS / f"roc_{split}.csv", y, prob)
    model_md5 = hashlib.md5(MODEL.read_bytes()).hexdigest()
    write_json(
        THRESHOLD, {"threshold": threshold, "rule": str(p.threshold), "model_md5": model_md5}
    )
    curve_png(
        PLOTS / "roc.png", curves, "false positive rate", "true positive rate", "ROC", diagonal=True
    )
    write_json(METRICS, report)
    t = report["test"]
    print(
        f"evaluate: threshold {threshold:.4f} ({p.threshold} on valid); test roc_auc "
        f"{t['roc_auc']:.4f} f2 {t['f2']:.4f} accuracy {t['accuracy']:.4f}"
    )


if __name__ == "__main__":
    main()
