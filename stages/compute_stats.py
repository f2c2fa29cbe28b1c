"""compute-stats stage: per-channel mean/std of the train split minus exclusions -> data/stats.json.

Run by DVC (`dvc repro compute-stats`). Reads only the train split: valid/test cannot leak in.
Leaves out train's exclusions when train.use_exclusions is true, as training does.
"""

from pathlib import Path

from pcam import h5io
from pcam.data import load_excluded
from pcam.errors import exit_on_user_error
from pcam.fileio import write_json
from pcam.params import load_params
from pcam.stats import channel_stats

RAW_DIR = Path("data/raw")
EXCLUSIONS = Path("data/validated/exclusions.json")
STATS = Path("data/stats.json")


@exit_on_user_error
def main() -> None:
    params = load_params()
    x_path, _, _ = h5io.split_files(RAW_DIR, "train")
    excluded = load_excluded(EXCLUSIONS if params.train.use_exclusions else None, "train")
    stats = channel_stats(x_path, excluded, params.stats.chunk_rows)
    write_json(STATS, stats)
    print(
        f"compute-stats: mean {stats['mean']} std {stats['std']} over {stats['n_patches']} patches"
    )


if __name__ == "__main__":
    main()
