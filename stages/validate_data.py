"""validate-data stage: check every split before training; write exclusions and a data report.

Run by DVC (`dvc repro validate-data`); the checks are pcam.validation's. A failed check exits 1
with one line naming the file, dataset and problem, and writes nothing (under DVC, which deleted
the outputs first, the line names `python -m pcam.restore`). Label checks set to "warn" print a
warning line and go on; a split without its (optional) meta CSV gets a line saying what was skipped.
Outputs: data/validated/exclusions.json (what train, compute-stats and evaluate leave out),
metrics/data.json (the headline), metrics/details/data.json (the full report) and
plots/data/<reason>.png (up to 32 flagged patches per reason, one file per reason even if empty).
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
    for why in dict.fromkeys(skipped.values()):  # one line per reason: what was skipped, why
        print(f"{prefix}: skipped {', '.join(k for k, v in skipped.items() if v == why)}: {why}")


@exit_on_user_error
def main() -> None:
    result = validate(RAW_DIR, load_params().validate)
    for line in result.warnings:
        print(f"validate-data: warning: {line}", file=sys.stderr)
    # Every check passed: only now is anything written.
    write_json(EXCLUSIONS, result.exclusions)
    write_json(REPORT, result.report)
    splits, leaked = result.report["splits"], result.report["leakage"]["tissue_rows_total"]
    headline = {name: {"n": r["n"], "excluded": r["excluded"]} for name, r in splits.items()}
    write_json(METRICS, headline | {"leaked_patches": leaked})
    for reason, g in result.galleries.items():
        patch_grid(GALLERIES / f"{reason}.png", g.patches, g.captions, g.title)
    for split, r in splits.items():
        found = ", ".join(f"{k} {v}" for k, v in r["flagged"].items() if v) or "nothing flagged"
        print(
            f"validate-data: {split}: {r['n']} patches, {r['positives']} positive; {found}; "
            f"{r['excluded']} excluded"
        )
        say_skipped(f"validate-data: {split}", r.get("skipped", {}))
    say_skipped("validate-data", result.report.get("skipped", {}))
    print(f"validate-data: {leaked} valid/test patches copy earlier tissue")


if __name__ == "__main__":
    main()
