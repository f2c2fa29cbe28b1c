"""Drift check: do new patches look like the training data, and does the model see them as it saw
the validation split?

    python -m pcam.drift NEW... [--out reports/drift.json] [--plot reports/drift.png]
                                [--fail-on-drift]

NEW: PCAM .h5 files (dataset "x"), 96x96 PNG/JPEG patches, or directories of them (as
`python -m pcam.predict` takes). Compared with:

- colour and stain: `pcam.stats` features of NEW against a training sample
  (data/drift_reference.json, from compute-stats), flagged when NEW's mean lies more than
  `drift.feature_shift_max` training standard deviations from training's. Training's spread holds
  its slide-to-slide stain variation, so a site whose slides stain like some training slides
  passes. PSI and KS are reported but do not flag: they also react to how few slides NEW holds (a
  few slides make a narrower distribution), and flagged every unseen 4-slide synthetic split.
- predictions: the model's probabilities on NEW against those on valid (data/predictions/valid.npz,
  from evaluate), flagged above `drift.prediction_psi_max` (PSI) or `drift.prediction_ks_max` (KS).
  A site with another share of tumour patches moves this too: a flag means "look", not "broken".

Writes a JSON report and a PNG (a histogram per feature and of the probabilities, flagged panels
red). Exit status 0 (also on drift, unless --fail-on-drift: then 3), 1 for bad input. torch is
imported only to run the model.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np

from pcam import stats
from pcam.errors import PcamError, exit_on_user_error
from pcam.fileio import write_json
from pcam.params import DriftParams, load_params
from pcam.predict import positive_int

EXIT_DRIFT = 3


def load_reference(path: Path) -> np.ndarray:
    """The training sample's features as (n, len(stats.FEATURES)), in stats.FEATURES order."""
    if not path.is_file():
        raise PcamError(f"{path}: drift reference not found (run `dvc repro compute-stats`)")
    doc = json.loads(path.read_text())
    if doc.get("features") != list(stats.FEATURES):
        raise PcamError(
            f"{path}: features {doc.get('features')} differ from this code's "
            f"{list(stats.FEATURES)} (run `dvc repro compute-stats`)"
        )
    return np.column_stack([doc["values"][name] for name in stats.FEATURES])


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
        "psi": stats.psi(reference, new, bins),
        "ks": float(ks.statistic),
        "ks_p": float(ks.pvalue),
    }


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
                blocks.append(h5io.pixels_as_uint8(f, h5io.read_rows(ds, slice(0, len(ds)), f), 0))
        else:
            blocks.append(read_image(f, center_crop=False, convert_rgb=False)[None])
    return np.concatenate(blocks), [str(f) for f in files]


def probabilities(model_path: Path, x: np.ndarray, batch_size: int) -> np.ndarray:
    """The model's probabilities for uint8 patches, on the CPU: the logits of `pcam.predict`'s
    torch backend, through the sigmoid evaluate used for the valid probabilities they meet."""
    from pcam.inference import sigmoid
    from pcam.predict import torch_backend

    return sigmoid(torch_backend(model_path, "cpu", batch_size)[0](x))


def plot(path: Path, panels: list[tuple]) -> None:
    """One panel per (name, reference, NEW, statistics): the two densities, red if flagged."""
    from pcam.plots import plt, save_figure

    rows = -(-len(panels) // 3)
    fig, axes = plt.subplots(rows, 3, figsize=(12, 2.8 * rows))
    for ax, (name, ref, cur, c) in zip(axes.flat, panels, strict=False):
        edges = np.histogram_bin_edges(np.concatenate([ref, cur]), bins=40)
        ax.hist(ref, edges, density=True, alpha=0.5, label="reference")
        ax.hist(cur, edges, density=True, alpha=0.5, label="NEW")
        title = f"{name}\nshift {c['shift_in_sd']:+.2f} sd, PSI {c['psi']:.2f}, KS {c['ks']:.2f}"
        ax.set_title(title, fontsize=9, color="red" if c["flagged"] else "black")
        ax.tick_params(labelsize=7)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def check(args: argparse.Namespace, p: DriftParams) -> tuple[dict, list[tuple]]:
    """The report, and the plot's panels."""
    reference = load_reference(args.reference)
    if not args.valid_predictions.is_file():
        raise PcamError(
            f"{args.valid_predictions}: validation predictions not found (run `dvc repro evaluate`)"
        )
    with np.load(args.valid_predictions) as saved:
        valid = saved["probability"]
    x, files = read_patches(args.inputs)
    if len(x) < p.min_patches:
        raise PcamError(
            f"{', '.join(map(str, args.inputs))}: {len(x)} patches, fewer than drift.min_patches = "
            f"{p.min_patches} (too few for the statistics to mean anything)"
        )
    new = stats.patch_features(x)
    prob = probabilities(args.model, x, args.batch_size)
    panels = [(n, reference[:, i], new[:, i]) for i, n in enumerate(stats.FEATURES)]
    features = {name: compare(ref, cur, p.bins) for name, ref, cur in panels}
    for c in features.values():
        c["flagged"] = abs(c["shift_in_sd"]) > p.feature_shift_max
    predictions = compare(valid, prob, p.bins)
    predictions["flagged"] = (
        predictions["psi"] > p.prediction_psi_max or predictions["ks"] > p.prediction_ks_max
    )
    flagged = [n for n, c in [*features.items(), ("predictions", predictions)] if c["flagged"]]
    report = {
        "drift": bool(flagged),
        "flagged": flagged,
        "new": {"n_patches": len(x), "files": files},
        "reference": {"n_patches": len(reference), "valid_n_patches": len(valid)},
        "thresholds": {k: v for k, v in asdict(p).items() if k.endswith("_max")},
        "features": features,
        "predictions": predictions,
    }
    panels = [(n, ref, cur, features[n]) for n, ref, cur in panels]
    return report, [*panels, ("probability (valid vs NEW)", valid, prob, predictions)]


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pcam.drift", description=__doc__.split("\n")[0])
    ap.add_argument("inputs", nargs="+", type=Path, metavar="NEW")
    ap.add_argument("--model", type=Path, default=Path("models/model.pt"))
    ap.add_argument("--reference", type=Path, default=Path("data/drift_reference.json"))
    ap.add_argument("--valid-predictions", type=Path, default=Path("data/predictions/valid.npz"))
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--out", type=Path, default=Path("reports/drift.json"))
    ap.add_argument("--plot", type=Path, default=Path("reports/drift.png"))
    ap.add_argument("--batch-size", type=positive_int, default=256)
    help_fail = f"exit {EXIT_DRIFT} when drift is flagged"
    ap.add_argument("--fail-on-drift", action="store_true", help=help_fail)
    args = ap.parse_args(argv)
    report, panels = check(args, load_params(args.params).drift)
    plot(args.plot, panels)
    write_json(args.out, report)
    for name, c in [*report["features"].items(), ("predictions", report["predictions"])]:
        print(
            f"drift: {name:16s} {'DRIFT' if c['flagged'] else 'ok':5s} shift "
            f"{c['shift_in_sd']:+.2f} sd  PSI {c['psi']:.3f}  KS {c['ks']:.3f}"
        )
    verdict = f"drift in {', '.join(report['flagged'])}" if report["drift"] else "no drift"
    print(f"drift: {report['new']['n_patches']} patches: {verdict} -> {args.out}, {args.plot}")
    if report["drift"] and args.fail_on_drift:
        sys.exit(EXIT_DRIFT)


if __name__ == "__main__":
    main()
