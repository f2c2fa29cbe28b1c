"""validate-data stage: check every split before training; write exclusions and a data report.

Run by DVC (`dvc repro validate-data`). A structural problem exits 1 with one line naming the file,
dataset and problem, and writes nothing.
"""

from pathlib import Path

from pcam import h5io
from pcam.errors import exit_on_user_error
from pcam.fileio import write_json
from pcam.validation import scan_split

RAW_DIR = Path("data/raw")
EXCLUSIONS = Path("data/validated/exclusions.json")
REPORT = Path("metrics/data.json")


@exit_on_user_error
def main() -> None:
    reports = {split: scan_split(RAW_DIR, split) for split in h5io.SPLITS}
    # Nothing is written until every split passed: a failed check leaves no outputs.
    write_json(
        EXCLUSIONS,
        {"splits": {split: {"n": r.n, "excluded": []} for split, r in reports.items()}},
    )
    write_json(
        REPORT,
        {
            split: {
                "n": r.n,
                "positives": r.positives,
                "positive_fraction": round(r.positives / r.n, 6),
                "storage": r.storage,
            }
            for split, r in reports.items()
        },
    )
    for r in reports.values():
        print(f"validate-data: {r.split}: {r.n} patches, {r.positives} positive: ok")


if __name__ == "__main__":
    main()
