"""The PCAM file format (Veeling et al., PatchCamelyon, Zenodo record 2546921), read and written:

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
_META_DTYPES = (np.int64, np.int64, bool, bool, str)
WRITE_CHUNK_ROWS = 256  # patches per HDF5 chunk we write: 7 MiB, fast contiguous reads


def x_name(split: str) -> str:
    return f"camelyonpatch_level_2_split_{split}_x.h5"


def y_name(split: str) -> str:
    return f"camelyonpatch_level_2_split_{split}_y.h5"


def meta_name(split: str) -> str:
    return f"camelyonpatch_level_2_split_{split}_meta.csv"


def split_files(raw_dir: str | os.PathLike, split: str) -> tuple[Path, Path, Path]:
    return tuple(Path(raw_dir) / f(split) for f in (x_name, y_name, meta_name))


@dataclass(frozen=True)
class Meta:
    """The meta CSV as columns."""

    coord_y: np.ndarray
    coord_x: np.ndarray
    tumor_patch: np.ndarray  # bool: any tumour in the patch
    center_tumor_patch: np.ndarray  # bool: tumour in the centre 32x32 (== label)
    wsi: np.ndarray  # str: slide id

    def __len__(self) -> int:
        return len(self.wsi)


def write_h5_dataset(path: Path, name: str, data: np.ndarray) -> None:
    """Write one dataset atomically, chunked along the first axis like the official files."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset(
            name, data=data, chunks=(min(WRITE_CHUNK_ROWS, max(1, len(data))), *data.shape[1:])
        )


def write_meta(path: Path, meta: Meta) -> None:
    fields = zip(META_COLUMNS, _META_DTYPES, strict=True)
    rows = zip(*(np.asarray(getattr(meta, c)).astype(t).tolist() for c, t in fields), strict=True)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        csv.writer(fh).writerows([META_COLUMNS, *rows])


def write_split(
    raw_dir: str | os.PathLike, split: str, x: np.ndarray, y: np.ndarray, meta: Meta
) -> None:
    """Write x, y (as the official (N,1,1,1) shape) and meta for one split."""
    if x.dtype != np.uint8 or x.shape[1:] != PATCH_SHAPE:
        raise ValueError(f"x must be (N,96,96,3) uint8, got {x.shape} {x.dtype}")
    xp, yp, mp = split_files(raw_dir, split)
    write_h5_dataset(xp, "x", x)
    write_h5_dataset(yp, "y", np.asarray(y, dtype=np.uint8).reshape(-1, 1, 1, 1))
    write_meta(mp, meta)


def read_meta(path: str | os.PathLike) -> Meta:
    """Read a meta CSV; wrong columns or unparsable values are a PcamError naming file and row."""
    path = Path(path)
    if not path.is_file():
        raise PcamError(f"{path}: meta CSV not found")
    # Decoded whole, not through a text stream, so that an error's offset is the file's (PCAM's
    # largest meta CSV is ~10 MB). A UTF-8 byte-order mark (spreadsheet exports) is dropped.
    data = path.read_bytes()
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        text = data[start:].decode("utf-8")
    except UnicodeDecodeError as err:
        offset = start + err.start
        line = data.count(b"\n", 0, offset) + 1
        raise PcamError(
            f"{path}:{line}: not UTF-8 text (byte {data[offset]:#04x} at offset {offset})"
        ) from None
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if header is None:
        raise PcamError(f"{path}: meta CSV is empty")
    skip = int(header[:1] in ([""], ["Unnamed: 0"]))  # the official CSVs' unnamed index column
    if tuple(header[skip:]) != META_COLUMNS:
        raise PcamError(
            f"{path}: meta CSV columns are {header[skip:]}, expected {list(META_COLUMNS)}"
        )
    rows = []
    for lineno, row in enumerate(reader, start=2):
        row = row[skip:]
        if len(row) != len(META_COLUMNS):
            raise PcamError(f"{path}:{lineno}: expected {len(META_COLUMNS)} fields, got {len(row)}")
        try:
            rows.append(
                (int(float(row[0])), int(float(row[1])), _bool(row[2]), _bool(row[3]), row[4])
            )
        except ValueError as err:
            raise PcamError(f"{path}:{lineno}: {err}") from None
    cols = list(zip(*rows, strict=True)) or [()] * len(META_COLUMNS)
    return Meta(*(np.asarray(c, dtype=t) for c, t in zip(cols, _META_DTYPES, strict=True)))


def _bool(text: str) -> bool:
    t = text.strip().lower()
    if t not in ("true", "1", "false", "0"):
        raise ValueError(f"not a boolean: {text!r}")
    return t in ("true", "1")


def open_dataset(path: str | os.PathLike, name: str) -> tuple[h5py.File, h5py.Dataset]:
    """Open `name` in an HDF5 file, turning h5py's errors into one clear PcamError line."""
    path = Path(path)
    if not path.is_file():
        raise PcamError(f"{path}: file not found")
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise PcamError(f"{path}: not a readable HDF5 file ({first_line(err)})") from None
    obj = f.get(name)
    if not isinstance(obj, h5py.Dataset):
        keys = list(f.keys())
        f.close()
        if obj is None:
            raise PcamError(f"{path}: dataset '{name}' missing (found {keys})")
        raise PcamError(f"{path}: '{name}' is a group, not a dataset")
    return f, obj


def check_x_dataset(path: str | os.PathLike, ds: h5py.Dataset) -> None:
    """An x dataset is (N,96,96,3) uint8, or float for pixels_as_uint8 to check row by row."""
    if ds.shape[1:] != PATCH_SHAPE or not (ds.dtype == np.uint8 or ds.dtype.kind == "f"):
        raise PcamError(f"{path}: dataset 'x' is {ds.shape} {ds.dtype}, expected (N,96,96,3) uint8")


def iter_chunks(n: int, rows: int) -> Iterator[slice]:
    """Contiguous row ranges covering [0, n): large slices are what make HDF5 reads fast."""
    return (slice(start, min(n, start + rows)) for start in range(0, n, rows))


def read_rows(
    ds: h5py.Dataset, rows: slice, path: Path | str = "", out: np.ndarray | None = None
) -> np.ndarray:
    """Read a contiguous slice, turning HDF5 read errors (truncation, bad chunks) into PcamError.
    With `out`, the rows go to its start (returned as a view): one buffer reused over many reads
    costs less in page faults than a fresh array per read."""
    try:
        if out is None:
            return ds[rows]
        view = out[: rows.stop - rows.start]
        ds.read_direct(view, np.s_[rows.start : rows.stop])
        return view
    except (OSError, RuntimeError, ValueError) as err:
        raise PcamError(
            f"{path or ds.file.filename}: dataset '{ds.name.lstrip('/')}' unreadable at rows "
            f"{rows.start}..{rows.stop - 1} ({first_line(err)})"
        ) from None


def pixels_as_uint8(path: Path | str, block: np.ndarray, start: int) -> np.ndarray:
    """A block of x rows (the first is row `start`) as uint8: as is, or float images if every
    value is an integer 0..255. [0, 1]-scaled floats are refused rather than rescaled: rounding
    would change pixels, and a patch of only 0s and 1s would be ambiguous."""
    if block.dtype == np.uint8:
        return block
    not_int = (block < 0) | (block > 255) | (block != np.floor(block))
    rule = "float images must hold integers 0..255 ([0, 1]-scaled images are refused: convert them to uint8)"
    for bad, what in (
        (~np.isfinite(block), "a non-finite value {} at index {}"),
        (not_int, "value {} at index {}; " + rule),
    ):
        if bad.any():
            row = int(np.flatnonzero(bad.reshape(len(block), -1).any(axis=1))[0])
            value = block[row][bad[row]][0]
            raise PcamError(f"{path}: dataset 'x' has " + what.format(value, start + row))
    return block.astype(np.uint8)


def read_labels(path: str | os.PathLike) -> np.ndarray:
    """All labels of a y file as a flat uint8 vector (the file stores (N,1,1,1))."""
    f, ds = open_dataset(path, "y")
    with f:
        return read_rows(ds, slice(0, ds.shape[0]), path).reshape(-1).astype(np.uint8)


def first_line(err: BaseException) -> str:
    return str(err).splitlines()[0] if str(err) else type(err).__name__
