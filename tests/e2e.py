"""Helpers for end-to-end tests: a temporary git copy of this repo, run with the real dvc CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tests.conftest import REPO

# Small enough that the whole pipeline runs in seconds; still exercises every stage.
TINY = {
    "data.synthetic.n_train": 256,
    "data.synthetic.n_valid": 128,
    "data.synthetic.n_test": 128,
    "data.synthetic.slides_train": 4,
    "data.synthetic.slides_valid": 2,
    "data.synthetic.slides_test": 2,
    "train.epochs": 1,
    "evaluate.bootstrap_resamples": 50,
    "slice.bootstrap_resamples": 50,
    "train.batch_size": 64,
    "benchmark.batch_sizes": [1, 8],
    "benchmark.train_batch_sizes": [8],
    "benchmark.repeats": 3,
    "benchmark.loader_patches": 128,
    "benchmark.loader_workers": 1,
    "benchmark.train_loop_patches": 128,
}

# TINY's train settings leave the model at chance (1 epoch at batch 64: val ROC-AUC ~0.5). These
# learn the tiny data (test ROC-AUC ~0.8, its 95% CI above 0.7), for tests that check the model
# learns. One thread: at batch 16, two threads on a busy 2-core machine spend most of each small
# step waiting for each other.
LEARNS = {"train.epochs": 3, "train.batch_size": 16, "train.lr": 0.005, "train.threads": 1}


def env() -> dict[str, str]:
    e = dict(os.environ)
    # Stage commands call `python`: make it this interpreter, whatever PATH the tests got.
    e["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{e.get('PATH', '')}"
    e["DVC_NO_ANALYTICS"] = "1"
    # DVC runs stages as `$SHELL -c CMD`. CI has no SHELL, hence /bin/sh: dash, which does not exec
    # a lone command, so the stage runs under a shell under dvc. Test that case everywhere.
    e["SHELL"] = "/bin/sh"
    for key in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL"):  # not those of a `make test` running us
        e.pop(key, None)
    e.setdefault("GIT_AUTHOR_NAME", "pcam tests")
    e.setdefault("GIT_AUTHOR_EMAIL", "tests@pcam")
    e.setdefault("GIT_COMMITTER_NAME", "pcam tests")
    e.setdefault("GIT_COMMITTER_EMAIL", "tests@pcam")
    return e


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    e = env()
    if (Path(cwd) / "src" / "pcam").is_dir():
        # A repo copy runs its own code, not the editable install's (which may be mid-edit).
        e["PYTHONPATH"] = str(Path(cwd) / "src")
    proc = subprocess.run(cmd, cwd=cwd, env=e, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
            f"stderr:\n{proc.stderr[-3000:]}"
        )
    return proc


STAGES = ("prepare", "validate-data", "compute-stats", "train", "evaluate", "slice", "benchmark")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for servers the tests start)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_cmd(repo: Path) -> list[str]:
    """`make` with this repo's Makefile, run in `repo`, with the venv running the tests."""
    venv = Path(sys.executable).parent.parent
    cmd = ["make", "--no-print-directory", "-f", str(REPO / "Makefile"), "-C", str(repo)]
    # -o: never (re)install into the venv from a test; it is set up already.
    return [*cmd, f"VENV={venv}", "-o", f"{venv}/.installed-stamp"]


def dvc(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    return run([str(Path(sys.executable).parent / "dvc"), *args], cwd, check)


def tracked_files() -> list[str]:
    """Files git tracks or would track (untracked but not ignored) in the working tree."""
    out = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [f for f in out.split("\0") if f and (REPO / f).is_file()]


def copy_repo(dest: Path, overrides: dict | None = None) -> Path:
    """A fresh git repo holding this working tree's files, params overridden, committed."""
    dest.mkdir(parents=True)
    for rel in tracked_files():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, target)
    for stale in ("dvc.lock",):  # the copy's outputs are its own
        (dest / stale).unlink(missing_ok=True)
    if overrides:
        set_params(dest, overrides)
    run(["git", "init", "-q", "-b", "main"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-q", "-m", "copy"], dest)
    return dest


def repro_and_commit(repo: Path, target: str) -> Path:
    """`dvc repro TARGET` in a repo copy, and commit what it wrote (metrics and plots in git)."""
    dvc(["repro", target], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-q", "-m", "repro"], repo)
    return repo


def set_params(repo: Path, overrides: dict) -> None:
    path = repo / "params.yaml"
    doc = yaml.safe_load(path.read_text())
    for dotted, value in overrides.items():
        node = doc
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def stop_process(proc: subprocess.Popen, timeout_s: float) -> None:
    """Terminate a server/daemon the test started; kill it if it does not exit in time."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def children(pid: int) -> list[int]:
    """The ids of the processes whose parent is `pid` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def stage_process(dvc_pid: int, script: str) -> int | None:
    """The PID of `python stages/SCRIPT` run by dvc process `dvc_pid` (maybe through a shell)."""
    todo = [dvc_pid]
    while todo:
        for pid in children(todo.pop()):
            try:
                args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if (
                Path(args[0].decode()).name.startswith("python")
                and f"stages/{script}".encode() in args
            ):
                return pid
            todo.append(pid)
    return None


def end_dvc_and_stage(proc: subprocess.Popen, stage: int | None) -> None:
    """Cleanup after a test that signals dvc or its stage: kill whichever is still running."""
    if stage and alive(stage):
        os.kill(stage, signal.SIGKILL)
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def alive(pid: int) -> bool:
    """Running (a zombie waiting for init to reap it has ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_for(condition, timeout_s: float, what: str, poll_s: float = 0.1) -> float:
    """Seconds until `condition()` held; AssertionError naming `what` after `timeout_s`."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        time.sleep(poll_s)
    return time.monotonic() - start


def files_under(repo: Path, rels: tuple[str, ...]) -> dict[str, bytes]:
    """Relative path -> bytes of every file at or under `rels` (files or directories)."""
    found = {}
    for rel in rels:
        path = repo / rel
        paths = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        found |= {str(p.relative_to(repo)): p.read_bytes() for p in paths if p.is_file()}
    return found
