"""Atomic file writes (an interrupted stage never leaves a half-written output that looks valid),
and file checksums."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds.

    The temporary file lives in the same directory so the final os.replace is atomic (same
    filesystem). On any exception the temporary file is removed and `path` is left untouched,
    so whatever was there before survives.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp creates 0600; give the final file the usual permissions (0666 minus umask).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as sorted, indented JSON atomically (stable bytes for identical content)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def md5_file(path: str | os.PathLike, chunk_bytes: int = 2**20) -> str:
    """md5 of a file read in chunks (an integrity check, not security)."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def write_csv(
    path: str | os.PathLike, columns: dict[str, Any], float_format: str = "{:.6f}"
) -> None:
    """Write equal-length columns as CSV atomically (DVC plots read CSV with a header row)."""
    names = list(columns)
    n = len(columns[names[0]])
    fmt = [float_format if isinstance(columns[k][0], float) else "{}" for k in names] if n else []
    lines = [",".join(names)]
    for i in range(n):
        lines.append(",".join(f.format(columns[k][i]) for f, k in zip(fmt, names, strict=True)))
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
