"""The offline bundle: installed into a fresh venv with the network really off (a network
namespace of its own, `unshare -n`), predict gives the PyTorch path's probabilities.

Building the bundle downloads the target's wheels once (PyPI); they are kept in
.cache/bundle-wheels/, so later runs need no network at all. Without the cache and without the
index, the test skips and says so.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import tarfile
import urllib.request

import h5py
import numpy as np
import pytest
from PIL import Image

from pcam import bundle, h5io
from pcam.predict import main
from tests.conftest import REPO
from tests.test_offline_clone import needs_unshare
from tests.test_predict import BACKEND_TOL, read_rows

WHEEL_CACHE = REPO / ".cache" / "bundle-wheels"
CONSTRAINTS = REPO / "constraints.txt"


def index_reachable() -> bool:
    url = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/") + "/numpy/"
    try:
        with urllib.request.urlopen(url, timeout=10):
            return True
    except OSError:
        return False


pytestmark = [
    needs_unshare,
    pytest.mark.skipif(
        sys.version_info[:2] != (3, 11), reason="the bundle's wheels are for CPython 3.11"
    ),
]


def offline(cmd: list, **kw) -> subprocess.CompletedProcess:
    """Run in a new network namespace (only a downed loopback) with no pip config or index."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON"))}
    env.pop("VIRTUAL_ENV", None)
    env["PIP_CONFIG_FILE"] = os.devnull
    return subprocess.run(
        ["unshare", "-n", *map(str, cmd)], capture_output=True, text=True, env=env, **kw
    )


def test_bundle_installs_and_predicts_offline(deployed_model, tmp_path, capsys):
    requirements = bundle.pinned_requirements(CONSTRAINTS)
    folder = bundle.wheel_folder(
        requirements, CONSTRAINTS, WHEEL_CACHE, bundle.PLATFORM, bundle.PYTHON_VERSION
    )
    if not folder.is_dir() and not index_reachable():
        pytest.skip(f"no cached wheels in {folder} and the package index is unreachable")
    archive = bundle.build(
        deployed_model,
        tmp_path / "dist" / "pcam-bundle-test.tar.gz",
        REPO / "src" / "pcam",
        CONSTRAINTS,
        WHEEL_CACHE,
    )
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "site", filter="data")
    root = tmp_path / "site" / "pcam-bundle-test"
    assert {p.name for p in root.iterdir()} == {
        "model.onnx", "model.pt", "threshold.json", "normalisation.json", "onnx_parity.json",
        "README.md", "requirements.txt", "wheels",
    }  # fmt: skip
    assert "pip install --no-index --find-links wheels pcam" in (root / "README.md").read_text()

    # Inputs: the test split's .h5 and one of its patches as a PNG.
    x_file = deployed_model / "raw" / h5io.x_name("test")
    png = tmp_path / "patch.png"
    with h5py.File(x_file, "r") as f:
        Image.fromarray(f["x"][5]).save(png)

    venv = tmp_path / "venv"
    python = venv / "bin" / "python"
    # Network really off: connecting anywhere fails at once inside the namespace.
    probe = offline(
        [sys._base_executable, "-c", "import socket; socket.create_connection(('1.1.1.1', 443), 5)"]
    )
    assert probe.returncode != 0 and (
        f"Errno {errno.ENETUNREACH}" in probe.stderr or "unreachable" in probe.stderr
    ), probe.stderr
    steps = [
        [sys._base_executable, "-m", "venv", venv],
        [python, "-m", "pip", "install", "-q", "--no-index", "--find-links", root / "wheels", "pcam"],
    ]  # fmt: skip
    for step in steps:
        done = offline(step, cwd=tmp_path, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
    no_torch = offline([python, "-c", "import torch"], cwd=tmp_path)
    assert "No module named 'torch'" in no_torch.stderr

    out = tmp_path / "offline.csv"
    done = offline(
        [python, "-m", "pcam.predict", "--model", root / "model.onnx", png, x_file, "--out", out],
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    onnx_rows = read_rows(out.read_text())

    main(["--model", str(deployed_model / "model.pt"), str(png), str(x_file)])
    torch_rows = read_rows(capsys.readouterr().out)
    assert len(onnx_rows) == len(torch_rows) == 1 + 64
    assert [r["index"] for r in onnx_rows] == [r["index"] for r in torch_rows]
    p_onnx = np.array([float(r["probability"]) for r in onnx_rows])
    p_torch = np.array([float(r["probability"]) for r in torch_rows])
    assert np.abs(p_onnx - p_torch).max() <= BACKEND_TOL
    assert [r["label"] for r in onnx_rows] == [r["label"] for r in torch_rows]
    assert p_onnx[0] == pytest.approx(p_onnx[1 + 5], abs=1e-6)  # the PNG is patch 5, lossless
