"""A stage dies with the dvc process that started it, whichever shell DVC runs it under."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.e2e import alive, end_dvc_and_stage, wait_for

# What DVC does: `$SHELL -c CMD` with DVC_STAGE set (dvc/stage/run.py), here from a script named
# `dvc`, which is how pcam.lifetime recognises it.
FAKE_DVC = """\
import os, subprocess, sys
subprocess.run(sys.argv[1], shell=True, executable=os.environ["SHELL"],
               env=os.environ | {"DVC_STAGE": "train"})
"""

# The stage: imports pcam (which ties it to dvc), reports its PID, and notes the signal it gets.
STAGE = """\
import pcam, os, signal, sys, time
def on_term(signum, frame):
    open(sys.argv[1] + ".term", "w").write(signal.Signals(signum).name)
    os._exit(75)
signal.signal(signal.SIGTERM, on_term)
open(sys.argv[1], "w").write(str(os.getpid()))
time.sleep(120)
"""


@pytest.mark.parametrize("shell", ["/bin/bash", "/bin/sh"])
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_the_stage_gets_sigterm_when_dvc_dies(tmp_path, shell, sig):
    if not Path(shell).exists():
        pytest.skip(f"no {shell}")
    dvc = tmp_path / "dvc"
    dvc.write_text(f"#!{sys.executable}\n{FAKE_DVC}")
    dvc.chmod(0o755)
    (tmp_path / "stage.py").write_text(STAGE)
    pid_file = tmp_path / "stage.pid"
    cmd = f"{sys.executable} {tmp_path / 'stage.py'} {pid_file}"
    e = os.environ | {"SHELL": shell, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen([str(dvc), cmd], env=e)
    stage = None
    try:
        wait_for(lambda: pid_file.is_file() and pid_file.read_text(), 60, "the stage starts")
        stage = int(pid_file.read_text())
        os.kill(proc.pid, sig)
        proc.wait(timeout=10)
        wait_for(lambda: not alive(stage), 10, f"the stage ends after dvc got {sig.name}")
    finally:
        end_dvc_and_stage(proc, stage)
    assert (tmp_path / "stage.pid.term").read_text() == "SIGTERM"


def test_a_stage_outside_dvc_is_left_alone(tmp_path):
    """Without DVC_STAGE (python stages/train.py by hand) nothing watches the parent."""
    out = subprocess.run(
        [sys.executable, "-c", "import pcam, threading; print(threading.active_count())"],
        env={k: v for k, v in os.environ.items() if k != "DVC_STAGE"}
        | {"PYTHONPATH": str(REPO / "src")},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "1"
