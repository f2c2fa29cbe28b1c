"""Bring back the outputs dvc.lock records, after a failed `dvc repro` or `dvc exp run`.

    python -m pcam.restore [STAGE ...]      # default: every stage in dvc.lock

DVC deletes a stage's outputs before running it and updates dvc.lock only on success; a failing
stage names this command (pcam.errors.restore_hint). Each output that does not match dvc.lock
comes back from the DVC cache (`cache: false` metrics and plots too when DVC's run-cache stored
them), else, for a `cache: false` output, from git HEAD when HEAD's dvc.lock records the same
hash. params.yaml and dvc.lock are not touched. Exit 1 with one line per output not restored.

Not `dvc checkout`: it skips `cache: false` outputs. Like DVC's own run-cache restore, this
rebuilds the stage from its lock entry (StageCache._create_stage, a private API: dvc is pinned in
constraints.txt and tests/test_nothing_lost_e2e.py runs this against the real CLI).
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
from pathlib import Path

import yaml

from pcam.errors import PcamError, exit_on_user_error


def _lock_stages(text: str) -> dict:
    return (yaml.safe_load(text) or {}).get("stages", {})


def _head_hashes(root: Path) -> dict[tuple[str, str], str | None]:
    """(stage, path) -> md5 in dvc.lock as committed in git HEAD ({} outside git)."""
    git = ["git", "show", "HEAD:./dvc.lock"]
    proc = subprocess.run(git, cwd=root, capture_output=True, text=True)
    stages = _lock_stages(proc.stdout) if proc.returncode == 0 else {}
    return {
        (name, out["path"]): out.get("md5")
        for name, entry in stages.items()
        for out in entry.get("outs") or []
    }


def _matches_lock(out) -> bool:
    return out.exists and not out.changed_checksum()


def restore(root: Path, stages: list[str]) -> tuple[list[str], list[str]]:
    """Restore what dvc.lock records for `stages` (all when empty): (what was done, problems)."""
    from dvc.exceptions import CheckoutError
    from dvc.repo import Repo

    lock_path = root / "dvc.lock"
    if not lock_path.is_file():
        raise PcamError(f"{lock_path}: no dvc.lock, so no earlier outputs are recorded")
    lock = _lock_stages(lock_path.read_text())
    unknown = [s for s in stages if s not in lock]
    if unknown:
        raise PcamError(
            f"{lock_path}: no stage {', '.join(map(repr, unknown))} (recorded: {', '.join(lock)})"
        )
    head = _head_hashes(root)
    done, problems = [], []
    with Repo(str(root)) as repo, repo.lock:
        uncached = {
            (stage.addressing, out.def_path)
            for stage in repo.index.stages
            for out in stage.outs
            if not out.use_cache
        }
        for name in stages or list(lock):
            recorded = repo.stage_cache._create_stage(lock[name], wdir=repo.root_dir)
            for out in recorded.outs:
                path, is_uncached = out.def_path, (name, out.def_path) in uncached
                if _matches_lock(out):
                    continue
                if not out.changed_cache():
                    # Uncached outputs are copied: they are committed to git as plain files.
                    copy = repo.stage_cache._cache_type_copy
                    try:
                        with copy() if is_uncached else contextlib.nullcontext():
                            out.checkout(force=True)
                    except CheckoutError as err:
                        problems.append(f"{path}: checkout from the DVC cache failed ({err})")
                        continue
                    source = "the DVC cache"
                elif is_uncached and head.get((name, path)) == out.hash_info.value:
                    out.remove()  # a half-written directory would keep files HEAD does not have
                    subprocess.run(
                        ["git", "restore", "--source=HEAD", "--worktree", "--", path],
                        cwd=root,
                        check=True,
                        capture_output=True,
                    )
                    source = "git HEAD"
                else:
                    where = "the DVC cache or git HEAD" if is_uncached else "the DVC cache"
                    problems.append(
                        f"{path} (stage '{name}'): the version dvc.lock records is not in {where}; "
                        f"`dvc pull {name}` fetches it if it was pushed, `dvc repro {name}` remakes it"
                    )
                    continue
                if not _matches_lock(out):
                    problems.append(f"{path}: restored from {source} but differs from dvc.lock")
                    continue
                done.append(f"{path}: restored from {source}")
    return done, problems


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pcam.restore", description=__doc__.split("\n")[0])
    ap.add_argument("stages", nargs="*", metavar="STAGE", help="default: every stage in dvc.lock")
    args = ap.parse_args(argv)
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        done, problems = restore(Path(Repo.find_root()), args.stages)
    except DvcException as err:  # not a DVC repository, its lock held by a running dvc, ...
        raise PcamError(f"dvc: {' '.join(str(err).split())}") from None
    for line in done:
        print(f"restore: {line}")
    if problems:
        for line in problems:
            print(f"error: {line}", file=sys.stderr)
        sys.exit(1)
    if not done:
        print("restore: every output already matches dvc.lock")


if __name__ == "__main__":
    main()
