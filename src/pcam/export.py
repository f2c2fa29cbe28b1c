"""ONNX export of the trained model, checked against PyTorch on the test split.

    python -m pcam.export            # models/model.pt -> models/model.onnx + models/onnx_parity.json
    python -m pcam.export --speed    # also img/s of both backends on CPU at batch 1 and 128
    make export                      # the same, after `dvc repro evaluate`

The ONNX graph takes uint8 NHWC patches (N,96,96,3) and returns one logit per patch; the
train-split normalisation is inside the graph (see pcam.onnx_model). Parity: PyTorch (the code
path of `evaluate` and `predict`) and onnxruntime each score every patch of the test split; the
report holds max |Δ probability| and the number of labels that differ at the stored threshold
(models/threshold.json). model.onnx is written only if max |Δp| <= --max-abs-diff and no label
differs; otherwise any earlier model.onnx stays as it was and the report says what differed.
Only the test patches are read (no labels), and nothing is chosen from them.

Not a DVC stage: the seven stage names are fixed, and the export is a deployment step on top of
the pipeline's outputs (it runs in `make bundle`). The report holds no clock time unless --speed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
from torch import nn

from pcam import h5io
from pcam.checkpoint import load_checkpoint, load_model
from pcam.data import normalise, read_x
from pcam.errors import PcamError, exit_on_user_error
from pcam.fileio import atomic_path, md5_file, write_json
from pcam.inference import predict_logits
from pcam.onnx_model import (
    FORMAT,
    INPUT,
    META_FORMAT,
    META_MODEL_CONFIG,
    META_NORMALISATION,
    META_SOURCE_MD5,
    OUTPUT,
    load_onnx,
)
from pcam.predict import load_threshold, sigmoid

# Parity bound on probabilities. Both backends compute in float32: over the ~10 layers of these
# models a logit moves by a few float32 ulps of its activations, ~1e-6, and a probability by at
# most a quarter of that. 1e-4 leaves two orders of magnitude of headroom and is still far below
# anything that matters clinically (predict prints probabilities to 6 decimals).
MAX_ABS_DIFF = 1e-4
SPEED_PATCHES = {1: 256, 128: 2048}  # batch size -> patches timed per pass


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class Deployable(nn.Module):
    """uint8 NHWC patches in, logits out: normalisation travels inside the exported graph."""

    def __init__(self, model: nn.Module, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.model = model
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x_uint8: torch.Tensor) -> torch.Tensor:
        return self.model(normalise(x_uint8, self.mean, self.std))


def onnx_bytes(ckpt: dict, model_path: Path) -> bytes:
    """The checkpoint's best weights as an ONNX model (dynamic batch), metadata attached."""
    model = load_model(ckpt, model_path).eval()
    norm = ckpt["normalisation"]
    net = Deployable(model, torch.tensor(norm["mean"]), torch.tensor(norm["std"])).eval()
    example = torch.zeros((2, *h5io.PATCH_SHAPE), dtype=torch.uint8)
    # dynamo=True, the exporter torch 2.13 maintains (the TorchScript one, dynamo=False, still
    # exists but warns that it will be removed); it needs onnxscript. external_data=False keeps
    # the weights inside the one file.
    with warnings.catch_warnings(), _quiet("torch.onnx"):
        # Library-internal chatter (torchvision ops it skips, pytree deprecations), not ours.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        program = torch.onnx.export(
            net,
            (example,),
            dynamo=True,
            input_names=[INPUT],
            output_names=[OUTPUT],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            external_data=False,
            verbose=False,
        )
    proto = program.model_proto
    meta = {
        META_FORMAT: FORMAT,
        META_SOURCE_MD5: md5_file(model_path),
        META_NORMALISATION: json.dumps(norm, sort_keys=True),
        META_MODEL_CONFIG: json.dumps(ckpt["model_config"], sort_keys=True),
    }
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    proto.doc_string = (
        "pcam: uint8 NHWC (N,96,96,3) patches in, logit out (probability = sigmoid); "
        "normalisation inside the graph; threshold in threshold.json next to the model"
    )
    onnx.checker.check_model(proto)
    return proto.SerializeToString(deterministic=True)


def parity(
    torch_logits: np.ndarray, onnx_logits: np.ndarray, threshold: float, max_abs_diff: float
) -> dict:
    p_torch, p_onnx = sigmoid(torch_logits), sigmoid(onnx_logits)
    diff = np.abs(p_torch - p_onnx)
    labels_differ = int(np.sum((p_torch >= threshold) != (p_onnx >= threshold)))
    max_diff = float(diff.max()) if len(diff) else 0.0
    return {
        "patches": len(diff),
        "max_abs_diff_probability": max_diff,
        "mean_abs_diff_probability": float(diff.mean()) if len(diff) else 0.0,
        "max_abs_diff_logit": float(np.abs(torch_logits - onnx_logits).max()) if len(diff) else 0.0,
        "threshold": threshold,
        "labels_differ": labels_differ,
        # Patches so close to the threshold that a difference of max_abs_diff could flip them.
        "patches_within_tolerance_of_threshold": int(
            np.sum(np.abs(p_torch - threshold) <= max_abs_diff)
        ),
        "max_abs_diff_allowed": max_abs_diff,
        "passed": bool(max_diff <= max_abs_diff and labels_differ == 0),
    }


def images_per_s(run, x: np.ndarray, batch_size: int, passes: int = 3) -> float:
    """Best of `passes` timed passes over x in batches, after one warm-up batch."""
    run(x[:batch_size])
    best = float("inf")
    for _ in range(passes):
        start = time.perf_counter()
        for i in range(0, len(x), batch_size):
            run(x[i : i + batch_size])
        best = min(best, time.perf_counter() - start)
    return len(x) / best


def speed(model: nn.Module, mean, std, onnx_path: Path, x: np.ndarray, threads: int) -> dict:
    """img/s of both backends on CPU at each batch size in SPEED_PATCHES (pre-loaded uint8 data)."""
    torch.set_num_threads(threads)
    onnx_model = load_onnx(onnx_path, threads=threads)
    out: dict = {"threads": threads, "load_average_1min_before": os.getloadavg()[0]}
    for batch, n in SPEED_PATCHES.items():
        xs = np.ascontiguousarray(x[:n])
        # Each call gets exactly one batch: the batch size is the length of what it gets.
        out[f"batch_{batch}"] = {
            "patches": len(xs),
            "torch_img_per_s": images_per_s(
                lambda b: predict_logits(model, b, mean, std, len(b)), torch.from_numpy(xs), batch
            ),
            "onnx_img_per_s": images_per_s(lambda b: onnx_model.logits(b, len(b)), xs, batch),
        }
    out["load_average_1min_after"] = os.getloadavg()[0]
    out["cpu"] = platform.processor() or platform.machine()
    return out


def export(
    model_path: Path,
    test_x: Path,
    out: Path,
    report_path: Path,
    threshold_path: Path,
    batch_size: int,
    max_abs_diff: float,
    speed_threads: int | None,
) -> dict:
    ckpt = load_checkpoint(model_path)
    threshold = load_threshold(threshold_path, md5_file(model_path), model_path)
    data = onnx_bytes(ckpt, model_path)
    x = read_x(test_x)
    if len(x) == 0:
        raise PcamError(f"{test_x}: dataset 'x' holds 0 patches: nothing to check parity on")
    model = load_model(ckpt, model_path).eval()
    mean = torch.tensor(ckpt["normalisation"]["mean"])
    std = torch.tensor(ckpt["normalisation"]["std"])
    with atomic_path(out) as tmp:
        tmp.write_bytes(data)
        onnx_model = load_onnx(tmp)
        report = {
            "model": model_path.name,
            "model_md5": md5_file(model_path),
            "onnx": out.name,
            "onnx_md5": md5_file(tmp),
            "test_x": test_x.name,
            "batch_size": batch_size,
            "versions": {
                "torch": torch.__version__,
                "onnx": onnx.__version__,
                "onnxruntime": onnxruntime.__version__,
            },
            "opset": next(o.version for o in onnx.load(tmp).opset_import if o.domain == ""),
            "parity": parity(
                predict_logits(model, torch.from_numpy(x), mean, std, batch_size),
                onnx_model.logits(x, batch_size),
                threshold,
                max_abs_diff,
            ),
        }
        if speed_threads:
            report["speed"] = speed(model, mean, std, tmp, x, speed_threads)
        write_json(report_path, report)
        p = report["parity"]
        if not p["passed"]:
            raise PcamError(
                f"{out}: not written: onnxruntime and PyTorch disagree on {test_x.name} (max "
                f"|Δp| {p['max_abs_diff_probability']:.2e}, allowed {max_abs_diff:.0e}; "
                f"{p['labels_differ']} labels differ at threshold {threshold:.4f}); see {report_path}"
            )
    return report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m pcam.export", description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=Path("models/model.pt"))
    ap.add_argument("--threshold-file", type=Path, default=None, help="default: next to --model")
    ap.add_argument(
        "--test-x", type=Path, default=Path("data/raw") / h5io.x_name("test"), help="parity data"
    )
    ap.add_argument("--out", type=Path, default=Path("models/model.onnx"))
    ap.add_argument("--report", type=Path, default=Path("models/onnx_parity.json"))
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--max-abs-diff", type=float, default=MAX_ABS_DIFF)
    ap.add_argument(
        "--speed",
        type=int,
        nargs="?",
        const=2,
        default=None,
        metavar="THREADS",
        help="also time both backends at batch 1 and 128 with THREADS threads (default 2)",
    )
    return ap.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.batch_size < 1:
        raise PcamError(f"--batch-size {args.batch_size} must be a positive integer")
    report = export(
        args.model,
        args.test_x,
        args.out,
        args.report,
        args.threshold_file or args.model.parent / "threshold.json",
        args.batch_size,
        args.max_abs_diff,
        args.speed,
    )
    p = report["parity"]
    print(
        f"export: {args.out} ({p['patches']} test patches: max |Δp| "
        f"{p['max_abs_diff_probability']:.2e}, {p['labels_differ']} labels differ) -> {args.report}"
    )


if __name__ == "__main__":
    main()
