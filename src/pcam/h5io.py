"""The PCAM file format: names, layout, and reading/writing it.

Official layout (Veeling et al., PatchCamelyon, Zenodo record 2546921):
  camelyonpatch_level_2_split_{split}_x.h5   dataset "x", (N, 96, 96, 3) uint8, RGB
  camelyonpatch_level_2_split_{split}_y.h5   dataset "y", (N, 1, 1, 1) uint8, 1 = tumour in centre 32x32
  camelyonpatch_level_2_split_{split}_meta.csv  coord_y, coord_x, tumor_patch, center_tumor_patch, wsi
"""

from __future__ import annotations

import codecs
import csv
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from pcam.errors import PcamError
from pcam.fileio import atomic_path

SPLITS = ("train", "valid", "test")
PATCH_SHAPE = (96, 96, 3)
META_COLUMNS = ("coord_y", "coord_x", "tumor_patch", "center_tumor_patch", "wsi")
# Rows per HDF5 chunk when we write: 256 patches = 7 MiB, large enough for fast contiguous reads.
WRITE_CHUNK_ROWS = 256


def x_name(split: str) -> str:
    return f"camelyonpatch_level_2_split_{split}_x.h5"


def y_name(split: str) -> str:
    return f"camelyonpatch_level_2_split_{split}_y.h5"


def meta_name(split: str) -> str:
    return f"camelyonpatch_level_2_split_{split}_meta.csv"


def split_files(raw_dir: str | os.PathLike, split: str) -> tuple[Path, Path, Path]:
    raw_dir = Path(raw_dir)
    return raw_dir / x_name(split), raw_dir / y_name(split), raw_dir / meta_name(split)


@dataclass(frozen=True)
class Meta:
    """The per-patch metadata CSV as columns."""

    coord_y: np.ndarray
    coord_x: np.ndarray
    tumor_patch: np.ndarray  # bool: any tumour in the patch
    center_tumor_patch: np.ndarray  # bool: tumour in the centre 32x32 (== label)
    wsi: np.ndarray  # str: slide id

    def __len__(self) -> int:
        return len(self.wsi)


def write_h5_dataset(
    path: Path, name: str, data: np.ndarray, compression: str | None = None
) -> None:
    """Write one dataset atomically, chunked along the first axis like the official files."""
    with atomic_path(path) as tmp:
        chunks = (min(WRITE_CHUNK_ROWS, max(1, len(data))),) + data.shape[1:]
        with h5py.File(tmp, "w") as f:
            kw = (
                {"compression": compression, "compression_opts": 1} if compression == "gzip" else {}
            )
            f.create_dataset(name, data=data, chunks=chunks, **kw)


def write_meta(path: Path, meta: Meta) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(META_COLUMNS)
        for row in zip(
            meta.coord_y,
            meta.coord_x,
            meta.tumor_patch,
            meta.center_tumor_patch,
            meta.wsi,
            strict=True,
        ):
            cy, cx, tp, ctp, wsi = row
            w.writerow([int(cy), int(cx), bool(tp), bool(ctp), str(wsi)])


def write_split(
    raw_dir: str | os.PathLike,
    split: str,
    x: np.ndarray,
    y: np.ndarray,
    meta: Meta,
    compression: str | None = None,
) -> None:
    """Write x, y (as the official (N,1,1,1) shape) and meta for one split."""
    if x.dtype != np.uint8 or x.shape[1:] != PATCH_SHAPE:
        raise ValueError(f"x must be (N,96,96,3) uint8, got {x.shape} {x.dtype}")
    xp, yp, mp = split_files(raw_dir, split)
    write_h5_dataset(xp, "x", x, compression)
    write_h5_dataset(yp, "y", np.asarray(y, dtype=np.uint8).reshape(-1, 1, 1, 1), compression)
    write_meta(mp, meta)


def read_meta(path: str | os.PathLike) -> Meta:
    """Read a meta CSV; wrong columns or unparsable values are a PcamError naming file and row."""
    path = Path(path)
    if not path.is_file():
        raise PcamError(f"{path}: meta CSV not found")
    with io.StringIO(_utf8_text(path), newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            raise PcamError(f"{path}: meta CSV is empty")
        # The official CSVs carry a leading unnamed index column; accept it and ignore it.
        if header and header[0] in ("", "Unnamed: 0"):
            header, skip = header[1:], 1
        else:
            skip = 0
        if tuple(header) != META_COLUMNS:
            raise PcamError(f"{path}: meta CSV columns are {header}, expected {list(META_COLUMNS)}")
        cols: list[list] = [[] for _ in META_COLUMNS]
        for lineno, row in enumerate(reader, start=2):
            row = row[skip:]
            if len(row) != len(META_COLUMNS):
                raise PcamError(
                    f"{path}:{lineno}: expected {len(META_COLUMNS)} fields, got {len(row)}"
                )
            try:
                cols[0].append(int(float(row[0])))
                cols[1].append(int(float(row[1])))
                cols[2].append(_parse_bool(row[2]))
                cols[3].append(_parse_bool(row[3]))
            except ValueError as err:
                raise PcamError(f"{path}:{lineno}: {err}") from None
            cols[4].append(row[4])
    return Meta(
        coord_y=np.asarray(cols[0], dtype=np.int64),
        coord_x=np.asarray(cols[1], dtype=np.int64),
        tumor_patch=np.asarray(cols[2], dtype=bool),
        center_tumor_patch=np.asarray(cols[3], dtype=bool),
        wsi=np.asarray(cols[4], dtype=str),
    )


def _utf8_text(path: Path) -> str:
    """A text file's content as str; bytes that are not UTF-8 are an error naming line and byte.

    Decoded whole rather than through a text stream, so the error's offset is the file's (PCAM's
    largest meta CSV is ~10 MB). A UTF-8 byte-order mark (spreadsheet exports) is dropped.
    """
    data = path.read_bytes()
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[start:].decode("utf-8")
    except UnicodeDecodeError as err:
        offset = start + err.start
        line = data.count(b"\n", 0, offset) + 1
        raise PcamError(
            f"{path}:{line}: not UTF-8 text (byte {data[offset]:#04x} at offset {offset})"
        ) from None


def _parse_bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("true", "1"):
        return True
    if t in ("false", "0"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def open_dataset(path: str | os.PathLike, name: str) -> tuple[h5py.File, h5py.Dataset]:
    """Open `name` in an HDF5 file, turning h5py's errors into one clear PcamError line."""
    path = Path(path)
    if not path.is_file():
        raise PcamError(f"{path}: file not found")
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise PcamError(f"{path}: not a readable HDF5 file ({_short(err)})") from None
    if name not in f:
        keys = list(f.keys())
        f.close()
        raise PcamError(f"{path}: dataset '{name}' missing (found {keys})")
    obj = f[name]
    if not isinstance(obj, h5py.Dataset):
        f.close()
        raise PcamError(f"{path}: '{name}' is a group, not a dataset")
    return f, obj


def check_x_dataset(path: str | os.PathLike, ds: h5py.Dataset) -> None:
    """An x dataset is (N,96,96,3) uint8, or float for pixels_as_uint8 to check row by row."""
    if ds.shape[1:] != PATCH_SHAPE or not (ds.dtype == np.uint8 or ds.dtype.kind == "f"):
        raise PcamError(f"{path}: dataset 'x' is {ds.shape} {ds.dtype}, expected (N,96,96,3) uint8")


def iter_chunks(n: int, rows: int) -> Iterator[slice]:
    """Contiguous row ranges covering [0, n): large slices are what make HDF5 reads fast."""
    for start in range(0, n, rows):
        yield slice(start, min(n, start + rows))


def read_rows(
    ds: h5py.Dataset, rows: slice, path: Path | str = "", out: np.ndarray | None = None
) -> np.ndarray:
    """Read a contiguous slice, turning HDF5 read errors (truncation, bad chunks) into PcamError.

    With `out`, the rows are read into its start (returned as a view): one buffer reused over
    many reads costs less in page faults than a fresh array per read.
    """
    try:
        if out is None:
            return ds[rows]
        view = out[: rows.stop - rows.start]
        ds.read_direct(view, np.s_[rows.start : rows.stop])
        return view
    except (OSError, RuntimeError, ValueError) as err:
        raise PcamError(
            f"{path or ds.file.filename}: dataset '{ds.name.lstrip('/')}' unreadable at rows "
            f"{rows.start}..{rows.stop - 1} ({_short(err)})"
        ) from None


def pixels_as_uint8(path: Path | str, block: np.ndarray, start: int) -> np.ndarray:
    """A block of x rows as uint8: as is, or float images if every value is an integer 0..255.

    [0, 1]-scaled floats are refused rather than rescaled: rounding them would change pixels, and
    a patch holding only 0s and 1s would be ambiguous. `start` is the block's first row, for the
    error message.
    """
    if block.dtype == np.uint8:
        return block
    finite = np.isfinite(block)
    if not finite.all():
        row = int(np.flatnonzero(~finite.reshape(len(block), -1).all(axis=1))[0])
        value = block[row][~finite[row]][0]
        raise PcamError(
            f"{path}: dataset 'x' has a non-finite value {value} at index {start + row}"
        )
    bad = (block < 0) | (block > 255) | (block != np.floor(block))
    if bad.any():
        row = int(np.flatnonzero(bad.reshape(len(block), -1).any(axis=1))[0])
        value = block[row][bad[row]][0]
        raise PcamError(
            f"{path}: dataset 'x' has value {value} at index {start + row}; float images must "
            "hold integers 0..255 ([0, 1]-scaled images are refused: convert them to uint8)"
        )
    return block.astype(np.uint8)


def read_labels(path: str | os.PathLike) -> np.ndarray:
    """All labels of a y file as a flat uint8 vector (the file stores (N,1,1,1))."""
    f, ds = open_dataset(path, "y")
    with f:
        return read_rows(ds, slice(0, ds.shape[0]), path).reshape(-1).astype(np.uint8)


def _short(err: BaseException) -> str:
    return str(err).splitlines()[0] if str(err) else type(err).__name__
