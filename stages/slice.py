"""slice stage: metrics on test slices where the model may fail silently -> metrics/slices.json.

Run by DVC (`dvc repro slice`). Reads the saved predictions; never re-runs the model.
"""

import json
from pathlib import Path

import numpy as np

from pcam import h5io
from pcam.data import read_x
from pcam.errors import exit_on_user_error
from pcam.fileio import write_json
from pcam.metrics import fbeta_at
from pcam.params import load_params
from pcam.slicing import bottom_fraction, mean_intensity, slice_f2

RAW_DIR = Path("data/raw")
PREDICTIONS = Path("data/predictions/test.npz")
EVAL = Path("metrics/eval.json")
METRICS = Path("metrics/slices.json")


@exit_on_user_error
def main() -> None:
    p = load_params().slice
    pred = np.load(PREDICTIONS)
    threshold = json.loads(EVAL.read_text())["threshold"]["value"]
    x_path, _, _ = h5io.split_files(RAW_DIR, "test")
    x = read_x(x_path, pred["index"])
    y, prob = pred["label"], pred["probability"]
    global_f2 = fbeta_at(y, prob, threshold, beta=2.0)
    dark = slice_f2(y, prob, threshold, bottom_fraction(mean_intensity(x), p.dark_fraction))
    dark["f2_gap"] = global_f2 - dark["f2"]
    warnings = []
    if dark["f2_gap"] > p.max_f2_gap:
        warnings.append(f"dark: F2 {dark['f2']:.3f} is {dark['f2_gap']:.3f} below global")
    write_json(
        METRICS, {"global": {"f2": global_f2}, "slices": {"dark": dark}, "warnings": warnings}
    )
    print(
        f"slice: global F2 {global_f2:.4f}; dark slice F2 {dark['f2']:.4f} (gap {dark['f2_gap']:.4f})"
    )


if __name__ == "__main__":
    main()
