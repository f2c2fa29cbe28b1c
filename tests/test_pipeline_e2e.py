"""The whole pipeline through the real dvc CLI, in a temporary git copy of the repo, tiny sizes."""

from __future__ import annotations

import json
import math

import pytest

from pcam import h5io
from tests.e2e import TINY, copy_repo, dvc, read_json, run

pytestmark = pytest.mark.e2e

STAGES = ("prepare", "validate-data", "compute-stats", "train", "evaluate", "slice", "benchmark")


@pytest.fixture(scope="module")
def repro_repo(tmp_path_factory):
    repo = copy_repo(tmp_path_factory.mktemp("e2e") / "repo", TINY)
    out = dvc(["repro"], repo)
    for stage in STAGES:
        assert f"Running stage '{stage}'" in out.stdout, out.stdout
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-q", "-m", "repro"], repo)
    return repo


def test_repro_writes_every_declared_output(repro_repo):
    raw = repro_repo / "data" / "raw"
    for split in h5io.SPLITS:
        for path in h5io.split_files(raw, split):
            assert path.is_file(), path
    for rel in (
        "data/validated/exclusions.json",
        "data/stats.json",
        "models/model.pt",
        "data/predictions/valid.npz",
        "data/predictions/test.npz",
        "models/threshold.json",
        "metrics/data.json",
        "metrics/train.json",
        "metrics/eval.json",
        "metrics/slices.json",
        "metrics/benchmark.json",
        "plots/eval/roc_test.csv",
        "plots/eval/roc.png",
        "dvclive/plots/metrics/train/loss.tsv",
        "dvclive/plots/metrics/val/roc_auc.tsv",
    ):
        assert (repro_repo / rel).is_file(), rel
    ev = read_json(repro_repo / "metrics/eval.json")
    assert 0.0 <= ev["test"]["roc_auc"] <= 1.0
    assert ev["threshold"]["chosen_on"] == "valid"
    # second repro: nothing to do, everything is cached and current
    again = dvc(["repro"], repro_repo)
    assert "Running stage" not in again.stdout


def test_status_clean_after_repro(repro_repo):
    status = json.loads(dvc(["status", "--json"], repro_repo).stdout)
    assert status == {}


def test_experiment_shows_in_exp_show_metrics_diff_and_plots_diff(repro_repo):
    before = read_json(repro_repo / "metrics/train.json")
    dvc(["exp", "run", "-S", "train.lr=0.02", "-n", "lr-0.02"], repro_repo)
    after = read_json(repro_repo / "metrics/train.json")
    assert after["final"]["val_loss"] != before["final"]["val_loss"]

    show = json.loads(dvc(["exp", "show", "--json"], repro_repo).stdout)
    flat = json.dumps(show)
    assert "lr-0.02" in flat
    # the baseline commit and the experiment both carry eval metrics
    assert flat.count('"roc_auc"') >= 2

    diff = json.loads(dvc(["metrics", "diff", "--json"], repro_repo).stdout)
    assert "metrics/train.json" in diff
    assert "final.val_loss" in diff["metrics/train.json"]
    assert "metrics/eval.json" in diff

    plots = json.loads(dvc(["plots", "diff", "--json"], repro_repo).stdout)["data"]
    (roc,) = plots["plots/eval/roc_test.csv"]
    values = roc["content"]["data"]["values"]
    assert {row["rev"] for row in values} == {"workspace", "HEAD"}  # baseline and experiment
    # no Infinity threshold in what DVC hands to Vega (breaks rendering)
    assert all(math.isfinite(float(row["threshold"])) for row in values)
