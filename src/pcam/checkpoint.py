"""Checkpoints: written atomically and byte-reproducibly, read only with weights_only=True."""

from __future__ import annotations

import io
import math
import os
import pickle
import sys
import zipfile
from pathlib import Path

import torch
from torch import nn

from pcam.errors import PcamError
from pcam.fileio import write_bytes
from pcam.models import MODEL_SIZE_KEY, build_model

FORMAT = "pcam-checkpoint/1"


def save_checkpoint(path: str | os.PathLike, payload: dict) -> None:
    # Into a buffer, then renamed into place: torch.save names the zip archive after the file it
    # writes, so saving to a temporary file name would make identical checkpoints differ by bytes.
    buf = io.BytesIO()
    torch.save(_canonical({"format": FORMAT, **payload}), buf)
    write_bytes(path, buf.getvalue())


def _canonical(obj):
    """Rebuild containers with interned strings, so equal content pickles to equal bytes.

    pickle writes a string it has seen before (same object) as a back-reference. A resumed run's
    optimizer state holds strings unpickled from the checkpoint, an uninterrupted run's holds
    literals: same values, different object identity, different bytes.
    """
    if isinstance(obj, str):
        return sys.intern(obj)
    if isinstance(obj, dict):
        return {_canonical(k): _canonical(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_canonical(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_canonical(v) for v in obj)
    return obj


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Tensors and plain containers only, never arbitrary pickles; checks what inference needs."""
    path = Path(path)
    if not path.is_file():
        raise PcamError(f"{path}: checkpoint not found")
    if not zipfile.is_zipfile(path):  # what torch.save writes; anything else is not ours
        raise PcamError(f"{path}: not a readable torch checkpoint (not a zip archive; truncated?)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).splitlines()[0] if str(err) else ""
        raise PcamError(
            f"{path}: refused to load: the checkpoint carries pickled objects beyond tensors and "
            f"plain containers ({first[:200]})"
        ) from None
    except (RuntimeError, OSError, EOFError) as err:
        raise PcamError(
            f"{path}: not a readable torch checkpoint ({str(err).splitlines()[0]})"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise PcamError(f"{path}: not a pcam checkpoint (expected format {FORMAT!r})")
    config = ckpt.get("model_config")
    if not isinstance(config, dict):
        raise PcamError(
            f"{path}: checkpoint has no model_config (cannot tell which model it holds)"
        )
    name = config.get("model")
    if name not in MODEL_SIZE_KEY:
        raise PcamError(
            f"{path}: checkpoint model_config names unknown model {name!r} "
            f"(known: {', '.join(MODEL_SIZE_KEY)})"
        )
    size = config.get(MODEL_SIZE_KEY[name])
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise PcamError(
            f"{path}: checkpoint model_config for {name!r} needs a positive integer "
            f"'{MODEL_SIZE_KEY[name]}', got {size!r}"
        )
    norm = ckpt.get("normalisation")  # the training data's per-channel mean/std
    if not isinstance(norm, dict):
        raise PcamError(
            f"{path}: checkpoint has no normalisation (the training data's per-channel mean/std)"
        )
    for key in ("mean", "std"):
        values = norm.get(key)
        if not (
            isinstance(values, list | tuple)
            and len(values) == 3
            and all(isinstance(v, int | float) and math.isfinite(v) for v in values)
        ):
            raise PcamError(
                f"{path}: checkpoint normalisation.{key} must be 3 finite numbers, got {values!r}"
            )
    if min(norm["std"]) <= 0:
        raise PcamError(f"{path}: checkpoint normalisation.std must be > 0, got {norm['std']}")
    return ckpt


def normalisation(ckpt: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The (mean, std) tensors recorded in a checkpoint that load_checkpoint accepted."""
    return torch.tensor(ckpt["normalisation"]["mean"]), torch.tensor(ckpt["normalisation"]["std"])


def load_model(
    ckpt: dict, path: str | os.PathLike = "checkpoint", expected_config: dict | None = None
) -> nn.Module:
    """The recorded architecture with the best epoch's weights (by val ROC-AUC).

    Refused: an interrupted run's checkpoint (its weights are not the trained model) and, with
    `expected_config` (model_config of the current params), another architecture's (results
    would be reported under params that did not make them).
    """
    if expected_config is not None and ckpt["model_config"] != expected_config:
        raise PcamError(
            f"{path}: checkpoint holds {_describe(ckpt['model_config'])} but params.yaml asks for "
            f"{_describe(expected_config)}; retrain (`dvc repro train`) or restore the train "
            "params it was trained with"
        )
    progress = ckpt.get("progress", {})
    if not progress.get("finished", False):
        raise PcamError(
            f"{path}: checkpoint of an unfinished run (stopped after {progress.get('epoch', '?')} "
            f"epochs, step {progress.get('step', '?')}); resume it with PCAM_RESUME=1"
        )
    model = build_model(ckpt["model_config"])
    load_state_strict(model, progress.get("best_state") or ckpt["model_state"], path)
    return model


def load_state_strict(model: nn.Module, state: dict, path: str | os.PathLike) -> None:
    """load_state_dict; a mismatch names the missing/unexpected keys and the differing shapes."""
    expected = model.state_dict()
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(state))
        if tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    problems = {
        "missing keys": sorted(set(expected) - set(state)),
        "unexpected keys": sorted(set(state) - set(expected)),
        "shape mismatch": shapes,
    }
    parts = [f"{what} {_few(items)}" for what, items in problems.items() if items]
    if parts:
        raise PcamError(
            f"{path}: checkpoint does not fit model {type(model).__name__}: " + "; ".join(parts)
        )
    model.load_state_dict(state)


def _describe(config: dict) -> str:
    sizes = ", ".join(f"{k} {v}" for k, v in config.items() if k != "model")
    return f"model {config['model']!r} ({sizes})"


def _few(items: list[str], n: int = 3) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return "[" + ", ".join(items[:n]) + "]" + more
