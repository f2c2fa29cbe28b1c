"""Each stage declares in dvc.yaml exactly the params it reads, and records no other.

Every stage script runs for real, in order, on tiny data in a temporary copy of the repo, under
tests/params_reads.py, which records each leaf of params.yaml the stage reads (an attribute
read on what `load_params` returned, by the stage or the library). Those reads are compared
with the stage's `params:` in dvc.yaml, both ways: a param read but not declared changes the
outputs while DVC calls the stage up to date; one declared but not read re-runs it for nothing.
prepare runs twice, from the synthetic source and from a file:// copy of what it wrote
(data.source: pcam), so both of its paths are seen.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml

from pcam import h5io
from pcam.checkpoint import load_checkpoint
from tests.e2e import STAGES, TINY, copy_repo, read_json, run, set_params
from tests.test_dvc_yaml import UNDECLARED_ON_PURPOSE

pytestmark = pytest.mark.e2e

# The branches that read more params: sgd reads train.momentum, plateau train.plateau_*. The
# benchmark cut to one measurement of each kind: what is timed is not the point here.
SETTINGS = TINY | {
    "train.optimizer": "sgd",
    "train.scheduler": "plateau",
    "benchmark.batch_sizes": [1],
    "benchmark.repeats": 1,
    "benchmark.warmup": 0,
    "benchmark.loader_patches": 32,
    "benchmark.train_loop_patches": 64,
}

# Declared and read, but only under a setting this test does not run (each stage reads them in
# one place). The test fails when one of them is read after all: the entry is then stale.
READ_UNDER_OTHER_SETTINGS = {
    # models.model_config reads the size key of train.model only: width for cnn, this for mlp.
    "train": {"train.hidden_units": "train.model: mlp"},
    "evaluate": {"train.hidden_units": "train.model: mlp"},
    # validation.label_problems reads the action of a label check that failed, only.
    "validate-data": {
        f"validate.label_checks.{check}": f"a split failing the {check} check"
        for check in ("one_class", "class_balance", "meta_agreement")
    },
}


def dvc_stages(repo: Path) -> dict:
    return yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]


def run_recorded(repo: Path, stage: dict, out: Path) -> set[str]:
    script = stage["cmd"].split()[1]  # python stages/NAME.py
    run(["python", "-m", "tests.params_reads", script, str(out)], repo)
    return set(json.loads(out.read_text()))


def mirror(raw: Path, to: Path) -> Path:
    """The files in `raw` as a PCAM mirror serves them (x, y gzipped); returns its md5 table."""
    to.mkdir()
    for split in h5io.SPLITS:
        x, y, meta = h5io.split_files(raw, split)
        for path in (x, y):
            (to / f"{path.name}.gz").write_bytes(gzip.compress(path.read_bytes(), mtime=0))
        shutil.copyfile(meta, to / meta.name)
    table = to.parent / "md5.json"
    md5 = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in to.glob("*.gz")}
    table.write_text(json.dumps(md5))
    return table


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> tuple[Path, dict[str, set[str]]]:
    """The repo copy after every stage ran once, and the params each stage read."""
    tmp = tmp_path_factory.mktemp("reads")
    repo = copy_repo(tmp / "repo", SETTINGS)
    stages = dvc_stages(repo)
    reads = {}
    for name in STAGES:
        reads[name] = run_recorded(repo, stages[name], tmp / f"{name}.json")
        if name == "prepare":
            table = mirror(repo / "data" / "raw", tmp / "mirror")
            pcam = {"data.source": "pcam", "data.pcam.base_url": (tmp / "mirror").as_uri()}
            set_params(repo, pcam | {"data.pcam.checksums": str(table)})
            reads[name] |= run_recorded(repo, stages[name], tmp / f"{name}-pcam.json")
    return repo, reads


def test_each_stage_reads_exactly_the_params_it_declares(recorded):
    repo, reads = recorded
    problems = []
    for name, stage in dvc_stages(repo).items():
        declared = set(stage.get("params", []))
        on_purpose = UNDECLARED_ON_PURPOSE.get(name, set())
        elsewhere = set(READ_UNDER_OTHER_SETTINGS.get(name, {}))
        for keys, what in (
            (reads[name] - declared - on_purpose, "reads params dvc.yaml does not declare for it"),
            (declared - reads[name] - elsewhere, "declares params it never read"),
            (on_purpose - reads[name], "no longer reads (drop from UNDECLARED_ON_PURPOSE)"),
            (elsewhere & reads[name], "reads now (drop from READ_UNDER_OTHER_SETTINGS)"),
            (elsewhere - declared, "does not declare (READ_UNDER_OTHER_SETTINGS lists)"),
        ):
            if keys:
                problems.append(f"{name} {what}: {', '.join(sorted(keys))}")
    assert not problems, "\n".join(problems)


def test_outputs_record_exactly_the_declared_params(recorded):
    # What a stage writes about its params is what dvc.lock records for it: another param in
    # there would change the bytes of an output DVC calls up to date.
    repo, _ = recorded
    values = yaml.safe_load((repo / "params.yaml").read_text())

    def declared(name: str) -> dict:
        out = {}
        for key in dvc_stages(repo)[name]["params"]:
            node = values
            for part in key.split("."):
                node = node[part]
            out[key] = node
        return out

    written = {
        "train": load_checkpoint(repo / "models/model.pt")["provenance"]["params"],
        "train details": read_json(repo / "metrics/details/train.json")["provenance"]["params"],
        "evaluate": read_json(repo / "metrics/details/eval.json")["provenance"]["params"],
        "slice": read_json(repo / "metrics/details/slices.json")["provenance"]["params"],
        "benchmark": read_json(repo / "metrics/details/benchmark.json")["params"],
    }
    for name, params in written.items():
        assert params == declared(name.split()[0]), name
