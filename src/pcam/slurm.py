"""The parts of the slurm/*.sbatch jobs that are easier in Python; slurm/common.sh calls them.

    python -m pcam.slurm run --stop-file PATH -- dvc repro --pull   # pcam_run
    python -m pcam.slurm requeue JOB_ID KEY                         # after a stop

`run` supervises the pipeline command. A stop reaches a job in one of three ways:
- `--signal=B:USR1@N` before a time limit, `scancel --signal=TERM --batch`: the batch shell
  alone. The shell writes the signal's name to the stop file; the supervisor passes the signal
  on to each process of the command that has a handler for it (only the training has one:
  SIGUSR1 or SIGTERM would kill dvc), also to a training that starts only later.
- `scancel --signal=TERM --full`: every process of the batch step at once.
- preemption (PreemptMode=REQUEUE), a plain `scancel`, a time limit without --signal: SIGTERM to
  every process of the job, SIGKILL KillWait seconds (default 30) later.
In the last two, dvc dies at once (it has no handler) while the training finishes its step and
writes its checkpoint. The supervisor is a child subreaper (PR_SET_CHILD_SUBREAPER): the
orphaned training becomes its child, and it returns only after the training has exited. Without
it the batch shell would see dvc gone and end the job, and Slurm would kill the training in the
middle of its checkpoint.

`requeue` decides what happens after a stop: a job Slurm lets run on (the stop was a signal
only) requeues itself; a preempted job is requeued by Slurm already; a cancelled one stays
cancelled, its checkpoint kept for a resubmission with PCAM_STATE_KEY.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
POLL_S = 0.2


def log(message: str) -> None:
    """The same line format as common.sh's pcam_log."""
    print(f"[pcam {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _children() -> dict[int, list[int]]:
    """Every process's children, by parent PID, from /proc."""
    tree: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # the process is gone
            continue
        # The command name (field 2) may hold spaces and parentheses; the fields after the last
        # ")" are numbers: state, then the parent PID.
        ppid = int(text.rpartition(")")[2].split()[1])
        tree.setdefault(ppid, []).append(int(stat.parent.name))
    return tree


def descendants(pid: int) -> list[int]:
    tree, found, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def catches(pid: int, sig: signal.Signals) -> bool:
    """Whether process `pid` has a handler for `sig` (its bit in /proc/PID/status SigCgt)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = re.search(r"^SigCgt:\s*([0-9a-f]+)", status, re.MULTILINE)
    return bool(mask) and bool(int(mask.group(1), 16) >> (sig - 1) & 1)


def _command(pid: int) -> str:
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    words = [a.decode(errors="replace") for a in args if a] or ["?"]
    return " ".join([Path(words[0]).name, *words[1:]])[:200]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def supervise(cmd: list[str], stop_file: Path) -> int:
    """Run `cmd`; on a stop, signal its processes that handle the signal and wait for them.

    Returns cmd's exit status (128 + N when signal N ended it).
    """
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    received: list[signal.Signals] = []
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda signum, _frame: received.append(signal.Signals(signum)))
    try:
        child = os.posix_spawnp(cmd[0], cmd, os.environ)
    except OSError as err:
        log(f"ERROR: cannot run {cmd[0]}: {err.strerror}")
        return 127
    status: int | None = None
    stop: signal.Signals | None = None
    told: dict[int, str] = {}  # PID -> command line, of the processes told to stop
    while True:
        if stop is None and received:
            stop = received[0]
        if stop is None and stop_file.is_file():
            stop = signal.Signals[stop_file.read_text().strip() or "SIGUSR1"]
        if stop is not None:
            for pid in descendants(os.getpid()):
                if pid not in told and catches(pid, stop):
                    command = _command(pid)
                    try:
                        os.kill(pid, stop)
                    except ProcessLookupError:
                        continue
                    told[pid] = command
                    log(f"forwarded {stop.name} to PID {pid} ({command})")
        # Reap the command and the orphans this subreaper inherits.
        while True:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            code = os.waitstatus_to_exitcode(wait_status)
            if pid == child:
                status = 128 - code if code < 0 else code
            elif pid in told:
                log(f"PID {pid} ({told[pid]}) exited with {code}")
        if status is not None and not any(_alive(pid) for pid in told):
            return status
        time.sleep(POLL_S)


def requeue(job_id: str, key: str) -> int:
    """After a stop: requeue the job when Slurm lets it run on, otherwise say what happens."""
    resubmit = f"resubmit with sbatch --export=ALL,PCAM_STATE_KEY={key} to resume"
    show = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, check=False
    )
    fields = dict(re.findall(r"(?:^| )(\w+)=(\S*)", show.stdout))
    state = fields.get("JobState", "unknown")
    # Slurm counts a requeue at once, before this run's processes have ended.
    if int(fields.get("Restarts") or 0) > int(os.environ.get("SLURM_RESTART_COUNT") or 0):
        log(f"Slurm requeues job {job_id} itself (preempted); the next run resumes")
        return 0
    if state != "RUNNING":
        # A plain scancel (CANCELLED) or a time limit without --signal: nothing can requeue it.
        log(f"job {job_id} ends ({state}); the checkpoint stays: {resubmit}")
        return 0
    log(f"requeueing job {job_id}; the next run resumes from the checkpoint")
    if subprocess.run(["scontrol", "requeue", job_id], check=False).returncode != 0:
        log(f"ERROR: scontrol requeue failed; {resubmit}")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pcam.slurm", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="action", required=True)
    run = sub.add_parser("run", help="run a command under the stop-signal supervisor")
    run.add_argument("--stop-file", type=Path, required=True)
    run.add_argument("cmd", nargs="+")
    again = sub.add_parser("requeue", help="after a stop: requeue the job, or say why not")
    again.add_argument("job_id")
    again.add_argument("key", help="the job's state key (PCAM_STATE_KEY to resume it)")
    args = parser.parse_args(argv)
    if args.action == "run":
        return supervise(args.cmd, args.stop_file)
    return requeue(args.job_id, args.key)


if __name__ == "__main__":
    sys.exit(main())
