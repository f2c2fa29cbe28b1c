"""DVC's run-cache and the resume switch, with the real dvc CLI in a temporary git copy (tiny data).

- `dvc exp run -S train.lr=A`, then B, then A again: the third restores `train` from the
  run-cache (no training), byte for byte.
- SIGTERM to a training stage under `dvc repro` (exit 75): the last finished model is still
  restorable; `PCAM_RESUME=1 dvc repro` continues from the checkpoint in .cache/checkpoints/ and
  ends with the bytes of an uninterrupted run, each step once in dvclive's TSVs.

The tests start from copies of one reproduced repo (prepare..train run once per module).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pcam.checkpoint import load_checkpoint
from tests.e2e import (
    TINY,
    copy_repo,
    dvc,
    end_dvc_and_stage,
    env,
    files_under,
    repro_and_commit,
    run,
    set_params,
    stage_process,
    wait_for,
)

pytestmark = pytest.mark.e2e

# Width 4, one epoch: training is the slow part of every test here.
BASE = TINY | {"train.width": 4, "train.epochs": 1, "train.batch_size": 32}
TRAIN_OUTPUTS = ("models/model.pt", "metrics/train.json", "dvclive")
CACHED_MESSAGE = "Stage 'train' is cached - skipping run, checking out outputs"
CHECKPOINT = Path(".cache/checkpoints/train.pt")
LOSS_TSV = Path("dvclive/plots/metrics/train/loss.tsv")
UPSTREAM = {
    "python stages/prepare.py": "prepare",
    "python stages/validate_data.py": "validate-data",
    "python stages/compute_stats.py": "compute-stats",
    "python stages/train.py": "train",
}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A copy that ran prepare..train once and committed the result."""
    repo = copy_repo(tmp_path_factory.mktemp("run-cache") / "repo", BASE)
    return repro_and_commit(repo, "train")


@pytest.fixture
def repo(base, tmp_path) -> Path:
    """A private copy of `base`: git history, DVC cache and run-cache included."""
    dest = tmp_path / "repo"
    shutil.copytree(base, dest, symlinks=True)
    shutil.rmtree(dest / ".dvc" / "tmp", ignore_errors=True)  # locks and indexes of `base`
    return dest


def run_cache_stages(repo: Path) -> set[str]:
    """The stages DVC's run-cache holds an entry for (each entry is a stage's lock entry)."""
    entries = [p for p in (repo / ".dvc" / "cache" / "runs").rglob("*") if p.is_file()]
    return {UPSTREAM.get(yaml.safe_load(p.read_text())["cmd"], "other") for p in entries}


def test_prepare_to_train_are_in_the_run_cache(base):
    # DVC keeps a run-cache entry only for a stage without `persist` outputs whose cache: false
    # outputs are all metrics or plots.
    assert run_cache_stages(base) == set(UPSTREAM.values())


def timed_exp_run(repo: Path, lr: float) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = dvc(["exp", "run", "-S", f"train.lr={lr}", "train"], repo)
    return proc, time.monotonic() - start


def test_repeated_experiment_restores_train_from_the_run_cache(repo):
    first, first_s = timed_exp_run(repo, 0.01)
    assert "Running stage 'train'" in first.stdout, first.stdout
    trained = files_under(repo, TRAIN_OUTPUTS)
    other, _ = timed_exp_run(repo, 0.005)
    assert "Running stage 'train'" in other.stdout, other.stdout
    assert files_under(repo, TRAIN_OUTPUTS) != trained

    again, again_s = timed_exp_run(repo, 0.01)
    print(f"exp run lr=0.01: trained in {first_s:.1f} s, run-cache hit in {again_s:.1f} s")
    assert CACHED_MESSAGE in again.stdout, again.stdout
    log = again.stdout + again.stderr
    assert "Running stage 'train'" not in log and "epoch 1/" not in log, log
    assert files_under(repo, TRAIN_OUTPUTS) == trained
    # Generous: the restore copies a few files; most of this is `dvc exp run` itself.
    assert again_s < 120


def test_resume_after_sigterm_gives_the_uninterrupted_bytes(repo, tmp_path, monkeypatch):
    monkeypatch.delenv("PCAM_RESUME", raising=False)
    finished = files_under(repo, TRAIN_OUTPUTS)
    set_params(repo, {"train.epochs": 2})
    log_path = tmp_path / "dvc.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "dvc"), "repro", "train"],
            cwd=repo,
            env=env() | {"PYTHONPATH": str(repo / "src")},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    stage_pid = None
    try:
        # DVC deletes the stage's outputs, dvclive/ too, before it starts the stage.
        def started() -> bool:
            return stage_process(proc.pid, "train.py") is not None or proc.poll() is not None

        wait_for(started, 120, "the stage starts")
        assert proc.poll() is None, log_path.read_text()
        stage_pid = stage_process(proc.pid, "train.py")

        # A first row: the training loop, with its SIGTERM handler, has started (2 epochs of
        # 8 steps each).
        def stepped() -> bool:
            tsv = repo / LOSS_TSV
            return proc.poll() is not None or (tsv.is_file() and len(tsv.read_text().split()) > 2)

        wait_for(stepped, 300, "train's first step", poll_s=0.01)
        assert proc.poll() is None, log_path.read_text()
        os.kill(stage_pid, signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        end_dvc_and_stage(proc, stage_pid)
    log = log_path.read_text()
    assert proc.returncode != 0 and "exited with 75" in log, log
    assert "train: stopped by SIGTERM" in log and f"checkpoint saved to {CHECKPOINT}" in log, log
    # The stage wrote no model; the finished one DVC deleted is in its cache, dvc.lock names it.
    assert not (repo / "models" / "model.pt").exists()
    progress = load_checkpoint(repo / CHECKPOINT)["progress"]
    assert not progress["finished"], progress
    print(f"stopped at epoch {progress['epoch'] + 1}, batch {progress['batch']}")
    run([sys.executable, "-m", "pcam.restore", "train"], repo)
    assert files_under(repo, TRAIN_OUTPUTS) == finished

    monkeypatch.setenv("PCAM_RESUME", "1")
    resumed = dvc(["repro", "train"], repo)
    where = f"at epoch {progress['epoch'] + 1}, batch {progress['batch']}"
    assert f"train: resuming from {CHECKPOINT} {where}" in resumed.stdout, resumed.stdout
    assert not (repo / CHECKPOINT).exists()
    after_resume = files_under(repo, TRAIN_OUTPUTS)
    train_lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["train"]
    # Each step once: every optimizer step in train/*, one row per epoch in val/*.
    for rel, tsv in after_resume.items():
        if rel.endswith(".tsv"):
            steps = [int(line.split("\t")[0]) for line in tsv.decode().splitlines()[1:]]
            if "/train/" in rel:
                assert steps == list(range(len(steps))) and len(steps) > progress["step"], rel
            else:
                assert len(steps) == 2 and steps[0] < steps[1], (rel, steps)

    # The uninterrupted run (-f: run it, not restore the resumed one from the run-cache).
    monkeypatch.delenv("PCAM_RESUME")
    uninterrupted = dvc(["repro", "-f", "train"], repo)
    assert "epoch 1/2" in uninterrupted.stdout and "resuming" not in uninterrupted.stdout
    assert files_under(repo, TRAIN_OUTPUTS) == after_resume
    assert yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["train"] == train_lock


def test_runcache_push_outside_a_dvc_repo_is_one_line(tmp_path):
    proc = run([sys.executable, "-m", "pcam.runcache", "push"], tmp_path, check=False)
    assert proc.returncode == 1
    (line,) = proc.stderr.splitlines()
    assert line.startswith("error: dvc: you are not inside of a DVC repository"), line
