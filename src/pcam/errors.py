"""User-facing errors: one clear line, non-zero exit, no traceback."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable[..., object])


class PcamError(Exception):
    """A problem with the user's input (data, params, checkpoint), not a bug in the code.

    The message must name the problem and where it is (file, dataset, split, index, key).
    """


def exit_on_user_error(main: F) -> F:
    """Wrap a CLI `main` so a PcamError prints `error: <message>` and exits 1 instead of a traceback.

    Bugs (any other exception) still raise with a full traceback: those are ours to fix.
    """

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except PcamError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]
