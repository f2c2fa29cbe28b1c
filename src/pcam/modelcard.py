"""Model card: a Markdown page about the trained model, generated from the pipeline's outputs.

    python -m pcam.modelcard [--root .] [--out reports/model_card.md]      (or `make model-card`)

Every number comes from a file the pipeline wrote (metrics/details/*.json, models/threshold.json,
dvc.lock, params.yaml); nothing is typed in by hand. A value a file does not hold is shown as
"not recorded" and listed at the end of the card (and on stderr), so the card still renders while
the metrics files change shape. The figures are links to the PNGs the stages wrote.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pcam.errors import PcamError, exit_on_user_error
from pcam.fileio import write_text
from pcam.readme import CI_NAMES, lookup, read, table

POINT_NAMES = {
    "pr_auc": "PR-AUC",
    "accuracy": "accuracy",
    "balanced_accuracy": "balanced accuracy",
    "precision": "precision",
    "f1": "F1",
    "brier": "Brier score",
    "ece": "expected calibration error",
}
COLUMNS = {
    "test": "test (official, untouched)",
    "test_without_exclusions": "test without exclusions",  # absent when test lost no patch
    "valid": "valid",
}
FIGURES = {
    "plots/eval/roc.png": "ROC, valid and test",
    "plots/eval/pr.png": "precision-recall, valid and test",
    "plots/eval/calibration.png": "calibration, valid and test",
    "plots/eval/threshold_test.png": "F2, sensitivity, specificity against the threshold (test)",
    "plots/slices/false_negatives_overall.png": "most confident false negatives (test)",
    "plots/slices/false_positives_overall.png": "most confident false positives (test)",
    "plots/slices/false_negatives_worst_slice.png": "most confident false negatives, worst slice",
}
ARTIFACT = "pcam-classifier"  # its name under `artifacts:` in dvc.yaml
SPLIT_ORDER = {"train": 0, "valid": 1, "test": 2}
RULES = {
    "f2": "maximises F2 on valid (recall weighted four times precision: a missed tumour costs "
    "more than a false alarm)",
    "f1": "maximises F1 on valid",
    "youden": "maximises sensitivity + specificity - 1 on valid",
}


class Source:
    """One output file; `get` answers a dotted key or records that the file lacks it."""

    def __init__(self, root: Path, rel: str, missing: list[str]):
        self.rel, self.missing, self.doc = rel, missing, None
        if (root / rel).is_file():
            self.doc = read(root, rel)
        else:
            missing.append(f"{rel}: file not found")

    def get(self, key: str, default=None):
        try:
            return lookup(self.doc, key)
        except KeyError:
            if self.doc is not None:
                self.missing.append(f"{self.rel}: no '{key}'")
            return default


def num(value, digits: int = 3) -> str:
    return "not recorded" if value is None else f"{value:.{digits}f}"


def with_ci(metric) -> str:
    if not isinstance(metric, dict):
        return num(metric)
    return f"{num(metric.get('value'))} ({num(metric.get('ci_low'))}–{num(metric.get('ci_high'))})"


def rule_meaning(rule) -> str:
    if str(rule).startswith("sensitivity@"):
        return f"the highest threshold whose sensitivity on valid is at least {str(rule)[12:]}"
    return RULES.get(str(rule), "a fixed number (evaluate.threshold)")


def lock_md5(lock: Source, stage: str, path: str) -> str | None:
    """The md5 dvc.lock records for an output of a stage."""
    for out in lock.get(f"stages.{stage}.outs", []) or []:
        if out.get("path") == path:
            return out.get("md5")
    lock.missing.append(f"dvc.lock: no output {path} of stage {stage}")
    return None


def plain(record) -> str:
    """A flat {name: value} record as `name value, ...`."""
    if not isinstance(record, dict):
        return "not recorded"
    return ", ".join(f"{k} {v}" for k, v in record.items())


def metrics_table(ev: Source) -> list[str]:
    splits = [s for s in COLUMNS if s != "test_without_exclusions" or s in (ev.doc or {})]
    rows = [
        [name, *(with_ci(ev.get(f"{split}.{key}")) for split in splits)]
        for key, name in {**CI_NAMES, **POINT_NAMES}.items()
    ]
    rows.append(["patches", *(ev.get(f"{split}.n", "not recorded") for split in splits)])
    return table(["metric", *(COLUMNS[s] for s in splits)], rows, 1, spaced=False)


def slice_lines(sl: Source) -> list[str]:
    rows = []
    for name, s in (sl.get("slices", {}) or {}).items():
        f2 = s.get("f2")
        scores = [with_ci(f2), num(f2.get("gap_to_global"))] if f2 else ["—", "—"]
        note = f" ({s['not_scored']})" if "not_scored" in s else ""
        auc = with_ci(s["roc_auc"]) if "roc_auc" in s else "—"
        rows.append([f"{name}{note}", s.get("n"), s.get("positives"), *scores, auc])
    header = [
        "slice",
        "patches",
        "positives",
        "F2 (95% CI)",
        "F2 gap to global",
        "ROC-AUC (95% CI)",
    ]
    worst = sl.get("worst_slice")
    return [
        *table(header, rows, 1, spaced=False),
        "",
        f"Worst slice by F2 gap: **{worst}**." if worst else "No slice could be scored.",
        *(f"- warning: {w}" for w in sl.get("warnings", []) or []),
        *(f"- skipped {what}: {why}" for what, why in (sl.doc or {}).get("skipped", {}).items()),
    ]


def data_lines(dr: Source, p: Source, tr: Source) -> list[str]:
    source = p.get("data.source")
    about = (
        "the synthetic stand-in for PCAM: figures here say nothing about real tissue"
        if source == "synthetic"
        else "PatchCamelyon, Zenodo record 2546921; published: P4M-DenseNet test ROC-AUC 0.963, "
        "accuracy 0.898, Veeling et al. 2018"
    )
    splits = sorted((dr.get("splits", {}) or {}).items(), key=lambda kv: SPLIT_ORDER.get(kv[0], 9))
    rows = [[s, r.get("n"), num(r.get("positive_fraction")), r.get("excluded")] for s, r in splits]
    reasons = dr.get("exclude_reasons", [])
    trained = (
        "left out the train patches flagged for these reasons"
        if p.get("train.use_exclusions")
        else "used every train patch (train.use_exclusions: false), as published work does"
    )
    skipped = {why for _, r in splits for why in r.get("skipped", {}).values()}
    return [
        f"- source: `{source}` ({about})",
        "",
        *table(["split", "patches", "positive fraction", "flagged for exclusion"], rows, 1, False),
        "",
        f"- exclusion reasons (validate.exclude): {', '.join(reasons or []) or 'none'}",
        f"- training {trained}; {tr.get('n_train', 'not recorded')} patches trained on.",
        "- test metrics are on the whole official test split; the column without exclusions "
        "shows what the flagged test patches change.",
        *(f"- skipped (no meta CSV): {why}" for why in sorted(skipped)),
    ]


def figure_lines(root: Path, out: Path) -> list[str]:
    lines = []
    for rel, caption in FIGURES.items():
        if (root / rel).is_file():
            lines += [f"![{caption}]({os.path.relpath(root / rel, out.parent)})", ""]
    return lines or ["No figures found (run `dvc repro`)."]


def limitation_lines(ev: Source, sl: Source, p: Source) -> list[str]:
    lines = [
        "- Patch level only: a positive means tumour in the centre 32×32 px of a 96×96 patch, "
        "not a slide or patient diagnosis.",
        "- Colours: trained on one source's staining and scanners (PCAM: two Dutch centres of "
        "Camelyon16). Other labs and scanners shift colours: run `python -m pcam.drift NEW` on "
        "a site's patches before trusting these figures there.",
        "- The intervals are bootstrap intervals over test patches of one trained model; they do "
        "not include the spread between training seeds (`make sweep` measures it).",
        f"- Calibration: expected calibration error {num(ev.get('test.ece'))} on test; read "
        "probabilities as scores unless that is small.",
    ]
    worst = sl.get("worst_slice")
    if worst:
        gap = sl.get(f"slices.{worst}.f2.gap_to_global")
        lines.append(f"- Weakest slice: {worst}, F2 {num(gap)} below the global F2.")
    if p.get("data.source") == "synthetic":
        lines.append(
            "- Trained and tested on synthetic patches: a demonstration of the pipeline, "
            "not a model for tissue."
        )
    return lines


def render(root: Path, out: Path) -> tuple[str, list[str]]:
    """The card's Markdown and what it could not find."""
    missing: list[str] = []
    ev, tr, sl, dr, th, p, lk = (
        Source(root, rel, missing)
        for rel in (
            *(f"metrics/details/{name}.json" for name in ("eval", "train", "slices", "data")),
            "models/threshold.json",
            "params.yaml",
            "dvc.lock",
        )
    )
    model = p.get("train.model")
    rule, value = ev.get("threshold.rule"), ev.get("threshold.value")
    parts = [
        f"# Model card: PCAM tumour-patch classifier (`{model}`)",
        "",
        f"Generated by `python -m pcam.modelcard` from the pipeline's outputs. DVC artifact "
        f"`{ARTIFACT}` (`models/model.pt`, declared in dvc.yaml).",
        "",
        "## Intended use",
        "",
        "Research and decision support: ranks 96×96 px H&E patches of lymph node sections "
        "(level 2 of the Camelyon16 slides, about 10× magnification) by the probability that "
        "tumour touches the centre 32×32 px, to point a pathologist at regions worth a look. "
        "Not a diagnostic device; not for other organs, stains, magnifications or frozen "
        "sections; not validated on any hospital's own slides.",
        "",
        "## Data",
        "",
        *data_lines(dr, p, tr),
        "",
        "## Training",
        "",
        f"- model `{model}`, width {p.get('train.width')}, optimizer {p.get('train.optimizer')}, "
        f"lr {p.get('train.lr')}, batch {p.get('train.batch_size')}, seed {p.get('train.seed')}",
        f"- epochs run {tr.get('epochs_run')}, best epoch {tr.get('best_epoch')} (validation "
        f"ROC-AUC {num(tr.get('best_val_roc_auc'))}); the best epoch's weights are the model",
        "",
        "## Decision threshold",
        "",
        f"Threshold **{num(value, 4)}**, rule `{rule}`: {rule_meaning(rule)}. "
        "The test split played no part in choosing it. It is stored next to the model "
        f"in `models/threshold.json` with the model's md5 ({th.get('model_md5')}), so "
        "`python -m pcam.predict` refuses it for another model.",
        "",
        "## Metrics (95% bootstrap intervals)",
        "",
        *metrics_table(ev),
        "",
        "## Slices of the test split",
        "",
        *slice_lines(sl),
        "",
        "## Figures",
        "",
        *figure_lines(root, out),
        "## Known limitations",
        "",
        *limitation_lines(ev, sl, p),
        "",
        "## Provenance",
        "",
        f"- model md5 {lock_md5(lk, 'train', 'models/model.pt')}; data/raw md5 "
        f"{lock_md5(lk, 'prepare', 'data/raw')} (dvc.lock)",
        f"- library versions: {plain(tr.get('provenance.versions'))}",
        f"- device: {plain(tr.get('provenance.device'))}",
        "- reproduce: `git checkout <commit> && dvc pull && dvc repro` (dvc.lock pins code, "
        "params and data hashes)",
    ]
    if missing:
        parts += ["", "## Not recorded", "", *[f"- {m}" for m in missing]]
    return "\n".join(parts) + "\n", missing


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m pcam.modelcard", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--root", type=Path, default=Path("."), help="the repository (outputs)")
    ap.add_argument("--out", type=Path, default=Path("reports/model_card.md"))
    args = ap.parse_args(argv)
    if not (args.root / "metrics/details/eval.json").is_file():
        raise PcamError(
            f"{args.root / 'metrics/details/eval.json'}: not found (run `dvc repro` first)"
        )
    text, missing = render(args.root, args.out)
    write_text(args.out, text)
    for m in missing:
        print(f"modelcard: not recorded: {m}", file=sys.stderr)
    print(f"modelcard: {args.out}")


if __name__ == "__main__":
    main()
