"""The drift check on a new synthetic site, unshifted and with another lab's stain, and on the
official test split: what `python -m pcam.drift` reports for each.

    python scripts/drift_demo.py [--n 1024] [--out-dir .cache/drift-demo]

Needs the pipeline's outputs (`dvc repro`). The site has 4 slides the model never saw, from the
training stain model; the shifted copies hold the same tissue in other colours (ANOTHER_LAB at half
and full strength). Prints Markdown tables: the drift statistics, and (labels being known) the
model's quality at the stored threshold. The JSON reports and plots stay in --out-dir.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
from pathlib import Path

from sklearn.metrics import fbeta_score, recall_score, roc_auc_score

from pcam import drift, h5io, stats
from pcam.readme import row, table
from pcam.synthetic import ANOTHER_LAB, StainShift, generate_split

SITE = [f"site_slide_{i:03d}" for i in range(4)]


def scaled(shift: StainShift, k: float) -> StainShift:
    """The shift at strength k (gains raised to k: 0 = none, 1 = full)."""
    return StainShift(*(tuple(float(g) ** k for g in gains) for gains in shift))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1024, help="patches of the new site")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out-dir", type=Path, default=Path(".cache/drift-demo"))
    args = ap.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    sets = {"test split (official, unshifted)": h5io.split_files("data/raw", "test")[0]}
    threshold = json.loads(Path("models/threshold.json").read_text())["threshold"]
    quality = []
    for name, k in (("site, unshifted", 0.0), ("site, half shift", 0.5), ("site, shifted", 1.0)):
        site = generate_split(args.n, SITE, args.seed, 0.2, stain_shift=scaled(ANOTHER_LAB, k))
        sets[name] = args.out_dir / f"site_{k:.1f}.h5"
        h5io.write_h5_dataset(sets[name], "x", site.x)
        # The labels are known here, so also: what the shift does to the model.
        prob = drift.probabilities(Path("models/model.pt"), site.x, 256)
        y, pred = site.y, prob >= threshold
        scores = [
            roc_auc_score(y, prob),
            fbeta_score(y, pred, beta=2),
            recall_score(y, pred),
            recall_score(y, pred, pos_label=0),
        ]
        quality.append([name, *(f"{v:.3f}" for v in scores)])
    # Per NEW: each feature's shift in training sds / PSI / KS, flagged marked.
    names = [*stats.FEATURES, "predictions"]
    print(row(["NEW", *names, "flagged"]) + "\n|---|" + "---:|" * len(names) + "---|")
    for name, path in sets.items():
        stem = args.out_dir / Path(path).stem
        with contextlib.redirect_stdout(io.StringIO()):
            drift.main([str(path), "--out", f"{stem}.json", "--plot", f"{stem}.png"])
        r = json.loads(Path(f"{stem}.json").read_text())
        cells = [r["features"][f] for f in stats.FEATURES] + [r["predictions"]]
        shown = [
            f"{c['shift_in_sd']:+.2f} / {c['psi']:.2f} / {c['ks']:.2f}"
            + (" **!**" if c["flagged"] else "")
            for c in cells
        ]
        print(row([f"{name} (n={r['new']['n_patches']})", *shown, ", ".join(r["flagged"]) or "—"]))
    header = ["model on the site", "ROC-AUC", "F2", "sensitivity", "specificity"]
    print("\n" + "\n".join(table(header, quality, 1, spaced=False)))


if __name__ == "__main__":
    main()
