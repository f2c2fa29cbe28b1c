"""Inference CLI: probabilities and labels for new patches, at the threshold chosen on valid.

    python -m pcam.predict --model models/model.pt INPUT... [--out predictions.csv]

INPUT may be PCAM .h5 files (dataset "x", (N,96,96,3) uint8), PNG/JPEG images (96x96 RGB; other
sizes are an error unless --center-crop) or directories of those. The CSV has one row per patch:
source, index (row in an .h5, 0 for an image), probability, label. The threshold comes from
models/threshold.json written by `evaluate` next to the model (or --threshold).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from pcam import h5io
from pcam.checkpoint import load_checkpoint, load_model
from pcam.data import read_x
from pcam.errors import PcamError, exit_on_user_error
from pcam.fileio import atomic_path, md5_file
from pcam.inference import predict_logits, sigmoid
from pcam.training import resolve_device

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
H5_SUFFIXES = {".h5", ".hdf5"}
SIZE = h5io.PATCH_SHAPE[0]


def expand_inputs(inputs: list[Path]) -> list[Path]:
    """Files as given, directories expanded (sorted, non-recursive) to their images and .h5 files."""
    files = []
    for path in inputs:
        if path.is_dir():
            found = sorted(
                q for q in path.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES | H5_SUFFIXES
            )
            if not found:
                raise PcamError(f"{path}: directory holds no .h5, .png or .jpg files")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise PcamError(f"{path}: no such file or directory")
    return files


def read_image(path: Path, center_crop: bool) -> np.ndarray:
    try:
        with Image.open(path) as im:
            rgb = np.array(im.convert("RGB"), dtype=np.uint8)  # a writable copy for torch
    except (UnidentifiedImageError, OSError) as err:
        raise PcamError(f"{path}: not a readable image ({err})") from None
    h, w = rgb.shape[:2]
    if (h, w) == (SIZE, SIZE):
        return rgb
    if center_crop and h >= SIZE and w >= SIZE:
        top, left = (h - SIZE) // 2, (w - SIZE) // 2
        return rgb[top : top + SIZE, left : left + SIZE]
    hint = "" if center_crop else " (use --center-crop for larger images)"
    raise PcamError(f"{path}: image is {w}x{h}, expected {SIZE}x{SIZE}{hint}")


def patches(
    files: list[Path], center_crop: bool
) -> Iterator[tuple[list[str], np.ndarray, np.ndarray]]:
    """(source of each row, row indices, uint8 patches): one batch per .h5 file, and one batch
    for all images."""
    images, image_paths = [], []
    for path in files:
        if path.suffix.lower() in H5_SUFFIXES:
            x = read_x(path)
            yield [str(path)] * len(x), np.arange(len(x)), x
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            images.append(read_image(path, center_crop))
            image_paths.append(str(path))
        else:
            raise PcamError(f"{path}: unsupported file type (expected .h5, .png, .jpg)")
    if images:
        yield image_paths, np.zeros(len(images), dtype=np.int64), np.stack(images)


def load_threshold(model_path: Path, threshold_path: Path | None, override: float | None) -> float:
    """The threshold evaluate chose on valid; refuse one recorded for another model file."""
    if override is not None:
        return override
    path = threshold_path or model_path.parent / "threshold.json"
    if not path.is_file():
        raise PcamError(
            f"{path}: no threshold file (run `dvc repro evaluate`, or pass --threshold)"
        )
    doc = json.loads(path.read_text())
    md5 = md5_file(model_path)
    if doc.get("model_md5") != md5:
        raise PcamError(
            f"{path}: threshold was chosen for another model (md5 differs from {model_path})"
        )
    return float(doc["threshold"])


def write_rows(fh, rows: list[tuple[str, int, float, int]]) -> None:
    w = csv.writer(fh)
    w.writerow(("source", "index", "probability", "label"))
    w.writerows((s, i, f"{q:.6f}", label) for s, i, q, label in rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m pcam.predict", description=__doc__.split("\n")[0])
    ap.add_argument("inputs", nargs="+", type=Path, metavar="INPUT")
    ap.add_argument("--model", type=Path, default=Path("models/model.pt"))
    ap.add_argument("--threshold-file", type=Path, default=None)
    ap.add_argument("--threshold", type=float, default=None, help="override the stored threshold")
    ap.add_argument("--out", type=Path, default=None, help="CSV path (default: stdout)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--center-crop", action="store_true", help="crop larger images to 96x96")
    return ap.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        raise PcamError(f"--threshold {args.threshold} must be within [0, 1]")
    device = resolve_device(args.device)
    ckpt = load_checkpoint(args.model)
    model = load_model(ckpt, args.model).to(device)
    threshold = load_threshold(args.model, args.threshold_file, args.threshold)
    mean = torch.tensor(ckpt["normalisation"]["mean"])
    std = torch.tensor(ckpt["normalisation"]["std"])
    rows = []
    for sources, index, x in patches(expand_inputs(args.inputs), args.center_crop):
        prob = sigmoid(
            predict_logits(model, torch.from_numpy(x), mean, std, args.batch_size, device)
        )
        rows += [
            (source, int(i), float(q), int(q >= threshold))
            for source, i, q in zip(sources, index, prob, strict=True)
        ]
    if args.out is None:
        write_rows(sys.stdout, rows)
        return
    with atomic_path(args.out) as tmp, open(tmp, "w", newline="") as fh:
        write_rows(fh, rows)
    print(
        f"predict: {len(rows)} patches -> {args.out} (threshold {threshold:.4f})", file=sys.stderr
    )


if __name__ == "__main__":
    main()
