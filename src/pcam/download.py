"""Download the official PCAM files (Zenodo record 2546921) into a raw-data directory.

Zenodo serves x and y as gzipped HDF5 (`*.h5.gz`) and the meta CSVs plain. Every file is first
downloaded into a cache directory (a partial file resumes with an HTTP Range request) and verified
there: md5, and the CSVs are parsed. The meta CSVs are optional: a source without them (HTTP 404,
or a missing file behind a file:// URL, e.g. torchvision's copy, which holds only the six x/y
files) is used without them, and later stages skip what needs them. Only when every file is
verified are they unpacked into `dest_dir`, each into a temporary that must open as HDF5 holding
the right dataset, and renamed into place together: an interrupted or corrupt download leaves
nothing in `dest_dir` that looks valid, and the files already there survive a failed run.
Verified downloads stay in the cache, so running again does not download them again.
"""

from __future__ import annotations

import contextlib
import gzip
import http.client
import json
import re
import shutil
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Mapping
from pathlib import Path

import h5py
from tqdm import tqdm

from pcam.errors import PcamError
from pcam.fileio import atomic_path, md5_file
from pcam.h5io import SPLITS, first_line, meta_name, read_meta, x_name, y_name

# md5 of every file, the meta CSVs included: a CSV cut short at a line end by a server that sent
# no Content-Length still parses, and only its md5 tells. The table in the PCAM README
# (github.com/basveeling/pcam) lists the valid and test rows swapped, for the CSVs as for x and y:
# there valid_x is d8c2... and test_x is d5b6.... The files themselves hash as below (the same
# values torchvision's PCAM class checks for x and y, and that DVC lock files of projects that
# downloaded the CSVs record for them).
PCAM_MD5 = {
    "camelyonpatch_level_2_split_train_x.h5.gz": "1571f514728f59376b705fc836ff4b63",
    "camelyonpatch_level_2_split_train_y.h5.gz": "35c2d7259d906cfc8143347bb8e05be7",
    "camelyonpatch_level_2_split_train_meta.csv": "5a3dd671e465cfd74b5b822125e65b0a",
    "camelyonpatch_level_2_split_valid_x.h5.gz": "d5b63470df7cfa627aeec8b9dc0c066e",
    "camelyonpatch_level_2_split_valid_y.h5.gz": "2b85f58b927af9964a4c15b8f7e8f179",
    "camelyonpatch_level_2_split_valid_meta.csv": "67589e00a4a37ec317f2d1932c7502ca",
    "camelyonpatch_level_2_split_test_x.h5.gz": "d8c2d60d490dbd479f8199bdfa0cf6ec",
    "camelyonpatch_level_2_split_test_y.h5.gz": "60a7035772fbdb7f34eb86d4420cf66a",
    "camelyonpatch_level_2_split_test_meta.csv": "3455fd69135b66734e1008f3af684566",
}
CHUNK_BYTES = 1 << 20  # 1 MiB reads/writes: full throughput, constant memory, smooth progress bar
# The k-th consecutive retry waits RETRY_BACKOFF_S * 2**(k-1): transient errors clear within
# seconds, and a server that is really down should fail the stage quickly, not hang it.
RETRY_BACKOFF_S = 1.0


class _NotFound(PcamError):
    """The source has no such file (HTTP 404/410, or a file:// path that does not exist)."""


def download_pcam(
    dest_dir: Path,
    base_url: str,
    *,
    md5: Mapping[str, str] | None = None,
    cache_dir: Path | None = None,
    timeout_s: float = 60.0,
    retries: int = 3,
    progress: bool = True,
) -> list[Path]:
    """Download, verify and unpack the PCAM files into `dest_dir`; return the final paths (nine,
    or six when the source has no meta CSVs).

    A file's URL is `base_url/name`. `md5` maps remote file names to md5s (unlisted files are not
    hashed); None means PCAM_MD5, looked up at call time so that tests can swap it. `cache_dir`
    (default `dest_dir/.download`) keeps the downloads. `retries` counts consecutive attempts that
    received nothing: progress resets it, so a slow flaky link still finishes. `timeout_s` is the
    socket timeout for connecting and for each read.
    """
    md5 = PCAM_MD5 if md5 is None else md5
    dest_dir = Path(dest_dir)
    cache_dir = Path(cache_dir) if cache_dir is not None else dest_dir / ".download"
    cache_dir.mkdir(parents=True, exist_ok=True)
    # (name in dest_dir, HDF5 dataset it must hold, or None for the CSV)
    plan = [(f(s), d) for s in SPLITS for f, d in ((x_name, "x"), (y_name, "y"), (meta_name, None))]

    # All network work and checks first: a failure here has not touched dest_dir at all.
    cached = {}
    for final, dataset in plan:
        remote = final if dataset is None else final + ".gz"
        url = f"{base_url.rstrip('/')}/{remote}"
        try:
            path = _fetch(url, cache_dir / remote, md5.get(remote), timeout_s, retries, progress)
        except _NotFound as err:
            if dataset is not None:
                raise
            print(f"download: {err}; continuing without it (the meta CSVs are optional)")
            continue
        if dataset is None:
            try:
                read_meta(path)
            except PcamError as err:
                path.unlink()  # so that a rerun fetches it again
                raise PcamError(f"{err} (deleted the download; run again to retry)") from None
        cached[final] = path, dataset

    # ExitStack renames the temporaries only if every one unpacked and checked, and removes them
    # all otherwise, so dest_dir is never half-updated.
    with contextlib.ExitStack() as stack:
        for final, (src, dataset) in cached.items():
            tmp = stack.enter_context(atomic_path(dest_dir / final))
            if dataset is None:
                shutil.copyfile(src, tmp)
            else:
                _gunzip_checked(src, tmp, dataset)
    for final, _ in plan:
        if final not in cached:  # a CSV of an earlier download would not describe these patches
            (dest_dir / final).unlink(missing_ok=True)
    return [dest_dir / final for final in cached]


def load_checksums(spec: str) -> Mapping[str, str]:
    """`official`: the table above. Otherwise a JSON file mapping remote file name to md5, for a
    mirror that repacked the files (and for tests, which serve small PCAM-format files)."""
    if spec == "official":
        return PCAM_MD5
    path = Path(spec)
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise PcamError(f"{path}: cannot read the md5 table (data.pcam.checksums): {err}") from None
    if not isinstance(table, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and re.fullmatch(r"[0-9a-fA-F]{32}", v)
        for k, v in table.items()
    ):
        raise PcamError(f"{path}: md5 table must map file names to 32-hex-digit md5 strings")
    return table


def _fetch(
    url: str, path: Path, expected_md5: str | None, timeout_s: float, retries: int, progress: bool
) -> Path:
    """`path` holding the verified content of `url`, downloading (resuming, retrying transient
    errors) only what is missing."""
    expected_md5 = expected_md5.lower() if expected_md5 else None
    if path.is_file():
        if expected_md5 is None or md5_file(path) == expected_md5:
            return path
        path.unlink()  # a cached file that no longer matches (disk error, edited): fetch it afresh
    # The download grows in `.part`; only a complete, verified file gets the cache name.
    part = path.with_name(path.name + ".part")
    failures = 0
    while True:
        offset = part.stat().st_size if part.exists() else 0
        try:
            if _transfer(url, part, offset, timeout_s, progress):
                break
            reason = "connection closed before the end of the file"
        except urllib.error.HTTPError as err:
            if err.code == 416 and offset > 0:
                # The partial file is not a prefix the server can continue (e.g. longer than the
                # remote file): start over rather than give up.
                part.unlink()
                continue
            if err.code in (404, 410):
                raise _NotFound(f"{url}: HTTP {err.code} {err.reason}") from None
            if not (err.code >= 500 or err.code in (408, 429)):
                raise PcamError(f"{url}: HTTP {err.code} {err.reason}") from None
            reason = f"HTTP {err.code} {err.reason}"
        except urllib.error.URLError as err:
            if isinstance(err.reason, FileNotFoundError):  # file:// URL (urllib's FileHandler)
                raise _NotFound(f"{url}: no such file") from None
            reason = str(err.reason)
        except (OSError, http.client.HTTPException) as err:
            reason = str(err) or type(err).__name__
        made_progress = part.exists() and part.stat().st_size > offset
        failures = 0 if made_progress else failures + 1
        if failures > retries:
            raise PcamError(f"{url}: download failed after {failures} attempts ({reason})")
        time.sleep(RETRY_BACKOFF_S * 2 ** max(failures - 1, 0))
    if expected_md5 is not None and (actual := md5_file(part)) != expected_md5:
        part.unlink()  # resuming a corrupt file could never fix it: the next run starts over
        raise PcamError(
            f"{url}: md5 mismatch for {path.name}: expected {expected_md5}, got {actual} "
            "(deleted the download; run again to retry)"
        )
    part.replace(path)
    return path


def _transfer(url: str, part: Path, offset: int, timeout_s: float, progress: bool) -> bool:
    """One HTTP request appending to `part` from `offset`; True if the file is now complete."""
    headers = {"User-Agent": "pcam-pipeline (urllib)"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=timeout_s) as resp:
        if resp.status == 206:
            match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", resp.headers.get("Content-Range", ""))
            if match is None or int(match.group(1)) != offset:
                part.unlink()  # a range we did not ask for cannot be appended: start over
                return False
            total = None if match.group(2) == "*" else int(match.group(2))
        else:  # no Range sent, or the server ignored it and sends the whole file: from zero
            offset = 0
            length = resp.headers.get("Content-Length")
            total = int(length) if length is not None else None
        with (
            open(part, "ab" if offset else "wb") as fh,
            tqdm.wrapattr(
                fh, "write", total, initial=offset, desc=part.stem, disable=not progress
            ) as out,
        ):
            shutil.copyfileobj(resp, out, CHUNK_BYTES)
    # http.client returns a short body without raising when the peer closes early, so the size
    # check is what detects a dropped connection (without Content-Length only md5 can).
    return total is None or part.stat().st_size == total


def _gunzip_checked(gz: Path, out: Path, dataset: str) -> None:
    """Stream-gunzip `gz` into `out`, which must be HDF5 holding `dataset`; a bad `gz` is deleted
    so that a rerun fetches it again."""
    try:
        with gzip.open(gz, "rb") as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, CHUNK_BYTES)
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        gz.unlink()
        raise PcamError(
            f"{gz}: corrupt gzip ({first_line(err)}); deleted it, run again to retry"
        ) from None
    try:
        with h5py.File(out, "r") as f:
            found = None if isinstance(f.get(dataset), h5py.Dataset) else list(f.keys())
    except OSError as err:
        gz.unlink()
        raise PcamError(
            f"{gz}: unpacked content is not a readable HDF5 file ({first_line(err)})"
        ) from None
    if found is not None:
        gz.unlink()
        raise PcamError(f"{gz}: unpacked HDF5 has no dataset '{dataset}' (found {found})")
