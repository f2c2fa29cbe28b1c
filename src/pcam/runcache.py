"""Push DVC's run-cache together with the files its records name, so other clones can use it.

    python -m pcam.runcache push [-r REMOTE]      # instead of `dvc push --run-cache`

`dvc push --run-cache` (DVC 3.67) uploads the run records but, of the files they name, only the
outputs of the workspace's dvc.lock and never a `cache: false` output; DVC restores a stage only
when it can get every output, so a clone that pulls the records still runs it. This pushes the
records and every file they name; the teammate's side is DVC's own (`dvc pull --run-cache`, then
`dvc exp run --pull` or `dvc repro --pull`; README: "Remote storage (GCS)", tests/test_remote_gcs.py).
"""

from __future__ import annotations

import argparse

from pcam.errors import PcamError, exit_on_user_error


def push(remote: str | None = None) -> tuple[int, int, int]:
    """(records pushed, files uploaded, files already in the remote), or PcamError."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    uploaded, present = 0, 0
    try:
        with Repo() as repo, repo.lock:
            records = repo.stage_cache.push(remote)  # what `dvc push --run-cache` sends
            # Each record as a stage with every output cached: its model, metrics and plots.
            for objs in repo.stage_cache.get_used_objs(records).values():
                result = repo.cloud.push(objs, remote=remote)
                if result.failed:
                    raise PcamError(
                        f"run-cache push to {remote or 'the default remote'}: "
                        f"{len(result.failed)} of {len(objs)} files failed to upload"
                    )
                uploaded += len(result.transferred)
                present += len(objs) - len(result.transferred)
    except DvcException as err:  # no remote, an http remote (no run-cache there), a held lock
        raise PcamError(f"dvc: {' '.join(str(err).split())}") from None
    return len(records), uploaded, present


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pcam.runcache", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    push_ap = sub.add_parser("push", help="push the run-cache and the files its records name")
    push_ap.add_argument("-r", "--remote", help="a DVC remote (default: the default remote)")
    records, uploaded, present = push(ap.parse_args(argv).remote)
    print(
        f"runcache: {records} run records pushed; the files they name: {uploaded} uploaded, "
        f"{present} already in the remote"
    )


if __name__ == "__main__":
    main()
