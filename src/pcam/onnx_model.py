"""The exported ONNX model at inference time, on onnxruntime alone (no torch).

`python -m pcam.export` writes models/model.onnx: uint8 NHWC patches (N,96,96,3) in, one logit
per patch out, with the train-split normalisation inside the graph, so a deployment cannot pair
the model with the wrong mean/std. The file's metadata names the checkpoint it was exported from
(its md5 is what models/threshold.json was chosen for) and repeats the normalisation for readers.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pcam.errors import PcamError

FORMAT = "pcam-onnx/1"
INPUT = "x_uint8"
OUTPUT = "logit"
# Keys of the ONNX model's metadata_props.
META_FORMAT = "pcam.format"
META_SOURCE_MD5 = "pcam.source_model_md5"
META_NORMALISATION = "pcam.normalisation"
META_MODEL_CONFIG = "pcam.model_config"


@dataclass(frozen=True)
class OnnxModel:
    session: object  # onnxruntime.InferenceSession
    source_md5: str  # md5 of the checkpoint it was exported from
    normalisation: dict

    def logits(self, x_uint8: np.ndarray, batch_size: int) -> np.ndarray:
        """Logits of an (N,96,96,3) uint8 array, in order, as float64 (like pcam.inference)."""
        out = []
        for start in range(0, len(x_uint8), batch_size):
            xb = np.ascontiguousarray(x_uint8[start : start + batch_size])
            out.append(self.session.run([OUTPUT], {INPUT: xb})[0])
        return np.concatenate(out).astype(np.float64) if out else np.empty(0)


def load_onnx(path: str | os.PathLike, threads: int | None = None) -> OnnxModel:
    """Open an exported model on onnxruntime's CPU provider; anything else is one PcamError line.

    `threads` caps onnxruntime's intra-op threads (None: its default, one per core).
    """
    path = Path(path)
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
    if threads:
        options.intra_op_num_threads = threads
    ort_errors = tuple(
        getattr(ort_state, name)
        for name in ("Fail", "InvalidProtobuf", "NoSuchFile", "InvalidArgument", "InvalidGraph")
    )
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except ort_errors as err:
        raise PcamError(f"{path}: not a loadable ONNX model ({_first_line(err)})") from None
    meta = session.get_modelmeta().custom_metadata_map
    if meta.get(META_FORMAT) != FORMAT:
        raise PcamError(
            f"{path}: not a pcam ONNX export (metadata {META_FORMAT!r} is "
            f"{meta.get(META_FORMAT)!r}, expected {FORMAT!r}); export it with python -m pcam.export"
        )
    return OnnxModel(
        session=session,
        source_md5=meta.get(META_SOURCE_MD5, ""),
        normalisation=json.loads(meta.get(META_NORMALISATION, "{}")),
    )


def _first_line(err: BaseException) -> str:
    return str(err).splitlines()[0] if str(err) else type(err).__name__
