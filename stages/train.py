"""train stage: train the model chosen by train.model -> models/model.pt, metrics/train.json, dvclive/.

Run by DVC (`dvc repro train`, `dvc exp run -S train.lr=1e-4`).
"""

from pathlib import Path

from dvclive import Live

from pcam.data import load_split, load_stats
from pcam.errors import exit_on_user_error
from pcam.fileio import write_json
from pcam.params import load_params, to_dict
from pcam.provenance import provenance
from pcam.training import train

RAW_DIR = Path("data/raw")
EXCLUSIONS = Path("data/validated/exclusions.json")
STATS = Path("data/stats.json")
MODEL = Path("models/model.pt")
METRICS = Path("metrics/train.json")
LIVE_DIR = Path("dvclive")


@exit_on_user_error
def main() -> None:
    params = load_params()
    p = params.train
    mean, std = load_stats(STATS)
    train_split = load_split(RAW_DIR, "train", EXCLUSIONS)
    valid_split = load_split(RAW_DIR, "valid")
    prov = provenance({"data": to_dict(params.data), "train": to_dict(p)}, p.seed)
    # dvcyaml=False/save_dvc_exp=False: dvc.yaml declares these files; DVCLive must not rewrite it
    # or create stray experiments when this script runs outside `dvc exp run`.
    with Live(dir=str(LIVE_DIR), dvcyaml=False, save_dvc_exp=False) as live:
        history = train(p, train_split, valid_split, mean, std, MODEL, prov, live)
    last = history[-1]
    write_json(
        METRICS,
        {
            "epochs": last.epoch,
            "train_loss": last.train_loss,
            "val_loss": last.val_loss,
            "val_roc_auc": last.val_roc_auc,
            "val_f2_at_0.5": last.val_f2,
            "n_train": len(train_split),
            "provenance": {k: prov[k] for k in ("seed", "git_commit", "versions", "device")},
        },
    )


if __name__ == "__main__":
    main()
