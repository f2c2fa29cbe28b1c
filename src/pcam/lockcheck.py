"""Check that dvc.lock is current with the committed code, params and dvc.yaml, without any data.

    python -m pcam.lockcheck [--repo DIR]      # or: make lock-check (CI, on a fresh clone)

Exit 0: nothing `dvc repro` would re-run except for outputs that are merely absent. Exit 1: one line
per problem (`train: param changed: train.lr`) and a hint to re-run and commit. Exit 2: dvc itself
failed (not a DVC repo, invalid dvc.yaml / dvc.lock / params.yaml).

Why not simpler tools: `dvc status` reports every absent output in a clone without data, and
`dvc repro --dry --allow-missing` misses some changes (DVC issues 9818 and 9861). So this parses
`dvc status --json` and sets "absent" apart from real drift, using dvc.lock for what status cannot
say (whether a stage or an output is recorded in the lock at all). What counts as current is what
DVC uses to decide whether to re-run a stage: entries removed from dvc.yaml but left in dvc.lock,
and frozen stages, are not reported (DVC ignores them). Only the root dvc.lock is read.

It also refuses a dvc.lock that contradicts itself (README: "CI and pre-commit"), which `dvc
status` cannot see without data (DVC issue 5369).
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
from pathlib import Path
from typing import Any, NamedTuple

import yaml

# Output states that only say the file is not here (no data pulled, or a clone has no cache).
ABSENT = ("not in cache", "deleted")
PARAM_KINDS = {
    "modified": "param changed",
    "new": "param not in dvc.lock",
    "deleted": "param deleted from params file",
}
STALE_HINT = "dvc.lock is stale: run `dvc repro` and commit dvc.lock"


class Drift(NamedTuple):
    """One way in which dvc.lock no longer describes the pipeline, for one stage."""

    stage: str
    kind: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.stage}: {self.kind}" + (f": {self.detail}" if self.detail else "")


def norm_path(path: str) -> str:
    # dvc status prints OS paths relative to the cwd; dvc.lock keeps dvc.yaml's spelling.
    return posixpath.normpath(path.replace("\\", "/"))


def overlaps(a: str, b: str) -> bool:
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def locked_paths(entry: dict[str, Any], key: str) -> set[str]:
    return {norm_path(item["path"]) for item in entry.get(key) or []}


def _status_outs(entries: list[Any]) -> dict[str, str]:
    return {
        p: s for e in entries if isinstance(e, dict) for p, s in e.get("changed outs", {}).items()
    }


def find_drift(status: dict[str, Any], lock: dict[str, Any]) -> list[Drift]:
    """Real changes in `dvc status --json` output (`status`), ignoring outputs merely absent.

    `lock` is the parsed dvc.lock ({} when there is none): in a clone without data, a stage never
    run or an output never recorded looks in `status` exactly like a recorded one that is absent.
    """
    locked = lock.get("stages") or {}
    # A deleted dependency is only absence when it is (inside) some stage's output: a clone has
    # upstream outputs missing. Outputs of `.dvc` files are not in dvc.lock, so take status's too.
    all_outs = {path for entry in locked.values() for path in locked_paths(entry, "outs")}
    all_outs |= {norm_path(path) for entries in status.values() for path in _status_outs(entries)}

    drift: list[Drift] = []
    for stage, entries in status.items():
        if stage.endswith(".dvc"):  # `dvc add` / `dvc import` files: only an edit counts
            outs = _status_outs(entries).items()
            drift += [
                Drift(stage, "output modified in workspace", p) for p, s in outs if s not in ABSENT
            ]
            continue
        if stage not in locked:
            # Everything else about a never-run stage is noise: its deps all look "modified".
            drift.append(Drift(stage, "stage not in dvc.lock (run dvc repro)"))
            continue
        params_files = {norm_path(p) for p in locked[stage].get("params") or {}}
        deps = locked_paths(locked[stage], "deps") | params_files
        outs = locked_paths(locked[stage], "outs")
        for item in entries:
            if isinstance(item, str):
                # "always changed": the stage opted out of caching; that is not a stale lock.
                if item != "always changed":
                    drift.append(
                        Drift(stage, {"changed command": "command changed"}.get(item, item))
                    )
                continue
            for path, state in item.get("changed deps", {}).items():
                if isinstance(state, dict):  # a params file: {"train.lr": "modified", ...}
                    drift += [
                        Drift(stage, PARAM_KINDS.get(s, f"param {s}"), k) for k, s in state.items()
                    ]
                elif norm_path(path) not in deps:
                    # Added to dvc.yaml, no recorded hash: "modified", or "deleted" when absent.
                    drift.append(Drift(stage, "dependency not in dvc.lock", path))
                elif state != "deleted" or not any(overlaps(norm_path(path), o) for o in all_outs):
                    drift.append(Drift(stage, f"dependency {state}", path))
            for path, state in item.get("changed outs", {}).items():
                if norm_path(path) not in outs:
                    # An output added to dvc.yaml: absent, it shows as "deleted" like a recorded one.
                    drift.append(Drift(stage, "output not in dvc.lock", path))
                elif state not in ABSENT:
                    kind = {"modified": "modified in workspace"}.get(state, state)
                    drift.append(Drift(stage, f"output {kind}", path))
    return drift


def absent_outputs(status: dict[str, Any]) -> list[str]:
    """Outputs that `dvc status` reports only as not here: what this check cannot verify."""
    outs = (_status_outs(entries).items() for entries in status.values())
    return sorted({norm_path(p) for items in outs for p, state in items if state in ABSENT})


# --- dvc.lock against itself ----------------------------------------------------------------------

# A directory's per-file hashes: `.dir` md5 -> {relpath: md5}, or None when the listing is not here.
DirListing = Callable[[str], "dict[str, str] | None"]


def no_listings(_md5: str) -> dict[str, str] | None:
    return None


class Contradiction(NamedTuple):
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
    outs = {name: locked_paths(entry, "outs") for name, entry in stages.items()}
    upstream = {
        name: {
            other
            for other in stages
            if other != name
            for dep in locked_paths(stages[name], "deps")
            if any(overlaps(dep, out) for out in outs[other])
        }
        for name in stages
    }
    order: list[str] = []
    while len(order) < len(stages):
        ready = [n for n in stages if n not in order and upstream[n] <= set(order)]
        # A cycle cannot be run by DVC; keep the rest in lock order rather than loop forever.
        order.append(ready[0] if ready else next(n for n in stages if n not in order))
    return order


def recorded_hash(item: dict[str, Any]) -> str | None:
    return item.get("md5") or item.get("etag") or item.get("checksum")


def first_difference(
    a: tuple[str, str], b: tuple[str, str], listing: DirListing
) -> tuple[str, str, str] | None:
    """Where two recorded (path, md5) entries for overlapping paths disagree: (path, md5 in a,
    md5 in b), None when they agree or cannot be compared (a `.dir` listing is not here)."""
    if a == b:
        return None
    files = []
    for path, md5 in (a, b):
        entries = listing(md5) if md5.endswith(".dir") else {"": md5}
        if entries is None:
            # Unknown contents: only an equal path can still be judged (by the hash of the whole).
            return (a[0], a[1], b[1]) if a[0] == b[0] else None
        files.append({posixpath.join(path, rel) if rel else path: h for rel, h in entries.items()})
    # Compare the part both entries describe: the deeper of the two paths.
    inner = max(a[0], b[0], key=len)
    files_a, files_b = (
        {p: h for p, h in f.items() if (p + "/").startswith(inner + "/")} for f in files
    )
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
    order = pipeline_order(lock)
    entries = {
        (name, key): [(norm_path(i["path"]), recorded_hash(i)) for i in stages[name].get(key) or []]
        for name in order
        for key in ("outs", "deps")
    }
    found = []
    for producer in order:
        for out in entries[producer, "outs"]:
            for consumer in order:
                for dep in entries[consumer, "deps"] if consumer != producer else []:
                    comparable = out[1] and dep[1] and overlaps(out[0], dep[0])
                    if comparable and (diff := first_difference(out, dep, listing)):
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


class DvcFailed(Exception):
    """dvc itself could not answer (not a repo, invalid YAML, dvc missing, remote unreachable)."""


def dvc_executable() -> str:
    # Prefer the dvc of this interpreter's venv: CI may not have the venv's bin/ on PATH.
    beside = Path(sys.executable).parent / "dvc"
    found = str(beside) if beside.is_file() and os.access(beside, os.X_OK) else shutil.which("dvc")
    if found is None:
        raise DvcFailed("dvc not found next to the Python interpreter or on PATH")
    return found


def run_dvc(args: list[str], repo: Path, capture: bool = True) -> subprocess.CompletedProcess[str]:
    """`dvc ARGS` in `repo` (output captured unless `capture` is false)."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    cmd = [dvc_executable(), *args]
    return subprocess.run(cmd, cwd=repo, env=env, capture_output=capture, text=True, check=False)


def dvc_out(args: list[str], repo: Path) -> str:
    """The stdout of `dvc ARGS` in `repo`; DvcFailed naming the command when it fails."""
    proc = run_dvc(args, repo)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines() or ["(no output)"]
        # dvc ends every failure with a "Having any troubles?" banner; its ERROR line says why.
        errors = [ln.removeprefix("ERROR: ") for ln in lines if ln.startswith("ERROR: ")]
        why = errors[0] if errors else lines[-1]
        raise DvcFailed(f"`dvc {' '.join(args)}` exited {proc.returncode}: {why}")
    return proc.stdout


def dvc_json(args: list[str], repo: Path) -> dict[str, Any]:
    """Run `dvc ARGS` (ARGS including --json) in `repo`; its stdout parsed as a JSON object."""
    command = f"`dvc {' '.join(args)}`"
    # Warnings (e.g. about frozen stages) go to stderr; stdout holds only the JSON.
    try:
        doc = json.loads(dvc_out(args, repo) or "{}")
    except json.JSONDecodeError as err:
        raise DvcFailed(f"{command} printed something that is not JSON: {err}") from err
    if not isinstance(doc, dict):
        raise DvcFailed(f"{command} printed a {type(doc).__name__}, not an object")
    return doc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pcam.lockcheck", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--repo", type=Path, default=Path("."), help="DVC repo root (default: cwd)")
    args = parser.parse_args(argv)
    if not args.repo.is_dir():
        print(f"error: --repo {args.repo} is not a directory", file=sys.stderr)
        return 2
    try:
        status = dvc_json(["status", "--json"], args.repo)
    except DvcFailed as err:
        print(f"error: in {args.repo}: {err}", file=sys.stderr)
        return 2
    lock_path = args.repo / "dvc.lock"  # none: nothing has been run
    lock = (yaml.safe_load(lock_path.read_text()) or {}) if lock_path.exists() else {}
    problems = [
        *find_drift(status, lock),
        *find_contradictions(lock, local_dir_listings(args.repo)),
    ]
    for problem in problems:
        print(problem)
    if problems:
        print(STALE_HINT)
        return 1
    n_stages, n_absent = len(lock.get("stages") or {}), len(absent_outputs(status))
    print(f"dvc.lock is current ({n_stages} stages; {n_absent} outputs absent, not checked)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
