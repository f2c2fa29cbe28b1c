"""download_pcam against a local HTTP server that serves tiny PCAM-format files (never Zenodo)."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.server
import re
import shutil
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from pcam import download
from pcam.download import download_pcam
from pcam.errors import PcamError
from pcam.h5io import SPLITS, Meta, meta_name, open_dataset, write_split, x_name, y_name
from tests.e2e import free_port

N_PATCHES = 8
CUT_BYTES = 50_000  # where a cut-short response stops; the x .gz files are ~220 kB
# A runaway client loop (e.g. a retry bug) gets 503s after this many requests instead of spinning.
MAX_REQUESTS = 60
TRAIN_X_GZ = x_name("train") + ".gz"
FINAL_NAMES = sorted(f(s) for s in SPLITS for f in (x_name, y_name, meta_name))


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves files from server.root; honours `Range: bytes=N-` unless server.ignore_range.

    server.cut_after[name] = K makes the next response for `name` stop after K body bytes while
    announcing the full length (a dropped connection); server.cut_unannounced[name] = K does the
    same without any Content-Length (the client cannot tell the body is short);
    server.fail_503[name] = n answers 503 to the next n requests for `name`.
    """

    def do_GET(self) -> None:
        srv = self.server
        name = urllib.parse.urlsplit(self.path).path.rsplit("/", 1)[-1]
        range_header = self.headers.get("Range")
        with srv.lock:
            srv.requests.append((name, range_header))
            too_many = len(srv.requests) > MAX_REQUESTS
            fail = srv.fail_503.get(name, 0) > 0
            if fail:
                srv.fail_503[name] -= 1
            cut = srv.cut_after.pop(name, None)
            unannounced = srv.cut_unannounced.pop(name, None)
        if too_many or fail:
            self.send_error(503)
            return
        path = srv.root / name
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        match = re.fullmatch(r"bytes=(\d+)-", range_header or "")
        start = 0
        if match and not srv.ignore_range:
            start = int(match.group(1))
            if start >= len(data):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        if unannounced is not None:
            self.end_headers()
            self.wfile.write(body[:unannounced])
            return
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        # HTTP/1.0: the connection closes when we return, so a cut body ends the transfer early.
        self.wfile.write(body if cut is None else body[:cut])

    def log_message(self, format, *args) -> None:  # keep test output quiet
        pass


@dataclass
class Served:
    url: str
    root: Path  # what the server serves (gzipped x/y, plain CSVs)
    orig: Path  # the uncompressed originals the download must reproduce
    md5: dict[str, str]
    server: http.server.ThreadingHTTPServer

    def requests_for(self, name: str) -> list[str | None]:
        return [rng for n, rng in self.server.requests if n == name]


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _write_tiny_pcam(orig: Path, root: Path) -> dict[str, str]:
    """Write real-format PCAM files to `orig`, the Zenodo layout of them to `root`; return md5s."""
    for i, split in enumerate(SPLITS):
        rng = np.random.default_rng(i)
        y = rng.integers(0, 2, N_PATCHES).astype(np.uint8)
        meta = Meta(
            coord_y=rng.integers(0, 10_000, N_PATCHES),
            coord_x=rng.integers(0, 10_000, N_PATCHES),
            tumor_patch=y.astype(bool),
            center_tumor_patch=y.astype(bool),
            wsi=np.array([f"{split}_slide_{j % 3}" for j in range(N_PATCHES)]),
        )
        x = rng.integers(0, 256, (N_PATCHES, 96, 96, 3), dtype=np.uint8)
        write_split(orig, split, x, y, meta)
        for name in (x_name(split), y_name(split)):
            (root / (name + ".gz")).write_bytes(gzip.compress((orig / name).read_bytes(), mtime=0))
        shutil.copyfile(orig / meta_name(split), root / meta_name(split))
    return {p.name: _md5(p) for p in root.iterdir()}


@pytest.fixture(autouse=True)
def _no_backoff(monkeypatch):
    monkeypatch.setattr(download, "RETRY_BACKOFF_S", 0.0)


@contextlib.contextmanager
def serving(tmp_path: Path) -> Iterator[Served]:
    """Tiny PCAM files in the Zenodo layout, served on 127.0.0.1 until the block ends."""
    root, orig = tmp_path / "served", tmp_path / "orig"
    root.mkdir(parents=True)
    md5 = _write_tiny_pcam(orig, root)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RangeHandler)
    server.root, server.requests, server.lock = root, [], threading.Lock()
    server.ignore_range, server.cut_after, server.fail_503 = False, {}, {}
    server.cut_unannounced = {}
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield Served(f"http://127.0.0.1:{server.server_port}/files", root, orig, md5, server)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def served(tmp_path):
    with serving(tmp_path) as s:
        yield s


def _fetch(served: Served, dest: Path, **kw) -> list[Path]:
    kw.setdefault("md5", served.md5)
    kw.setdefault("cache_dir", dest.parent / "cache")
    kw.setdefault("progress", False)
    return download_pcam(dest, served.url, timeout_s=5.0, **kw)


def _files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def _assert_matches_originals(served: Served, dest: Path) -> None:
    assert _files(dest) == FINAL_NAMES
    for name in FINAL_NAMES:
        assert (dest / name).read_bytes() == (served.orig / name).read_bytes(), name
    f, ds = open_dataset(dest / x_name("train"), "x")
    with f:
        assert ds.shape == (N_PATCHES, 96, 96, 3)


def test_happy_path_default_cache(served, tmp_path):
    dest = tmp_path / "raw"
    paths = download_pcam(dest, served.url, md5=served.md5, timeout_s=5.0, progress=True)
    assert sorted(p.name for p in paths) == FINAL_NAMES
    assert all(p.parent == dest for p in paths)
    assert _files(dest) == sorted([".download", *FINAL_NAMES])
    (dest / ".download").rename(tmp_path / "cache")  # compare dest without the cache in it
    _assert_matches_originals(served, dest)
    assert len(served.server.requests) == 9
    assert all(rng is None for _, rng in served.server.requests)


def test_resume_after_cut_short_transfer(served, tmp_path):
    served.server.cut_after[TRAIN_X_GZ] = CUT_BYTES
    _fetch(served, tmp_path / "raw")
    assert served.requests_for(TRAIN_X_GZ) == [None, f"bytes={CUT_BYTES}-"]
    _assert_matches_originals(served, tmp_path / "raw")


def test_resume_partial_file_from_earlier_run(served, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / (TRAIN_X_GZ + ".part")).write_bytes((served.root / TRAIN_X_GZ).read_bytes()[:1234])
    _fetch(served, tmp_path / "raw")
    assert served.requests_for(TRAIN_X_GZ) == ["bytes=1234-"]
    _assert_matches_originals(served, tmp_path / "raw")


def test_server_ignoring_range_restarts_from_zero(served, tmp_path):
    served.server.ignore_range = True
    served.server.cut_after[TRAIN_X_GZ] = CUT_BYTES
    _fetch(served, tmp_path / "raw")
    # The resume was asked for, answered with the whole file (200), and not appended to the part.
    assert served.requests_for(TRAIN_X_GZ) == [None, f"bytes={CUT_BYTES}-"]
    _assert_matches_originals(served, tmp_path / "raw")


def test_md5_mismatch_leaves_dest_empty(served, tmp_path):
    name = y_name("test") + ".gz"  # the last .gz: everything before it downloaded fine
    md5 = {**served.md5, name: "0" * 32}
    with pytest.raises(PcamError, match=rf"{name}.*expected 0{{32}}, got {served.md5[name]}"):
        _fetch(served, tmp_path / "raw", md5=md5)
    assert _files(tmp_path / "raw") == []
    assert not (tmp_path / "cache" / name).exists()
    assert not (tmp_path / "cache" / (name + ".part")).exists()


@pytest.mark.parametrize("kind", ["bad_crc", "not_hdf5", "wrong_dataset"])
def test_corrupt_gzip_or_content_leaves_dest_empty(served, tmp_path, kind):
    name = y_name("valid") + ".gz"
    gz = served.root / name
    if kind == "bad_crc":
        data = bytearray(gz.read_bytes())
        data[-8] ^= 0xFF  # the stored CRC32 no longer matches the content
        gz.write_bytes(bytes(data))
    elif kind == "not_hdf5":
        gz.write_bytes(gzip.compress(b"this is not HDF5" * 100))
    else:  # a valid HDF5 file, but it holds "x" where the y file must hold "y"
        gz.write_bytes(gzip.compress((served.orig / x_name("valid")).read_bytes()))
    md5 = {**served.md5, name: _md5(gz)}  # the checksum passes: only unpacking can tell
    message = {"bad_crc": "corrupt gzip", "not_hdf5": "not a readable HDF5", "wrong_dataset": "'y'"}
    with pytest.raises(PcamError, match=rf"{name}.*{message[kind]}"):
        _fetch(served, tmp_path / "raw", md5=md5)
    assert _files(tmp_path / "raw") == []
    assert not (tmp_path / "cache" / name).exists()  # the next run fetches it afresh


def test_bad_meta_csv_is_an_error(served, tmp_path):
    csv = served.root / meta_name("test")
    csv.write_text("a,b\n1,2\n")
    md5 = {**served.md5, csv.name: _md5(csv)}  # the checksum passes: only parsing can tell
    with pytest.raises(PcamError, match=rf"{meta_name('test')}.*columns"):
        _fetch(served, tmp_path / "raw", md5=md5)
    assert _files(tmp_path / "raw") == []


def test_meta_csv_cut_at_a_line_end_without_content_length_is_not_cached(served, tmp_path):
    # A server that sends no Content-Length and stops early: the short CSV still parses (it ends
    # at a line end), so only its md5 can tell. It must not be cached as verified.
    name = meta_name("train")
    data = (served.root / name).read_bytes()
    cut = data.rindex(b"\n", 0, len(data) - 1) + 1  # drop the last row
    served.server.cut_unannounced[name] = cut
    with pytest.raises(PcamError, match=rf"{name}: expected {served.md5[name]}, got "):
        _fetch(served, tmp_path / "raw")
    assert _files(tmp_path / "raw") == []
    assert not (tmp_path / "cache" / name).exists()
    _fetch(served, tmp_path / "raw")  # the next run fetches the whole file
    _assert_matches_originals(served, tmp_path / "raw")


def test_official_md5s_cover_every_file():
    # x, y and the meta CSVs of every split: nothing is cached as verified without a checksum.
    assert sorted(download.PCAM_MD5) == sorted(
        f(s) + ext for s in SPLITS for f, ext in ((x_name, ".gz"), (y_name, ".gz"), (meta_name, ""))
    )
    assert all(re.fullmatch(r"[0-9a-f]{32}", v) for v in download.PCAM_MD5.values())


def test_404_names_url_without_retrying(served, tmp_path):
    (served.root / TRAIN_X_GZ).unlink()
    with pytest.raises(PcamError, match=rf"{re.escape(served.url)}/{TRAIN_X_GZ}: HTTP 404"):
        _fetch(served, tmp_path / "raw")
    assert len(served.requests_for(TRAIN_X_GZ)) == 1
    assert _files(tmp_path / "raw") == []


def test_5xx_is_retried(served, tmp_path):
    served.server.fail_503[TRAIN_X_GZ] = 2
    _fetch(served, tmp_path / "raw", retries=2)
    assert len(served.requests_for(TRAIN_X_GZ)) == 3
    _assert_matches_originals(served, tmp_path / "raw")


def test_persistent_5xx_gives_up_after_retries(served, tmp_path):
    served.server.fail_503[TRAIN_X_GZ] = 10
    with pytest.raises(PcamError, match=r"failed after 3 attempts \(HTTP 503"):
        _fetch(served, tmp_path / "raw", retries=2)
    assert len(served.requests_for(TRAIN_X_GZ)) == 3


def test_connection_refused_is_an_error(tmp_path):
    port = free_port()  # free a moment ago: nothing listens there
    with pytest.raises(PcamError, match=rf"127.0.0.1:{port}/files/{TRAIN_X_GZ}: download failed"):
        download_pcam(
            tmp_path / "raw",
            f"http://127.0.0.1:{port}/files",
            retries=1,
            cache_dir=tmp_path / "cache",
            timeout_s=5.0,
            progress=False,
        )


def test_failed_run_keeps_existing_files(served, tmp_path):
    dest = tmp_path / "raw"
    _fetch(served, dest, cache_dir=tmp_path / "first_cache")
    before = {name: (dest / name).read_bytes() for name in FINAL_NAMES}
    name = x_name("valid") + ".gz"
    with pytest.raises(PcamError, match="md5 mismatch"):
        _fetch(served, dest, md5={**served.md5, name: "f" * 32})
    assert {name: (dest / name).read_bytes() for name in FINAL_NAMES} == before
    assert _files(dest) == FINAL_NAMES  # no temporaries left behind either


def test_cached_downloads_are_not_fetched_again(served, tmp_path):
    _fetch(served, tmp_path / "raw")
    assert len(served.server.requests) == 9
    _fetch(served, tmp_path / "raw2")
    assert len(served.server.requests) == 9
    _assert_matches_originals(served, tmp_path / "raw2")
    # A cached file that no longer matches its md5 is fetched again; the others are not.
    (tmp_path / "cache" / TRAIN_X_GZ).write_bytes(b"garbage")
    _fetch(served, tmp_path / "raw3")
    assert len(served.server.requests) == 10
    _assert_matches_originals(served, tmp_path / "raw3")


XY_NAMES = sorted(f(s) for s in SPLITS for f in (x_name, y_name))


def test_meta_csvs_are_optional(served, tmp_path, capsys):
    # torchvision's and tensorflow-datasets' copies of PCAM hold only the six x/y files.
    for split in SPLITS:
        (served.root / meta_name(split)).unlink()
    dest = tmp_path / "raw"
    dest.mkdir()
    (dest / meta_name("train")).write_text("an earlier download's CSV")
    paths = _fetch(served, dest)
    assert sorted(p.name for p in paths) == XY_NAMES
    assert _files(dest) == XY_NAMES  # the stale CSV does not describe these patches: gone
    for name in XY_NAMES:
        assert (dest / name).read_bytes() == (served.orig / name).read_bytes(), name
    said = [line for line in capsys.readouterr().out.splitlines() if "optional" in line]
    assert len(said) == 3 and all("HTTP 404" in line for line in said)


def test_a_missing_x_or_y_file_is_still_an_error(served, tmp_path):
    (served.root / (y_name("valid") + ".gz")).unlink()
    with pytest.raises(PcamError, match=rf"{y_name('valid')}.gz: HTTP 404"):
        _fetch(served, tmp_path / "raw")
    assert _files(tmp_path / "raw") == []


def test_file_url_local_copy_without_csvs(served, tmp_path):
    # A local copy: file:// (torchvision keeps the .h5.gz it unpacked), no meta CSVs, no server.
    for split in SPLITS:
        (served.root / meta_name(split)).unlink()
    dest = tmp_path / "raw"
    download_pcam(
        dest, served.root.as_uri(), md5=served.md5, cache_dir=tmp_path / "c", progress=False
    )
    assert _files(dest) == XY_NAMES
    assert served.server.requests == []
    for name in XY_NAMES:
        assert (dest / name).read_bytes() == (served.orig / name).read_bytes(), name


def test_checksum_table_official_or_json(tmp_path):
    assert download.load_checksums("official") is download.PCAM_MD5
    table = tmp_path / "md5.json"
    table.write_text('{"a.h5.gz": "0123456789abcdef0123456789abcdef"}')
    assert download.load_checksums(str(table)) == {"a.h5.gz": "0123456789abcdef0123456789abcdef"}
    table.write_text('{"a.h5.gz": "not an md5"}')
    with pytest.raises(PcamError, match="md5.json: md5 table must map"):
        download.load_checksums(str(table))
    with pytest.raises(PcamError, match="absent.json: cannot read the md5 table"):
        download.load_checksums(str(tmp_path / "absent.json"))
