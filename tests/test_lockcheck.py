"""Tests of pcam.lockcheck: find_drift on recorded `dvc status --json` output (dvc 3.67), and the
real CLI on a tiny DVC repo that is built, reproduced, committed and cloned without its data."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pcam.lockcheck import (
    STALE_HINT,
    Contradiction,
    Drift,
    absent_outputs,
    find_contradictions,
    find_drift,
    pipeline_order,
)

# dvc.lock of the tiny two-stage project below (hashes shortened: find_drift never reads them).
LOCK = {
    "schema": "2.0",
    "stages": {
        "prep": {
            "cmd": "python prep.py",
            "deps": [{"path": "prep.py", "md5": "eda8", "size": 101}],
            "params": {"params.yaml": {"prep.n": 3}},
            "outs": [{"path": "data.txt", "md5": "f561", "size": 3}],
        },
        "train": {
            "cmd": "python train.py",
            "deps": [
                {"path": "data.txt", "md5": "f561", "size": 3},
                {"path": "train.py", "md5": "878d", "size": 182},
            ],
            "params": {"params.yaml": {"train.epochs": 2, "train.lr": 0.1}},
            "outs": [
                {"path": "metrics.json", "md5": "dc92", "size": 12},
                {"path": "model.txt", "md5": "67ac", "size": 6},
            ],
        },
    },
}

# What a fresh clone (no data, no cache) prints: every cached output "not in cache", and a stage
# whose upstream output is absent sees that dependency "deleted". The committed cache: false
# metrics.json matches dvc.lock and so does not appear at all.
CLEAN_CLONE = {
    "prep": [{"changed outs": {"data.txt": "not in cache"}}],
    "train": [
        {"changed deps": {"data.txt": "deleted"}},
        {"changed outs": {"model.txt": "not in cache"}},
    ],
}


def drift_lines(status: dict, lock: dict = LOCK) -> list[str]:
    return [str(d) for d in find_drift(status, lock)]


# --- find_drift on recorded samples -------------------------------------------------------------


def test_clean_clone_and_clean_workspace_have_no_drift():
    assert find_drift(CLEAN_CLONE, LOCK) == []
    assert find_drift({}, LOCK) == []
    assert absent_outputs(CLEAN_CLONE) == ["data.txt", "model.txt"]


def test_absent_cache_false_output_is_absence_not_drift():
    status = {
        "prep": [{"changed outs": {"data.txt": "not in cache"}}],
        "train": [
            {"changed deps": {"data.txt": "deleted"}},
            {"changed outs": {"model.txt": "not in cache", "metrics.json": "deleted"}},
        ],
    }
    assert find_drift(status, LOCK) == []
    assert absent_outputs(status) == ["data.txt", "metrics.json", "model.txt"]


def test_params_modified_new_and_deleted():
    status = {
        "prep": [
            {"changed deps": {"params.yaml": {"prep.n": "deleted"}}},
            {"changed outs": {"data.txt": "not in cache"}},
        ],
        "train": [
            {
                "changed deps": {
                    "data.txt": "deleted",
                    "params.yaml": {"train.lr": "modified", "train.wd": "new"},
                }
            },
            {"changed outs": {"model.txt": "not in cache"}},
        ],
    }
    assert drift_lines(status) == [
        "prep: param deleted from params file: prep.n",
        "train: param changed: train.lr",
        "train: param not in dvc.lock: train.wd",
    ]


def test_params_file_deleted():
    status = {
        "prep": [
            {"changed deps": {"params.yaml": "deleted"}},
            {"changed outs": {"data.txt": "not in cache"}},
        ],
    }
    assert drift_lines(status) == ["prep: dependency deleted: params.yaml"]


def test_dependency_modified_and_deleted():
    status = {
        "prep": [
            {"changed deps": {"prep.py": "deleted"}},
            {"changed outs": {"data.txt": "not in cache"}},
        ],
        "train": [
            {"changed deps": {"train.py": "modified", "data.txt": "deleted"}},
            {"changed outs": {"model.txt": "not in cache"}},
        ],
    }
    assert drift_lines(status) == [
        "prep: dependency deleted: prep.py",
        "train: dependency modified: train.py",
    ]


def test_dependency_inside_an_absent_directory_output_is_absence():
    lock = {
        "stages": {
            "prepare": {"cmd": "p", "outs": [{"path": "data/raw"}]},
            "train": {"cmd": "t", "deps": [{"path": "data/raw/x.h5"}]},
        }
    }
    status = {
        "prepare": [{"changed outs": {"data/raw": "not in cache"}}],
        "train": [{"changed deps": {"data/raw/x.h5": "deleted"}}],
    }
    assert find_drift(status, lock) == []


def test_dependency_added_to_dvc_yaml():
    # A new dep has no hash in dvc.lock: "modified" if present, "deleted" if an absent upstream out.
    status = {
        "prep": [
            {"changed deps": {"model.txt": "deleted"}},
            {"changed outs": {"data.txt": "not in cache"}},
        ],
        "train": [
            {"changed deps": {"data.txt": "deleted", "extra.py": "modified"}},
            {"changed outs": {"model.txt": "not in cache"}},
        ],
    }
    assert drift_lines(status) == [
        "prep: dependency not in dvc.lock: model.txt",
        "train: dependency not in dvc.lock: extra.py",
    ]


def test_command_changed():
    status = {
        "prep": [{"changed outs": {"data.txt": "not in cache"}}],
        "train": [
            {"changed deps": {"data.txt": "deleted"}},
            {"changed outs": {"model.txt": "not in cache"}},
            "changed command",
        ],
    }
    assert find_drift(status, LOCK) == [Drift("train", "command changed")]
    assert drift_lines(status) == ["train: command changed"]


def test_new_stage_is_reported_once_whatever_status_says_about_it():
    # A stage only in dvc.yaml, with an absent upstream dep and an absent out, looks exactly like
    # a locked stage with absent data; only dvc.lock tells them apart.
    status = CLEAN_CLONE | {
        "ev": [{"changed deps": {"model.txt": "deleted"}}, {"changed outs": {"ev.txt": "deleted"}}],
        "cb": ["always changed"],  # no deps and no outs
        "report": [{"changed outs": {"report.json": "modified"}}],  # its out is already in git
    }
    assert drift_lines(status) == [
        "ev: stage not in dvc.lock (run dvc repro)",
        "cb: stage not in dvc.lock (run dvc repro)",
        "report: stage not in dvc.lock (run dvc repro)",
    ]


def test_no_dvc_lock_means_every_stage_is_new():
    status = {
        "prep": [
            {"changed deps": {"prep.py": "modified", "params.yaml": "new"}},
            {"changed outs": {"data.txt": "deleted"}},
        ],
    }
    assert drift_lines(status, {}) == ["prep: stage not in dvc.lock (run dvc repro)"]


def test_output_modified_in_workspace():
    status = {
        "prep": [{"changed outs": {"data.txt": "not in cache"}}],
        "train": [
            {"changed deps": {"data.txt": "deleted"}},
            {"changed outs": {"model.txt": "not in cache", "metrics.json": "modified"}},
        ],
    }
    assert drift_lines(status) == ["train: output modified in workspace: metrics.json"]


def test_output_added_to_dvc_yaml():
    status = {
        "prep": [{"changed outs": {"data.txt": "not in cache"}}],
        "train": [
            {"changed deps": {"data.txt": "deleted"}},
            {"changed outs": {"model.txt": "not in cache", "other.txt": "deleted"}},
        ],
    }
    assert drift_lines(status) == ["train: output not in dvc.lock: other.txt"]


def test_always_changed_and_frozen_stages_are_not_drift():
    status = {
        # always_changed: true: the stage is listed on every run.
        "prep": [{"changed outs": {"data.txt": "not in cache"}}, "always changed"],
        # frozen: true: dvc hides the deps (and warns on stderr), whatever changed in them.
        "train": [{"changed outs": {"model.txt": "not in cache"}}],
    }
    assert find_drift(status, LOCK) == []


def test_dvc_add_files_are_checked_for_edits_only():
    absent = CLEAN_CLONE | {"raw.dvc": [{"changed outs": {"raw": "not in cache"}}]}
    edited = CLEAN_CLONE | {"raw.dvc": [{"changed outs": {"raw": "modified"}}]}
    assert find_drift(absent, LOCK) == []
    assert drift_lines(edited) == ["raw.dvc: output modified in workspace: raw"]


def test_unknown_states_are_reported_not_dropped():
    status = {"train": ["changed checksum"]}
    assert drift_lines(status) == ["train: changed checksum"]


# --- find_contradictions: dvc.lock against itself ----------------------------------------------


def with_out_md5(lock: dict, stage: str, path: str, md5: str) -> dict:
    """A copy of `lock` in which `stage` recorded `md5` for its output `path` (as after
    `dvc repro -s stage` with a changed param, the downstream stages not re-run)."""
    stages = {name: dict(entry) for name, entry in lock["stages"].items()}
    stages[stage]["outs"] = [
        {**o, "md5": md5} if o["path"] == path else o for o in stages[stage]["outs"]
    ]
    return {**lock, "stages": stages}


def test_consistent_lock_has_no_contradiction():
    assert find_contradictions(LOCK) == []


def test_output_rehashed_alone_contradicts_the_downstream_dependency():
    lock = with_out_md5(LOCK, "prep", "data.txt", "9999")
    found = find_contradictions(lock)
    assert found == [Contradiction("prep", "train", "data.txt", "9999", "f561")]
    assert str(found[0]) == (
        "train: dvc.lock contradicts itself: data.txt is f561 for train (dependency) "
        "but 9999 for prep (output)"
    )


# The project's shape: a directory output, and stages that depend on it or on files inside it.
DIR_LOCK = {
    "stages": {
        "validate": {
            "cmd": "v",
            "deps": [{"path": "data/raw", "md5": "aaa.dir"}],
            "outs": [{"path": "data/stats.json", "md5": "s1"}],
        },
        "stats": {
            "cmd": "s",
            "deps": [{"path": "data/raw/train_x.h5", "md5": "x1"}],
            "outs": [{"path": "models/m.pt", "md5": "m1"}],
        },
        "report": {"cmd": "r", "deps": [{"path": "data", "md5": "ddd.dir"}], "outs": []},
        "prepare": {"cmd": "p", "outs": [{"path": "data/raw", "md5": "aaa.dir"}]},
    }
}
LISTINGS = {
    "aaa.dir": {"train_x.h5": "x1", "train_y.h5": "y1"},
    "ddd.dir": {"raw/train_x.h5": "x1", "raw/train_y.h5": "y1", "stats.json": "s1"},
}


def test_pipeline_order_puts_producers_first():
    assert pipeline_order(DIR_LOCK) == ["prepare", "validate", "stats", "report"]
    assert pipeline_order(LOCK) == ["prep", "train"]


def test_directory_listings_agree():
    assert find_contradictions(DIR_LOCK, LISTINGS.get) == []


def test_directory_output_rehashed_contradicts_exact_path_without_any_listing():
    lock = with_out_md5(DIR_LOCK, "prepare", "data/raw", "bbb.dir")
    # No listing anywhere (a data-less clone): only the exact path can be judged.
    assert [str(c) for c in find_contradictions(lock)] == [
        "validate: dvc.lock contradicts itself: data/raw is aaa.dir for validate (dependency) "
        "but bbb.dir for prepare (output)"
    ]


def test_file_inside_a_directory_output_is_compared_when_the_listing_is_cached():
    lock = with_out_md5(DIR_LOCK, "prepare", "data/raw", "bbb.dir")
    listings = {**LISTINGS, "bbb.dir": {"train_x.h5": "x2", "train_y.h5": "y1"}}
    found = find_contradictions(lock, listings.get)
    assert Contradiction("prepare", "stats", "data/raw/train_x.h5", "x2", "x1") in found
    # Not comparable without the new listing: only the exact-path pair is reported.
    assert [c.consumer for c in find_contradictions(lock, LISTINGS.get)] == ["validate"]


def test_file_missing_from_the_directory_listing_is_a_contradiction():
    listings = {**LISTINGS, "aaa.dir": {"train_y.h5": "y1"}}
    found = find_contradictions(DIR_LOCK, listings.get)
    assert Contradiction("prepare", "stats", "data/raw/train_x.h5", "absent", "x1") in found


def test_directory_dependency_holding_a_file_output():
    lock = with_out_md5(DIR_LOCK, "validate", "data/stats.json", "s2")
    found = find_contradictions(lock, LISTINGS.get)
    assert found == [Contradiction("validate", "report", "data/stats.json", "s2", "s1")]


# --- the CLI on a real DVC repo, cloned without data -------------------------------------------

SRC = Path(__file__).resolve().parents[1] / "src"

PARAMS_YAML = "prep:\n  n: 3\ntrain:\n  lr: 0.1\n  epochs: 2\n"
DVC_YAML = """\
stages:
  prep:
    cmd: python prep.py
    deps: [prep.py]
    params: [prep.n]
    outs: [data.txt]
  train:
    cmd: python train.py
    deps: [train.py, data.txt]
    params: [train.lr, train.epochs]
    outs: [model.txt]
    metrics:
      - metrics.json:
          cache: false
"""
# data.txt depends on the param prep.n, so a param change shows in the hash.
PREP_PY = (
    "import yaml\n"
    'n = yaml.safe_load(open("params.yaml"))["prep"]["n"]\n'
    'open("data.txt", "w").write("xyz\\n" * n)\n'
)
TRAIN_PY = (
    'data = open("data.txt").read()\n'
    'open("model.txt", "w").write(data * 2)\n'
    'open("metrics.json", "w").write(\'{"acc": 0.5}\\n\')\n'
)


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "DVC_NO_ANALYTICS": "1",
        # `python` in the stage commands must be this interpreter; pcam importable before install.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])),
        # Isolate git from the user's config (signing, hooks) and give it an identity.
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_AUTHOR_NAME": "test",
        "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "test",
        "GIT_COMMITTER_EMAIL": "test@example.com",
    }


def _dvc() -> str:
    beside = Path(sys.executable).parent / "dvc"
    return str(beside) if beside.exists() else "dvc"


def _run(args: list[str], cwd: Path) -> None:
    proc = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout}\n{proc.stderr}"


def lockcheck(repo: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pcam.lockcheck", "--repo", str(repo)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def make_project(origin: Path) -> None:
    """The two-stage project, reproduced and committed in `origin`."""
    (origin / "params.yaml").write_text(PARAMS_YAML)
    (origin / "dvc.yaml").write_text(DVC_YAML)
    (origin / "prep.py").write_text(PREP_PY)
    (origin / "train.py").write_text(TRAIN_PY)
    _run(["git", "init", "-q"], origin)
    _run([_dvc(), "init", "-q"], origin)
    _run([_dvc(), "config", "core.analytics", "false"], origin)
    _run([_dvc(), "repro", "-q"], origin)
    _run(["git", "add", "-A"], origin)
    _run(["git", "commit", "-q", "-m", "pipeline"], origin)


@pytest.fixture(scope="module")
def fresh_clone(tmp_path_factory) -> Path:
    """A clone of a reproduced and committed two-stage project: code, params, lock, no data."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    origin = tmp_path_factory.mktemp("origin")
    make_project(origin)
    clone = tmp_path_factory.mktemp("clone") / "repo"
    _run(["git", "clone", "-q", str(origin), str(clone)], origin.parent)
    assert not (clone / "model.txt").exists() and (clone / "metrics.json").exists()
    return clone


@pytest.fixture
def clone(fresh_clone, tmp_path) -> Path:
    """A private copy of the fresh clone, for a test to change."""
    return Path(shutil.copytree(fresh_clone, tmp_path / "repo", symlinks=True))


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def assert_stale(proc: subprocess.CompletedProcess[str], *lines: str) -> None:
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout.splitlines() == [*lines, STALE_HINT]


@pytest.mark.e2e
def test_cli_fresh_clone_without_data_is_current(clone):
    proc = lockcheck(clone)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == "dvc.lock is current (2 stages; 2 outputs absent, not checked)"


@pytest.mark.e2e
def test_cli_param_changed(clone):
    edit(clone / "params.yaml", "lr: 0.1", "lr: 0.2")
    assert_stale(lockcheck(clone), "train: param changed: train.lr")


@pytest.mark.e2e
def test_cli_dependency_modified(clone):
    with (clone / "train.py").open("a") as f:
        f.write("# a comment is a change to the code\n")
    assert_stale(lockcheck(clone), "train: dependency modified: train.py")


@pytest.mark.e2e
def test_cli_command_changed(clone):
    edit(clone / "dvc.yaml", "cmd: python train.py", "cmd: python train.py --fast")
    assert_stale(lockcheck(clone), "train: command changed")


@pytest.mark.e2e
def test_cli_new_stage(clone):
    with (clone / "dvc.yaml").open("a") as f:
        f.write(
            "  report:\n    cmd: python -c 'print(1)' > report.txt\n"
            "    deps: [model.txt]\n    outs: [report.txt]\n"
        )
    assert_stale(lockcheck(clone), "report: stage not in dvc.lock (run dvc repro)")


@pytest.mark.e2e
def test_cli_committed_metrics_edited(clone):
    (clone / "metrics.json").write_text('{"acc": 0.99}\n')
    assert_stale(lockcheck(clone), "train: output modified in workspace: metrics.json")


@pytest.mark.e2e
def test_cli_not_a_dvc_repo_exits_2(tmp_path):
    proc = lockcheck(tmp_path)
    assert proc.returncode == 2
    assert "not inside of a DVC repository" in proc.stderr


@pytest.mark.e2e
def test_cli_refuses_a_lock_that_contradicts_itself_in_a_data_less_clone(tmp_path):
    # The case: a param of the first stage changes, only that stage is re-run, commit.
    origin = tmp_path / "origin"
    origin.mkdir()
    make_project(origin)
    edit(origin / "params.yaml", "n: 3", "n: 4")
    _run([_dvc(), "repro", "-q", "-s", "prep"], origin)
    _run(["git", "commit", "-q", "-am", "prep.n=4, only prep re-run"], origin)
    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(origin), str(clone)], tmp_path)

    proc = lockcheck(clone)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    line, hint = proc.stdout.splitlines()
    assert line.startswith("train: dvc.lock contradicts itself: data.txt is ")
    assert line.endswith(" for prep (output)")
    assert hint == STALE_HINT
