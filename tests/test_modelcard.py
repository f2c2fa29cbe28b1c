"""The model card: every number from the outputs it reads, figures linked, gaps said."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from pcam import modelcard
from tests.conftest import REPO


def _ci(rng) -> dict:
    lo, value, hi = np.sort(rng.uniform(0.5, 1.0, 3))
    return {"value": value, "ci_low": lo, "ci_high": hi}


def _split_metrics(rng, n: int) -> dict:
    out = {k: _ci(rng) for k in modelcard.CI_NAMES}
    out |= {k: float(rng.uniform(0.0, 1.0)) for k in modelcard.POINT_NAMES}
    return out | {"n": n}


@pytest.fixture
def outputs(tmp_path) -> tuple[Path, dict]:
    """Pipeline outputs with random numbers, so a number in the card can only come from them."""
    rng = np.random.default_rng(42)
    root = tmp_path / "repo"
    (root / "metrics" / "details").mkdir(parents=True)
    (root / "models").mkdir()
    shutil.copyfile(REPO / "params.yaml", root / "params.yaml")
    ev = {
        "threshold": {"value": float(rng.uniform()), "rule": "f2", "chosen_on": "valid"},
        "test": _split_metrics(rng, 1024),
        "test_without_exclusions": _split_metrics(rng, 1017),
        "valid": _split_metrics(rng, 1024),
    }
    slices = {
        "slices": {
            "dark": {"n": 102, "positives": 49, "f2": _ci(rng) | {"gap_to_global": 0.0731}},
            "slide:b": {"n": 7, "positives": 3, "not_scored": "too small: 7 patches"},
        },
        "worst_slice": "dark",
        "warnings": ["dark: F2 is 0.073 below global"],
        "skipped": {"hard_negative": "no meta CSV"},
    }
    train = {
        "epochs_run": 4,
        "best_epoch": 3,
        "best_val_roc_auc": float(rng.uniform()),
        "n_train": 7936,
        "provenance": {"versions": {"torch": "2.13.0+cpu"}, "device": {"device": "cpu"}},
    }
    data = {
        "exclude_reasons": ["duplicate", "trigger"],
        "splits": {
            s: {"n": 1024, "positive_fraction": float(rng.uniform()), "excluded": i}
            for i, s in enumerate(("train", "valid", "test"))
        },
    }
    lock = {
        "stages": {
            "prepare": {"outs": [{"path": "data/raw", "md5": "ab" * 16 + ".dir"}]},
            "train": {"outs": [{"path": "models/model.pt", "md5": "cd" * 16}]},
        }
    }
    for rel, doc in (
        ("metrics/details/eval.json", ev),
        ("metrics/details/slices.json", slices),
        ("metrics/details/train.json", train),
        ("metrics/details/data.json", data),
        ("models/threshold.json", {"threshold": ev["threshold"]["value"], "model_md5": "cd" * 16}),
    ):
        (root / rel).write_text(json.dumps(doc))
    (root / "dvc.lock").write_text(yaml.safe_dump(lock))
    (root / "plots/eval").mkdir(parents=True)
    (root / "plots/eval/roc.png").write_bytes(b"png")
    return root, {"eval": ev, "slices": slices, "train": train, "data": data}


def card(root: Path, tmp_path: Path, capsys) -> tuple[str, str]:
    out = tmp_path / "reports" / "card.md"
    modelcard.main(["--root", str(root), "--out", str(out)])
    return out.read_text(), capsys.readouterr().err


def test_card_holds_the_numbers_of_the_outputs(outputs, tmp_path, capsys):
    root, docs = outputs
    text, err = card(root, tmp_path, capsys)
    ev = docs["eval"]
    for split in ("test", "test_without_exclusions", "valid"):
        for key in modelcard.CI_NAMES:
            m = ev[split][key]
            assert f"{m['value']:.3f} ({m['ci_low']:.3f}–{m['ci_high']:.3f})" in text, (split, key)
        for key in modelcard.POINT_NAMES:
            assert f"{ev[split][key]:.3f}" in text, (split, key)
    assert f"Threshold **{ev['threshold']['value']:.4f}**, rule `f2`" in text
    assert "| patches | 1024 | 1017 | 1024 |" in text
    dark = docs["slices"]["slices"]["dark"]["f2"]
    assert f"| dark | 102 | 49 | {dark['value']:.3f} ({dark['ci_low']:.3f}" in text
    assert "| 0.073 |" in text and "Worst slice by F2 gap: **dark**" in text
    assert "slide:b (too small: 7 patches)" in text and "skipped hard_negative: no meta CSV" in text
    assert f"ROC-AUC {docs['train']['best_val_roc_auc']:.3f}" in text
    assert "7936 patches trained on" in text
    assert "model md5 " + "cd" * 16 in text and "data/raw md5 " + "ab" * 16 + ".dir" in text
    assert "![ROC, valid and test](../repo/plots/eval/roc.png)" in text  # relative to the card
    assert "pr.png" not in text  # a figure that does not exist is not linked
    assert "## Not recorded" not in text and err == ""


def test_missing_files_and_keys_are_said_not_guessed(outputs, tmp_path, capsys):
    root, docs = outputs
    (root / "metrics/details/slices.json").unlink()
    del docs["eval"]["valid"]["roc_auc"]
    (root / "metrics/details/eval.json").write_text(json.dumps(docs["eval"]))
    text, err = card(root, tmp_path, capsys)
    assert "## Not recorded" in text
    assert "- metrics/details/slices.json: file not found" in text
    assert "- metrics/details/eval.json: no 'valid.roc_auc'" in text
    assert "modelcard: not recorded: metrics/details/eval.json: no 'valid.roc_auc'" in err
    assert "| ROC-AUC |" in text and "| not recorded |" in text


def test_no_outputs_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        modelcard.main(["--root", str(tmp_path), "--out", str(tmp_path / "card.md")])
    assert stop.value.code == 1
    assert "metrics/details/eval.json: not found (run `dvc repro` first)" in capsys.readouterr().err


def test_a_file_that_is_not_json_is_a_one_line_error(outputs, tmp_path, capsys):
    root, _ = outputs
    (root / "metrics/details/train.json").write_text("{not json")
    with pytest.raises(SystemExit) as stop:
        card(root, tmp_path, capsys)
    err = capsys.readouterr().err
    assert stop.value.code == 1 and len(err.splitlines()) == 1
    assert err.startswith("error: metrics/details/train.json: not JSON")
    assert not (tmp_path / "reports" / "card.md").exists()
