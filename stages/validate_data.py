"""validate-data stage: check every split before training; write exclusions and a data report.

Run by DVC (`dvc repro validate-data`). A structural problem, a label check set to "error", or
a content finding past a threshold in params.yaml (validate.*), exits 1 with one line naming the
file, dataset and problem, and writes nothing: run by hand, outputs from an earlier run stay as
they were; under DVC, which deleted them first, the line names `python -m pcam.restore`. Label
checks set to "warn" print a warning line and go on.

Outputs: data/validated/exclusions.json (per split, the patches excluded for the reasons in
validate.exclude; train and compute-stats leave out train's, evaluate reports test with and
without test's), metrics/data.json (the headline: patches and exclusions per split, leaked
patches), metrics/details/data.json (the full report: counts per reason, storage, leakage, label
association, slides) and plots/data/<reason>.png (up to 32 flagged patches per reason, one file per reason even if empty).
A split without its meta CSV (optional) gets one line saying which checks were skipped and why.
"""

import sys
from pathlib import Path

from pcam.errors import exit_on_user_error
from pcam.fileio import write_json
from pcam.params import load_params
from pcam.plots import patch_grid
from pcam.validation import validate

RAW_DIR = Path("data/raw")
EXCLUSIONS = Path("data/validated/exclusions.json")
METRICS = Path("metrics/data.json")
REPORT = Path("metrics/details/data.json")
GALLERIES = Path("plots/data")


def say_skipped(prefix: str, skipped: dict[str, str]) -> None:
    """One line per reason: what was skipped and why."""
    for why in dict.fromkeys(skipped.values()):
        what = ", ".join(k for k, v in skipped.items() if v == why)
        print(f"{prefix}: skipped {what}: {why}")


@exit_on_user_error
def main() -> None:
    p = load_params().validate
    result = validate(RAW_DIR, p)
    for line in result.warnings:
        print(f"validate-data: warning: {line}", file=sys.stderr)
    # Every check passed: only now is anything written.
    write_json(EXCLUSIONS, result.exclusions)
    write_json(REPORT, result.report)
    splits = result.report["splits"]
    write_json(
        METRICS,
        {name: {"n": r["n"], "excluded": r["excluded"]} for name, r in splits.items()}
        | {"leaked_patches": result.report["leakage"]["tissue_rows_total"]},
    )
    for reason, g in result.galleries.items():
        patch_grid(GALLERIES / f"{reason}.png", g.patches, g.captions, g.title)
    for split, r in result.report["splits"].items():
        found = ", ".join(f"{k} {v}" for k, v in r["flagged"].items() if v) or "nothing flagged"
        print(
            f"validate-data: {split}: {r['n']} patches, {r['positives']} positive; {found}; "
            f"{r['excluded']} excluded"
        )
        say_skipped(f"validate-data: {split}", r.get("skipped", {}))
    say_skipped("validate-data", result.report.get("skipped", {}))
    leak = result.report["leakage"]
    print(f"validate-data: {leak['tissue_rows_total']} valid/test patches copy earlier tissue")


if __name__ == "__main__":
    main()
