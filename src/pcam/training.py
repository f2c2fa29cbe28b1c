"""The training loop: one readable function, seeded end to end, checkpointed atomically.

Determinism: every random draw comes from a torch.Generator seeded from (train.seed, epoch), the
model is initialised from train.seed, deterministic algorithms are enforced and the thread count
is fixed. Same code + params + data => byte-identical checkpoint on the same machine type.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.metrics import fbeta_score, roc_auc_score
from torch import nn
from tqdm import tqdm

from pcam.checkpoint import save_checkpoint
from pcam.data import Split, augment, normalise
from pcam.inference import predict_logits, sigmoid
from pcam.models import build_model, init_weights, model_config
from pcam.params import TrainParams


def set_determinism(seed: int, threads: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    # cuBLAS needs this for deterministic matmuls on CUDA; harmless on CPU.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.set_num_threads(threads)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A generator per epoch: an epoch's shuffling/augmentation does not depend on earlier ones."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


@dataclass
class EpochResult:
    epoch: int
    train_loss: float
    val_loss: float
    val_roc_auc: float
    val_f2: float
    images_per_s: float


def evaluate_split(model: nn.Module, split: Split, mean, std, batch_size: int) -> dict[str, float]:
    logits = predict_logits(model, split.x, mean, std, batch_size)
    y = split.y.numpy().astype(np.float64)
    loss = nn.functional.binary_cross_entropy_with_logits(
        torch.from_numpy(logits), torch.from_numpy(y)
    ).item()
    prob = sigmoid(logits)
    # 0.5 here only for monitoring; the deployed threshold is chosen by `evaluate` on valid.
    return {
        "loss": loss,
        "roc_auc": float(roc_auc_score(y, prob)),
        "f2": float(fbeta_score(y, prob >= 0.5, beta=2.0, zero_division=0.0)),
    }


def grad_norm(model: nn.Module) -> float:
    norms = [p.grad.detach().norm(2) for p in model.parameters() if p.grad is not None]
    return torch.stack(norms).norm(2).item() if norms else 0.0


def train(
    p: TrainParams,
    train_split: Split,
    valid_split: Split,
    mean: torch.Tensor,
    std: torch.Tensor,
    out_path: str | os.PathLike,
    provenance: dict,
    live=None,
) -> list[EpochResult]:
    """Train p.epochs epochs; log to `live` (a dvclive.Live) and checkpoint at every epoch end."""
    set_determinism(p.seed, p.threads)
    config = model_config(p)
    model = build_model(config)
    init_weights(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    loss_fn = nn.BCEWithLogitsLoss()
    n = len(train_split)
    steps_per_epoch = (n + p.batch_size - 1) // p.batch_size
    history: list[EpochResult] = []
    step = 0
    for epoch in range(p.epochs):
        gen = epoch_generator(p.seed, epoch)
        order = torch.randperm(n, generator=gen)
        model.train()
        t0 = time.perf_counter()
        total_loss = 0.0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{p.epochs}", leave=False)
        for b in bar:
            idx = order[b * p.batch_size : (b + 1) * p.batch_size]
            xb = normalise(augment(train_split.x[idx], gen), mean, std)
            yb = train_split.y[idx].to(torch.float32)
            loss = loss_fn(model(xb), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = grad_norm(model)
            optimizer.step()
            step += 1
            total_loss += loss.item() * len(idx)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if live is not None:
                live.log_metric("train/loss", loss.item())
                live.log_metric("train/grad_norm", gnorm)
                live.log_metric("train/lr", optimizer.param_groups[0]["lr"])
                live.next_step()
        seconds = time.perf_counter() - t0
        val = evaluate_split(model, valid_split, mean, std, max(p.batch_size, 256))
        result = EpochResult(
            epoch + 1, total_loss / n, val["loss"], val["roc_auc"], val["f2"], n / seconds
        )
        history.append(result)
        if live is not None:
            for key in ("loss", "roc_auc", "f2"):
                live.log_metric(f"val/{key}", val[key])
            # A timing: dvclive/ is therefore not byte-reproducible; metrics/train.json is.
            live.log_metric("perf/images_per_s", result.images_per_s)
        print(
            f"epoch {result.epoch}/{p.epochs}: train_loss {result.train_loss:.4f} "
            f"val_loss {result.val_loss:.4f} val_roc_auc {result.val_roc_auc:.4f} "
            f"val_f2 {result.val_f2:.4f} ({result.images_per_s:.0f} img/s)",
            flush=True,
        )
        save_checkpoint(
            out_path,
            {
                "model_config": config,
                "model_state": model.state_dict(),
                "optimizer_state": optimizer.state_dict(),
                "epoch": epoch + 1,
                "step": step,
                "normalisation": {"mean": mean.tolist(), "std": std.tolist()},
                # Timings stay out of the checkpoint so that it is byte-reproducible.
                "history": [{k: v for k, v in vars(h).items() if k != "images_per_s"} for h in history],
                "provenance": provenance,
            },
        )
    return history
