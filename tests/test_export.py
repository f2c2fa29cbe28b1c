"""ONNX export: the parity report, the model's metadata, and no model.onnx when parity fails."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest

import pcam
from pcam import h5io
from pcam.export import main, parity
from pcam.fileio import md5_file
from pcam.predict import ONNX_FORMAT, OnnxModel


def export_args(d, out, report) -> list[str]:
    x = d / "raw" / h5io.x_name("test")
    return ["--model", str(d / "model.pt"), "--test-x", str(x), "--out", str(out), "--report", str(report)]  # fmt: skip


def test_export_report_and_metadata(deployed_model):
    report = json.loads((deployed_model / "onnx_parity.json").read_text())
    p = report["parity"]
    assert p["passed"] and p["patches"] == 64 and p["labels_differ"] == 0
    assert 0.0 <= p["max_abs_diff_probability"] <= 1e-4
    assert report["onnx_md5"] == md5_file(deployed_model / "model.onnx")
    assert report["model_md5"] == md5_file(deployed_model / "model.pt")
    meta = {m.key: m.value for m in onnx.load(deployed_model / "model.onnx").metadata_props}
    assert meta["pcam.format"] == ONNX_FORMAT
    assert meta["pcam.source_model_md5"] == md5_file(deployed_model / "model.pt")


def test_export_is_byte_reproducible(deployed_model, tmp_path):
    main(export_args(deployed_model, tmp_path / "again.onnx", tmp_path / "again.json"))
    assert (tmp_path / "again.onnx").read_bytes() == (deployed_model / "model.onnx").read_bytes()


def test_export_bytes_do_not_depend_on_where_or_how_it_ran(deployed_model, tmp_path):
    # torch's exporter records source paths, lines and module names per node: a copy of the code
    # elsewhere, run as `python -m pcam.export`, must still write the in-process export's bytes.
    code = tmp_path / "elsewhere"
    shutil.copytree(os.path.dirname(pcam.__file__), code / "pcam")
    out = tmp_path / "model.onnx"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pcam.export",
            *export_args(deployed_model, out, tmp_path / "r.json"),
        ],
        env={**os.environ, "PYTHONPATH": str(code)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == (deployed_model / "model.onnx").read_bytes()


def test_parity_counts_flipped_labels_and_large_differences():
    logits = np.array([-2.0, 0.0, 2.0])
    ok = parity(logits, logits + 1e-7, threshold=0.6, max_abs_diff=1e-4)
    assert ok["passed"] and ok["labels_differ"] == 0
    # sigmoid(0.40) = 0.599 < 0.6 <= sigmoid(0.45) = 0.611: one label flips
    flip = parity(np.array([0.4]), np.array([0.45]), threshold=0.6, max_abs_diff=0.1)
    assert flip["labels_differ"] == 1 and not flip["passed"]
    far = parity(logits, logits + 0.01, threshold=0.99, max_abs_diff=1e-4)
    assert far["labels_differ"] == 0 and not far["passed"]
    assert far["max_abs_diff_probability"] == pytest.approx(0.0025, rel=0.01)


def test_failed_parity_keeps_the_old_model_and_says_why(
    deployed_model, tmp_path, monkeypatch, capsys
):
    out, report = tmp_path / "model.onnx", tmp_path / "parity.json"
    out.write_bytes(b"the previous export")
    real_logits = OnnxModel.logits
    monkeypatch.setattr(OnnxModel, "logits", lambda self, x, b: real_logits(self, x, b) + 0.5)
    with pytest.raises(SystemExit) as exc:
        main(export_args(deployed_model, out, report))
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "model.onnx: not written: onnxruntime and PyTorch disagree" in err
    assert out.read_bytes() == b"the previous export"
    assert not json.loads(report.read_text())["parity"]["passed"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left
