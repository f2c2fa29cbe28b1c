"""Check that dvc.lock is current with the committed code, params and dvc.yaml, without any data.

Run it in CI on a fresh clone (no data, no DVC cache):

    python -m pcam.lockcheck [--repo DIR]      # or: make lock-check

Exit 0: nothing `dvc repro` would re-run except for outputs that are merely absent. Exit 1: one line
per problem (`train: param changed: train.lr`) and a hint to re-run and commit. Exit 2: dvc itself
failed (not a DVC repo, invalid dvc.yaml / dvc.lock / params.yaml).

Why not simpler tools: `dvc status` reports every absent output in a clone without data, and
`dvc repro --dry --allow-missing` misses some changes (DVC issues 9818 and 9861). So this parses
`dvc status --json` and sets "absent" apart from real drift, using dvc.lock for what status cannot
say (whether a stage or an output is recorded in the lock at all).

What counts as current is what DVC itself uses to decide whether to re-run a stage. Two
consequences: dependencies, params, outputs or stages *removed* from dvc.yaml but still in dvc.lock
are not reported (DVC ignores the leftover entries, and `dvc repro` would not touch them); and
frozen stages are not checked (DVC neither reports nor re-runs them). Only the root dvc.lock is
read, so stages of a nested dvc.yaml would be reported as not in dvc.lock; this project has none.

It also refuses a dvc.lock that contradicts itself, which `dvc status` cannot see without data
(DVC issue 5369): a stage re-run alone (`dvc repro -s prepare` after a param change) records a new
hash for its output while a downstream stage still records the old one for the same path. Exact
paths are always compared, also in a clone with no data or cache. When one path lies inside the
other (a stage depends on `data/raw/x.h5` from the directory output `data/raw`), the per-file
hashes are only in the directory's `.dir` listing in the DVC cache: such pairs are compared when
that listing is in the local cache, and skipped otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import posixpath
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

# Drift kinds: each is the middle part of a printed line `stage: kind: detail`.
STAGE_NOT_LOCKED = "stage not in dvc.lock (run dvc repro)"
COMMAND_CHANGED = "command changed"
PARAM_CHANGED = "param changed"
PARAM_NOT_LOCKED = "param not in dvc.lock"
PARAM_DELETED = "param deleted from params file"
DEP_MODIFIED = "dependency modified"
DEP_DELETED = "dependency deleted"
DEP_NOT_LOCKED = "dependency not in dvc.lock"
OUT_MODIFIED = "output modified in workspace"
OUT_NOT_LOCKED = "output not in dvc.lock"

# Output states that only say the file is not here (no data pulled, or a clone has no cache).
ABSENT = ("not in cache", "deleted")

STALE_HINT = "dvc.lock is stale: run `dvc repro` and commit dvc.lock"


@dataclass(frozen=True)
class Drift:
    """One way in which dvc.lock no longer describes the pipeline, for one stage."""

    stage: str
    kind: str
    detail: str = ""

    def __str__(self) -> str:
        line = f"{self.stage}: {self.kind}"
        return f"{line}: {self.detail}" if self.detail else line


def norm_path(path: str) -> str:
    # dvc status prints OS paths relative to the cwd; dvc.lock keeps dvc.yaml's spelling.
    return posixpath.normpath(path.replace("\\", "/"))


def _overlaps(a: str, b: str) -> bool:
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def _locked_paths(entry: dict[str, Any], key: str) -> set[str]:
    return {norm_path(item["path"]) for item in entry.get(key) or []}


def _status_outs(entries: list[Any]) -> dict[str, str]:
    outs: dict[str, str] = {}
    for entry in entries:
        if isinstance(entry, dict):
            outs.update(entry.get("changed outs", {}))
    return outs


def _is_data_file(key: str) -> bool:
    # `dvc add` / `dvc import` files appear in status under their own name, not as stages.
    return key.endswith(".dvc")


def find_drift(status: dict[str, Any], lock: dict[str, Any]) -> list[Drift]:
    """Real changes in `dvc status --json` output, ignoring outputs that are merely absent.

    `status` is the parsed JSON of `dvc status --json`; `lock` is the parsed dvc.lock ({} when
    there is none). The lock is needed because in a clone without data a stage that was never run,
    or an output that was never recorded, looks in `status` exactly like a recorded one whose file
    is absent.
    """
    locked = lock.get("stages") or {}
    # A deleted dependency is only absence when it is (inside) some stage's output: a clone has
    # upstream outputs missing. Outputs of `.dvc` files are not in dvc.lock, so take status's too.
    all_outs = {path for entry in locked.values() for path in _locked_paths(entry, "outs")}
    all_outs |= {norm_path(path) for entries in status.values() for path in _status_outs(entries)}

    drift: list[Drift] = []
    for stage, entries in status.items():
        if _is_data_file(stage):
            for path, state in _status_outs(entries).items():
                if state not in ABSENT:
                    drift.append(Drift(stage, OUT_MODIFIED, path))
            continue
        if stage not in locked:
            # Everything else about a never-run stage is noise: its deps all look "modified".
            drift.append(Drift(stage, STAGE_NOT_LOCKED))
            continue
        entry = locked[stage]
        locked_deps = _locked_paths(entry, "deps") | {
            norm_path(p) for p in entry.get("params") or {}
        }
        locked_outs = _locked_paths(entry, "outs")
        for item in entries:
            if isinstance(item, str):
                drift.extend(_stage_drift(stage, item))
                continue
            for path, state in item.get("changed deps", {}).items():
                drift.extend(_dep_drift(stage, path, state, locked_deps, all_outs))
            for path, state in item.get("changed outs", {}).items():
                drift.extend(_out_drift(stage, path, state, locked_outs))
    return drift


def _stage_drift(stage: str, state: str) -> list[Drift]:
    if state == "changed command":
        return [Drift(stage, COMMAND_CHANGED)]
    if state == "always changed":
        # The stage opted out of caching (always_changed: true); that is not a stale lock.
        return []
    return [Drift(stage, state)]


def _dep_drift(
    stage: str, path: str, state: str | dict[str, str], locked_deps: set[str], all_outs: set[str]
) -> list[Drift]:
    if isinstance(state, dict):  # a params file: {"train.lr": "modified", ...}
        kinds = {"modified": PARAM_CHANGED, "new": PARAM_NOT_LOCKED, "deleted": PARAM_DELETED}
        return [Drift(stage, kinds.get(s, f"param {s}"), key) for key, s in state.items()]
    if norm_path(path) not in locked_deps:
        # A dependency added to dvc.yaml has no recorded hash: status calls it "modified", or
        # "deleted" when it is an upstream output absent from this clone. Either way it is new.
        return [Drift(stage, DEP_NOT_LOCKED, path)]
    if state == "deleted":
        if any(_overlaps(norm_path(path), out) for out in all_outs):
            return []
        return [Drift(stage, DEP_DELETED, path)]
    if state == "modified":
        return [Drift(stage, DEP_MODIFIED, path)]
    return [Drift(stage, f"dependency {state}", path)]


def _out_drift(stage: str, path: str, state: str, locked_outs: set[str]) -> list[Drift]:
    if norm_path(path) not in locked_outs:
        # An output added to dvc.yaml: absent, it shows as "deleted" just like a recorded one.
        return [Drift(stage, OUT_NOT_LOCKED, path)]
    if state in ABSENT:
        return []
    if state == "modified":
        return [Drift(stage, OUT_MODIFIED, path)]
    return [Drift(stage, f"output {state}", path)]


def absent_outputs(status: dict[str, Any]) -> list[str]:
    """Outputs that `dvc status` reports only as not here: what this check cannot verify."""
    paths = {
        norm_path(path)
        for entries in status.values()
        for path, state in _status_outs(entries).items()
        if state in ABSENT
    }
    return sorted(paths)


# --- dvc.lock against itself ----------------------------------------------------------------------

# A directory's per-file hashes: `.dir` md5 -> {relpath: md5}, or None when the listing is not here.
DirListing = Callable[[str], "dict[str, str] | None"]


def no_listings(_md5: str) -> dict[str, str] | None:
    return None


@dataclass(frozen=True)
class Contradiction:
    """`consumer` recorded `dep_md5` for `path`; `producer`, which writes it, recorded `out_md5`."""

    producer: str
    consumer: str
    path: str
    out_md5: str
    dep_md5: str

    def __str__(self) -> str:
        return (
            f"{self.consumer}: dvc.lock contradicts itself: {self.path} is {self.dep_md5} for "
            f"{self.consumer} (dependency) but {self.out_md5} for {self.producer} (output)"
        )


def pipeline_order(lock: dict[str, Any]) -> list[str]:
    """The stages of dvc.lock, each after the stages whose outputs it depends on (ties: lock order)."""
    stages = lock.get("stages") or {}
    names = list(stages)
    outs = {name: _locked_paths(stages[name], "outs") for name in names}
    upstream = {
        name: {
            other
            for other in names
            if other != name
            for dep in _locked_paths(stages[name], "deps")
            for out in outs[other]
            if _overlaps(dep, out)
        }
        for name in names
    }
    order: list[str] = []
    while len(order) < len(names):
        ready = [n for n in names if n not in order and upstream[n] <= set(order)]
        # A cycle cannot be run by DVC; keep the rest in lock order rather than loop forever.
        order.append(ready[0] if ready else next(n for n in names if n not in order))
    return order


def recorded_hash(item: dict[str, Any]) -> str | None:
    return item.get("md5") or item.get("etag") or item.get("checksum")


def _files(path: str, md5: str, listing: DirListing) -> dict[str, str] | None:
    """Per-file hashes of one lock entry, or None for a directory whose listing is not here."""
    if not md5.endswith(".dir"):
        return {path: md5}
    entries = listing(md5)
    if entries is None:
        return None
    return {posixpath.join(path, rel): h for rel, h in entries.items()}


def _within(files: dict[str, str], inner: str) -> dict[str, str]:
    return {p: h for p, h in files.items() if p == inner or p.startswith(inner + "/")}


def first_difference(
    a: tuple[str, str], b: tuple[str, str], listing: DirListing
) -> tuple[str, str, str] | None:
    """Where two recorded (path, md5) entries for overlapping paths disagree: (path, md5 in a,
    md5 in b), None when they agree or cannot be compared (a `.dir` listing is not here)."""
    (path_a, md5_a), (path_b, md5_b) = a, b
    if path_a == path_b and md5_a == md5_b:
        return None
    files_a, files_b = _files(path_a, md5_a, listing), _files(path_b, md5_b, listing)
    if files_a is None or files_b is None:
        # Unknown contents: only an equal path can still be judged (by the hash of the whole).
        return (path_a, md5_a, md5_b) if path_a == path_b else None
    # Compare the part both entries describe: the deeper of the two paths.
    inner = max(path_a, path_b, key=len)
    files_a, files_b = _within(files_a, inner), _within(files_b, inner)
    for path in sorted(files_a.keys() | files_b.keys()):
        if files_a.get(path) != files_b.get(path):
            return path, files_a.get(path, "absent"), files_b.get(path, "absent")
    return None


def find_contradictions(
    lock: dict[str, Any], listing: DirListing = no_listings
) -> list[Contradiction]:
    """Every path whose hash as an output of one stage differs from the hash another stage
    recorded for it (or for a file inside it, or a directory holding it) as a dependency."""
    stages = lock.get("stages") or {}
    found: list[Contradiction] = []
    order = pipeline_order(lock)
    for producer in order:
        for out in stages[producer].get("outs") or []:
            out_entry = (norm_path(out["path"]), recorded_hash(out))
            if out_entry[1] is None:
                continue
            for consumer in order:
                if consumer == producer:
                    continue
                for dep in stages[consumer].get("deps") or []:
                    dep_entry = (norm_path(dep["path"]), recorded_hash(dep))
                    if dep_entry[1] is None or not _overlaps(out_entry[0], dep_entry[0]):
                        continue
                    diff = first_difference(out_entry, dep_entry, listing)
                    if diff:
                        found.append(Contradiction(producer, consumer, *diff))
    return found


def local_dir_listings(repo: Path) -> DirListing:
    """Read `.dir` listings from the repo's local DVC cache (wherever config puts it)."""
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc_repo:
        odb = dvc_repo.cache.local

    def listing(md5: str) -> dict[str, str] | None:
        try:
            entries = json.loads(Path(odb.oid_to_path(md5)).read_text())
        except (OSError, ValueError):
            return None
        return {e["relpath"]: e["md5"] for e in entries if "relpath" in e and "md5" in e}

    return listing


# --- running dvc -----------------------------------------------------------------------------------


def dvc_executable() -> str | None:
    # Prefer the dvc of this interpreter's venv: CI may not have the venv's bin/ on PATH.
    beside = Path(sys.executable).parent / "dvc"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("dvc")


class DvcFailed(Exception):
    """dvc itself could not report a status (not a repo, invalid YAML, dvc missing)."""


def run_dvc(args: list[str], repo: Path) -> subprocess.CompletedProcess[str]:
    """`dvc ARGS` in `repo`, output captured; DvcFailed when there is no dvc to run."""
    dvc = dvc_executable()
    if dvc is None:
        raise DvcFailed("dvc not found next to the Python interpreter or on PATH")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    return subprocess.run(
        [dvc, *args], cwd=repo, env=env, capture_output=True, text=True, check=False
    )


def error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """dvc's own `ERROR: ...` line, else whatever it printed."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("ERROR: ")]
    return lines[0].removeprefix("ERROR: ") if lines else proc.stderr.strip() or proc.stdout.strip()


def dvc_json(args: list[str], repo: Path) -> dict[str, Any]:
    """Run `dvc ARGS` (ARGS including --json) in `repo`; its stdout parsed as a JSON object."""
    proc = run_dvc(args, repo)
    command = f"`dvc {' '.join(args)}`"
    if proc.returncode != 0:
        raise DvcFailed(f"{command} exited {proc.returncode}: {error_line(proc)}")
    # Warnings (e.g. about frozen stages) go to stderr; stdout holds only the JSON.
    try:
        status = json.loads(proc.stdout or "{}")
    except json.JSONDecodeError as err:
        raise DvcFailed(f"{command} printed something that is not JSON: {err}") from err
    if not isinstance(status, dict):
        raise DvcFailed(f"{command} printed a {type(status).__name__}, not an object")
    return status


def dvc_status(repo: Path) -> dict[str, Any]:
    """Run `dvc status --json` in `repo` and return its parsed stdout."""
    return dvc_json(["status", "--json"], repo)


def read_lock(repo: Path) -> dict[str, Any]:
    """The parsed dvc.lock of `repo`, or {} when there is none (nothing has been run)."""
    path = repo / "dvc.lock"
    if not path.exists():
        return {}
    return yaml.safe_load(path.read_text()) or {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pcam.lockcheck",
        description="Check that dvc.lock is current; works on a clone with no data or cache.",
    )
    parser.add_argument(
        "--repo", type=Path, default=Path("."), help="root of the DVC repo (default: cwd)"
    )
    args = parser.parse_args(argv)

    if not args.repo.is_dir():
        print(f"error: --repo {args.repo} is not a directory", file=sys.stderr)
        return 2
    try:
        status = dvc_status(args.repo)
    except DvcFailed as err:
        print(f"error: in {args.repo}: {err}", file=sys.stderr)
        return 2
    lock = read_lock(args.repo)

    problems: list[Drift | Contradiction] = [*find_drift(status, lock)]
    problems += find_contradictions(lock, local_dir_listings(args.repo))
    if problems:
        for problem in problems:
            print(problem)
        print(STALE_HINT)
        return 1
    n_stages = len(lock.get("stages") or {})
    n_absent = len(absent_outputs(status))
    print(f"dvc.lock is current ({n_stages} stages; {n_absent} outputs absent, not checked)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
