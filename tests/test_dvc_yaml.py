"""dvc.yaml keeps its contracts: stage names, code deps that match imports, leaf params."""

from __future__ import annotations

import ast
import difflib
from pathlib import Path

import yaml

from tests.conftest import REPO
from tests.e2e import STAGES

# Read by a stage but unable to change its outputs, so neither declared (a change would re-run the
# pipeline for nothing) nor written into any output: how patient prepare's download is, which md5
# table accepts it. tests/test_params_reads_e2e.py checks that the stage does read them.
UNDECLARED_ON_PURPOSE = {
    "prepare": {"data.pcam.timeout_s", "data.pcam.retries", "data.pcam.checksums"},
}
# Read by `python -m pcam.drift` (a check run on new data after the pipeline), by no stage.
READ_OUTSIDE_THE_PIPELINE = {
    f"drift.{key}"
    for key in (
        "bins",
        "feature_shift_max",
        "prediction_psi_max",
        "prediction_ks_max",
        "min_patches",
    )
}


def dvc_yaml() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())


def script_of(stage: dict) -> Path:
    return REPO / stage["cmd"].split()[1]


def pcam_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "pcam":
                found |= {alias.name for alias in node.names}
            elif node.module.startswith("pcam."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("pcam.")}
    return found


def code_closure(script: Path) -> set[str]:
    """Every src/pcam module a stage script imports, directly or through other modules."""
    seen: set[str] = set()
    # Importing any pcam module runs the package's __init__ (CPU numerics pins, stage lifetime).
    todo = list(pcam_imports(script)) + ["__init__"]
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        todo += list(pcam_imports(REPO / "src" / "pcam" / f"{mod}.py"))
    return {f"src/pcam/{m}.py" for m in seen}


def leaf_keys(doc: dict, prefix: str = "") -> set[str]:
    keys = set()
    for k, v in doc.items():
        if isinstance(v, dict):
            keys |= leaf_keys(v, f"{prefix}{k}.")
        else:
            keys.add(prefix + k)
    return keys


def test_stage_names_exactly():
    assert tuple(dvc_yaml()["stages"]) == STAGES


def test_code_deps_match_what_each_stage_imports():
    # A module missing from deps means a code change that DVC would not re-run; an extra one
    # means needless re-runs. Both are checked so the list cannot drift.
    for name, stage in dvc_yaml()["stages"].items():
        script = script_of(stage)
        declared = {d for d in stage["deps"] if d.startswith(("src/", "stages/"))}
        expected = code_closure(script) | {str(script.relative_to(REPO))}
        assert declared == expected, f"{name}: declared {sorted(declared ^ expected)} differ"


def test_params_are_leaves_and_every_leaf_is_used():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    leaves = leaf_keys(params)
    used = set()
    for name, stage in dvc_yaml()["stages"].items():
        for key in stage.get("params", []):
            assert key in leaves, f"{name}: param {key} is not a leaf of params.yaml"
            used.add(key)
    assert leaves - used == set().union(*UNDECLARED_ON_PURPOSE.values()) | READ_OUTSIDE_THE_PIPELINE


def test_metrics_and_plots_are_not_cached():
    for name, stage in dvc_yaml()["stages"].items():
        for section in ("metrics", "plots"):
            for entry in stage.get(section, []):
                ((path, opts),) = entry.items()
                assert opts.get("cache") is False, f"{name}: {path} must be cache: false"


# Paths a stage script names that are neither inputs nor outputs of the pipeline.
# The download cache and the resumable training checkpoint: state kept aside from DVC on purpose.
NOT_PIPELINE_PATHS = {".cache/pcam", ".cache/checkpoints/train.pt"}


def path_constants(script: Path) -> set[str]:
    """Module-level NAME = Path("...") constants of a stage script: the files it touches."""
    found = set()
    for node in ast.parse(script.read_text()).body:
        if (
            isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Call)
            and getattr(node.value.func, "id", None) == "Path"
            and node.value.args
            and isinstance(node.value.args[0], ast.Constant)
        ):
            found.add(node.value.args[0].value)
    return found


def _names(entries: list) -> list[str]:
    return [e if isinstance(e, str) else next(iter(e)) for e in entries]


def test_every_path_a_stage_touches_is_declared():
    # Catches the silent bug of a stage reading a file DVC does not know it depends on (DVC
    # would then skip it when that file changes) or writing an undeclared output.
    for name, stage in dvc_yaml()["stages"].items():
        declared = set(stage["deps"])
        for section in ("outs", "metrics", "plots"):
            declared |= set(_names(stage.get(section, [])))
        for path in path_constants(script_of(stage)) - NOT_PIPELINE_PATHS:
            related = [
                d
                for d in declared
                if d == path or d.startswith(path + "/") or path.startswith(d + "/")
            ]
            assert related, f"{name}: {path} is used by {script_of(stage).name} but not declared"


def test_benchmark_depends_on_what_it_times_only():
    # Not the trained weights nor lr/seed/epochs/...: an lr or seed experiment must not re-run it.
    from pcam.benchmark import TIMED_TRAIN_PARAMS

    stage = dvc_yaml()["stages"]["benchmark"]
    assert "models/model.pt" not in stage["deps"]
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    benchmark_keys = {k for k in leaf_keys(params) if k.startswith("benchmark.")}
    assert set(stage["params"]) == benchmark_keys | {f"train.{k}" for k in TIMED_TRAIN_PARAMS}


def test_params_yaml_is_written_the_way_dvc_writes_it_back(tmp_path):
    # `dvc exp run -S` rewrites params.yaml with DVC's own YAML round trip (ruamel: flow lists
    # become block lists, a comment after a flow list moves). params.yaml is kept in the form that
    # round trip produces, so an experiment's params.yaml differs in the line it set, nothing else.
    from dvc.utils.hydra import apply_overrides

    original = (REPO / "params.yaml").read_text()
    path = tmp_path / "params.yaml"
    path.write_text(original)
    seed = yaml.safe_load(original)["train"]["seed"]
    apply_overrides(path, [f"train.seed={seed}"])  # what -S does, with the value it has
    assert path.read_text() == original
    apply_overrides(path, ["train.lr=1e-4"])
    diff = difflib.unified_diff(original.splitlines(), path.read_text().splitlines(), n=0)
    changed = [line for line in diff if line[:1] in "+-" and line[:3] not in ("+++", "---")]
    lr = yaml.safe_load(original)["train"]["lr"]
    assert changed == [f"-  lr: {lr}", "+  lr: 0.0001"]


def test_each_plot_file_is_declared_once():
    """A file under a stage's `plots:` and again under the top-level `plots:` is drawn twice by
    `dvc plots show` (once per definition)."""
    doc = dvc_yaml()
    in_stages = [
        next(iter(entry)) if isinstance(entry, dict) else entry
        for stage in doc["stages"].values()
        for entry in stage.get("plots", [])
    ]
    top = []
    for entry in doc.get("plots", []):
        name, props = next(iter(entry.items())) if isinstance(entry, dict) else (entry, None)
        ys = (props or {}).get("y")
        top += list(ys) if isinstance(ys, dict) else [name]
    twice = [t for t in top for s in in_stages if t == s or t.startswith(s.rstrip("/") + "/")]
    assert not twice, twice


# Imported by several stages for what they share; not a stage's own logic (README, "The pipeline").
SHARED_MODULES = {
    *("__init__", "errors", "fileio", "h5io", "lifetime", "numerics", "params", "plots"),
    *("provenance", "data", "models", "checkpoint", "inference", "allocator"),
}
# Another stage's module, run on purpose: the benchmark times the training step itself, and slice
# scores its slices with evaluate's metrics (the same definitions and intervals).
ALSO_RUNS = {"benchmark": {"training"}, "slice": {"metrics"}}


def test_each_stage_logic_is_in_the_two_files_the_readme_names():
    """A newcomer finds a stage's logic in its script plus one module (prepare: one per data
    source): the README's table names them, and the code deps in dvc.yaml hold no other."""
    rows = {}
    for line in (REPO / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 4 and cells[0].strip("`") in STAGES:
            rows[cells[0].strip("`")] = cells[3]
    assert set(rows) == set(STAGES)
    for name, stage in dvc_yaml()["stages"].items():
        named = rows[name].split("`")[1::2]
        assert named[0] == f"stages/{script_of(stage).name}", name
        own = {Path(p).stem for p in named[1:]}
        assert 1 <= len(own) <= (2 if name == "prepare" else 1), (name, own)
        deps = {Path(d).stem for d in stage["deps"] if d.startswith("src/pcam/")}
        assert deps - SHARED_MODULES - ALSO_RUNS.get(name, set()) == own, name
