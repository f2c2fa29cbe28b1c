"""ONNX export of the trained model, checked against PyTorch on the test split.

    python -m pcam.export            # models/model.pt -> models/model.onnx + models/onnx_parity.json
    python -m pcam.export --speed    # also img/s of both backends on CPU at batch 1 and 128
    make export                      # the same, after `dvc repro evaluate`

uint8 NHWC patches (N,96,96,3) in, one logit out, the train-split normalisation inside the graph.
PyTorch (the code path of `evaluate` and `predict`) and onnxruntime each score every test patch;
model.onnx is written only if max |Δ probability| <= --max-abs-diff and no label differs at the
stored threshold (models/threshold.json), else an earlier model.onnx stays as it was and the
report says what differed. Only the test patches are read (no labels), nothing is chosen from
them. Not a DVC stage: the seven stage names are fixed, and the export is a deployment step on
top of the pipeline's outputs (`make bundle`). The report holds no clock time unless --speed.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import timeit
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
from torch import nn

from pcam import h5io, predict
from pcam.checkpoint import load_checkpoint, load_model, normalisation
from pcam.data import normalise, read_x
from pcam.errors import PcamError, exit_on_user_error
from pcam.fileio import atomic_path, md5_file, write_json
from pcam.inference import predict_logits
from pcam.predict import sigmoid

# Parity bound on probabilities. Both backends compute in float32: over the ~10 layers of these
# models a logit moves by a few float32 ulps of its activations, ~1e-6, and a probability by at
# most a quarter of that. 1e-4 leaves two orders of magnitude of headroom and is still far below
# anything that matters clinically (predict prints probabilities to 6 decimals).
MAX_ABS_DIFF = 1e-4
SPEED_PATCHES = {1: 256, 128: 2048}  # batch size -> patches timed per pass


class Deployable(nn.Module):
    """uint8 NHWC patches in, logits out: normalisation travels inside the exported graph."""

    def __init__(self, model: nn.Module, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.model = model
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x_uint8: torch.Tensor) -> torch.Tensor:
        return self.model(normalise(x_uint8, self.mean, self.std))


def onnx_bytes(ckpt: dict, model: nn.Module, model_md5: str) -> bytes:
    """The model as ONNX (dynamic batch, normalisation inside), pcam metadata attached."""
    net = Deployable(model, *normalisation(ckpt)).eval()
    example = torch.zeros((2, *h5io.PATCH_SHAPE), dtype=torch.uint8)
    # Library-internal chatter (torchvision ops it skips, pytree deprecations), not ours.
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    onnx_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            # dynamo=True, the exporter torch 2.13 maintains (the TorchScript one warns that it
            # will be removed); it needs onnxscript. external_data=False: weights in the one file.
            proto = torch.onnx.export(
                net,
                (example,),
                dynamo=True,
                input_names=[predict.ONNX_INPUT],
                output_names=[predict.ONNX_OUTPUT],
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                external_data=False,
                verbose=False,
            ).model_proto
    finally:
        onnx_log.setLevel(level)
    # The exporter's debug records (source paths and lines, Python module names) would tie the
    # bytes to where and how the export ran; onnxruntime does not read them.
    for node in [*proto.graph.node, *(n for f in proto.functions for n in f.node)]:
        del node.metadata_props[:]
    meta = {
        "format": predict.ONNX_FORMAT,
        "source_model_md5": model_md5,
        "normalisation": json.dumps(ckpt["normalisation"], sort_keys=True),
        "model_config": json.dumps(ckpt["model_config"], sort_keys=True),
    }
    for key, value in meta.items():
        proto.metadata_props.add(key=f"pcam.{key}", value=value)
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
    batches = [x[i : i + batch_size] for i in range(0, len(x), batch_size)]
    seconds = timeit.repeat(lambda: [run(b) for b in batches], repeat=passes, number=1)
    return len(x) / min(seconds)


def speed(model: nn.Module, mean, std, onnx_path: Path, x: np.ndarray, threads: int) -> dict:
    """img/s of both backends on CPU at each batch size in SPEED_PATCHES (pre-loaded uint8 data)."""
    torch.set_num_threads(threads)
    onnx_model = predict.load_onnx(onnx_path, threads=threads)
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


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    ap = predict.Parser(prog="python -m pcam.export", description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=Path("models/model.pt"))
    ap.add_argument("--threshold-file", type=Path, help="default: next to --model")
    test_x = Path("data/raw") / h5io.x_name("test")
    ap.add_argument("--test-x", type=Path, default=test_x, help="parity data")
    ap.add_argument("--out", type=Path, default=Path("models/model.onnx"))
    ap.add_argument("--report", type=Path, default=Path("models/onnx_parity.json"))
    ap.add_argument("--batch-size", type=predict.positive_int, default=256)
    ap.add_argument("--max-abs-diff", type=float, default=MAX_ABS_DIFF)
    speed_help = "also time both backends at batch 1 and 128 with THREADS threads (default 2)"
    ap.add_argument("--speed", type=int, nargs="?", const=2, metavar="THREADS", help=speed_help)
    args = ap.parse_args(argv)

    ckpt = load_checkpoint(args.model)
    model_md5 = md5_file(args.model)
    threshold_path = args.threshold_file or args.model.parent / "threshold.json"
    threshold = predict.load_threshold(threshold_path, model_md5, args.model)
    model = load_model(ckpt, args.model).eval()
    data = onnx_bytes(ckpt, model, model_md5)
    x = read_x(args.test_x)
    if len(x) == 0:
        raise PcamError(f"{args.test_x}: dataset 'x' holds 0 patches: nothing to check parity on")
    mean, std = normalisation(ckpt)
    with atomic_path(args.out) as tmp:
        tmp.write_bytes(data)
        torch_logits = predict_logits(model, torch.from_numpy(x), mean, std, args.batch_size)
        onnx_logits = predict.load_onnx(tmp).logits(x, args.batch_size)
        p = parity(torch_logits, onnx_logits, threshold, args.max_abs_diff)
        report = {
            "model": args.model.name,
            "model_md5": model_md5,
            "onnx": args.out.name,
            "onnx_md5": md5_file(tmp),
            "test_x": args.test_x.name,
            "batch_size": args.batch_size,
            "versions": {
                "torch": torch.__version__,
                "onnx": onnx.__version__,
                "onnxruntime": onnxruntime.__version__,
            },
            "opset": next(o.version for o in onnx.load(tmp).opset_import if o.domain == ""),
            "parity": p,
        }
        if args.speed:
            report["speed"] = speed(model, mean, std, tmp, x, args.speed)
        write_json(args.report, report)
        if not p["passed"]:
            raise PcamError(
                f"{args.out}: not written: onnxruntime and PyTorch disagree on {args.test_x.name} "
                f"(max |Δp| {p['max_abs_diff_probability']:.2e}, allowed {args.max_abs_diff:.0e}; "
                f"{p['labels_differ']} labels differ at threshold {threshold:.4f}); see {args.report}"
            )
    print(
        f"export: {args.out} ({p['patches']} test patches: max |Δp| "
        f"{p['max_abs_diff_probability']:.2e}, {p['labels_differ']} labels differ) -> {args.report}"
    )


if __name__ == "__main__":
    main()
