"""A fresh clone with no network and no credentials stays quiet and quick: `dvc checkout` and
`dvc exp run` wait on no remote and print no traceback.

    pytest tests/test_offline_clone.py      # needs `unshare -n` (root, or user namespaces)

With the team bucket committed as the *default* remote, DVC loads each missing directory listing
(`.dir`) from it; offline, gcsfs retried each for about a minute and logged tracebacks (124 s and
6 tracebacks for `dvc checkout` here). The bucket is now committed as a named remote only.
The time bounds are hard timeouts against waiting on a network, not benchmarks.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.e2e import TINY, env, run

pytestmark = pytest.mark.e2e

CHECKOUT_BOUND_S = 20
EXP_RUN_BOUND_S = 60  # includes running `prepare` on the tiny data


def _can_unshare_network() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, check=False)
    return probe.returncode == 0


needs_unshare = pytest.mark.skipif(
    not _can_unshare_network(), reason="`unshare -n` is not permitted here"
)


def offline(
    args: list[str], cwd: Path, bound_s: float
) -> tuple[subprocess.CompletedProcess, float]:
    """Run `args` in a network namespace with no interfaces up; fail past `bound_s` seconds."""
    e = env()
    e["PYTHONPATH"] = str(cwd / "src")
    for key in ("GOOGLE_APPLICATION_CREDENTIALS", "CLOUDSDK_CONFIG"):
        e.pop(key, None)
    start = time.monotonic()
    try:
        proc = subprocess.run(
            ["unshare", "-n", *args],
            cwd=cwd,
            env=e,
            capture_output=True,
            text=True,
            timeout=bound_s,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{' '.join(args)} still running offline after {bound_s} s")
    return proc, time.monotonic() - start


@pytest.fixture
def clone(tmp_path) -> Path:
    dest = tmp_path / "clone"
    run(["git", "clone", "-q", str(REPO), str(dest)], tmp_path)
    return dest


def dvc_exe() -> str:
    return str(Path(sys.executable).parent / "dvc")


@needs_unshare
def test_checkout_in_an_offline_clone_is_quick_and_quiet(clone):
    proc, wall_s = offline([dvc_exe(), "checkout"], clone, CHECKOUT_BOUND_S)
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output, output
    assert "googleapis" not in output and "credentials" not in output, output
    # No data in a fresh clone: DVC says which outputs it could not create, and nothing else.
    assert "Checkout failed for following targets" in proc.stderr, output
    assert wall_s < CHECKOUT_BOUND_S


@needs_unshare
def test_exp_run_in_an_offline_clone_is_quick_and_quiet(clone):
    tiny = [f"-S{key}={value}" for key, value in TINY.items() if key.startswith("data.")]
    proc, _ = offline([dvc_exe(), "exp", "run", *tiny, "prepare"], clone, EXP_RUN_BOUND_S)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "Traceback" not in output and "googleapis" not in output, output
    assert "Running stage 'prepare'" in output
