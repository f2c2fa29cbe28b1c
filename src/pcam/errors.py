"""User-facing errors: one clear line, non-zero exit, no traceback."""

from __future__ import annotations

import functools
import os
import sys
import traceback
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable[..., object])


class PcamError(Exception):
    """A problem with the user's input (data, params, checkpoint), not a bug in the code.

    The message must name the problem and where it is (file, dataset, split, index, key).
    """


def restore_hint() -> str:
    """Under `dvc repro`/`dvc exp run` (DVC sets DVC_STAGE): DVC deleted this stage's outputs
    before running it, so a failure says how to get them back. Empty outside DVC."""
    stage = os.environ.get("DVC_STAGE")
    if not stage:
        return ""
    return (
        f" [dvc removed the earlier outputs of stage '{stage}'; `python -m pcam.restore {stage}` "
        "brings back the ones dvc.lock records]"
    )


def exit_on_user_error(main: F) -> F:
    """Wrap a CLI `main` so a PcamError prints `error: <message>` and exits 1 instead of a traceback.

    Bugs (any other exception) still raise with a full traceback: those are ours to fix. Under
    DVC either failure also names the command that brings back the outputs DVC deleted.
    """

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except PcamError as err:
            print(f"error: {err}{restore_hint()}", file=sys.stderr)
            sys.exit(1)
        except Exception:
            hint = restore_hint()
            if not hint:
                raise
            traceback.print_exc()  # a bug: the traceback, then the way back as the last line
            print(hint.strip(" []"), file=sys.stderr)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]
