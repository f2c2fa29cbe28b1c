"""Bad inputs, one row each: how to break the input, the command, what its one line must say.

Every row runs the real command in a fresh work directory (tiny PCAM data, the committed
params.yaml, a trained checkpoint, and earlier outputs of the stage) and checks the project's
standard: exit 1, one line `error: ...` that names the place (file, key, line, index) and is the
last thing printed, no traceback, and the earlier outputs untouched (no half-written files). A
new bad input is one more row. Failures under `dvc repro` (outputs that DVC deletes) are in
tests/test_nothing_lost_e2e.py.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml

from pcam import h5io
from pcam.checkpoint import save_checkpoint
from pcam.params import load_params
from pcam.training import train
from pcam.validation import label_problems
from tests.conftest import REPO, write_tiny_split
from tests.e2e import env as e2e_env
from tests.e2e import set_params
from tests.test_download import serving
from tests.test_training import MEAN, STD, params, prov, tiny_split


def stage(name: str) -> list[str]:
    return [sys.executable, str(REPO / "stages" / f"{name}.py")]


# prepare, with the download's md5 table swapped for the tiny served files' (md5.json).
PREPARE_WITH_TEST_MD5 = [
    sys.executable,
    "-c",
    "import json, runpy, sys; from pcam import download; "
    "download.PCAM_MD5 = json.load(open('md5.json')); "
    "runpy.run_path(sys.argv[1], run_name='__main__')",
    str(REPO / "stages" / "prepare.py"),
]

RESTORE = [sys.executable, "-m", "pcam.restore"]
DVC = str(Path(sys.executable).parent / "dvc")

VALIDATE_OUTS = ("data/validated/exclusions.json", "metrics/data.json", "plots/data/black.png")
EVALUATE_OUTS = (
    "data/predictions/test.npz",
    "models/threshold.json",
    "metrics/eval.json",
    "plots/eval/roc.png",
)
PREPARE_OUTS = tuple(f"data/raw/{name}" for name in (h5io.x_name("train"), h5io.meta_name("test")))


@dataclass(frozen=True)
class Case:
    id: str
    command: list[str]
    # Breaks the input in the work directory; the ExitStack ends what it starts (servers).
    break_input: Callable[[Path, contextlib.ExitStack], None]
    expect: tuple[str, ...]  # regexes the error line must match
    outputs: tuple[str, ...]  # earlier outputs the failure must leave as they were


# --- ways to break an input --------------------------------------------------------------------


def raw(work: Path, split: str) -> tuple[Path, Path, Path]:
    return h5io.split_files(work / "data" / "raw", split)


def set_labels(split: str, y: list[int]):
    def apply(work: Path, _stack) -> None:
        labels = np.array(y, dtype=np.uint8)
        _, yp, mp = raw(work, split)
        h5io.write_h5_dataset(yp, "y", labels.reshape(-1, 1, 1, 1))
        meta = h5io.read_meta(mp)  # keep the meta CSV agreeing: only the labels are at fault
        h5io.write_meta(mp, _with_centre(meta, labels.astype(bool)))

    return apply


def _with_centre(meta: h5io.Meta, centre: np.ndarray) -> h5io.Meta:
    return h5io.Meta(meta.coord_y, meta.coord_x, meta.tumor_patch, centre, meta.wsi)


def contradict_meta(split: str):
    def apply(work: Path, _stack) -> None:
        _, yp, mp = raw(work, split)
        y = h5io.read_labels(yp)
        h5io.write_meta(mp, _with_centre(h5io.read_meta(mp), y == 0))

    return apply


def meta_bytes_at(split: str, line: int, junk: bytes):
    def apply(work: Path, _stack) -> None:
        mp = raw(work, split)[2]
        lines = mp.read_bytes().split(b"\n")
        lines[line - 1] = lines[line - 1].replace(b"slide", junk, 1)
        mp.write_bytes(b"\n".join(lines))

    return apply


def remove(rel: str):
    return lambda work, _stack: (work / rel).unlink()


def write_y(split: str, index: int, value: int):
    def apply(work: Path, _stack) -> None:
        y = np.zeros((16, 1, 1, 1), np.uint8)
        y[1::2] = 1
        y[index] = value
        with h5py.File(raw(work, split)[1], "w") as f:
            f.create_dataset("y", data=y)

    return apply


def black_patches(split: str, rows: int):
    def apply(work: Path, _stack) -> None:
        xp = raw(work, split)[0]
        with h5py.File(xp, "r") as f:
            x = f["x"][:]
        x[:rows] = 0
        h5io.write_h5_dataset(xp, "x", x)

    return apply


def params_text(edit: Callable[[str], str]):
    def apply(work: Path, _stack) -> None:
        path = work / "params.yaml"
        path.write_text(edit(path.read_text()))

    return apply


def params_set(**dotted):
    return lambda work, _stack: set_params(
        work, {k.replace("__", "."): v for k, v in dotted.items()}
    )


def checkpoint_edit(edit: Callable[[dict], None]):
    def apply(work: Path, _stack) -> None:
        path = work / "models" / "model.pt"
        ckpt = torch.load(path, weights_only=True)
        del ckpt["format"]
        edit(ckpt)
        save_checkpoint(path, ckpt)

    return apply


def serve_meta_cut_short(work: Path, stack: contextlib.ExitStack) -> None:
    """The official layout on 127.0.0.1; train's meta CSV ends one row early at a line end,
    with no Content-Length: it parses, only its md5 can tell."""
    served = stack.enter_context(serving(work / "server"))
    name = h5io.meta_name("train")
    data = (served.root / name).read_bytes()
    served.server.cut_unannounced[name] = data.rindex(b"\n", 0, len(data) - 1) + 1
    (work / "md5.json").write_text(json.dumps(served.md5))
    set_params(
        work,
        {
            "data.source": "pcam",
            "data.pcam.base_url": served.url,
            "data.pcam.retries": 0,
            "data.pcam.timeout_s": 10,
        },
    )


def dvc_repo_recording(stages: dict):
    """Make the work directory a DVC repository whose dvc.lock records `stages`."""

    def apply(work: Path, _stack) -> None:
        subprocess.run([DVC, "init", "--no-scm", "-q"], cwd=work, check=True, env=e2e_env())
        (work / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": stages}))

    return apply


def drop_key(key: str):
    return checkpoint_edit(lambda ckpt: ckpt.pop(key))


def unknown_model(ckpt: dict) -> None:
    ckpt["model_config"] = {"model": "vit", "width": 16}


# --- the table ---------------------------------------------------------------------------------

CASES = [
    # validate-data: structure (folded in from test_validation.py)
    Case(
        "test x file missing",
        stage("validate_data"),
        remove("data/raw/camelyonpatch_level_2_split_test_x.h5"),
        (r"camelyonpatch_level_2_split_test_x\.h5: file not found",),
        VALIDATE_OUTS,
    ),
    Case(
        "label 7",
        stage("validate_data"),
        write_y("train", 3, 7),
        (r"split_train_y\.h5: dataset 'y' has label 7 at index 3",),
        VALIDATE_OUTS,
    ),
    Case(
        "too many patches flagged",
        stage("validate_data"),
        black_patches("train", 8),
        (r"train: 8 of 16 patches flagged", "validate.max_excluded_fraction"),
        VALIDATE_OUTS,
    ),
    # validate-data: label sanity
    Case(
        "train split of one class",
        stage("validate_data"),
        set_labels("train", [0] * 16),
        (r"split_train_y\.h5: split 'train' has only label 0 \(16 patches\)", "one_class: warn"),
        VALIDATE_OUTS,
    ),
    Case(
        "valid split 14 of 16 positive",
        stage("validate_data"),
        set_labels("valid", [1] * 14 + [0] * 2),
        (r"split_valid_y\.h5: split 'valid' has positive fraction 0\.8750 \(14 of 16\)",),
        VALIDATE_OUTS,
    ),
    Case(
        "labels contradict center_tumor_patch on every row",
        stage("validate_data"),
        contradict_meta("test"),
        (
            r"split_test_meta\.csv: 16 of 16 labels in camelyonpatch_level_2_split_test_y\.h5 "
            r"\(100\.0%\) differ from center_tumor_patch \(first at index 0",
        ),
        VALIDATE_OUTS,
    ),
    Case(
        "meta CSV with latin-1 bytes",
        stage("validate_data"),
        meta_bytes_at("valid", 5, "slïde".encode("latin-1")),
        (r"split_valid_meta\.csv:5: not UTF-8 text \(byte 0xef at offset \d+\)",),
        VALIDATE_OUTS,
    ),
    # params.yaml
    Case(
        "duplicate key",
        stage("validate_data"),
        params_text(lambda t: t.replace("  lr: 0.002\n", "  lr: 0.002\n  lr: 0.02\n")),
        (r"params\.yaml:\d+: duplicate key 'train\.lr' \(first at line \d+\)",),
        VALIDATE_OUTS,
    ),
    Case(
        "duplicate section",
        stage("validate_data"),
        params_text(lambda t: t + "\ntrain:\n  lr: 0.1\n"),
        (r"params\.yaml:\d+: duplicate section 'train' \(first at line \d+\)",),
        VALIDATE_OUTS,
    ),
    Case(
        "unclosed flow list",
        stage("validate_data"),
        params_text(lambda t: t.replace("  epochs: 4\n", "  epochs: [4\n")),
        (r"params\.yaml:\d+:\d+: not valid YAML: .*\(while parsing a flow sequence at line \d+\)",),
        VALIDATE_OUTS,
    ),
    Case(
        "tab indentation",
        stage("validate_data"),
        params_text(lambda t: t.replace("  epochs: 4\n", "\tepochs: 4\n")),
        (r"params\.yaml:\d+:1: not valid YAML: found character '\\t'",),
        VALIDATE_OUTS,
    ),
    Case(
        "positive fraction range upside down",
        stage("validate_data"),
        params_set(validate__min_positive_fraction=0.8, validate__max_positive_fraction=0.2),
        (r"validate\.min_positive_fraction = 0\.8 is above validate\.max_positive_fraction",),
        VALIDATE_OUTS,
    ),
    # evaluate: the checkpoint
    Case(
        "train.model changed after training",
        stage("evaluate"),
        params_set(train__model="mlp"),
        (
            r"model\.pt: checkpoint holds model 'cnn' \(width \d+\) but params\.yaml asks for "
            r"model 'mlp' \(hidden_units \d+\)",
        ),
        EVALUATE_OUTS,
    ),
    Case(
        "checkpoint names an unknown model",
        stage("evaluate"),
        checkpoint_edit(unknown_model),
        (r"model\.pt: checkpoint model_config names unknown model 'vit'",),
        EVALUATE_OUTS,
    ),
    Case(
        "checkpoint without normalisation",
        stage("evaluate"),
        drop_key("normalisation"),
        (r"model\.pt: checkpoint has no normalisation",),
        EVALUATE_OUTS,
    ),
    Case(
        "checkpoint without model_config",
        stage("evaluate"),
        drop_key("model_config"),
        (r"model\.pt: checkpoint has no model_config",),
        EVALUATE_OUTS,
    ),
    # pcam.restore, the way back after a failure under DVC
    Case(
        "restore outside a DVC repository",
        RESTORE + ["train"],
        lambda work, _stack: None,
        (r"dvc: you are not inside of a DVC repository",),
        (),
    ),
    Case(
        "restore of a stage dvc.lock does not record",
        RESTORE + ["trian"],
        dvc_repo_recording({"train": {"cmd": "python stages/train.py"}}),
        (r"dvc\.lock: no stage 'trian' \(recorded: train\)",),
        (),
    ),
    # prepare: the official download
    Case(
        "meta CSV cut short, no Content-Length",
        PREPARE_WITH_TEST_MD5,
        serve_meta_cut_short,
        (r"md5 mismatch for camelyonpatch_level_2_split_train_meta\.csv: expected [0-9a-f]{32}",),
        PREPARE_OUTS,
    ),
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A finished checkpoint of the committed architecture (so evaluate accepts it as is)."""
    path = tmp_path_factory.mktemp("model") / "model.pt"
    p = params(epochs=1, width=load_params(REPO / "params.yaml").train.width)
    train(p, tiny_split("train", 32, 0), tiny_split("valid", 16, 1), MEAN, STD, path, prov(p))
    return path


def make_workdir(work: Path, checkpoint: Path, outputs: tuple[str, ...]) -> None:
    shutil.copy(REPO / "params.yaml", work / "params.yaml")
    for i, split in enumerate(h5io.SPLITS):
        write_tiny_split(work / "data" / "raw", split, n=16, seed=i)
    (work / "models").mkdir()
    shutil.copy(checkpoint, work / "models" / "model.pt")
    (work / "data" / "validated").mkdir(parents=True)
    (work / "data" / "validated" / "exclusions.json").write_text(
        json.dumps({"exclude_reasons": [], "splits": {}})
    )
    for rel in outputs:  # an earlier run's outputs: a failure must leave them as they were
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).write_text(f"earlier {rel}")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gives_one_clear_line(case: Case, tmp_path, checkpoint):
    make_workdir(tmp_path, checkpoint, case.outputs)
    with contextlib.ExitStack() as stack:
        case.break_input(tmp_path, stack)
        proc = subprocess.run(
            case.command, cwd=tmp_path, capture_output=True, text=True, timeout=600
        )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    # One error line, the last one (a download's progress bars may come before it).
    assert errors == lines[-1:], proc.stderr
    for pattern in case.expect:
        assert re.search(pattern, errors[0]), errors[0]
    for rel in case.outputs:
        assert (tmp_path / rel).read_text() == f"earlier {rel}", rel
    assert not list(tmp_path.rglob("*.tmp"))


# --- label checks set to warn ------------------------------------------------------------------


def test_label_check_set_to_warn_reports_and_goes_on(tmp_path, checkpoint):
    make_workdir(tmp_path, checkpoint, ())
    set_labels("train", [0] * 16)(tmp_path, None)
    set_params(tmp_path, {"validate.label_checks.one_class": "warn"})
    proc = subprocess.run(stage("validate_data"), cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    warning = "split_train_y.h5: split 'train' has only label 0 (16 patches)"
    assert proc.stderr.startswith("validate-data: warning: data/raw/camelyonpatch_level_2_")
    assert warning in proc.stderr
    report = json.loads((tmp_path / "metrics" / "details" / "data.json").read_text())
    assert len(report["warnings"]) == 1 and warning in report["warnings"][0]


def test_meta_agreement_is_skipped_without_a_meta_csv(tmp_path):
    p = load_params(REPO / "params.yaml").validate
    y = np.array([0, 1] * 8, dtype=np.uint8)
    meta_path, y_path = tmp_path / "meta.csv", tmp_path / "y.h5"
    contradicting = h5io.Meta(y, y, y == 1, y == 0, np.array(["s"] * 16))
    checks = [c for c, _ in label_problems("train", y_path, y, meta_path, contradicting, p)]
    assert checks == ["meta_agreement"]
    assert label_problems("train", y_path, y, meta_path, None, p) == []
