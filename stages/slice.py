"""slice stage (`dvc repro slice`): metrics on test slices where the model may fail silently.

Reads evaluate's saved predictions and metrics (never re-runs the model), the raw test patches and
meta CSV; writes every slice's scores, the worst slice's F2 gap (the headline) and galleries of
the most confident false negatives/positives, overall and in the worst slice.
"""

import json
from pathlib import Path

import pcam  # noqa: F401  (first: pins the CPU numerics before numpy and torch load)

# isort: split
import numpy as np

from pcam import h5io
from pcam.data import read_x
from pcam.errors import PcamError, exit_on_user_error
from pcam.fileio import write_json
from pcam.metrics import CI_METRICS
from pcam.params import load_params
from pcam.plots import patch_grid
from pcam.provenance import provenance
from pcam.slicing import META_SLICES, confident_errors, define_slices, patch_features, score_slice

RAW_DIR = Path("data/raw")
PREDICTIONS = Path("data/predictions/test.npz")
EVAL = Path("metrics/eval.json")
METRICS = Path("metrics/slices.json")
DETAILS = Path("metrics/details/slices.json")
PLOTS = Path("plots/slices")


@exit_on_user_error
def main() -> None:
    params = load_params()
    p = params.slice
    seed = params.evaluate.bootstrap_seed
    pred = np.load(PREDICTIONS)
    index, y, prob = pred["index"], pred["label"].astype(np.int64), pred["probability"]
    evaluation = json.loads(EVAL.read_text())
    threshold = evaluation["threshold"]
    x_path, _, meta_path = h5io.split_files(RAW_DIR, "test")
    meta, skipped = None, {}
    if meta_path.exists():
        meta = h5io.read_meta(meta_path)
        if len(meta) <= int(index.max()):
            raise PcamError(
                f"{meta_path}: {len(meta)} rows but predictions index row {index.max()}"
            )
        meta = h5io.Meta(*(getattr(meta, f)[index] for f in h5io.META_COLUMNS))
    else:
        # The meta CSVs are optional (torchvision's PCAM copy has none); slices by pixels still run.
        why = f"{meta_path.name} absent (the meta CSVs are optional)"
        skipped = dict.fromkeys(META_SLICES, why)
        print(f"slice: skipped {', '.join(META_SLICES)}: {why}")
    x = read_x(x_path, index)

    # evaluate scored these very predictions at this threshold
    global_metrics = {k: evaluation["test"][k] for k in CI_METRICS}
    masks = define_slices(patch_features(x, p.background_saturation), meta, p)
    slices = {
        name: score_slice(y, prob, threshold, mask, global_metrics, p, seed)
        for name, mask in masks.items()
    }
    gaps = {n: s["f2"]["gap_to_global"] for n, s in slices.items() if "f2" in s}
    warnings = [
        f"{name}: F2 {slices[name]['f2']['value']:.3f} is {gap:.3f} below global "
        f"{global_metrics['f2']:.3f} (slice.max_f2_gap {p.max_f2_gap})"
        for name, gap in sorted(gaps.items(), key=lambda kv: -kv[1])
        if gap > p.max_f2_gap
    ]
    worst = max(gaps, key=gaps.get) if gaps else None

    for name, mask in (("overall", np.ones(len(y), bool)), ("worst_slice", masks.get(worst))):
        if mask is None:
            continue
        errors = confident_errors(y, prob, threshold, mask, p.gallery_size)
        label = name if name == "overall" else f"worst slice ({worst})"
        for kind, positions in zip(("negatives", "positives"), errors, strict=True):
            patch_grid(
                PLOTS / f"false_{kind}_{name}.png",
                x[positions],
                [f"#{index[i]} p={prob[i]:.2f} y={y[i]}" for i in positions],
                f"most confident false {kind}, {label}",
            )

    write_json(METRICS, {"worst_f2_gap": gaps[worst]} if worst else {})
    write_json(
        DETAILS,
        {
            "global": global_metrics | {"threshold": threshold, "n": len(y)},
            "slices": slices,
            "worst_slice": worst,
            "warnings": warnings,
            **({"skipped": skipped} if skipped else {}),
            "provenance": provenance("slice", seed, inputs=[PREDICTIONS]),
        },
    )
    for name, s in slices.items():
        f2 = f"F2 {s['f2']['value']:.3f} (gap {s['f2']['gap_to_global']:+.3f})" if "f2" in s else ""
        print(f"slice: {name:24s} n={s['n']:5d} {f2} {s.get('not_scored', '')}")
    for w in warnings:
        print(f"slice: warning: {w}")


if __name__ == "__main__":
    main()
