"""Drift check: do new patches look like the training data, and does the model see them as it saw
the validation split?

    python -m pcam.drift NEW... [--out reports/drift.json] [--plot reports/drift.png]
                                [--fail-on-drift]

NEW: PCAM .h5 files (dataset "x"), 96x96 PNG/JPEG patches, or directories of them (as
`python -m pcam.predict` takes). Compared with:

- colour and stain: the features of `pcam.stats` on NEW against those of a sample of the training
  split (data/drift_reference.json, written by compute-stats). A feature is flagged when its mean
  on NEW lies more than `drift.feature_shift_max` training standard deviations from the
  training mean (standardised mean difference). Training's spread already holds its
  slide-to-slide stain variation, so a site whose slides stain like some training slides passes.
  PSI and KS are reported beside it but do not flag: they also react to how few slides NEW holds
  (a few slides make a narrower distribution), and flagged every unseen 4-slide synthetic split.
- predictions: the model's probabilities on NEW against its probabilities on valid
  (data/predictions/valid.npz, written by evaluate), flagged when the PSI exceeds
  `drift.prediction_psi_max` or the KS statistic `drift.prediction_ks_max`. A site with another
  share of tumour patches moves this too: a flag here means "look", not "broken".

Writes a JSON report and a PNG (one histogram per feature and one of the probabilities; flagged
panels in red). Exit status 0 (also when drift is found, unless --fail-on-drift: then 3), 1 for
bad input. Thresholds come from params.yaml (drift.*). torch is imported only to run the model.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pcam import stats as stain  # the colour/stain features
from pcam.errors import PcamError, exit_on_user_error
from pcam.fileio import write_json
from pcam.params import DriftParams, load_params

EXIT_DRIFT = 3


@dataclass(frozen=True)
class DriftResult:
    report: dict  # what the JSON holds
    reference: np.ndarray  # (k, features) the training sample
    new: np.ndarray  # (n, features) NEW
    valid_probability: np.ndarray
    new_probability: np.ndarray


def load_reference(path: Path) -> np.ndarray:
    """The training sample's features as (n, len(stain.FEATURES)), in stain.FEATURES order."""
    if not path.is_file():
        raise PcamError(f"{path}: drift reference not found (run `dvc repro compute-stats`)")
    doc = json.loads(path.read_text())
    if doc.get("features") != list(stain.FEATURES):
        raise PcamError(
            f"{path}: features {doc.get('features')} differ from this code's "
            f"{list(stain.FEATURES)} (run `dvc repro compute-stats`)"
        )
    return np.column_stack([np.asarray(doc["values"][name]) for name in stain.FEATURES])


def load_valid_probabilities(path: Path) -> np.ndarray:
    if not path.is_file():
        raise PcamError(f"{path}: validation predictions not found (run `dvc repro evaluate`)")
    with np.load(path) as saved:
        return saved["probability"]


def compare(reference: np.ndarray, new: np.ndarray, bins: int) -> dict:
    """Location (standardised mean difference), PSI and KS of `new` against `reference`."""
    from scipy.stats import ks_2samp

    sd = float(reference.std())
    ks = ks_2samp(reference, new)
    return {
        "mean_reference": float(reference.mean()),
        "mean_new": float(new.mean()),
        "std_reference": sd,
        "shift_in_sd": float((new.mean() - reference.mean()) / sd) if sd > 0 else 0.0,
        "psi": stain.psi(reference, new, bins),
        "ks": float(ks.statistic),
        "ks_p": float(ks.pvalue),
    }


def feature_drift(reference: np.ndarray, new: np.ndarray, p: DriftParams) -> dict[str, dict]:
    out = {}
    for i, name in enumerate(stain.FEATURES):
        c = compare(reference[:, i], new[:, i], p.bins)
        c["flagged"] = abs(c["shift_in_sd"]) > p.feature_shift_max
        out[name] = c
    return out


def prediction_drift(valid: np.ndarray, new: np.ndarray, p: DriftParams) -> dict:
    c = compare(valid, new, p.bins)
    c["flagged"] = c["psi"] > p.prediction_psi_max or c["ks"] > p.prediction_ks_max
    return c


def read_patches(inputs: list[Path]) -> tuple[np.ndarray, list[str]]:
    """Every patch of NEW as one (n, 96, 96, 3) uint8 array, and the files they came from."""
    from pcam import h5io
    from pcam.predict import H5_SUFFIXES, expand_inputs, read_image

    files = expand_inputs(inputs, keep_going=False).files
    blocks = []
    for f in files:
        if f.suffix.lower() in H5_SUFFIXES:
            fh, ds = h5io.open_dataset(f, "x")
            with fh:
                h5io.check_x_dataset(f, ds)
                blocks.append(
                    h5io.pixels_as_uint8(f, h5io.read_rows(ds, slice(0, ds.shape[0]), f), 0)
                )
        else:
            blocks.append(read_image(f, center_crop=False, convert_rgb=False)[None])
    return np.concatenate(blocks), [str(f) for f in files]


def probabilities(model_path: Path, x: np.ndarray, batch_size: int) -> np.ndarray:
    """The model's probabilities for uint8 patches, on the CPU."""
    import torch

    from pcam.checkpoint import load_checkpoint, load_model
    from pcam.inference import predict_logits, sigmoid

    ckpt = load_checkpoint(model_path)
    model = load_model(ckpt, model_path)
    mean = torch.tensor(ckpt["normalisation"]["mean"])
    std = torch.tensor(ckpt["normalisation"]["std"])
    return sigmoid(predict_logits(model, torch.from_numpy(x), mean, std, batch_size))


def plot(path: Path, r: DriftResult) -> None:
    """One panel per feature and one for the probabilities: reference vs NEW densities."""
    from pcam.plots import plt, save_figure

    panels = [
        (name, r.reference[:, i], r.new[:, i], r.report["features"][name])
        for i, name in enumerate(stain.FEATURES)
    ]
    panels.append(
        (
            "probability (valid vs NEW)",
            r.valid_probability,
            r.new_probability,
            r.report["predictions"],
        )
    )
    cols = 3
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows))
    for ax, (name, ref, cur, c) in zip(axes.flat, panels, strict=False):
        edges = np.histogram_bin_edges(np.concatenate([ref, cur]), bins=40)
        ax.hist(ref, edges, density=True, alpha=0.5, label="reference")
        ax.hist(cur, edges, density=True, alpha=0.5, label="NEW")
        ax.set_title(
            f"{name}\nshift {c['shift_in_sd']:+.2f} sd, PSI {c['psi']:.2f}, KS {c['ks']:.2f}",
            fontsize=9,
            color="red" if c["flagged"] else "black",
        )
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def check(
    inputs: list[Path],
    model_path: Path,
    reference_path: Path,
    valid_predictions: Path,
    p: DriftParams,
    batch_size: int,
) -> DriftResult:
    reference = load_reference(reference_path)
    valid = load_valid_probabilities(valid_predictions)
    x, files = read_patches(inputs)
    if len(x) < p.min_patches:
        raise PcamError(
            f"{', '.join(map(str, inputs))}: {len(x)} patches, fewer than drift.min_patches = "
            f"{p.min_patches} (too few for the statistics to mean anything)"
        )
    new = stain.patch_features(x)
    prob = probabilities(model_path, x, batch_size)
    features = feature_drift(reference, new, p)
    predictions = prediction_drift(valid, prob, p)
    flagged = [n for n, c in features.items() if c["flagged"]]
    if predictions["flagged"]:
        flagged.append("predictions")
    report = {
        "drift": bool(flagged),
        "flagged": flagged,
        "new": {"n_patches": len(x), "files": files},
        "reference": {"n_patches": len(reference), "valid_n_patches": len(valid)},
        "thresholds": {
            "feature_shift_max": p.feature_shift_max,
            "prediction_psi_max": p.prediction_psi_max,
            "prediction_ks_max": p.prediction_ks_max,
        },
        "features": features,
        "predictions": predictions,
    }
    return DriftResult(report, reference, new, valid, prob)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m pcam.drift", description=__doc__.split("\n")[0])
    ap.add_argument("inputs", nargs="+", type=Path, metavar="NEW")
    ap.add_argument("--model", type=Path, default=Path("models/model.pt"))
    ap.add_argument("--reference", type=Path, default=Path("data/drift_reference.json"))
    ap.add_argument("--valid-predictions", type=Path, default=Path("data/predictions/valid.npz"))
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--out", type=Path, default=Path("reports/drift.json"))
    ap.add_argument("--plot", type=Path, default=Path("reports/drift.png"))
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument(
        "--fail-on-drift", action="store_true", help=f"exit {EXIT_DRIFT} when drift is flagged"
    )
    return ap.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    p = load_params(args.params).drift
    result = check(
        args.inputs, args.model, args.reference, args.valid_predictions, p, args.batch_size
    )
    report = result.report
    plot(args.plot, result)
    write_json(args.out, report)
    for name, c in [*report["features"].items(), ("predictions", report["predictions"])]:
        mark = "DRIFT" if c["flagged"] else "ok"
        print(
            f"drift: {name:16s} {mark:5s} shift {c['shift_in_sd']:+.2f} sd  PSI {c['psi']:.3f}  "
            f"KS {c['ks']:.3f}"
        )
    verdict = f"drift in {', '.join(report['flagged'])}" if report["drift"] else "no drift"
    print(f"drift: {report['new']['n_patches']} patches: {verdict} -> {args.out}, {args.plot}")
    if report["drift"] and args.fail_on_drift:
        sys.exit(EXIT_DRIFT)


if __name__ == "__main__":
    main()
