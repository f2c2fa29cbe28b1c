"""scripts/: each one starts (imports resolve, options parse), and the drift demo scales a stain
shift the way it says. No pipeline stage runs them, so nothing else would notice them break."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO

SCRIPTS = sorted((REPO / "scripts").glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_starts_and_explains_its_options(script):
    done = subprocess.run(
        [sys.executable, str(script), "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage:")


def test_drift_demo_scales_the_stain_shift():
    spec = importlib.util.spec_from_file_location("drift_demo", REPO / "scripts/drift_demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    shift = demo.ANOTHER_LAB
    assert demo.scaled(shift, 1.0) == shift
    none = demo.scaled(shift, 0.0)
    assert type(none) is type(shift)
    assert all(np.allclose(gains, 1.0) for gains in none)
    half = demo.scaled(shift, 0.5)
    for h, full in zip(half, shift, strict=True):
        assert np.allclose(np.square(h), full)
