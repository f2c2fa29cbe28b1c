"""pcam.report: seed aggregation on a recorded `dvc exp show --json`; a real sweep end to end.

pytest tests/test_report.py -m "not e2e"    # unit tests on the recorded sample, ~1 s
pytest tests/test_report.py                 # + 2 lr x 2 seeds through `make sweep`, ~1.5 min
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
from pathlib import Path

import pytest
import yaml

from pcam import report
from pcam.errors import PcamError
from tests.chromium import undrawn_plots
from tests.conftest import REPO
from tests.e2e import TINY, copy_repo, dvc, make_cmd, run

# `dvc exp show --json` of a tiny sweep (train.lr 0.002/0.02 x train.seed 0/1 on a baseline with
# lr 0.002, seed 0), trimmed to the keys used here; plus a running and a failed experiment.
SAMPLE = """
[
 {"rev": "workspace", "name": null, "error": null,
  "data": {"rev": "workspace", "timestamp": null, "params": {"params.yaml": {"data": {"data": {"synthetic": {"n_train": 256}}, "train": {"seed": 0, "lr": 0.002, "epochs": 1}, "benchmark": {"batch_sizes": [1, 8]}}}}, "metrics": {"metrics/eval.json": {"data": {"valid": {"roc_auc": {"ci_high": 0.7953958793081718, "ci_low": 0.6154686099684699, "value": 0.7080078125}, "f2": {"ci_high": 0.8857844218887908, "ci_low": 0.7926785337738104, "value": 0.8443271767810027}}, "test": {"roc_auc": {"ci_high": 0.761499829351165, "ci_low": 0.5804204309340617, "value": 0.671875}, "f2": {"ci_high": 0.8401201838105338, "ci_low": 0.6847133757961783, "value": 0.7692307692307693}, "sensitivity": {"ci_high": 0.9264705882352942, "ci_low": 0.7535326086956522, "value": 0.84375}, "specificity": {"ci_high": 0.4782608695652174, "ci_low": 0.246140350877193, "value": 0.359375}}, "threshold": {"value": 0.24747401766474492, "chosen_on": "valid"}}}}},
  "experiments": null},
 {"rev": "0260e2cedb00ea8bca8b41e192c953b799b13fd6", "name": "main", "error": null,
  "data": {"rev": "0260e2cedb00ea8bca8b41e192c953b799b13fd6", "timestamp": "2026-11-22T06:09:52", "params": {"params.yaml": {"data": {"data": {"synthetic": {"n_train": 256}}, "train": {"seed": 0, "lr": 0.002, "epochs": 1}, "benchmark": {"batch_sizes": [1, 8]}}}}, "metrics": {"metrics/eval.json": {"data": {"valid": {"roc_auc": {"ci_high": 0.7953958793081718, "ci_low": 0.6154686099684699, "value": 0.7080078125}, "f2": {"ci_high": 0.8857844218887908, "ci_low": 0.7926785337738104, "value": 0.8443271767810027}}, "test": {"roc_auc": {"ci_high": 0.761499829351165, "ci_low": 0.5804204309340617, "value": 0.671875}, "f2": {"ci_high": 0.8401201838105338, "ci_low": 0.6847133757961783, "value": 0.7692307692307693}, "sensitivity": {"ci_high": 0.9264705882352942, "ci_low": 0.7535326086956522, "value": 0.84375}, "specificity": {"ci_high": 0.4782608695652174, "ci_low": 0.246140350877193, "value": 0.359375}}, "threshold": {"value": 0.24747401766474492, "chosen_on": "valid"}}}}},
  "experiments": [
   {"name": "waiting", "executor": {"state": "running"},
    "revs": [{"rev": "676548ed921332dad1b50f4cc61962196956508c", "name": "waiting", "data": {"rev": "workspace", "timestamp": null, "params": {"params.yaml": {"data": {"data": {"synthetic": {"n_train": 256}}, "train": {"seed": 0, "lr": 0.5, "epochs": 1}, "benchmark": {"batch_sizes": [1, 8]}}}}, "metrics": {"metrics/eval.json": {"data": {"valid": {"roc_auc": {"ci_high": 0.7953958793081718, "ci_low": 0.6154686099684699, "value": 0.7080078125}, "f2": {"ci_high": 0.8857844218887908, "ci_low": 0.7926785337738104, "value": 0.8443271767810027}}, "test": {"roc_auc": {"ci_high": 0.761499829351165, "ci_low": 0.5804204309340617, "value": 0.671875}, "f2": {"ci_high": 0.8401201838105338, "ci_low": 0.6847133757961783, "value": 0.7692307692307693}, "sensitivity": {"ci_high": 0.9264705882352942, "ci_low": 0.7535326086956522, "value": 0.84375}, "specificity": {"ci_high": 0.4782608695652174, "ci_low": 0.246140350877193, "value": 0.359375}}, "threshold": {"value": 0.24747401766474492, "chosen_on": "valid"}}}}}, "error": null}]},
   {"name": "paper-zoea", "executor": {"state": "success"},
    "revs": [{"rev": "09f455d38586c0a62d85bd5c38e309db12a8d767", "name": "paper-zoea", "data": {"rev": "09f455d38586c0a62d85bd5c38e309db12a8d767", "timestamp": "2026-11-22T06:13:28", "params": {"params.yaml": {"data": {"data": {"synthetic": {"n_train": 256}}, "train": {"seed": 1, "lr": 0.02, "epochs": 1}, "benchmark": {"batch_sizes": [1, 8]}}}}, "metrics": {"metrics/eval.json": {"data": {"valid": {"roc_auc": {"ci_high": 0.7858436629783879, "ci_low": 0.607796743697479, "value": 0.699462890625}, "f2": {"ci_high": 0.8951502080390884, "ci_low": 0.7947907593633701, "value": 0.8513513513513513}}, "test": {"roc_auc": {"ci_high": 0.7548490085183633, "ci_low": 0.5730252103340407, "value": 0.66357421875}, "f2": {"ci_high": 0.12887708851759686, "ci_low": 0.0, "value": 0.057692307692307696}, "sensitivity": {"ci_high": 0.10714285714285714, "ci_low": 0.0, "value": 0.046875}, "specificity": {"ci_high": 1.0, "ci_low": 0.9523617511520737, "value": 0.984375}}, "threshold": {"value": 0.04729316865580362, "chosen_on": "valid"}}}}}, "error": null}]},
   {"name": "unfit-gaol", "executor": {"state": "success"},
    "revs": [{"rev": "f543b08fe5ee88e18ca2a9fb1d7175f811606963", "name": "unfit-gaol", "data": {"rev": "f543b08fe5ee88e18ca2a9fb1d7175f811606963", "timestamp": "2026-11-22T06:12:33", "params": {"params.yaml": {"data": {"data": {"synthetic": {"n_train": 256}}, "train": {"seed": 0, "lr": 0.02, "epochs": 1}, "benchmark": {"batch_sizes": [1, 8]}}}}, "metrics": {"metrics/eval.json": {"data": {"valid": {"roc_auc": {"ci_high": 0.7219696888691468, "ci_low": 0.5217592329354868, "value": 0.622802734375}, "f2": {"ci_high": 0.8761682242990654, "ci_low": 0.7794117647058824, "value": 0.8333333333333334}}, "test": {"roc_auc": {"ci_high": 0.6713537354091197, "ci_low": 0.46566973341060564, "value": 0.5634765625}, "f2": {"ci_high": 0.724296738355898, "ci_low": 0.513234420105281, "value": 0.6231003039513677}, "sensitivity": {"ci_high": 0.7575757575757576, "ci_low": 0.523773987206823, "value": 0.640625}, "specificity": {"ci_high": 0.625, "ci_low": 0.38095238095238093, "value": 0.5}}, "threshold": {"value": 3.319579717644798e-05, "chosen_on": "valid"}}}}}, "error": null}]},
   {"name": "swell-work", "executor": {"state": "success"},
    "revs": [{"rev": "94a5ff068ec067b4199a15d732c6c3e6d0cfe7ce", "name": "swell-work", "data": {"rev": "94a5ff068ec067b4199a15d732c6c3e6d0cfe7ce", "timestamp": "2026-11-22T06:11:11", "params": {"params.yaml": {"data": {"data": {"synthetic": {"n_train": 256}}, "train": {"seed": 1, "lr": 0.002, "epochs": 1}, "benchmark": {"batch_sizes": [1, 8]}}}}, "metrics": {"metrics/eval.json": {"data": {"valid": {"roc_auc": {"ci_high": 0.6733654309002722, "ci_low": 0.4816964043898458, "value": 0.580322265625}, "f2": {"ci_high": 0.8761682242990654, "ci_low": 0.7794117647058824, "value": 0.8333333333333334}}, "test": {"roc_auc": {"ci_high": 0.7773622110445205, "ci_low": 0.6033690696179649, "value": 0.695556640625}, "f2": {"ci_high": 0.753859649122807, "ci_low": 0.5512975285171103, "value": 0.6635802469135802}, "sensitivity": {"ci_high": 0.7796610169491526, "ci_low": 0.548376049491825, "value": 0.671875}, "specificity": {"ci_high": 0.7246376811594203, "ci_low": 0.4843623991935484, "value": 0.609375}}, "threshold": {"value": 0.28161643905021616, "chosen_on": "valid"}}}}}, "error": null}]},
   {"name": "prize-curn", "executor": {"state": "success"},
    "revs": [{"rev": "a5bfd5e55a0529d7ee9d786d47be4d97f25bae49", "name": "prize-curn", "data": {"rev": "a5bfd5e55a0529d7ee9d786d47be4d97f25bae49", "timestamp": "2026-11-22T06:10:06", "params": {"params.yaml": {"data": {"data": {"synthetic": {"n_train": 256}}, "train": {"seed": 0, "lr": 0.002, "epochs": 1}, "benchmark": {"batch_sizes": [1, 8]}}}}, "metrics": {"metrics/eval.json": {"data": {"valid": {"roc_auc": {"ci_high": 0.7953958793081718, "ci_low": 0.6154686099684699, "value": 0.7080078125}, "f2": {"ci_high": 0.8857844218887908, "ci_low": 0.7926785337738104, "value": 0.8443271767810027}}, "test": {"roc_auc": {"ci_high": 0.761499829351165, "ci_low": 0.5804204309340617, "value": 0.671875}, "f2": {"ci_high": 0.8401201838105338, "ci_low": 0.6847133757961783, "value": 0.7692307692307693}, "sensitivity": {"ci_high": 0.9264705882352942, "ci_low": 0.7535326086956522, "value": 0.84375}, "specificity": {"ci_high": 0.4782608695652174, "ci_low": 0.246140350877193, "value": 0.359375}}, "threshold": {"value": 0.24747401766474492, "chosen_on": "valid"}}}}}, "error": null}]},
   {"name": "bad-chunk", "executor": {"state": "failed"},
    "revs": [{"rev": "fd94531f1403ec57deb606e283c21a1a95892326", "name": "bad-chunk", "data": {"rev": "fd94531f1403ec57deb606e283c21a1a95892326", "timestamp": "2026-11-22T06:17:13", "params": {"params.yaml": {"data": {"data": {"synthetic": {"n_train": 256}}, "train": {"seed": 0, "lr": 0.002, "epochs": 1}, "benchmark": {"batch_sizes": [1, 8]}}}}, "metrics": {"metrics/eval.json": {"data": {"valid": {"roc_auc": {"ci_high": 0.7953958793081718, "ci_low": 0.6154686099684699, "value": 0.7080078125}, "f2": {"ci_high": 0.8857844218887908, "ci_low": 0.7926785337738104, "value": 0.8443271767810027}}, "test": {"roc_auc": {"ci_high": 0.761499829351165, "ci_low": 0.5804204309340617, "value": 0.671875}, "f2": {"ci_high": 0.8401201838105338, "ci_low": 0.6847133757961783, "value": 0.7692307692307693}, "sensitivity": {"ci_high": 0.9264705882352942, "ci_low": 0.7535326086956522, "value": 0.84375}, "specificity": {"ci_high": 0.4782608695652174, "ci_low": 0.246140350877193, "value": 0.359375}}, "threshold": {"value": 0.24747401766474492, "chosen_on": "valid"}}}}}, "error": {"msg": "Experiment run failed", "type": ""}}]}
  ]}
]
"""


def sample() -> list[dict]:
    return json.loads(SAMPLE)


# ---------------------------------------------------------------------------------------------
# unit tests on the recorded sample


def test_runs_leave_out_workspace_running_and_failed():
    runs, notes = report.runs_from_exp_show(sample())
    names = [r.name for r in runs]
    assert names[0] == "main"  # the baseline commit is a run, marked as such
    assert [r.baseline for r in runs] == [True, False, False, False, False]
    assert len(names) == 5 and "workspace" not in names, names
    # A running experiment already shows metrics (its parent's, in SAMPLE): only the state tells.
    assert "waiting" not in names and "bad-chunk" not in names
    assert notes == ["experiment waiting: running", "experiment bad-chunk: failed"]


def experiments() -> list[report.Run]:
    return [r for r in report.runs_from_exp_show(sample())[0] if not r.baseline]


def test_identical_params_are_one_sample():
    runs = experiments()
    kept, notes = report.dedupe([*runs, dataclasses.replace(runs[0], name="again")])
    assert kept == runs
    assert notes == [f"again: same params as {runs[0].name}, counted once"]


def test_configurations_are_every_param_but_the_seed():
    runs, _ = report.dedupe(experiments())
    configs = report.group_configs(runs)
    assert report.varying_params(configs) == ["train.lr"]
    by_lr = {c.params["train.lr"]: c for c in configs}
    assert sorted(by_lr) == [0.002, 0.02]
    for config in configs:
        assert config.seeds == [0, 1]
        values = [report.metric_value(r, "valid.roc_auc") for r in config.runs]
        stat = config.stat("valid.roc_auc")
        assert stat.n == 2
        assert stat.mean == pytest.approx(statistics.fmean(values))
        assert stat.std == pytest.approx(statistics.stdev(values))


def test_metric_values_read_ci_dicts_and_keys_with_dots():
    run = report.Run(
        "r",
        "0" * 40,
        {},
        {
            "metrics/eval.json": {"valid": {"roc_auc": {"value": 0.9, "ci_low": 0.8}, "n": 5}},
            "metrics/train.json": {"final": {"val_f2_at_0.5": 0.7}, "flag": True},
        },
    )
    assert report.metric_value(run, "valid.roc_auc") == 0.9
    assert report.metric_value(run, "valid.n") == 5.0
    assert report.metric_value(run, "metrics/train.json:final.val_f2_at_0.5") == 0.7
    assert report.metric_value(run, "metrics/train.json:flag") is None  # not a number
    assert report.metric_value(run, "valid.missing") is None


def _config(lr: float, valid: list[float], test: list[float]) -> report.Config:
    runs = tuple(
        report.Run(
            f"lr{lr}-s{seed}",
            "0" * 40,
            {"train.lr": lr, "train.seed": seed},
            {"metrics/eval.json": {"valid": {"roc_auc": v}, "test": {"roc_auc": t}}},
        )
        for seed, (v, t) in enumerate(zip(valid, test, strict=True))
    )
    return report.Config({"train.lr": lr}, runs, "train.seed")


def test_champion_is_chosen_on_valid_never_on_test():
    # lr 0.1 is better on test, lr 0.01 on valid: valid decides.
    configs = [_config(0.1, [0.80, 0.82], [0.95, 0.96]), _config(0.01, [0.90, 0.88], [0.70, 0.72])]
    assert report.champion(configs, "valid.roc_auc").params["train.lr"] == 0.01
    with pytest.raises(PcamError, match="validation metric"):
        report.champion(configs, "test.roc_auc")


def test_cli_refuses_a_test_metric_as_select(capsys):
    with pytest.raises(SystemExit) as exit_info:
        report.main(["experiments", "--select", "test.f2", "--input", "never-read.json"])
    assert exit_info.value.code == 1
    assert "validation metric" in capsys.readouterr().err


def test_lower_is_better_for_a_loss():
    configs = [_config(0.1, [0.3, 0.4], [0, 0]), _config(0.01, [0.2, 0.1], [0, 0])]
    best = report.champion(configs, "valid.roc_auc", lower_is_better=True)
    assert best.params["train.lr"] == 0.01


def _lock(train_lr: float, model_md5_in_evaluate: str) -> dict:
    return {
        "stages": {
            "train": {
                "params": {"params.yaml": {"train.lr": train_lr}},
                "deps": [{"path": "data/raw", "md5": "raw.dir"}],
                "outs": [
                    {"path": "models/model.pt", "md5": "new"},
                    {"path": "metrics/train.json", "md5": "t"},
                ],
            },
            "evaluate": {
                "deps": [{"path": "models/model.pt", "md5": model_md5_in_evaluate}],
                "outs": [
                    {"path": "data/predictions", "md5": "p.dir"},
                    {"path": "metrics/eval.json"},
                ],
            },
            "slice": {
                "deps": [{"path": "data/predictions/test.npz", "md5": "whatever"}],
                "outs": [{"path": "metrics/slices.json"}],
            },
        }
    }


def test_stale_outputs_of_stages_an_experiment_did_not_run():
    params = {"train.lr": 0.02}
    assert report.stale_outputs(_lock(0.02, "new"), params) == set()
    # `dvc exp run train`: evaluate still describes the parent's model, and slice reads it
    assert report.stale_outputs(_lock(0.02, "old"), params) == {
        "data/predictions",
        "metrics/eval.json",
        "metrics/slices.json",
    }
    # `dvc exp run -S train.lr=0.02 prepare`: train itself never saw the new lr
    assert "metrics/train.json" in report.stale_outputs(_lock(0.002, "new"), params)


def test_stale_metrics_are_dropped_and_named():
    run = _config(0.02, [0.9], [0.8]).runs[0]
    kept, notes = report.drop_stale_metrics([run], lambda rev: _lock(0.02, "old"))
    assert report.metric_value(kept[0], "valid.roc_auc") is None
    assert "metrics/eval.json" in notes[0]
    kept, notes = report.drop_stale_metrics([run], lambda rev: None)
    assert report.metric_value(kept[0], "valid.roc_auc") == 0.9 and "not checked" in notes[0]


def test_cli_prints_table_champion_and_writes_plot(tmp_path, capsys):
    saved = tmp_path / "exp_show.json"
    saved.write_text(SAMPLE)
    plot = tmp_path / "sweep.png"
    report.main(["experiments", "--input", str(saved), "--plot", str(plot)])
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("| train.lr"))
    for metric in report.MAIN_METRICS:
        assert metric in header
    # SAMPLE's valid.roc_auc: lr 0.002 runs 0.7080, 0.5803 (mean 0.6442); lr 0.02 runs 0.6995,
    # 0.6228 (mean 0.6611, sample std 0.0542): 0.02 wins on the mean despite the best single run.
    row = next(line for line in lines if "(champion)" in line)
    assert "**0.02**" in row and "0.6611 ± 0.0542" in row
    assert "Champion by highest mean valid.roc_auc over seeds: **train.lr=0.02**" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the baseline commit (lr 0.002, seed 0: valid.roc_auc 0.7080) apart, under the grid
    assert "| main | 0.002 | 0 | 0.7080 |" in out.split("### Baseline")[1]


def test_champion_comes_from_the_grid_never_the_baseline(tmp_path, capsys):
    # The bug this guards against: a baseline with params outside the grid (lr 0.001, one run)
    # and the best valid.roc_auc was named champion over the grid's means.
    doc = sample()
    baseline = doc[1]["data"]
    baseline["params"]["params.yaml"]["data"]["train"]["lr"] = 0.001
    baseline["metrics"]["metrics/eval.json"]["data"]["valid"]["roc_auc"] = 0.95
    saved = tmp_path / "exp_show.json"
    saved.write_text(json.dumps(doc))
    report.main(["experiments", "--input", str(saved), "--metric", "valid.roc_auc"])
    out = capsys.readouterr().out
    table, baseline_part = out.split("### Baseline")
    assert "## Experiments: 2 configuration(s), 4 run(s)" in table
    # lr 0.02: 0.6995, 0.6228; lr 0.002: 0.7080, 0.5803 (the experiments, not the baseline)
    rows = [line for line in table.splitlines() if line.startswith("| ") and "train.lr" not in line]
    assert rows == [
        "| **0.02** (champion) | 0, 1 | 2 | 0.6611 ± 0.0542 |",
        "| 0.002 | 0, 1 | 2 | 0.6442 ± 0.0903 |",
    ]
    assert "0.001" not in table and "0.9500" not in table
    assert "| main | 0.001 | 0 | 0.9500 |" in baseline_part


def test_changes_names_an_unknown_base(tmp_path, capsys):
    run(["git", "init", "-q", "-b", "main"], tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        report.main(["--repo", str(tmp_path), "changes", "--base", "no-such-branch", "--out", "-"])
    assert exit_info.value.code == 1
    assert "--base no-such-branch: not a commit" in capsys.readouterr().err


def test_make_sweep_queues_the_grid():
    cmd = ["make", "-n", "--no-print-directory", "-o", ".venv/.installed-stamp", "sweep"]
    default = run(cmd, REPO).stdout
    assert "dvc exp run --queue -S train.lr=1e-3,3e-4 -S train.seed=0,1,2" in default
    custom = run([*cmd, "SWEEP_LRS=0.1", "SWEEP_SEEDS=4,5", "SWEEP_TARGETS=train"], REPO).stdout
    assert "dvc exp run --queue -S train.lr=0.1 -S train.seed=4,5 train" in custom
    run_all = run([*cmd[:-1], "sweep-run", "SWEEP_JOBS=3"], REPO).stdout
    assert "dvc exp run --run-all -j 3" in run_all


# ---------------------------------------------------------------------------------------------
# end to end: a tiny sweep through the Makefile targets, then both reports


def make_in(repo: Path, *targets_and_vars: str) -> subprocess.CompletedProcess:
    return run([*make_cmd(repo), *targets_and_vars], repo)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """A committed tiny baseline, its 2 lr x 2 seed sweep plus one broken experiment, queued and
    run by `make`; with the result of `make sweep-run`."""
    repo = copy_repo(tmp_path_factory.mktemp("sweep") / "repo", TINY)
    # Up to evaluate: the sweep metrics are in metrics/eval.json; slice/benchmark add only time.
    dvc(["repro", "evaluate"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-q", "-m", "baseline"], repo)
    base_lr = yaml.safe_load((repo / "params.yaml").read_text())["train"]["lr"]
    # The grid holds the baseline's params too (that experiment's stages are up to date: cheap);
    # the report still shows the baseline commit apart. Floats as DVC will write them.
    lrs = [float(f"{lr:g}") for lr in (base_lr, base_lr * 10)]
    grid = [f"SWEEP_LRS={lrs[0]:g},{lrs[1]:g}", "SWEEP_SEEDS=0,1", "SWEEP_TARGETS=evaluate"]
    make_in(repo, "sweep", *grid)
    # Out of range: stops in compute-stats, seconds in; queued last, so the grid still runs.
    make_in(repo, "sweep", "SWEEP_GRID=-S stats.chunk_rows=-5", "SWEEP_TARGETS=compute-stats")
    sweep_run = run([*make_cmd(repo), "sweep-run", "SWEEP_JOBS=1"], repo, check=False)
    yield repo, lrs, sweep_run
    # The queue worker lingers ~10 s after the queue empties; do not leave it behind.
    dvc(["queue", "stop"], repo, check=False)


def _revs(repo: Path) -> dict[str, str]:
    """name -> commit of the baseline and of every experiment (experiment names are not git refs)."""
    doc = json.loads(dvc(["exp", "show", "--json"], repo).stdout)
    revs = {c.get("name") or c["rev"]: c["rev"] for c in doc if c["rev"] != "workspace"}
    revs.update({e["name"]: e["revs"][0]["rev"] for c in doc for e in c.get("experiments") or []})
    return revs


def _train_params(repo: Path, rev: str) -> tuple[float, int]:
    train = yaml.safe_load(run(["git", "show", f"{rev}:params.yaml"], repo).stdout)["train"]
    return train["lr"], train["seed"]


def _valid_auc(repo: Path) -> dict[tuple[float, int], float]:
    """(lr, seed) -> valid ROC-AUC, read from each run's own commit, not through pcam.report."""
    out = {}
    for rev in _revs(repo).values():
        ev = json.loads(run(["git", "show", f"{rev}:metrics/eval.json"], repo).stdout)
        auc = ev["valid"]["roc_auc"]
        out[_train_params(repo, rev)] = auc["value"] if isinstance(auc, dict) else auc
    return out


@pytest.mark.e2e
def test_sweep_run_fails_when_an_experiment_fails(swept):
    # `dvc exp run --run-all` itself exits 0 when an experiment fails; the target must not.
    repo, _, sweep_run = swept
    assert sweep_run.returncode != 0, sweep_run.stdout
    assert "sweep-run: experiments failed" in sweep_run.stdout
    status = dvc(["queue", "status"], repo).stdout
    assert status.count("Success") == 4 and status.count("Failed") == 1, status


@pytest.mark.e2e
def test_sweep_report_means_over_seeds_and_champion(swept, tmp_path):
    repo, lrs, _ = swept
    auc = _valid_auc(repo)
    assert set(auc) == {(lr, seed) for lr in lrs for seed in (0, 1)}, auc

    make_in(repo, "sweep-report", f"REPORTS={tmp_path}")
    text = (tmp_path / "experiments.md").read_text()
    means = {lr: statistics.fmean([auc[(lr, 0)], auc[(lr, 1)]]) for lr in lrs}
    for lr in lrs:
        spread = statistics.stdev([auc[(lr, 0)], auc[(lr, 1)]])
        assert f"{means[lr]:.4f} ± {spread:.4f}" in text, (lr, text)
    best = max(lrs, key=lambda lr: means[lr])
    assert f"**train.lr={best:g}**" in text, text
    assert "2 configuration(s), 4 run(s)" in text, text  # the grid; the baseline apart
    assert "| main |" in text.split("### Baseline")[1].split("Left out")[0], text
    assert ": failed" in text.split("Left out or merged:")[1], text
    assert (tmp_path / "experiments.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.e2e
def test_changes_report_against_the_base_branch(swept, tmp_path):
    repo, lrs, _ = swept
    exp = next(n for n, rev in _revs(repo).items() if _train_params(repo, rev) == (lrs[1], 1))
    dvc(["exp", "apply", exp], repo)
    make_in(repo, "changes-report", "BASE=main", f"REPORTS={tmp_path}")
    text = (tmp_path / "changes.md").read_text()
    assert "## Changes: the workspace against `main`" in text
    params_section = text.split("### Params")[1].split("### Metrics")[0]
    assert "train.lr" in params_section and f"{lrs[1]:g}" in params_section
    metrics_section = text.split("### Metrics")[1].split("### Plots")[0]
    assert "valid.roc_auc" in metrics_section and "test.roc_auc" in metrics_section
    link = text.split("### Plots")[1].split("](")[1].split(")")[0]
    page = (tmp_path / link).resolve()
    assert page == (tmp_path / "plots" / "index.html").resolve() and page.is_file()
    html = page.read_text()
    assert "vegaEmbed" in html and '"main"' in html and '"workspace"' in html
    # the committed offline template is the default: every plot draws with no network
    assert "cdn.jsdelivr.net" not in html
    assert undrawn_plots(page) == []
