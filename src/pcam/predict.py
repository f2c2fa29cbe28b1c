"""Inference CLI: probabilities and labels for new patches, at the threshold chosen on valid.

    python -m pcam.predict INPUT... [--model models/model.pt | models/model.onnx] [--out out.csv]
    python -m pcam.predict --backend onnx data/raw --out predictions.csv   # no torch needed

INPUT may be PCAM .h5 files (dataset "x", (N,96,96,3) uint8), PNG/JPEG images (96x96 8-bit RGB)
or directories of those. A PCAM directory works as it is: the _x.h5 files are scored, a matching
_y.h5 next to one fills the true_label column, _y.h5 and .csv files are not scored. Images of
another size are an error unless --center-crop can cut 96x96 out of them; grayscale, alpha,
palette, CMYK and 16-bit images are an error unless --convert-rgb (the conversion is spelled out
in its help). With --keep-going, a bad input is listed and skipped and the others are scored;
the exit status is still 1.

The CSV has one row per patch: source, index (row in an .h5, 0 for an image), probability, label
(at the threshold), true_label (from a _y.h5, else empty). The threshold comes from
threshold.json next to the model, written by `evaluate` for that very checkpoint (or --threshold).

Backends: torch (models/model.pt) or onnx (models/model.onnx from `python -m pcam.export`, runs on
onnxruntime without torch, which makes start-up several seconds shorter). The backend follows the
--model suffix unless --backend says otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np  # the rest is imported where needed: `--help` or a typo is answered at once

from pcam.errors import PcamError, exit_on_user_error
from pcam.fileio import md5_file, write_text

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
H5_SUFFIXES = {".h5", ".hdf5"}
SIZE = 96  # h5io.PATCH_SHAPE; not imported from there, which would import h5py for images too
H5_BLOCK_ROWS = 4096  # patches read from an .h5 at a time (108 MiB): memory bounded per file
DEFAULT_MODELS = {"torch": Path("models/model.pt"), "onnx": Path("models/model.onnx")}
# The ONNX model from `python -m pcam.export`: uint8 NHWC patches in, one logit out, normalisation
# inside the graph (a deployment cannot pair it with the wrong mean/std). Its metadata_props
# (pcam.*) name the checkpoint it came from: that md5 is what threshold.json was chosen for.
ONNX_FORMAT = "pcam-onnx/1"
ONNX_INPUT = "x_uint8"
ONNX_OUTPUT = "logit"

# How --convert-rgb names each Pillow mode it turns into 8-bit RGB (other modes are refused).
MODE_NAMES = {
    "L": "grayscale",
    "LA": "grayscale with alpha",
    "1": "1-bit black and white",
    "P": "palette",
    "PA": "palette with alpha",
    "RGBA": "RGBA (alpha channel)",
    "RGBa": "RGBA (alpha channel)",
    "CMYK": "CMYK",
    "YCbCr": "YCbCr",
    "I;16": "16-bit grayscale",
    "I;16B": "16-bit grayscale",
    "I;16L": "16-bit grayscale",
}
CONVERT_HELP = (
    "convert non-RGB images to 8-bit RGB instead of refusing them: grayscale is copied to all "
    "three channels, alpha is composited over white (the slide background), palettes and CMYK "
    "are converted by Pillow, 16-bit samples keep their high byte (v >> 8)"
)

Logits = Callable[[np.ndarray], np.ndarray]  # uint8 (n,96,96,3) -> float64 logits (n,)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Probabilities from logits, numpy only (scipy's expit computes the same 1 / (1 + e^-x))."""
    with np.errstate(over="ignore"):  # e^-x overflows to inf for x < -709: probability 0, right
        return 1.0 / (1.0 + np.exp(-logits))


@dataclass(frozen=True)
class OnnxModel:
    session: object  # onnxruntime.InferenceSession
    source_md5: str  # md5 of the checkpoint it was exported from
    normalisation: dict

    def logits(self, x_uint8: np.ndarray, batch_size: int) -> np.ndarray:
        """Logits of an (N,96,96,3) uint8 array, in order, as float64 (like pcam.inference)."""
        batches = (x_uint8[i : i + batch_size] for i in range(0, len(x_uint8), batch_size))
        out = [
            self.session.run([ONNX_OUTPUT], {ONNX_INPUT: np.ascontiguousarray(b)})[0]
            for b in batches
        ]
        return np.concatenate(out).astype(np.float64) if out else np.empty(0)


def load_onnx(path: Path, threads: int | None = None) -> OnnxModel:
    """An exported model on onnxruntime's CPU provider (`threads`: intra-op cap, None: default)."""
    if not path.is_file():
        raise PcamError(f"{path}: ONNX model not found (python -m pcam.export writes it)")
    try:
        import onnxruntime as ort
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_state
    except ImportError:
        raise PcamError(
            "onnxruntime is not installed: pip install onnxruntime (or use --backend torch)"
        ) from None
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: no optimiser chatter on stderr
    options.intra_op_num_threads = threads or 0  # 0: onnxruntime's default, one per core
    bad_model = ("Fail", "InvalidProtobuf", "NoSuchFile", "InvalidArgument", "InvalidGraph")
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except tuple(getattr(ort_state, name) for name in bad_model) as err:
        first_line = (str(err).splitlines() or [type(err).__name__])[0]
        raise PcamError(f"{path}: not a loadable ONNX model ({first_line})") from None
    meta = session.get_modelmeta().custom_metadata_map
    if meta.get("pcam.format") != ONNX_FORMAT:
        raise PcamError(
            f"{path}: not a pcam ONNX export (metadata 'pcam.format' is "
            f"{meta.get('pcam.format')!r}, expected {ONNX_FORMAT!r}); export it with python -m pcam.export"
        )
    norm = json.loads(meta.get("pcam.normalisation", "{}"))
    return OnnxModel(session, meta.get("pcam.source_model_md5", ""), norm)


class Inputs(NamedTuple):
    files: list[Path]
    failures: list[str]  # inputs that could not even be listed (with --keep-going)


def is_label_file(path: Path) -> bool:
    return path.suffix.lower() in H5_SUFFIXES and path.stem.endswith("_y")


def expand_inputs(inputs: list[Path], keep_going: bool) -> Inputs:
    """Files as given; directories expanded (sorted, non-recursive) to their images and .h5 files,
    without the PCAM label files (_y.h5), which label their _x.h5 instead of being scored."""
    found = Inputs([], [])
    for path in inputs:
        try:
            if path.is_dir():
                suffixes = IMAGE_SUFFIXES | H5_SUFFIXES
                files = sorted(q for q in path.iterdir() if q.suffix.lower() in suffixes)
                files = [q for q in files if not is_label_file(q)]
                if not files:
                    raise PcamError(f"{path}: directory holds no .h5, .png or .jpg files to score")
                found.files.extend(files)
            elif path.is_file():
                found.files.append(path)
            else:
                raise PcamError(f"{path}: no such file or directory")
        except PcamError as err:
            if not keep_going:
                raise
            found.failures.append(str(err))
    return found


def read_image(path: Path, center_crop: bool, convert_rgb: bool) -> np.ndarray:
    """One image as a (96,96,3) uint8 array; anything else is one PcamError line."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            rgb = _as_rgb(path, im, convert_rgb)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise PcamError(f"{path}: not a readable image ({err})") from None
    h, w = rgb.shape[:2]
    if (h, w) == (SIZE, SIZE):
        return rgb
    if h >= SIZE and w >= SIZE:
        if center_crop:
            top, left = (h - SIZE) // 2, (w - SIZE) // 2
            return rgb[top : top + SIZE, left : left + SIZE]
        hint = " (use --center-crop to cut out the centre)"
    else:
        ways = "both ways" if h < SIZE and w < SIZE else "one way"
        hint = f" (smaller than {SIZE}x{SIZE} {ways}: cropping cannot help)"
    raise PcamError(f"{path}: image is {w}x{h}, expected {SIZE}x{SIZE}{hint}")


def _as_rgb(path: Path, im, convert_rgb: bool) -> np.ndarray:
    """8-bit RGB pixels of an open image; other modes only with convert_rgb (see CONVERT_HELP)."""
    from PIL import Image

    # Pillow opens a 16-bit RGB PNG as mode RGB (keeping the high byte): only the raw mode tells.
    rawmode = im.tile[0].args if im.tile and isinstance(im.tile[0].args, str) else ""
    if im.mode == "RGB" and ";16" not in rawmode:
        return np.array(im, dtype=np.uint8)  # a writable copy for torch
    what = "16-bit RGB" if im.mode == "RGB" else MODE_NAMES.get(im.mode)
    if what is None:
        raise PcamError(f"{path}: image mode {im.mode} is not supported (expected 8-bit RGB)")
    if not convert_rgb:
        raise PcamError(f"{path}: image is {what}, expected 8-bit RGB (--convert-rgb converts it)")
    if im.mode == "RGB":
        return np.array(im, dtype=np.uint8)  # Pillow already kept the high byte of each sample
    if im.mode.startswith("I;16"):
        gray = (np.asarray(im, dtype=np.uint16) >> 8).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if im.mode in ("LA", "PA", "RGBA", "RGBa") or "transparency" in im.info:
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return np.array(Image.alpha_composite(white, im.convert("RGBA")).convert("RGB"))
    return np.array(im.convert("RGB"), dtype=np.uint8)


def score_h5(path: Path, logits: Logits) -> Iterator[tuple]:
    """Rows of one .h5 file, read in contiguous blocks so memory does not grow with the file;
    a camelyonpatch_..._x.h5 takes its true labels from the _y.h5 next to it."""
    from pcam import h5io

    f, ds = h5io.open_dataset(path, "x")
    with f:
        h5io.check_x_dataset(path, ds)
        n = ds.shape[0]
        if n == 0:
            raise PcamError(f"{path}: dataset 'x' holds 0 patches")
        y_path = path.with_name(path.stem[:-2] + "_y" + path.suffix)
        y = h5io.read_labels(y_path) if path.stem.endswith("_x") and y_path.is_file() else None
        if y is not None and len(y) != n:
            raise PcamError(f"{y_path}: {len(y)} labels for the {n} patches of {path.name}")
        for rows in h5io.iter_chunks(n, H5_BLOCK_ROWS):
            x = h5io.pixels_as_uint8(path, h5io.read_rows(ds, rows, path), rows.start)
            for i, p in zip(range(rows.start, rows.stop), sigmoid(logits(x)), strict=True):
                yield str(path), i, float(p), None if y is None else int(y[i])


def score(inputs: Inputs, logits: Logits, args: argparse.Namespace) -> tuple[list, list[str]]:
    """Rows (source, index, probability, true label) of every input that scored, in the order of
    the inputs, and the failures (--keep-going; else the first raises). An .h5 file's rows count
    only when the whole file scored; images go to the model in batches of --batch-size."""
    rows, failures = [], list(inputs.failures)
    images: list[tuple[str, np.ndarray]] = []  # (source, pixels) waiting for a full batch

    def flush_images() -> None:
        if images:
            prob = sigmoid(logits(np.stack([x for _, x in images])))
            rows.extend((s, 0, float(p), None) for (s, _), p in zip(images, prob, strict=True))
            images.clear()

    for path in inputs.files:
        try:
            if path.suffix.lower() in H5_SUFFIXES:
                flush_images()  # rows stay in the order of the inputs
                rows.extend(list(score_h5(path, logits)))
            elif path.suffix.lower() in IMAGE_SUFFIXES:
                images.append((str(path), read_image(path, args.center_crop, args.convert_rgb)))
                if len(images) == args.batch_size:
                    flush_images()
            else:
                raise PcamError(f"{path}: unsupported file type (expected .h5, .png, .jpg)")
        except PcamError as err:
            message = str(err)
            if is_label_file(path) and "dataset 'x' missing" in message:
                message += " (a PCAM label file: score its _x.h5 or the directory)"
            if not args.keep_going:
                raise PcamError(message) from None
            failures.append(message)
    flush_images()
    return rows, failures


def load_threshold(path: Path, model_md5: str, model_path: Path) -> float:
    """The threshold evaluate chose on valid; refuse one recorded for another checkpoint."""
    if not path.is_file():
        raise PcamError(
            f"{path}: no threshold file (run `dvc repro evaluate`, or pass --threshold)"
        )
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise PcamError(
            f"{path}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno})"
        ) from None
    except UnicodeDecodeError as err:
        raise PcamError(f"{path}: not UTF-8 text (byte {err.start})") from None
    value = doc.get("threshold") if isinstance(doc, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise PcamError(f"{path}: key 'threshold' must be a number in [0, 1], got {value!r}")
    if doc.get("model_md5") != model_md5:
        raise PcamError(
            f"{path}: threshold was chosen for another model (md5 differs from {model_path})"
        )
    return float(value)


def torch_backend(model_path: Path, device: str, batch_size: int) -> tuple[Logits, str]:
    """The checkpoint on torch: logits function, and the md5 its threshold must carry."""
    try:
        import torch
    except ImportError:
        raise PcamError(
            "torch is not installed here: use --backend onnx with model.onnx (pcam bundles ship "
            "the onnx backend only)"
        ) from None
    from pcam.checkpoint import load_checkpoint, load_model, normalisation
    from pcam.inference import predict_logits

    if device == "cuda" and not torch.cuda.is_available():
        raise PcamError("--device cuda: no CUDA device is available")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    ckpt = load_checkpoint(model_path)
    model = load_model(ckpt, model_path).to(device)
    mean, std = normalisation(ckpt)

    def logits(x: np.ndarray) -> np.ndarray:
        return predict_logits(model, torch.from_numpy(x), mean, std, batch_size, device)

    return logits, md5_file(model_path)


def onnx_backend(model_path: Path, device: str, batch_size: int) -> tuple[Logits, str]:
    """The exported model on onnxruntime: logits function, and the md5 of its source checkpoint."""
    if device == "cuda":
        raise PcamError("--device cuda needs --backend torch (the onnx backend runs on CPU)")
    model = load_onnx(model_path)
    return (lambda x: model.logits(x, batch_size)), model.source_md5


class Parser(argparse.ArgumentParser):
    """Usage mistakes are one line too (argparse alone prints the usage block first)."""

    def error(self, message: str):
        raise PcamError(f"{message} (see {self.prog} --help)")


def positive_int(text: str) -> int:
    with contextlib.suppress(ValueError):
        if int(text) >= 1:
            return int(text)
    raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = Parser(
        prog="python -m pcam.predict",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("inputs", nargs="+", type=Path, metavar="INPUT")
    ap.add_argument(
        "--model", type=Path, help="default: models/model.pt (torch) or models/model.onnx (onnx)"
    )
    ap.add_argument(
        "--backend", choices=DEFAULT_MODELS, help="default: onnx for a .onnx --model, else torch"
    )
    ap.add_argument("--threshold-file", type=Path, help="default: threshold.json next to the model")
    ap.add_argument("--threshold", type=float, help="override the stored threshold")
    ap.add_argument("--out", type=Path, help="CSV path (default: stdout)")
    ap.add_argument("--batch-size", type=positive_int, default=256)
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument(
        "--center-crop", action="store_true", help="cut the centre 96x96 out of larger images"
    )
    ap.add_argument("--convert-rgb", action="store_true", help=CONVERT_HELP)
    ap.add_argument(
        "--keep-going",
        action="store_true",
        help="score the good inputs, list the bad ones, exit 1 if any failed",
    )
    return ap.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        raise PcamError(f"--threshold {args.threshold} must be within [0, 1]")
    backend = args.backend or ("onnx" if args.model and args.model.suffix == ".onnx" else "torch")
    model_path = args.model or DEFAULT_MODELS[backend]
    if backend == "torch" and model_path.suffix == ".onnx":
        raise PcamError(f"{model_path}: an ONNX model needs --backend onnx")
    if backend == "onnx" and model_path.suffix != ".onnx":
        raise PcamError(
            f"{model_path}: --backend onnx needs the exported .onnx model (python -m pcam.export)"
        )
    # Inputs first: a typo in a path is answered before the model loads.
    inputs = expand_inputs(args.inputs, args.keep_going)
    load = torch_backend if backend == "torch" else onnx_backend
    logits, model_md5 = load(model_path, args.device, args.batch_size)
    threshold = args.threshold
    if threshold is None:
        threshold_path = args.threshold_file or model_path.parent / "threshold.json"
        threshold = load_threshold(threshold_path, model_md5, model_path)
    rows, failures = score(inputs, logits, args)
    for message in failures:
        print(f"error: {message}", file=sys.stderr)
    if not rows:
        raise PcamError(
            "no patches scored: nothing written" + (" (every input failed)" if failures else "")
        )
    table = io.StringIO()
    csv.writer(table).writerows(
        [
            ("source", "index", "probability", "label", "true_label"),
            *(
                (s, i, f"{p:.6f}", int(p >= threshold), "" if y is None else y)
                for s, i, p, y in rows
            ),
        ]
    )
    if args.out is None:
        sys.stdout.write(table.getvalue())
    else:
        write_text(args.out, table.getvalue())
        print(
            f"predict: {len(rows)} patches -> {args.out} (threshold {threshold:.4f}, {backend})",
            file=sys.stderr,
        )
    if failures:
        n_inputs = len(inputs.files) + len(inputs.failures)
        raise PcamError(
            f"{len(failures)} of {n_inputs} inputs failed (listed above); the others were scored"
        )


if __name__ == "__main__":
    main()
