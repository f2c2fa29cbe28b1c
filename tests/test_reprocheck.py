"""Tests of pcam.reprocheck: compare() on hand-made dvc.lock dicts, and the CLI on a tiny DVC
project whose output depends on something dvc.yaml does not declare (so it can fail to reproduce)."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import yaml

from pcam.reprocheck import NEW_LOCK, compare, describe, is_timing_output, lock_values
from tests.e2e import dvc, run

LOCK = {
    "schema": "2.0",
    "stages": {
        "train": {
            "cmd": "python train.py",
            "deps": [
                {"path": "data/raw", "hash": "md5", "md5": "aaa.dir"},
                {"path": "train.py", "hash": "md5", "md5": "t1"},
            ],
            "params": {"params.yaml": {"train.lr": 0.1, "train.seed": 0}},
            "outs": [{"path": "models/model.pt", "hash": "md5", "md5": "m1"}],
        },
        "prepare": {
            "cmd": "python prepare.py",
            "deps": [{"path": "prepare.py", "hash": "md5", "md5": "p1"}],
            "params": {"params.yaml": {"data.seed": 7}},
            "outs": [{"path": "data/raw", "hash": "md5", "md5": "aaa.dir"}],
        },
        "benchmark": {
            "cmd": "python benchmark.py",
            "deps": [{"path": "models/model.pt", "hash": "md5", "md5": "m1"}],
            "outs": [
                {"path": "metrics/benchmark.json", "hash": "md5", "md5": "b1"},
                {"path": "plots/benchmark/scaling.png", "hash": "md5", "md5": "s1"},
                {"path": "plots/benchmark/throughput.csv", "hash": "md5", "md5": "c1"},
            ],
        },
    },
}
N_ENTRIES = 9  # 4 deps + 3 params + 2 outs: the timing outputs are left out


def changed(**edits: str) -> dict:
    """A copy of LOCK with output/dependency md5s replaced: {"stage:path": md5} as keywords."""
    lock = copy.deepcopy(LOCK)
    for key, md5 in edits.items():
        stage, path = key.split(":", 1)
        for section in ("deps", "outs"):
            for item in lock["stages"][stage].get(section, []):
                if item["path"] == path:
                    item["md5"] = md5
    return lock


def test_timing_outputs_are_exactly_the_benchmark_files():
    assert is_timing_output("metrics/benchmark.json")
    assert is_timing_output("metrics/details/benchmark.json")
    assert not is_timing_output("metrics/details/eval.json")
    assert is_timing_output("plots/benchmark/scaling.png")
    assert is_timing_output("plots/benchmark/throughput.csv")
    assert is_timing_output("plots/benchmark")  # as a directory output: only those files
    assert not is_timing_output("metrics/benchmark.json.bak")
    assert not is_timing_output("plots/benchmarks/x.csv")
    assert not is_timing_output("metrics/eval.json")


def test_identical_locks_match_every_entry():
    result = compare(LOCK, copy.deepcopy(LOCK))
    assert result.mismatches == []
    assert result.matched == N_ENTRIES == len(lock_values(LOCK))
    assert describe(result) == f"repro-check: all {N_ENTRIES} hashes of dvc.lock reproduced"


def test_benchmark_timings_may_differ():
    new = changed(
        **{"benchmark:metrics/benchmark.json": "b2", "benchmark:plots/benchmark/scaling.png": "s2"}
    )
    assert compare(LOCK, new).mismatches == []


def test_first_mismatch_is_the_most_upstream_stage():
    # The lock lists train before prepare; prepare runs first, so it is named.
    new = changed(
        **{
            "prepare:data/raw": "bbb.dir",
            "train:data/raw": "bbb.dir",
            "train:models/model.pt": "m2",
        }
    )
    result = compare(LOCK, new)
    assert [(m.stage, m.section, m.path) for m in result.mismatches] == [
        ("prepare", "outs", "data/raw"),
        ("train", "deps", "data/raw"),
        ("train", "outs", "models/model.pt"),
    ]
    assert result.matched == N_ENTRIES - 3
    assert describe(result) == (
        f"repro-check: 3 of {N_ENTRIES} hashes differ; first: stage prepare, out data/raw: "
        "committed aaa.dir vs new bbb.dir"
    )


def test_changed_model_only():
    result = compare(
        LOCK, changed(**{"train:models/model.pt": "m2", "benchmark:models/model.pt": "m2"})
    )
    assert describe(result).startswith(
        f"repro-check: 2 of {N_ENTRIES} hashes differ; first: stage train, "
    )
    assert describe(result).endswith("out models/model.pt: committed m1 vs new m2")


def test_param_value_and_missing_stage():
    new = copy.deepcopy(LOCK)
    new["stages"]["train"]["params"]["params.yaml"]["train.lr"] = 0.2
    del new["stages"]["benchmark"]
    result = compare(LOCK, new)
    assert describe(result).endswith(
        "first: stage train, param params.yaml:train.lr: committed 0.1 vs new 0.2"
    )
    missing = [m for m in result.mismatches if m.stage == "benchmark"]
    assert [(m.path, m.new) for m in missing] == [("models/model.pt", "absent")]


def test_directory_mismatch_names_the_file_inside_when_listings_are_cached():
    new = changed(**{"prepare:data/raw": "bbb.dir", "train:data/raw": "bbb.dir"})
    listings = {"aaa.dir": {"x.h5": "x1", "y.h5": "y1"}, "bbb.dir": {"x.h5": "x1", "y.h5": "y2"}}
    line = describe(compare(LOCK, new), listings.get)
    assert line.endswith("first: stage prepare, out data/raw/y.h5: committed y1 vs new y2")


# --- the CLI on a tiny project ----------------------------------------------------------------------

DVC_YAML = """\
stages:
  prep:
    cmd: python prep.py
    deps: [prep.py]
    outs: [data.txt]
    metrics:
      - metrics/prep.json:
          cache: false
  benchmark:
    cmd: python bench.py
    deps: [bench.py, data.txt]
    outs:
      - plots/benchmark/t.csv:
          cache: false
    metrics:
      - metrics/benchmark.json:
          cache: false
"""
# SALT is an input dvc.yaml does not declare: changing it breaks reproducibility on purpose.
PREP_PY = """\
import json, os
salt = os.environ.get("SALT", "a")
open("data.txt", "w").write(salt * 3)
os.makedirs("metrics", exist_ok=True)
json.dump({"salt": salt}, open("metrics/prep.json", "w"))
"""
BENCH_PY = """\
import json, os, time
os.makedirs("plots/benchmark", exist_ok=True)
open("plots/benchmark/t.csv", "w").write(f"t\\n{time.perf_counter_ns()}\\n")
json.dump({"t_ns": time.perf_counter_ns()}, open("metrics/benchmark.json", "w"))
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("reprocheck") / "repo"
    repo.mkdir()
    (repo / "dvc.yaml").write_text(DVC_YAML)
    (repo / "prep.py").write_text(PREP_PY)
    (repo / "bench.py").write_text(BENCH_PY)
    run(["git", "init", "-q"], repo)
    dvc(["init", "-q"], repo)
    dvc(["repro", "-q"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-q", "-m", "pipeline"], repo)
    return repo


def reprocheck(repo: Path, **env: str):
    cmd = [sys.executable, "-m", "pcam.reprocheck", "--repo", str(repo)]
    if env:
        cmd = ["env", *(f"{k}={v}" for k, v in env.items()), *cmd]
    return run(cmd, repo, check=False)


def git_status(repo: Path) -> str:
    return run(["git", "status", "--porcelain"], repo).stdout


@pytest.mark.e2e
def test_cli_passes_when_everything_but_timings_reproduces(project):
    committed_bench = (project / "metrics/benchmark.json").read_text()
    proc = reprocheck(project)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # prep: 1 dep + 2 outs; benchmark: 2 deps (its timing outputs are left out)
    assert proc.stdout.splitlines()[-1] == "repro-check: all 5 hashes of dvc.lock reproduced"
    # The re-run wrote new timings; the committed files are back.
    assert (project / "metrics/benchmark.json").read_text() == committed_bench
    assert git_status(project) == ""


@pytest.mark.e2e
def test_cli_names_the_output_that_did_not_reproduce(project):
    lock_before = (project / "dvc.lock").read_text()
    proc = reprocheck(project, SALT="b")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    line = proc.stdout.splitlines()[-1]
    assert line.startswith(
        "repro-check: 3 of 5 hashes differ; first: stage prep, out data.txt: committed "
    )
    # prep's two outputs and benchmark's data.txt dependency; the committed lock and metrics
    # are restored.
    assert (project / "dvc.lock").read_text() == lock_before
    assert git_status(project) == ""
    # The re-derived lock is kept, git-ignored, for a closer look.
    kept = yaml.safe_load((project / NEW_LOCK).read_text())
    committed = yaml.safe_load(lock_before)
    assert kept["stages"]["prep"]["outs"] != committed["stages"]["prep"]["outs"]
    assert kept["stages"]["prep"]["deps"] == committed["stages"]["prep"]["deps"]
