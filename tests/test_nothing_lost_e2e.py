"""Nothing lost under DVC, with the real dvc CLI in a temporary git copy of the repo (tiny data).

DVC deletes a stage's outputs before running it. After a failed `dvc repro` or `dvc exp run` the
failing stage's one error line names `python -m pcam.restore STAGE`, and that command brings the
earlier outputs back byte for byte, metrics and plots included. Killing `dvc` ends the stage it
started, so no orphan goes on writing outputs.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pcam.checkpoint import load_checkpoint
from tests.e2e import (
    TINY,
    alive,
    children,
    copy_repo,
    dvc,
    end_dvc_and_stage,
    env,
    files_under,
    free_port,
    repro_and_commit,
    run,
    set_params,
    stage_process,
    wait_for,
)

pytestmark = pytest.mark.e2e

UPSTREAM = ("prepare", "validate-data", "compute-stats", "train")
RESTORE = re.compile(r"`(python -m pcam\.restore [\w-]+)`")


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A copy that ran prepare..train once and committed the result (metrics and plots in git)."""
    repo = copy_repo(tmp_path_factory.mktemp("nothing-lost") / "repo", TINY)
    return repro_and_commit(repo, "train")


def assert_back_to_committed_state(repo: Path, outputs: tuple[str, ...], before: dict) -> None:
    assert files_under(repo, outputs) == before
    run(["git", "checkout", "--", "params.yaml"], repo)
    status = json.loads(dvc(["status", "--json", *UPSTREAM], repo).stdout)
    assert status == {}, status
    assert run(["git", "status", "--porcelain"], repo).stdout == ""


def fail_and_restore(repo, command, stage, outputs, expect, params=None) -> None:
    before = files_under(repo, outputs)
    assert all((repo / rel).exists() for rel in outputs)
    if params:
        set_params(repo, params)
    proc = dvc(command, repo, check=False)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and expect in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert files_under(repo, outputs) != before, "DVC deleted nothing: the test breaks nothing"
    (restore,) = RESTORE.findall(errors[0])
    assert restore == f"python -m pcam.restore {stage}"
    out = run(restore.split(), repo)
    assert "restored from" in out.stdout
    assert_back_to_committed_state(repo, outputs, before)


def test_failed_validate_data_gives_back_metrics_and_plots(repo):
    fail_and_restore(
        repo,
        ["repro", "validate-data"],
        "validate-data",
        ("metrics/data.json", "plots/data", "data/validated/exclusions.json"),
        "has positive fraction",
        {"validate.min_positive_fraction": 0.0, "validate.max_positive_fraction": 0.1},
    )


def test_failed_download_gives_back_data_raw(repo):
    fail_and_restore(
        repo,
        ["repro", "prepare"],
        "prepare",
        ("data/raw",),
        "download failed",
        {
            "data.source": "pcam",
            "data.pcam.base_url": f"http://127.0.0.1:{free_port()}/files",  # nothing listens
            "data.pcam.retries": 0,
        },
    )


def test_negative_epochs_give_back_train_metrics(repo):
    fail_and_restore(
        repo,
        ["repro", "train"],
        "train",
        ("metrics/train.json", "models/model.pt", "dvclive"),
        "train.epochs = -1 out of range",
        {"train.epochs": -1},
    )


def test_failed_experiment_gives_back_train_metrics(repo):
    fail_and_restore(
        repo,
        ["exp", "run", "-S", "train.lr=abc", "train"],
        "train",
        ("metrics/train.json", "models/model.pt", "dvclive"),
        "train.lr = 'abc' must be a finite number",
    )


# --- killing dvc ends the stage ------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killing_dvc_ends_the_stage(repo, tmp_path, sig):
    outputs = ("metrics/train.json", "models/model.pt", "dvclive")
    before = files_under(repo, outputs)
    set_params(repo, {"train.epochs": 1000})  # would run for many minutes
    log_path = tmp_path / "dvc.log"
    e = env() | {"PYTHONPATH": str(repo / "src")}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "dvc"), "repro", "train"],
            cwd=repo,
            env=e,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    stage_pid = None
    try:
        # Killed inside the training loop, after its first epoch: the worst moment.
        wait_for(
            lambda: "epoch 1/1000" in log_path.read_text() or proc.poll() is not None,
            300,
            "train's first epoch",
        )
        assert proc.poll() is None, log_path.read_text()
        # Under dash (tests/e2e.env's SHELL) a shell sits between dvc and the stage: killing dvc
        # leaves that shell alive, so only pcam.lifetime's watch on dvc can end the stage.
        stage_pid = stage_process(proc.pid, "train.py")
        assert stage_pid is not None and stage_pid not in children(proc.pid)
        os.kill(proc.pid, sig)
        proc.wait(timeout=30)
        seconds = wait_for(lambda: not alive(stage_pid), 60, "the stage ends after dvc")
    finally:
        end_dvc_and_stage(proc, stage_pid)
    print(f"stage ended {seconds:.1f} s after dvc got {sig.name}")
    # Nothing written after the stage ended, and no trained model or train metrics at all: the
    # train metrics are written only when training finishes (DVC deleted the earlier ones).
    stamps = {p: p.stat().st_mtime_ns for p in (repo / "models").rglob("*")}
    time.sleep(2)
    assert {p: p.stat().st_mtime_ns for p in (repo / "models").rglob("*")} == stamps
    assert not (repo / "metrics" / "train.json").exists()
    # model.pt is written only when training finishes; the stage's SIGTERM went to its
    # resumable checkpoint, outside DVC's outputs.
    assert not (repo / "models" / "model.pt").exists()
    assert not load_checkpoint(repo / ".cache" / "checkpoints" / "train.pt")["progress"]["finished"]
    run(["python", "-m", "pcam.restore", "train"], repo)
    assert_back_to_committed_state(repo, outputs, before)
