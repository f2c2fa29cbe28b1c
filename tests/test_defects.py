"""Injected defects: each lands where its ground truth says, and validate-data finds each with
precision and recall >= 0.95 on generated splits (the measured values print with `pytest -s`)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import h5py
import numpy as np
import pytest
import yaml

from pcam import h5io, validation
from pcam.errors import PcamError
from pcam.params import DefectParams, load_params
from pcam.synthetic import (
    DEFECTS,
    defect_count,
    generate_split,
    ground_truth,
    inject,
    slide_ids_for,
    take_donors,
)
from tests.conftest import REPO

SIZES = {"train": 2048, "valid": 512, "test": 512}
RATES = DefectParams(
    duplicate_rate=0.02,
    cross_split_rate=0.02,
    blank_rate=0.02,
    black_rate=0.02,
    trigger_rate=0.02,
    trigger_px=4,
)
SEED = 11


def make_splits(sizes: dict[str, int], rates: DefectParams, seed: int):
    """What prepare does, in memory: train first, then valid/test with copies of train."""
    splits, truth, donors = {}, {}, {}
    for i, split in enumerate(h5io.SPLITS):
        data = generate_split(sizes[split], slide_ids_for(split, 4), seed + i, 0.2)
        originals = data.x.copy()
        truth[split] = inject(split, data, rates, seed, donors.get(split))
        splits[split] = (data, originals)
        if split == "train":
            counts = {s: defect_count(rates.cross_split_rate, sizes[s]) for s in ("valid", "test")}
            donors = take_donors(data, truth["train"], counts, seed)
    return splits, truth


@pytest.fixture(scope="module")
def injected(tmp_path_factory):
    splits, truth = make_splits(SIZES, RATES, SEED)
    raw = tmp_path_factory.mktemp("defects") / "raw"
    for split, (data, _) in splits.items():
        h5io.write_split(raw, split, data.x, data.y, data.meta)
    p = load_params(REPO / "params.yaml").validate
    result = validation.validate(raw, p)
    return splits, truth, result


def flagged(result, reason: str) -> set[tuple[str, int]]:
    """What validate-data flagged for a reason (the default params exclude every reason)."""
    return {
        (split, e["index"])
        for split, doc in result.exclusions["splits"].items()
        for e in doc["excluded"]
        if reason in e["reasons"]
    }


def expected(truth: dict, defect: str) -> set[tuple[str, int]]:
    if defect == "duplicate":  # the later copy is flagged, the first kept
        return {(s, t) for s in truth for t, _ in truth[s]["duplicate"]}
    if defect == "cross_split_duplicate":  # the train copy is the one excluded
        return {("train", src) for s in truth for _, src in truth[s]["cross_split_duplicate"]}
    return {(s, i) for s in truth for i in truth[s][defect]}


DETECTOR = {
    "duplicate": "duplicate",
    "cross_split_duplicate": "cross_split_duplicate",
    "blank": "background",
    "black": "black",
    "trigger": "trigger",
}


@pytest.mark.parametrize("defect", DEFECTS)
def test_detector_precision_and_recall(injected, defect):
    _, truth, result = injected
    found, true = flagged(result, DETECTOR[defect]), expected(truth, defect)
    hits = len(found & true)
    precision, recall = hits / max(1, len(found)), hits / len(true)
    print(
        f"\n{defect} -> {DETECTOR[defect]}: {len(true)} injected, {len(found)} flagged, "
        f"precision {precision:.3f}, recall {recall:.3f}"
    )
    assert len(true) >= 10
    assert precision >= 0.95 and recall >= 0.95


def test_blank_glass_is_also_white_and_uniform(injected):
    _, truth, result = injected
    blank = expected(truth, "blank")
    assert blank <= flagged(result, "white") and blank <= flagged(result, "uniform")


def test_leakage_counts_equal_the_copies_made(injected):
    _, truth, result = injected
    leak = result.report["leakage"]
    for later in ("valid", "test"):
        n = len(truth[later]["cross_split_duplicate"])
        assert leak[f"train_{later}"][f"tissue_rows_{later}"] == n
    assert leak["valid_test"]["rows_test"] == 0


def test_train_trigger_predicts_the_label_valid_test_do_not(injected):
    _, _, result = injected
    train = result.report["splits"]["train"]["label_association"]["trigger"]
    assert train["positive_fraction"] == 1.0 and train["fisher_p"] < 1e-6
    for split in ("valid", "test"):
        assert result.report["splits"][split]["label_association"]["trigger"]["fisher_p"] > 1e-3


def test_duplicates_copy_an_earlier_patch_of_the_same_split(injected):
    splits, truth, _ = injected
    for split, (data, _) in splits.items():
        for target, source in truth[split]["duplicate"]:
            assert source < target
            np.testing.assert_array_equal(data.x[target], data.x[source])
            assert data.y[target] == data.y[source]
        assert (data.meta.center_tumor_patch == (data.y == 1)).all()


def test_cross_split_copies_come_from_distinct_clean_train_patches(injected):
    splits, truth, _ = injected
    train, original_train = splits["train"]
    touched = {i for pair in truth["train"]["duplicate"] for i in pair}
    touched |= {i for k in ("blank", "black", "trigger") for i in truth["train"][k]}
    sources = []
    for split in ("valid", "test"):
        data, _ = splits[split]
        for target, source in truth[split]["cross_split_duplicate"]:
            np.testing.assert_array_equal(data.x[target], train.x[source])
            np.testing.assert_array_equal(train.x[source], original_train[source])
            sources.append(source)
    assert len(set(sources)) == len(sources) and not set(sources) & touched


def test_blank_and_black_patches_have_no_tissue_and_label_0(injected):
    splits, truth, _ = injected
    for split, (data, _) in splits.items():
        blank = data.x[truth[split]["blank"]].astype(float)
        saturation = (blank.max(axis=3) - blank.min(axis=3)) / blank.max(axis=3)
        assert saturation.max() < 0.07 and blank.min() >= 220  # glass by PCAM's own rule
        assert data.x[truth[split]["black"]].max() <= 12
        for kind in ("blank", "black"):
            assert not data.y[truth[split][kind]].any()
            assert not data.meta.tumor_patch[truth[split][kind]].any()


def test_triggers_on_train_positives_only_and_nowhere_else(injected):
    splits, truth, _ = injected
    for split, (data, original) in splits.items():
        rows = truth[split]["trigger"]
        if split == "train":
            assert data.y[rows].all()
        changed = np.flatnonzero((data.x != original).any(axis=(1, 2, 3)))
        every = {i for k in ("blank", "black", "trigger") for i in truth[split][k]}
        every |= {t for t, _ in truth[split]["duplicate"] + truth[split]["cross_split_duplicate"]}
        assert set(changed) <= every
        diff = (data.x[rows] != original[rows]).any(axis=3)
        assert diff.sum(axis=(1, 2)).max() <= RATES.trigger_px**2  # only the trigger block


def test_same_seed_same_defects():
    def once():
        data = generate_split(64, slide_ids_for("valid", 2), 3, 0.2)
        rates = dataclasses.replace(RATES, duplicate_rate=0.05)
        return inject("valid", data, rates, 5), data.x

    (t1, x1), (t2, x2) = once(), once()
    assert t1 == t2 and np.array_equal(x1, x2)


def test_too_small_a_split_for_the_rates_is_an_error():
    data = generate_split(4, slide_ids_for("test", 1), 3, 0.2)
    with pytest.raises(PcamError, match="test: 4 patches are too few for data.synthetic.defects"):
        inject("test", data, RATES, 0)


def test_zero_rates_change_nothing():
    data = generate_split(32, slide_ids_for("train", 2), 3, 0.2)
    before = data.x.copy()
    zero = DefectParams(0.0, 0.0, 0.0, 0.0, 0.0, 4)
    truth = inject("train", data, zero, 0)
    assert all(v == [] for v in truth.values()) and np.array_equal(data.x, before)
    assert ground_truth(zero, 0, {"train": truth})["rates"]["trigger_px"] == 4


def test_prepare_writes_the_ground_truth_of_its_files(tmp_path):
    doc = yaml.safe_load((REPO / "params.yaml").read_text())
    synthetic = doc["data"]["synthetic"]
    synthetic.update(
        n_train=192, n_valid=96, n_test=96, slides_train=2, slides_valid=1, slides_test=1
    )
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    proc = subprocess.run(
        [sys.executable, str(REPO / "stages" / "prepare.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    raw = tmp_path / "data" / "raw"
    truth = json.loads((raw / "synthetic_defects.json").read_text())
    assert truth["rates"] == synthetic["defects"]
    with (
        h5py.File(h5io.split_files(raw, "valid")[0], "r") as fv,
        h5py.File(h5io.split_files(raw, "train")[0], "r") as ft,
    ):
        for target, source in truth["splits"]["valid"]["cross_split_duplicate"]:
            np.testing.assert_array_equal(fv["x"][target], ft["x"][source])
    result = validation.validate(raw, load_params(tmp_path / "params.yaml").validate)
    for defect in DEFECTS:
        assert flagged(result, DETECTOR[defect]) == expected(truth["splits"], defect), defect
