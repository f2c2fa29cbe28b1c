"""pcam.slurm without a cluster: the stop supervisor on real process trees, the requeue decision
on a stand-in `scontrol`. (tests/test_slurm.py runs both inside real Slurm jobs.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.e2e import env

# A training stand-in: handles SIGTERM/SIGUSR1 like stages/train.py (finish the step, write the
# checkpoint, exit 75), taking a second to "checkpoint" so that a supervisor returning early shows.
TRAINING = textwrap.dedent(
    """\
    import signal, sys, time
    from pathlib import Path

    out = Path(sys.argv[1])
    got = []
    for s in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, lambda n, f: got.append(signal.Signals(n).name))
    Path(str(out) + ".ready").touch()
    while not got:
        time.sleep(0.05)
    time.sleep(1.0)
    out.write_text(got[0])
    sys.exit(75)
    """
)


def start(tmp_path: Path, stop_file: Path) -> tuple[subprocess.Popen, Path]:
    """`python -m pcam.slurm run` over `sh -c "python training.py; ..."` (sh: a dvc stand-in,
    with no signal handler), in its own session, as Slurm would run the batch step."""
    script = tmp_path / "training.py"
    script.write_text(TRAINING)
    out = tmp_path / "checkpoint"
    # The `; exit $?` keeps sh from exec-ing the training, as dvc stays the training's parent.
    inner = f"{sys.executable} {script} {out}; exit $?"
    cmd = [sys.executable, "-m", "pcam.slurm", "run", "--stop-file", str(stop_file), "--"]
    proc = subprocess.Popen(
        [*cmd, "sh", "-c", inner],
        env=env(),
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 30
    while not Path(f"{out}.ready").exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "the training stand-in did not start"
        time.sleep(0.05)
    return proc, out


def test_sigterm_to_every_process_waits_for_the_orphaned_training(tmp_path):
    # Preemption / scancel --full: SIGTERM to all processes at once. The dvc stand-in dies at
    # once; the training, orphaned, must still finish before the supervisor returns.
    proc, out = start(tmp_path, tmp_path / "stop")
    os.killpg(proc.pid, signal.SIGTERM)
    _, log = proc.communicate(timeout=30)
    assert out.read_text() == "SIGTERM", log
    assert proc.returncode == 128 + signal.SIGTERM  # the command's status: sh died of SIGTERM
    assert "exited with 75" in log


def test_stop_file_forwards_the_signal_only_to_processes_that_handle_it(tmp_path):
    # The time-limit path: only the batch shell got SIGUSR1; it writes the stop file.
    stop = tmp_path / "stop"
    proc, out = start(tmp_path, stop)
    stop.write_text("SIGUSR1\n")
    _, log = proc.communicate(timeout=30)
    assert out.read_text() == "SIGUSR1", log
    assert proc.returncode == 75, log  # sh was not signalled: it passed the training's 75 on
    assert log.count("forwarded SIGUSR1 to PID") == 1, log
    assert "training.py" in log


def test_without_a_stop_the_command_status_passes_through(tmp_path):
    cmd = [sys.executable, "-m", "pcam.slurm", "run", "--stop-file", str(tmp_path / "stop")]
    proc = subprocess.run([*cmd, "--", "sh", "-c", "exit 3"], env=env(), capture_output=True)
    assert proc.returncode == 3
    proc = subprocess.run([*cmd, "--", "no-such-dvc"], env=env(), capture_output=True, text=True)
    assert proc.returncode == 127 and "cannot run no-such-dvc" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("line", "restart_count", "requeued", "says"),
    [
        # scancel --signal=TERM: the job runs on, so it requeues itself
        ("JobId=7 JobState=RUNNING Restarts=0", "", True, "requeueing job 7"),
        ("JobId=7 JobState=RUNNING Restarts=1", "1", True, "requeueing job 7"),
        # preemption with PreemptMode=REQUEUE: Slurm has requeued it already
        ("JobId=7 JobState=COMPLETING Restarts=2", "1", False, "Slurm requeues job 7 itself"),
        # plain scancel: cancelled for good, resumable by its key
        ("JobId=7 JobState=COMPLETING Restarts=0", "", False, "PCAM_STATE_KEY=7_3"),
        ("JobId=7 JobState=CANCELLED Restarts=0", "", False, "PCAM_STATE_KEY=7_3"),
    ],
)
def test_requeue_decision(tmp_path, line, restart_count, requeued, says):
    calls = tmp_path / "calls"
    fake = tmp_path / "scontrol"
    fake.write_text(f'#!/bin/sh\necho "$*" >>{calls}\n[ "$1" = show ] && echo "{line}"\nexit 0\n')
    fake.chmod(0o755)
    e = env() | {"PATH": f"{tmp_path}:{env()['PATH']}", "SLURM_RESTART_COUNT": restart_count}
    proc = subprocess.run(
        [sys.executable, "-m", "pcam.slurm", "requeue", "7", "7_3"],
        env=e,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert says in proc.stderr
    assert ("requeue 7" in calls.read_text().splitlines()) == requeued


def test_requeue_outside_slurm_says_how_to_resume(tmp_path):
    (tmp_path / "train.pt").write_bytes(b"")
    e = env() | {"PCAM_CHECKPOINT_DIR": str(tmp_path)}
    cmd = [sys.executable, "-m", "pcam.slurm", "requeue", "", "local-42"]
    proc = subprocess.run(cmd, env=e, capture_output=True, text=True)
    assert proc.returncode == 1
    assert f"the checkpoint is kept in {tmp_path}" in proc.stderr
    assert "not a SLURM job: run it again with PCAM_STATE_KEY=local-42" in proc.stderr


# --- the small helpers the batch scripts call (formerly Python heredocs in slurm/common.sh) ---


@pytest.fixture
def in_copy(tmp_path, monkeypatch):
    """A directory holding the repo's params.yaml and benchmark details, as a job's working copy."""
    import shutil

    from tests.conftest import REPO

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "metrics" / "details").mkdir(parents=True)
    shutil.copy(
        REPO / "metrics" / "details" / "benchmark.json",
        tmp_path / "metrics" / "details" / "benchmark.json",
    )
    (tmp_path / ".dvc").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_check_devices_counts_the_jobs_gpus(in_copy, monkeypatch, capsys):
    from pcam import slurm

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert slurm.main(["check-devices", "--"]) == 0  # params.yaml: train.devices 1
    assert slurm.main(["check-devices", "--", "-n", "x", "-S", "train.devices=2", "train"]) == 1
    assert "train.devices=2 but this job has 0 GPU(s)" in capsys.readouterr().err
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert slurm.main(["check-devices", "--", "-S", "train.devices=2"]) == 0
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert (
        slurm.main(["check-devices", "--", "-S", "train.devices=2", "-S", "train.device=cpu"]) == 0
    )


def test_check_devices_reads_params_with_the_strict_loader(in_copy):
    from pcam import slurm

    text = (in_copy / "params.yaml").read_text()
    (in_copy / "params.yaml").write_text(text.replace("  devices: 1", "  devices: two"))
    with pytest.raises(SystemExit) as stop:
        slurm.main(["check-devices", "--"])
    assert stop.value.code == 1


def test_benchmark_params_sets_benchmark_keys_only(in_copy, capsys):
    import yaml

    from pcam import slurm

    assert slurm.main(["benchmark-params", "--", "-S", "benchmark.repeats=2"]) == 0
    assert yaml.safe_load((in_copy / "params.yaml").read_text())["benchmark"]["repeats"] == 2
    before = (in_copy / "params.yaml").read_text()
    for bad in (["-S", "train.lr=0.1"], ["-S", "benchmark.nope=1"], ["benchmark.repeats=3"]):
        assert slurm.main(["benchmark-params", "--", *bad]) == 1, bad
    # a value the strict loader refuses leaves params.yaml as it was
    assert slurm.main(["benchmark-params", "--", "-S", "benchmark.repeats=-1"]) == 1
    assert (in_copy / "params.yaml").read_text() == before
    assert "benchmark.repeats" in capsys.readouterr().err


def test_throughput_row_appends_one_row_under_one_header(in_copy, monkeypatch):
    import json

    from pcam import slurm

    monkeypatch.setenv("SLURM_JOB_PARTITION", "gpu_course")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    table = in_copy / "throughput.md"
    assert slurm.main(["throughput-row", str(table)]) == 0
    assert slurm.main(["throughput-row", str(table)]) == 0
    lines = table.read_text().splitlines()
    assert lines[0].startswith("| partition |") and len(lines) == 4
    inference = json.loads((in_copy / "metrics/details/benchmark.json").read_text())["inference"]
    bs1 = max(v["images_per_s"] for k, v in inference.items() if k.endswith("_bs1"))
    best = max(v["images_per_s"] for v in inference.values())
    assert lines[2] == lines[3] and "`gpu_course`" in lines[2] and "| 42 |" in lines[2]
    assert f"| {bs1:.1f} |" in lines[2] and f"| {best:.1f} (" in lines[2]


def test_use_cache_writes_the_local_config(in_copy):
    from configobj import ConfigObj

    from pcam import slurm

    assert slurm.main(["use-cache", "/shared/cache", "/tmp/site"]) == 0
    conf = ConfigObj(str(in_copy / ".dvc" / "config.local"))
    assert conf["cache"] == {"dir": "/shared/cache", "type": "reflink,copy"}
    assert conf["core"]["site_cache_dir"] == "/tmp/site"


def test_check_devices_prints_the_experiment_name(in_copy, capsys):
    from pcam import slurm

    default = ["check-devices", "--name", "pcam-exp-7", "--"]
    assert slurm.main([*default, "-S", "train.lr=0.1", "train"]) == 0
    assert capsys.readouterr().out == "pcam-exp-7\n"
    for given in (["-n", "mine"], ["--name", "mine"], ["--name=mine"]):
        assert slurm.main([*default, "-S", "train.lr=0.1", *given, "train"]) == 0
        assert capsys.readouterr().out == "mine\n", given
    assert slurm.main(["check-devices", "--", "-n", "mine"]) == 0  # no --name: prints nothing
    assert capsys.readouterr().out == ""


def test_copy_back_copies_what_git_sees_changed(tmp_path, monkeypatch, capsys):
    from pcam import slurm
    from tests.e2e import run

    work, checkout = tmp_path / "work", tmp_path / "checkout"
    for d in (work, checkout):
        (d / "metrics").mkdir(parents=True)
        (d / "dvc.lock").write_text("old\n")
        (d / "gone.json").write_text("{}\n")
        (d / "metrics" / "kept.json").write_text("{}\n")
    run(["git", "init", "-q"], work)
    run(["git", "add", "-A"], work)
    run(["git", "commit", "-q", "-m", "start"], work)
    (work / "dvc.lock").write_text("new\n")
    (work / "gone.json").unlink()
    (work / "plots").mkdir()
    (work / "plots" / "roc.json").write_text("[1]\n")
    (checkout / "untracked.txt").write_text("mine\n")
    monkeypatch.chdir(work)
    assert slurm.main(["copy-back", str(checkout)]) == 0
    assert (checkout / "dvc.lock").read_text() == "new\n"
    assert (checkout / "plots" / "roc.json").read_text() == "[1]\n"
    assert not (checkout / "gone.json").exists()
    assert (checkout / "metrics" / "kept.json").read_text() == "{}\n"
    assert (checkout / "untracked.txt").read_text() == "mine\n"
    assert sorted(p.name for p in checkout.rglob("*")) == [
        "dvc.lock",
        "kept.json",
        "metrics",
        "plots",
        "roc.json",
        "untracked.txt",
    ]  # no temporary files left
    assert "copied 3 changed file(s) back to" in capsys.readouterr().err


REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "where, settings, says",
    [
        ("elsewhere", {}, "slurm/common.sh not found: sbatch from the checkout's root"),
        ("checkout", {"PCAM_MODULES": "no-such-module"}, "module load no-such-module failed"),
        ("checkout", {"TMPDIR": "/no/such/dir"}, "cannot create a working directory in /no/such"),
    ],
)
def test_a_job_that_cannot_start_says_why_and_fails(tmp_path, where, settings, says):
    # common.sh is sourced in a `||` list, where bash ignores `set -e`: its load-time steps must
    # fail by themselves, before the job runs anything with the wrong environment.
    cwd = REPO_ROOT if where == "checkout" else tmp_path
    job_env = {k: v for k, v in env().items() if not k.startswith(("SLURM_", "PCAM_"))}
    # A venv that is not there: should a broken check let the job go on, it stops at activation
    # (a failed assertion) instead of running the job in the checkout.
    job_env["PCAM_VENV"] = str(tmp_path / "no-venv")
    done = subprocess.run(
        ["bash", str(REPO_ROOT / "slurm/prepare_data.sbatch")],
        cwd=cwd,
        env={**job_env, **settings},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    assert says in done.stderr.strip().splitlines()[-1]
