"""A stage process dies with the `dvc` process that started it.

When `dvc repro` or `dvc exp run` is killed, DVC's lock goes and dvc.lock never records the stage;
a stage still running would write outputs that nothing tracks, maybe while the next `dvc repro`
writes the same files. So a stage gets SIGTERM when dvc ends: it ends any stage at once, and the
training, which catches it, checkpoints and exits (as on a SLURM preemption).

DVC runs a stage as `$SHELL -c CMD`. bash execs a lone command, so the stage's parent is dvc; dash
(Debian's /bin/sh) does not, and its shell outlives a killed dvc. Hence two mechanisms: the kernel
signals us when our parent dies (PR_SET_PDEATHSIG), and where the parent is not dvc, a thread
waits on a pidfd of the nearest `dvc` ancestor (pidfd_open, Linux 5.3; polling where missing).
pcam/__init__.py calls die_with_dvc() when DVC_STAGE is set (DVC sets it for every stage command);
processes a stage starts that import pcam (DDP ranks) die with it too.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import sys
import threading
import time
from pathlib import Path

PR_SET_PDEATHSIG = 1  # linux/prctl.h
POLL_S = 0.5  # only where pidfd_open is missing


def die_with_dvc(sig: signal.Signals = signal.SIGTERM) -> None:
    """Get `sig` when our parent or the `dvc` process we run under ends (Linux only)."""
    if not sys.platform.startswith("linux"):
        return
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return
    ppid = os.getppid()
    # A parent that died before the prctl call left us to init (pid 1): that death is missed, so
    # act on it now. Unless dvc itself is pid 1 (`docker run IMAGE dvc repro`).
    if ppid == 1 and not _runs_dvc(1):
        os.kill(os.getpid(), sig)
        return
    dvc = ppid
    while dvc > 1 and not _runs_dvc(dvc, missing=False):  # the nearest dvc ancestor
        dvc = _parent(dvc)
    if dvc > 1 and dvc != ppid:
        _watch(dvc, sig)


def _watch(pid: int, sig: signal.Signals) -> None:
    """Send `sig` to this process when process `pid` ends (a daemon thread waits for it)."""
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        fd = None
    if fd is not None and not _runs_dvc(pid):  # the PID was reused between the lookup and now
        os.close(fd)
        return

    def wait() -> None:
        if fd is not None:
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            poller.poll()  # readable once the process has exited
        else:
            while _alive(pid) and _runs_dvc(pid):
                time.sleep(POLL_S)
        os.kill(os.getpid(), sig)

    threading.Thread(target=wait, name="pcam-die-with-dvc", daemon=True).start()


def _parent(pid: int) -> int:
    """The parent PID of `pid` (0 when it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    # The command name (field 2) may hold spaces and parentheses; the fields after the last ")"
    # are numbers: state, then the parent PID.
    return int(stat.rpartition(")")[2].split()[1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _runs_dvc(pid: int, missing: bool = True) -> bool:
    """Whether `pid` runs dvc (`missing` where that cannot be read)."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return missing
    # `dvc ...` or `python .../dvc ...` (a venv's entry point run by its interpreter).
    return any(Path(a.decode(errors="replace")).name == "dvc" for a in args[:2])
