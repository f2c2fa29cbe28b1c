"""Shared fixtures: tiny PCAM-format data written by the project's own writer."""

from __future__ import annotations

from pathlib import Path

import pcam  # noqa: F401  (first: the tests run with the CPU numerics pinned, as the stages do)

# isort: split
import numpy as np
import pytest

from pcam import h5io

REPO = Path(__file__).resolve().parents[1]


def make_meta(n: int, y: np.ndarray, slide: str = "slide_0") -> h5io.Meta:
    return h5io.Meta(
        coord_y=np.arange(n, dtype=np.int64) * 96,
        coord_x=np.zeros(n, dtype=np.int64),
        tumor_patch=y.astype(bool),
        center_tumor_patch=y.astype(bool),
        wsi=np.array([slide] * n),
    )


def write_tiny_split(raw_dir: Path, split: str, n: int = 16, seed: int = 0) -> tuple:
    """Random-pixel split with alternating labels: enough for structure, not for learning."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, 96, 96, 3), dtype=np.uint8)
    y = (np.arange(n) % 2).astype(np.uint8)
    h5io.write_split(raw_dir, split, x, y, make_meta(n, y, f"{split}_slide"))
    return x, y


@pytest.fixture
def tiny_raw(tmp_path: Path) -> Path:
    raw = tmp_path / "raw"
    for i, split in enumerate(h5io.SPLITS):
        write_tiny_split(raw, split, n=16, seed=i)
    return raw


@pytest.fixture(scope="session")
def deployed_model(tmp_path_factory) -> Path:
    """A tiny trained model as `evaluate` and `make export` leave it: model.pt, threshold.json,
    model.onnx and onnx_parity.json, plus a 64-patch test split in raw/ (x, y, meta)."""
    import hashlib
    import json

    from pcam.export import main as export_main
    from pcam.training import train
    from tests.test_training import MEAN, STD, params, prov, tiny_split

    d = tmp_path_factory.mktemp("deployed")
    p = params(epochs=1)
    train(
        p,
        tiny_split("train", 48, 0),
        tiny_split("valid", 16, 1),
        MEAN,
        STD,
        d / "model.pt",
        prov(p),
    )
    md5 = hashlib.md5((d / "model.pt").read_bytes()).hexdigest()
    (d / "threshold.json").write_text(json.dumps({"threshold": 0.5, "model_md5": md5}))
    x = tiny_split("test", 64, 2).x.numpy()
    y = (np.arange(64) % 2).astype(np.uint8)
    h5io.write_split(d / "raw", "test", x, y, make_meta(64, y))
    export_main(
        [
            "--model",
            str(d / "model.pt"),
            "--test-x",
            str(d / "raw" / h5io.x_name("test")),
            "--out",
            str(d / "model.onnx"),
            "--report",
            str(d / "onnx_parity.json"),
        ]
    )
    return d
