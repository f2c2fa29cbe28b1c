"""A logistic regression on per-patch mean RGB colour: how much of the task colour alone solves.

    python scripts/mean_colour_baseline.py [--raw data/raw]

Fits on the train split, reports test ROC-AUC. If the CNN is not clearly better than this, the
data (synthetic or not) can be solved without looking at cell morphology.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pcam import h5io
from pcam.data import read_x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--raw", type=Path, default=Path("data/raw"))
    raw = ap.parse_args().raw
    feats, labels = {}, {}
    for split in ("train", "test"):
        xp, yp, _ = h5io.split_files(raw, split)
        x = read_x(xp)
        feats[split], labels[split] = x.reshape(len(x), -1, 3).mean(axis=1), h5io.read_labels(yp)
    clf = make_pipeline(StandardScaler(), LogisticRegression()).fit(feats["train"], labels["train"])
    auc = roc_auc_score(labels["test"], clf.predict_proba(feats["test"])[:, 1])
    print(f"mean-colour logistic regression: test ROC-AUC {auc:.4f}")


if __name__ == "__main__":
    main()
