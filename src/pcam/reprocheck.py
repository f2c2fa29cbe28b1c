"""Re-derive dvc.lock from scratch and compare every hash with the one in the workspace.

    python -m pcam.reprocheck [--repo DIR]      # or: make repro-check (CI runs it after make test)

`dvc repro --force` (nothing from the run-cache), then every dependency hash, param value and
output hash of the new dvc.lock against the saved one; only TIMING_OUTPUTS may differ (README: "CI
and pre-commit"). Exit 0: all reproduced. Exit 1: one line naming the first stage (pipeline
order) and file that differ, both hashes, and how many differ. Exit 2: `dvc repro` failed. The
saved dvc.lock and the git-tracked outputs are put back (`git status` is what it was); the new lock
is kept in NEW_LOCK. Cached outputs stay as re-derived: `dvc checkout` brings back the saved ones.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from pcam.lockcheck import (
    DirListing,
    DvcFailed,
    first_difference,
    local_dir_listings,
    locked_paths,
    no_listings,
    norm_path,
    pipeline_order,
    recorded_hash,
    run_dvc,
)

# Benchmark timings differ between any two runs: the only outputs exempt from the comparison.
# A path ending in "/" stands for every file under that directory.
TIMING_OUTPUTS = ("metrics/benchmark.json", "metrics/details/benchmark.json", "plots/benchmark/")

SECTIONS = ("deps", "params", "outs")  # within a stage: inputs first, then what it made
NEW_LOCK = Path(".dvc/tmp/repro-check/dvc.lock")  # relative to the repo root; git-ignored


def is_timing_output(path: str) -> bool:
    path = norm_path(path)
    # A directory entry ("dir/") covers the files under it and the directory as one output.
    return any(
        path == t.rstrip("/") or (t.endswith("/") and path.startswith(t)) for t in TIMING_OUTPUTS
    )


def lock_values(lock: dict[str, Any]) -> dict[tuple[str, str, str], Any]:
    """(stage, section, path or params key) -> md5 or param value, for every entry of dvc.lock
    except the timing outputs, in pipeline order."""
    values: dict[tuple[str, str, str], Any] = {}
    for stage in pipeline_order(lock):
        entry = lock["stages"][stage]
        for section in ("deps", "outs"):
            for item in entry.get(section) or []:
                if not is_timing_output(item["path"]):
                    values[(stage, section, norm_path(item["path"]))] = recorded_hash(item)
        for params_file, params in (entry.get("params") or {}).items():
            for key, value in params.items():
                values[(stage, "params", f"{params_file}:{key}")] = value
    return values


class Mismatch(NamedTuple):
    stage: str
    section: str
    path: str  # a file, or `params.yaml:train.lr`
    committed: Any
    new: Any


class Comparison(NamedTuple):
    matched: int
    mismatches: list[Mismatch]


def compare(committed: dict[str, Any], new: dict[str, Any]) -> Comparison:
    """Every entry of the committed lock against the new one; entries only in one of them count
    as mismatches too. Mismatches come in pipeline order (stage, then deps, params, outs)."""
    old_values, new_values = lock_values(committed), lock_values(new)
    order: dict[str, int] = {}
    for stage in pipeline_order(committed) + pipeline_order(new):  # new stages last
        order.setdefault(stage, len(order))
    keys = sorted(
        old_values.keys() | new_values.keys(),
        key=lambda k: (order[k[0]], SECTIONS.index(k[1]), k[2]),
    )
    pairs = [(key, old_values.get(key, "absent"), new_values.get(key, "absent")) for key in keys]
    mismatches = [Mismatch(*key, old, new) for key, old, new in pairs if old != new]
    return Comparison(matched=len(keys) - len(mismatches), mismatches=mismatches)


def describe(comparison: Comparison, listing: DirListing = no_listings) -> str:
    """The one line printed for a result."""
    if not comparison.mismatches:
        return f"repro-check: all {comparison.matched} hashes of dvc.lock reproduced"
    first = comparison.mismatches[0]
    path, committed, new = first.path, first.committed, first.new
    if first.section != "params" and isinstance(committed, str) and isinstance(new, str):
        # A directory: name the file inside it, when both listings are in the cache.
        inside = first_difference((path, committed), (path, new), listing)
        if inside and inside[0] != path:
            path, committed, new = inside
    kind = "param" if first.section == "params" else first.section.rstrip("s")
    total = len(comparison.mismatches) + comparison.matched
    return (
        f"repro-check: {len(comparison.mismatches)} of {total} hashes differ; first: stage "
        f"{first.stage}, {kind} {path}: committed {committed} vs new {new}"
    )


# --- running it ------------------------------------------------------------------------------------


def _git_tracked_outputs(repo: Path, lock: dict[str, Any]) -> list[str]:
    """Outputs in dvc.lock that git keeps (cache: false): DVC git-ignores the cached ones."""
    paths = sorted(
        {p for e in (lock.get("stages") or {}).values() for p in locked_paths(e, "outs")}
    )
    check = ["git", "check-ignore", "--no-index", "--", *paths]
    ignored = subprocess.run(check, cwd=repo, capture_output=True, text=True, check=False)
    return [p for p in paths if p not in set(ignored.stdout.split())]


def _copy_over(paths: list[str], src_root: Path, dst_root: Path) -> None:
    """Make each path under `dst_root` what it is under `src_root` (absent there: removed)."""
    for rel in paths:
        src, dst = src_root / rel, dst_root / rel
        if dst.is_dir() and not dst.is_symlink():
            shutil.rmtree(dst)
        elif dst.exists() or dst.is_symlink():
            dst.unlink()
        if src.is_dir():
            shutil.copytree(src, dst, symlinks=True)
        elif src.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)


def reproduce(repo: Path) -> tuple[dict[str, Any], dict[str, Any]] | int:
    """Run `dvc repro --force` in `repo`; return (saved lock, new lock), or dvc's exit code when it
    failed. The saved dvc.lock and the git-tracked outputs are restored either way."""
    lock_path = repo / "dvc.lock"
    committed = yaml.safe_load(lock_path.read_text()) or {}
    keep = ["dvc.lock", *_git_tracked_outputs(repo, committed)]
    with tempfile.TemporaryDirectory(prefix="repro-check-") as saved:
        _copy_over(keep, repo, Path(saved))
        try:
            proc = run_dvc(["repro", "--force"], repo, capture=False)
            if proc.returncode != 0:
                return proc.returncode
            new_text = lock_path.read_text()
            (repo / NEW_LOCK).parent.mkdir(parents=True, exist_ok=True)
            (repo / NEW_LOCK).write_text(new_text)
        finally:
            _copy_over(keep, Path(saved), repo)
    return committed, yaml.safe_load(new_text) or {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pcam.reprocheck",
        description="Run `dvc repro --force` and compare the new dvc.lock with the saved one.",
    )
    parser.add_argument("--repo", type=Path, default=Path("."), help="DVC repo root (default: cwd)")
    repo = parser.parse_args(argv).repo
    if not (repo / "dvc.lock").is_file():
        print(f"repro-check: no dvc.lock in {repo}: nothing to compare with", file=sys.stderr)
        return 2
    try:
        result = reproduce(repo)
    except DvcFailed as err:
        print(f"repro-check: {err}", file=sys.stderr)
        return 2
    if isinstance(result, int):
        print(f"repro-check: `dvc repro --force` exited {result} (see above)", file=sys.stderr)
        return 2
    comparison = compare(*result)
    print(describe(comparison, local_dir_listings(repo)))
    return 1 if comparison.mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
