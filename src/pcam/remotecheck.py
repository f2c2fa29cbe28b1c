"""Check that every cached output named in dvc.lock is in the DVC remote, so a teammate's
`dvc pull` of this commit will find it.

    python -m pcam.remotecheck [--repo DIR] [--remote NAME]     # or: make remote-check [REMOTE=NAME]

Works in a clone without data or cache: `dvc data status --not-in-remote --granular`, file by file
inside directories; a directory whose `.dir` listing is nowhere is named as a whole, `data/raw/`.
Why not `dvc status --cloud`: README, "Remote storage (GCS)" (and DVC issue 8079). Exit 1: one line
per missing file, then a summary. Exit 2: no remote configured, or dvc could not reach it.
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
