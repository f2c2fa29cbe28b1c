"""The committed dvc.lock matches the committed code and params, checked the way CI checks it:
in a fresh clone without data or DVC cache; and the check catches real drift in this pipeline."""

from __future__ import annotations

import sys

import pytest
import yaml

from tests.conftest import REPO
from tests.e2e import run

pytestmark = pytest.mark.e2e


@pytest.fixture
def clone(tmp_path):
    dest = tmp_path / "clone"
    run(["git", "clone", "-q", str(REPO), str(dest)], tmp_path)
    return dest


def lockcheck(repo):
    return run([sys.executable, "-m", "pcam.lockcheck", "--repo", str(repo)], repo, check=False)


def test_fresh_clone_passes(clone):
    out = lockcheck(clone)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "dvc.lock is current (7 stages" in out.stdout


def test_changed_param_fails_naming_stage_and_param(clone):
    path = clone / "params.yaml"
    path.write_text(path.read_text().replace("dark_fraction: 0.1 ", "dark_fraction: 0.2 "))
    out = lockcheck(clone)
    assert out.returncode == 1
    assert "slice: param changed: slice.dark_fraction" in out.stdout


def test_edited_stage_file_fails_naming_it(clone):
    with open(clone / "stages" / "evaluate.py", "a") as fh:
        fh.write("\n# an edit\n")
    out = lockcheck(clone)
    assert out.returncode == 1
    assert "evaluate: dependency modified: stages/evaluate.py" in out.stdout


def test_changed_cmd_fails(clone):
    path = clone / "dvc.yaml"
    doc = yaml.safe_load(path.read_text())
    doc["stages"]["benchmark"]["cmd"] += " --verbose"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    out = lockcheck(clone)
    assert out.returncode == 1
    assert "benchmark: command changed" in out.stdout


def test_lock_contradicting_itself_fails_naming_both_stages(clone):
    # As after `dvc repro -s prepare` with another data.synthetic.seed: prepare records a new
    # data/raw, the stages that read it still record the old one.
    path = clone / "dvc.lock"
    lock = yaml.safe_load(path.read_text())
    (out,) = lock["stages"]["prepare"]["outs"]
    old, new = out["md5"], "0123456789abcdef0123456789abcdef.dir"
    out["md5"] = new
    path.write_text(yaml.safe_dump(lock, sort_keys=False))
    out = lockcheck(clone)
    assert out.returncode == 1, out.stdout + out.stderr
    assert (
        f"validate-data: dvc.lock contradicts itself: data/raw is {old} for validate-data "
        f"(dependency) but {new} for prepare (output)"
    ) in out.stdout.splitlines()
