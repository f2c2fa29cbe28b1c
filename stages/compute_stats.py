"""compute-stats stage: statistics of the train split minus exclusions -> data/stats.json (per-channel
mean/std for normalisation) and data/drift_reference.json (colour/stain features of
drift.reference_patches train patches, what `python -m pcam.drift` compares new data with).

Run by DVC (`dvc repro compute-stats`). Reads only the train split: valid/test cannot leak in.
Leaves out train's exclusions when train.use_exclusions is true, as training does. One pass over
the file serves both outputs; the drift reference is written here, not computed by the drift
check, because a site checking its patches has the model but not the 7 GB of training data.
"""

from pathlib import Path

from pcam import h5io
from pcam.data import load_excluded
from pcam.errors import exit_on_user_error
from pcam.fileio import write_json
from pcam.params import load_params
from pcam.stats import FeatureSample, channel_stats, reference_rows

RAW_DIR = Path("data/raw")
EXCLUSIONS = Path("data/validated/exclusions.json")
STATS = Path("data/stats.json")
DRIFT_REFERENCE = Path("data/drift_reference.json")


@exit_on_user_error
def main() -> None:
    params = load_params()
    x_path = h5io.split_files(RAW_DIR, "train")[0]
    excluded = load_excluded(EXCLUSIONS if params.train.use_exclusions else None, "train")
    f, ds = h5io.open_dataset(x_path, "x")
    with f:
        n = ds.shape[0]
    sample = FeatureSample(reference_rows(n, excluded, params.drift.reference_patches))
    stats = channel_stats(x_path, excluded, params.stats.chunk_rows, on_block=sample.add)
    write_json(STATS, stats)
    write_json(DRIFT_REFERENCE, sample.reference())
    print(
        f"compute-stats: mean {stats['mean']} std {stats['std']} over {stats['n_patches']} "
        f"patches; drift reference: {len(sample.rows)} patches"
    )


if __name__ == "__main__":
    main()
