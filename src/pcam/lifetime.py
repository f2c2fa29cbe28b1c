"""A stage process dies with the `dvc` process that started it.

When `dvc repro` or `dvc exp run` is killed (SIGKILL, SIGTERM), DVC's lock goes and dvc.lock
never records the stage; a stage still running would write outputs that nothing tracks, maybe
while the next `dvc repro` writes the same files. On Linux the kernel can signal a process when
its parent dies (prctl PR_SET_PDEATHSIG). The signal is SIGTERM: it ends any stage at once, and
the training loop, which catches it, finishes its step, checkpoints and exits (the same path as
a SLURM preemption, where dvc and the stage may both get SIGTERM and dvc may go first).

DVC runs a stage as `$SHELL -c CMD`; bash, dash and zsh exec a lone command, so the stage's
parent is dvc itself (tests/test_nothing_lost_e2e.py checks it). pcam/__init__.py calls
die_with_parent() when DVC_STAGE is set (DVC sets it for every stage command), i.e. as soon as a
stage imports pcam; processes a stage starts that import pcam (DDP ranks) die with the stage.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from pathlib import Path

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(sig: signal.Signals = signal.SIGTERM) -> bool:
    """Ask the kernel to send `sig` when the parent dies; False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return False
    # A parent that died before the prctl call left us to init (pid 1): that death is missed, so
    # act on it now. Unless dvc itself is pid 1 (`docker run IMAGE dvc repro`).
    if os.getppid() == 1 and not _runs_dvc(1):
        os.kill(os.getpid(), sig)
    return True


def _runs_dvc(pid: int) -> bool:
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True  # cannot tell: assume it is our parent rather than kill a healthy stage
    return any(Path(a.decode(errors="replace")).name == "dvc" for a in args)
