"""Check that every cached output named in dvc.lock is in the DVC remote, so a teammate's
`dvc pull` of this commit will find it.

    python -m pcam.remotecheck [--repo DIR] [--remote NAME]     # or: make remote-check [REMOTE=NAME]

Works in a clone without data or cache (CI). It asks DVC itself, file by file:
`dvc data status --not-in-remote --granular --json -r NAME` compares what dvc.lock (and any `.dvc`
file) names with the remote, inside directory outputs too, reading each directory's `.dir` listing
from the local cache or else from the default remote. A directory whose listing is in neither
place is reported as one entry, `data/raw/`. (Not `dvc status --cloud`: it leaves such a directory
out of its answer with only a warning, and counts every file of a directory as present once the
directory's `.dir` object is, DVC issue 8079.)

Exit 0: `remote-check: every cached output in dvc.lock is in remote 'gcs'`. Exit 1: one line per
missing file, `not in remote 'gcs': models/model.pt (in the local cache: dvc push)`, then a summary.
Exit 2: no remote configured, or dvc could not reach it (the message says which).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pcam.lockcheck import DvcFailed, dvc_json, run_dvc

HINTS = {True: "in the local cache: dvc push", False: "not in the local cache either"}

NO_DEFAULT_HINT = (
    "no default DVC remote: `dvc remote default --local gcs` where credentials are set up "
    "(README: Remote storage), or make remote-check REMOTE=NAME"
)


class RemoteCheckFailed(DvcFailed):
    """dvc could not answer (no remote, unreachable remote, invalid repo)."""


@dataclass(frozen=True)
class Missing:
    path: str  # a file, or a directory (ending in "/") whose listing is nowhere to be found
    in_cache: bool


def remote_name(repo: Path, remote: str | None) -> str:
    """The remote to check: `remote` when given, else the repo's default remote."""
    if remote:
        return remote
    proc = run_dvc(["remote", "default"], repo)
    name = proc.stdout.strip()
    if proc.returncode != 0 or not name:
        raise RemoteCheckFailed(NO_DEFAULT_HINT)
    return name


def not_in_remote(status: dict[str, Any]) -> list[Missing]:
    """What the remote lacks, from `dvc data status --not-in-remote --json`, sorted by path."""
    not_cached = set(status.get("not_in_cache") or [])
    return [Missing(p, p not in not_cached) for p in sorted(status.get("not_in_remote") or [])]


def data_status(repo: Path, remote: str) -> dict[str, Any]:
    return dvc_json(
        ["data", "status", "--not-in-remote", "--granular", "--json", "--remote", remote], repo
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pcam.remotecheck",
        description="Check that every cached output in dvc.lock is in the DVC remote.",
    )
    parser.add_argument("--repo", type=Path, default=Path("."), help="DVC repo root (default: cwd)")
    parser.add_argument("--remote", help="DVC remote name (default: the default remote)")
    args = parser.parse_args(argv)

    try:
        remote = remote_name(args.repo, args.remote)
        missing = not_in_remote(data_status(args.repo, remote))
    except DvcFailed as err:
        print(f"remote-check: {err}", file=sys.stderr)
        return 2
    if not missing:
        print(f"remote-check: every cached output in dvc.lock is in remote '{remote}'")
        return 0
    for item in missing:
        print(f"not in remote '{remote}': {item.path} ({HINTS[item.in_cache]})")
    print(
        f"remote-check: {len(missing)} cached file(s) named in dvc.lock are not in remote "
        f"'{remote}': `dvc push` them from a workspace that has them"
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
