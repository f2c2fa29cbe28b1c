"""The whole pipeline through the real dvc CLI, in a temporary git copy of the repo, tiny sizes."""

from __future__ import annotations

import csv
import io
import json
import math
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from sklearn import metrics as skm

from pcam import h5io
from pcam.checkpoint import load_checkpoint
from pcam.data import read_x
from tests.conftest import REPO
from tests.e2e import LEARNS, STAGES, TINY, copy_repo, dvc, env, read_json, run

pytestmark = pytest.mark.e2e

METRICS_FILES = ("data", "train", "eval", "slices", "benchmark")


@pytest.fixture(scope="module")
def repro_repo(tmp_path_factory):
    repo = copy_repo(tmp_path_factory.mktemp("e2e") / "repo", TINY | LEARNS)
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
        *(f"metrics/{name}.json" for name in METRICS_FILES),
        *(f"metrics/details/{name}.json" for name in METRICS_FILES),
        "plots/eval/roc_test.csv",
        "plots/eval/roc.png",
        "dvclive/plots/metrics/train/loss.tsv",
        "dvclive/plots/metrics/val/roc_auc.tsv",
    ):
        assert (repro_repo / rel).is_file(), rel
    ev = read_json(repro_repo / "metrics/details/eval.json")
    # The model learnt: on the untouched test split its ROC-AUC is above chance with 95%
    # confidence (a model that did not learn scores ~0.5, its interval reaching below 0.5).
    assert ev["test"]["roc_auc"]["ci_low"] > 0.6, ev["test"]["roc_auc"]
    assert ev["threshold"]["chosen_on"] == "valid"
    bench = read_json(repro_repo / "metrics/details/benchmark.json")
    assert len(bench["cpu_pins"]["rounds"]) == TINY["benchmark.repeats"]
    assert set(bench["inference"]) == {
        f"cpu_fp32_{layout}_bs{bs}" for layout in ("cl", "nchw") for bs in (1, 8)
    }
    # The headline figures are the measured ones: the best configuration, our loader against
    # the best naive one, every throughput row one measured configuration.
    inference = {k: v["images_per_s"] for k, v in bench["inference"].items()}
    assert bench["best_inference_images_per_s"] == max(inference.values())
    assert inference[bench["best_inference_configuration"]] == max(inference.values())
    delivery = {k: v["images_per_s"] for k, v in bench["data_delivery"].items()}
    naive = max(v for k, v in delivery.items() if k.startswith("naive_"))
    assert bench["loader_speedup_vs_naive"] == delivery["ours"] / naive
    assert set(delivery) == {"ours", "naive_workers0", "naive_workers1"}
    loop = bench["train_loop_vs_premade"]
    assert (
        bench["train_loop_images_per_s"]
        == loop["loop_images_per_s"]
        == float(np.median([r["loop_images_per_s"] for r in loop["rounds"]]))
    )
    throughput = (repro_repo / "plots/benchmark/throughput.csv").read_text().splitlines()
    measured = {
        f"infer_{k.rsplit('_bs', 1)[0]},{k.rsplit('_bs', 1)[1]}": v for k, v in inference.items()
    }
    measured |= {
        f"train_step_{k.rsplit('_bs', 1)[0]},{k.rsplit('_bs', 1)[1]}": v["images_per_s"]
        for k, v in bench["train_step"].items()
    }
    assert throughput[0] == "configuration,batch_size,images_per_s"
    assert {row.rsplit(",", 1)[0]: float(row.rsplit(",", 1)[1]) for row in throughput[1:]} == {
        k: round(v, 1) for k, v in measured.items()
    }
    # second repro: nothing to do, everything is cached and current
    again = dvc(["repro"], repro_repo)
    assert "Running stage" not in again.stdout


def test_headline_metrics_are_the_details_few_numbers(repro_repo):
    # What `dvc metrics diff` compares: a screenful, each number also in the stage's details.
    shown = json.loads(dvc(["metrics", "show", "--json"], repro_repo).stdout)
    rows = {
        (path, key) for path, data in shown[""]["data"].items() for key in _leaves(data["data"])
    }
    assert {path for path, _ in rows} == {f"metrics/{name}.json" for name in METRICS_FILES}
    assert len(rows) <= 40, sorted(rows)
    table = dvc(["metrics", "diff", "--all", "--md"], repro_repo).stdout.splitlines()
    assert len([line for line in table if line.startswith("| metrics/")]) == len(rows)
    headline = read_json(repro_repo / "metrics/eval.json")
    details = read_json(repro_repo / "metrics/details/eval.json")
    assert headline["threshold"] == details["threshold"]["value"]
    for split in ("valid", "test"):
        for name in ("roc_auc", "f2"):
            full = details[split][name]
            assert headline[split][name] == full["value"]
            assert headline[split][f"{name}_ci_low"] == full["ci_low"]
            assert headline[split][f"{name}_ci_high"] == full["ci_high"]
    train = read_json(repro_repo / "metrics/train.json")
    history = read_json(repro_repo / "metrics/details/train.json")
    assert train["best_epoch"] == history["best_epoch"]
    assert train["best_val_loss"] == history["best"]["val_loss"]
    # the model is the best epoch's: evaluate's valid ROC-AUC is that epoch's
    assert headline["valid"]["roc_auc"] == pytest.approx(history["best_val_roc_auc"], abs=1e-12)
    slices = read_json(repro_repo / "metrics/details/slices.json")
    worst = slices["slices"][slices["worst_slice"]]["f2"]["gap_to_global"]
    assert read_json(repro_repo / "metrics/slices.json") == {"worst_f2_gap": worst}


def _leaves(node, prefix=""):
    if isinstance(node, dict):
        return [leaf for k, v in node.items() for leaf in _leaves(v, f"{prefix}{k}.")]
    return [prefix[:-1]]


def test_status_clean_after_repro(repro_repo):
    status = json.loads(dvc(["status", "--json"], repro_repo).stdout)
    assert status == {}


def test_experiment_shows_in_exp_show_metrics_diff_and_plots_diff(repro_repo):
    before = read_json(repro_repo / "metrics/train.json")
    out = dvc(["exp", "run", "-S", "train.lr=0.02", "-n", "lr-0.02"], repro_repo).stdout
    after = read_json(repro_repo / "metrics/train.json")
    assert after["best_val_loss"] != before["best_val_loss"]
    # lr changes the model, not what the benchmark times: it is not re-run
    ran = [stage for stage in STAGES if f"Running stage '{stage}'" in out]
    assert ran == ["train", "evaluate", "slice"], out

    show = json.loads(dvc(["exp", "show", "--json"], repro_repo).stdout)
    flat = json.dumps(show)
    assert "lr-0.02" in flat
    # the baseline commit and the experiment both carry eval metrics
    assert flat.count('"roc_auc"') >= 2

    diff = json.loads(dvc(["metrics", "diff", "--json"], repro_repo).stdout)
    assert "metrics/train.json" in diff
    assert "best_val_loss" in diff["metrics/train.json"]
    assert "test.roc_auc" in diff["metrics/eval.json"]
    assert "metrics/benchmark.json" not in diff

    plots = json.loads(dvc(["plots", "diff", "--json"], repro_repo).stdout)["data"]
    (roc,) = plots["plots/eval/roc_test.csv"]
    values = roc["content"]["data"]["values"]
    assert {row["rev"] for row in values} == {"workspace", "HEAD"}  # baseline and experiment
    # no Infinity threshold in what DVC hands to Vega (breaks rendering)
    assert all(math.isfinite(float(row["threshold"])) for row in values)


def test_reported_test_metrics_recompute_from_saved_predictions(repro_repo):
    """An independent check: every test metric in eval.json, recomputed from the saved
    predictions with scikit-learn (ECE with a direct numpy formula), gives the same value."""
    ev = read_json(repro_repo / "metrics/details/eval.json")
    saved = np.load(repro_repo / "data/predictions/test.npz")
    y, prob = saved["label"].astype(int), saved["probability"]
    t = ev["threshold"]["value"]
    pred = prob >= t
    bins = np.minimum((prob * 15).astype(int), 14)
    ece = sum(abs(y[bins == b].sum() - prob[bins == b].sum()) for b in range(15)) / len(y)
    expected = {
        "roc_auc": skm.roc_auc_score(y, prob),
        "pr_auc": skm.average_precision_score(y, prob),
        "accuracy": skm.accuracy_score(y, pred),
        "balanced_accuracy": skm.balanced_accuracy_score(y, pred),
        "sensitivity": skm.recall_score(y, pred),
        "specificity": skm.recall_score(y, pred, pos_label=0),
        "precision": skm.precision_score(y, pred, zero_division=0.0),
        "f1": skm.f1_score(y, pred),
        "f2": skm.fbeta_score(y, pred, beta=2),
        "brier": skm.brier_score_loss(y, prob),
        "nll": skm.log_loss(y, np.clip(prob, 1e-7, 1 - 1e-7)),
        "ece": ece,
    }
    for name, value in expected.items():
        reported = ev["test"][name]
        reported = reported["value"] if isinstance(reported, dict) else reported
        assert reported == pytest.approx(value, abs=1e-12), name
    # the threshold came from valid: on valid it maximises F2 (the configured rule)
    val = np.load(repro_repo / "data/predictions/valid.npz")
    yv, pv = val["label"].astype(int), val["probability"]
    f2_at_t = skm.fbeta_score(yv, pv >= t, beta=2)
    assert all(f2_at_t >= skm.fbeta_score(yv, pv >= c, beta=2) - 1e-12 for c in np.unique(pv))


def test_predict_on_the_test_file_gives_evaluates_predictions(repro_repo):
    """The inference CLI on data/raw's test file: evaluate's saved probabilities (to the CSV's 6
    decimals), its threshold's labels, the true labels, row for row."""
    x_path = repro_repo / "data/raw" / h5io.x_name("test")
    # in evaluate's batches: the same arithmetic, hence the same bits
    batch = yaml.safe_load((repro_repo / "params.yaml").read_text())["evaluate"]["batch_size"]
    cmd = [sys.executable, "-m", "pcam.predict", str(x_path), "--batch-size", str(batch)]
    csv_text = run(cmd, repro_repo).stdout
    rows = list(csv.DictReader(io.StringIO(csv_text)))
    saved = np.load(repro_repo / "data/predictions/test.npz")
    threshold = read_json(repro_repo / "models/threshold.json")["threshold"]
    assert [int(r["index"]) for r in rows] == saved["index"].tolist()
    assert [r["probability"] for r in rows] == [f"{p:.6f}" for p in saved["probability"]]
    assert [int(r["label"]) for r in rows] == (saved["probability"] >= threshold).tolist()
    assert [int(r["true_label"]) for r in rows] == saved["label"].tolist()


def test_train_never_sees_an_excluded_patch(repro_repo, tmp_path):
    """Poison every train patch validate-data excluded (pixels inverted, label flipped): the train
    stage gives the same model. Poison one kept patch: another model."""
    work = tmp_path / "work"
    for rel in (
        "params.yaml",
        "dvc.yaml",
        "stages",
        "src",
        "data/raw",
        "data/validated",
        "data/stats.json",
    ):
        src, dest = repro_repo / rel, work / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        # copies, never links: the raw files may be links into the DVC cache
        if src.is_dir():
            shutil.copytree(src, dest)
        else:
            shutil.copy2(src, dest)
    doc = read_json(work / "data/validated/exclusions.json")
    excluded = sorted(e["index"] for e in doc["splits"]["train"]["excluded"])
    assert excluded, "the synthetic train split carries defects: some must be excluded"
    x_path, y_path, _ = h5io.split_files(work / "data/raw", "train")

    def train_stage() -> dict:
        run([sys.executable, "stages/train.py"], work)
        ckpt = load_checkpoint(work / "models/model.pt")
        return {"state": ckpt["model_state"], "history": ckpt["progress"]["history"]}

    def poison(rows: list[int]) -> None:
        x, y = read_x(x_path), h5io.read_labels(y_path)
        x[rows], y[rows] = 255 - x[rows], 1 - y[rows]
        h5io.write_h5_dataset(x_path, "x", x)
        h5io.write_h5_dataset(y_path, "y", y.reshape(-1, 1, 1, 1))

    clean = train_stage()
    poison(excluded)
    after = train_stage()
    assert after["history"] == clean["history"]
    assert all(torch.equal(after["state"][k], v) for k, v in clean["state"].items())
    kept = next(i for i in range(len(h5io.read_labels(y_path))) if i not in excluded)
    poison([kept])
    control = train_stage()
    assert control["history"] != clean["history"]


def readme_sweep_table_command() -> list[str]:
    """The README's sweep-table command: the line of its own after 'A sweep table'."""
    text = (REPO / "README.md").read_text().split("**A sweep table**", 1)[1]
    line = next(ln for ln in text.splitlines() if ln.startswith("dvc exp show --only-changed"))
    return shlex.split(line)


def test_readme_sweep_table_fits_200_columns(repro_repo):
    """The README's `dvc exp show` line on a 4-run sweep (2 lr x 2 seeds): every column shown
    (rich replaces the columns that do not fit with '…'), no line wider than 200."""
    dvc(["exp", "remove", "--all-commits"], repro_repo)
    for lr in ("0.002", "0.004"):
        for seed in ("0", "1"):
            dvc(["exp", "run", "-S", f"train.lr={lr}", "-S", f"train.seed={seed}"], repro_repo)
    cmd = readme_sweep_table_command()
    assert cmd[0] == "dvc"
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "dvc"), *cmd[1:], "--no-pager"],
        cwd=repro_repo,
        env=env() | {"COLUMNS": "200"},
        capture_output=True,
        text=True,
        check=True,
    )
    table = proc.stdout.splitlines()
    assert "…" not in proc.stdout, proc.stdout
    assert max(map(len, table)) <= 200, proc.stdout
    header = next(line for line in table if "Experiment" in line).split()
    for column in ("train.lr", "train.seed", "threshold", "valid.roc_auc", "test.f2"):
        assert column in header, header
    assert not any("_ci_" in c or "/" in c or c == "Created" for c in header), header
    assert sum(line.lstrip().startswith(("├──", "└──")) for line in table) == 4, proc.stdout
