"""train stage: train.model -> models/model.pt, dvclive/, metrics/train.json (the headline) and
metrics/details/train.json (best and last epoch, train size, provenance).

On SIGTERM/SIGUSR1 (SLURM's warning before a time limit, preemption, scancel) it saves a checkpoint
to $PCAM_CHECKPOINT_DIR/train.pt (default .cache/checkpoints/) and exits 75; PCAM_RESUME=1 continues
where it stopped, with identical results. With train.devices > 1 it spawns that many DDP ranks
(gloo on CPU, nccl on GPU); under torchrun or srun (WORLD_SIZE, RANK set) each process is one rank.
Rank 0 alone writes the outputs.
"""

import os
import socket
import sys
from pathlib import Path

import pcam  # noqa: F401  (first: pins the CPU numerics before numpy and torch load)

# isort: split
import torch.distributed as dist
import torch.multiprocessing as mp
from dvclive import Live

from pcam import h5io
from pcam.data import load_split, load_stats
from pcam.errors import exit_on_user_error
from pcam.fileio import write_json
from pcam.params import load_params
from pcam.provenance import provenance
from pcam.training import EXIT_INTERRUPTED, RESUME_ENV, TrainingInterrupted, resolve_device, train

RAW_DIR = Path("data/raw")
EXCLUSIONS = Path("data/validated/exclusions.json")
STATS = Path("data/stats.json")
MODEL = Path("models/model.pt")
# Outside DVC's outputs (DVC deletes those before a run) and git-ignored. SLURM jobs keep it on
# shared storage, one directory per job, where it outlives the node-local copy (slurm/common.sh).
CHECKPOINT = Path(os.environ.get("PCAM_CHECKPOINT_DIR") or ".cache/checkpoints") / "train.pt"


def run_rank(rank: int, world: int) -> None:
    params = load_params()
    p = params.train
    device = resolve_device(p.device)
    if world > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world)
    mean, std = load_stats(STATS)
    budget = params.data.memory_budget_gb
    exclusions = EXCLUSIONS if p.use_exclusions else None
    train_split = load_split(RAW_DIR, "train", exclusions, budget)
    valid_split = load_split(RAW_DIR, "valid", memory_budget_gb=budget)
    inputs = [path for s in ("train", "valid") for path in h5io.split_files(RAW_DIR, s)[:2]]
    prov = provenance("train", p.seed, device, [*inputs, EXCLUSIONS, STATS])
    prov["world_size"] = world
    # dvcyaml=False/save_dvc_exp=False: dvc.yaml declares these files; DVCLive must not rewrite it
    # or create stray experiments outside `dvc exp run`. A fresh directory each time: a resumed
    # run writes the rows logged before the interruption again itself.
    live = Live(dir="dvclive", dvcyaml=False, save_dvc_exp=False) if rank == 0 else None
    splits = (train_split, valid_split)
    try:
        prog = train(
            p, *splits, mean, std, MODEL, prov, live, rank, world, checkpoint_path=CHECKPOINT
        )
    except TrainingInterrupted as stop:
        if rank == 0:
            print(
                f"train: stopped by {stop}; checkpoint saved to {CHECKPOINT}. Resume with "
                f"{RESUME_ENV}=1 dvc repro (or {RESUME_ENV}=1 python stages/train.py).",
                file=sys.stderr,
            )
        sys.exit(EXIT_INTERRUPTED)
    finally:
        if live is not None:
            live.end()
        if world > 1:
            dist.destroy_process_group()
    if rank == 0:
        last = prog.history[-1]
        # best_epoch is 0 when no epoch had a valid ROC-AUC (e.g. one class in valid)
        best = prog.history[prog.best_epoch - 1] if prog.best_epoch else {}
        headline = {"epochs_run": prog.epoch, "best_epoch": prog.best_epoch}
        # The saved model is the best epoch's, so evaluate's valid.* are its validation metrics
        # at the chosen threshold; only its validation loss is this stage's own headline.
        best_loss = {"best_val_loss": best["val_loss"]} if best else {}
        write_json(Path("metrics/train.json"), headline | best_loss)
        details = {
            "stopped_early": prog.stopped_early,
            "best_val_roc_auc": prog.best_roc_auc,
            "best": best,
            "final": {k: last[k] for k in ("train_loss", "val_loss", "val_roc_auc", "val_f2")},
            "n_train": len(train_split),
            "provenance": prov,
        }
        write_json(Path("metrics/details/train.json"), headline | details)


@exit_on_user_error
def spawned_rank(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    run_rank(rank, world)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@exit_on_user_error
def main() -> None:
    if "WORLD_SIZE" in os.environ:  # launched by torchrun / srun: this process is one rank
        run_rank(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
        return
    devices = load_params().train.devices
    if devices == 1:
        run_rank(0, 1)
        return
    try:
        mp.spawn(spawned_rank, args=(devices, free_port()), nprocs=devices)
    except mp.ProcessExitedException as err:
        sys.exit(err.exit_code if err.exit_code else 1)


if __name__ == "__main__":
    main()
