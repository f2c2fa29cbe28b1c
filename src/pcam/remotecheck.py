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

Exit 0: every cached output is in the remote. Exit 1: one line per missing file, `not in remote
'gcs': models/model.pt (in the local cache: dvc push)`, then a summary. Exit 2: no remote
configured, or dvc could not reach it (the message says which).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pcam.lockcheck import DvcFailed, dvc_json, run_dvc

NO_DEFAULT_HINT = (
    "no default DVC remote: `dvc remote default --local gcs` where credentials are set up "
    "(README: Remote storage), or make remote-check REMOTE=NAME"
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
        remote = args.remote
        if not remote:
            proc = run_dvc(["remote", "default"], args.repo)
            remote = proc.stdout.strip() if proc.returncode == 0 else ""
        if not remote:
            raise DvcFailed(NO_DEFAULT_HINT)
        cmd = ["data", "status", "--not-in-remote", "--granular", "--json", "--remote", remote]
        status = dvc_json(cmd, args.repo)
    except DvcFailed as err:
        print(f"remote-check: {err}", file=sys.stderr)
        return 2
    missing = sorted(status.get("not_in_remote") or [])
    not_cached = set(status.get("not_in_cache") or [])
    if not missing:
        print(f"remote-check: every cached output in dvc.lock is in remote '{remote}'")
        return 0
    for path in missing:
        hint = (
            "not in the local cache either"
            if path in not_cached
            else "in the local cache: dvc push"
        )
        print(f"not in remote '{remote}': {path} ({hint})")
    print(
        f"remote-check: {len(missing)} cached file(s) named in dvc.lock are not in remote "
        f"'{remote}': `dvc push` them from a workspace that has them"
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
