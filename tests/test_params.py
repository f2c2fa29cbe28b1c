"""params.yaml loads strictly: unknown keys, wrong types and out-of-range values are errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from pcam.params import ParamsError, declared_params, load_params, to_dict
from tests.conftest import REPO


def write_params(tmp_path: Path, edit) -> Path:
    doc = yaml.safe_load((REPO / "params.yaml").read_text())
    edit(doc)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_committed_params_load():
    p = load_params(REPO / "params.yaml")
    assert p.data.source in ("synthetic", "pcam")
    assert p.train.lr > 0
    # frozen: a stage cannot change its configuration behind params.yaml's back
    with pytest.raises(AttributeError):
        p.train.lr = 1.0  # type: ignore[misc]


def test_typo_names_key_file_and_suggestion(tmp_path):
    def edit(d):
        d["train"]["learning_rate"] = d["train"].pop("lr")

    path = write_params(tmp_path, edit)
    with pytest.raises(ParamsError) as err:
        load_params(path)
    msg = str(err.value)
    assert str(path) in msg
    assert "train.learning_rate" in msg
    # no name is close, but 'lr' is the one key missing: that is the suggestion
    assert "did you mean 'train.lr'?" in msg


def test_close_typo_suggests_the_right_key(tmp_path):
    path = write_params(tmp_path, lambda d: d["train"].__setitem__("epcohs", 3))
    with pytest.raises(
        ParamsError, match=r"unknown key 'train.epcohs'; did you mean 'train.epochs'"
    ):
        load_params(path)


def test_unknown_section(tmp_path):
    path = write_params(tmp_path, lambda d: d.__setitem__("trian", {}))
    with pytest.raises(ParamsError, match=r"unknown key 'trian'; did you mean 'train'"):
        load_params(path)


def test_missing_key_is_an_error_not_a_hidden_default(tmp_path):
    path = write_params(tmp_path, lambda d: d["train"].pop("seed"))
    with pytest.raises(ParamsError, match=r"missing key 'train.seed'"):
        load_params(path)


@pytest.mark.parametrize(
    ("section", "key", "value", "pattern"),
    [
        ("train", "epochs", "three", r"train.epochs = 'three' must be an integer"),
        ("train", "epochs", 2.5, r"train.epochs = 2.5 must be an integer"),
        ("train", "epochs", True, r"train.epochs = True must be an integer"),
        ("train", "lr", "fast", r"train.lr = 'fast' must be a finite number"),
        ("train", "lr", 0.0, r"train.lr = 0.0 out of range: must be > 0"),
        ("train", "lr", -1e-3, r"train.lr = -0.001 out of range"),
        ("train", "batch_size", 0, r"train.batch_size = 0 out of range: must be >= 1"),
        ("train", "model", "resnet9000", r"train.model = 'resnet9000' is not one of"),
        ("data", "source", "synthetc", r"did you mean 'synthetic'"),
        ("slice", "dark_fraction", 1.5, r"slice.dark_fraction = 1.5 out of range: must be <= 1"),
        ("evaluate", "threshold", "f3", r"evaluate.threshold = 'f3' must be one of"),
        ("evaluate", "threshold", 1.5, r"evaluate.threshold = 1.5 must be within \[0, 1\]"),
        (
            "drift",
            "feature_shift_max",
            0,
            r"drift.feature_shift_max = 0.0 out of range: must be > 0",
        ),
        ("drift", "prediction_ks_max", 1.5, r"drift.prediction_ks_max = 1.5 out of range"),
        ("drift", "reference_patches", 10, r"drift.reference_patches = 10 out of range"),
        ("benchmark", "batch_sizes", [], r"benchmark.batch_sizes = list must be a non-empty list"),
        ("benchmark", "batch_sizes", [8, "x"], r"benchmark.batch_sizes\[1\] = 'x' must be an"),
    ],
)
def test_wrong_type_or_range_names_key_and_value(tmp_path, section, key, value, pattern):
    path = write_params(tmp_path, lambda d: d[section].__setitem__(key, value))
    with pytest.raises(ParamsError, match=pattern) as err:
        load_params(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("rule", ["f2", "f1", "youden", "sensitivity@0.95", 0.5, 1])
def test_threshold_rules_accepted(tmp_path, rule):
    path = write_params(tmp_path, lambda d: d["evaluate"].__setitem__("threshold", rule))
    assert load_params(path).evaluate.threshold == rule


def test_exponent_without_dot_reads_as_float(tmp_path):
    # `dvc exp run -S train.lr=1e-4` writes 1e-4, which plain YAML 1.1 would read as a string.
    path = tmp_path / "params.yaml"
    text = (REPO / "params.yaml").read_text().replace("lr: 0.002", "lr: 1e-4")
    assert "lr: 1e-4" in text
    path.write_text(text)
    assert load_params(path).train.lr == pytest.approx(1e-4)


def test_invalid_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)
    with pytest.raises(ParamsError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")


def test_to_dict_round_trips(tmp_path):
    p = load_params(REPO / "params.yaml")
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(to_dict(p)))
    assert load_params(path) == p


def test_declared_params_are_dvc_yaml_s_list_with_params_yaml_s_values(tmp_path):
    dvc_yaml, params = REPO / "dvc.yaml", REPO / "params.yaml"
    p = load_params(params)
    got = declared_params("train", dvc_yaml, params)
    stage = yaml.safe_load(dvc_yaml.read_text())["stages"]["train"]
    assert list(got) == stage["params"]  # dvc.yaml's keys, in its order: no more, no fewer
    assert got["data.memory_budget_gb"] == p.data.memory_budget_gb
    assert got["train.augment.flips"] == p.train.augment.flips
    assert "data.pcam.timeout_s" not in got
    with pytest.raises(ParamsError, match=r"nope.yaml: not found"):
        declared_params("train", tmp_path / "nope.yaml", params)
    with pytest.raises(ParamsError, match=r"dvc.yaml: no stage 'trian'"):
        declared_params("trian", dvc_yaml, params)
    renamed = tmp_path / "dvc.yaml"
    renamed.write_text(dvc_yaml.read_text().replace("- train.lr\n", "- train.learning_rate\n"))
    with pytest.raises(ParamsError, match=r"stage 'train' declares train.learning_rate, not in"):
        declared_params("train", renamed, params)


def test_the_reads_recorder_sees_each_leaf_read_and_nothing_else():
    # tests/params_reads.py, which tests/test_params_reads_e2e.py runs every stage under.
    from tests.params_reads import recording

    reads: set[str] = set()
    p = recording(load_params(REPO / "params.yaml"), reads)
    assert isinstance(p.train.augment, type(load_params(REPO / "params.yaml").train.augment))
    assert reads == set()  # sections are not leaves
    assert p.train.lr > 0 and p.train.augment.flips in (True, False)
    assert reads == {"train.lr", "train.augment.flips"}
    copy = dataclasses.replace(p.evaluate, batch_size=1)  # reads every field it keeps
    fields = {f"evaluate.{f.name}" for f in dataclasses.fields(copy)}
    assert reads - {"train.lr", "train.augment.flips"} == fields - {"evaluate.batch_size"}
    reads.clear()
    assert copy.batch_size == 1 and copy.threshold == p.evaluate.threshold
    assert reads == {"evaluate.threshold"}  # the copy's reads are not params.yaml's
    reads.clear()
    to_dict(p.slice)
    assert reads == {f"slice.{f.name}" for f in dataclasses.fields(p.slice)}


def test_the_first_mistake_in_the_file_is_the_one_reported(tmp_path):
    # validate is read before slice (params.yaml's order): its cross-key check must fire first.
    def edit(d):
        d["validate"]["min_positive_fraction"] = 0.8
        d["validate"]["max_positive_fraction"] = 0.2
        d["slice"]["min_size"] = 0

    with pytest.raises(ParamsError, match=r"validate\.min_positive_fraction = 0\.8 is above"):
        load_params(write_params(tmp_path, edit))
