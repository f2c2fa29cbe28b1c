"""The training loop: one readable function, seeded end to end, resumable with identical bytes.

The model is initialised from train.seed; every later draw (sampling order, augmentation) comes
from a torch.Generator seeded from (train.seed, epoch). The resumable checkpoint holds that
generator's state, the position inside the epoch and every metric row logged so far, so a run
interrupted and resumed ends with the bytes of an uninterrupted one. The checkpoint lives outside
DVC's outputs and is written at each epoch end and on SIGTERM/SIGUSR1; the model file is written
once, at the end: a killed run never replaces the last finished model, and DVC can run-cache the
stage (it refuses to for `persist` outputs).
"""

from __future__ import annotations

import copy
import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from sklearn.metrics import fbeta_score, roc_auc_score
from torch import nn
from tqdm import tqdm

from pcam import numerics
from pcam.allocator import keep_freed_memory
from pcam.checkpoint import load_checkpoint, load_state_strict, save_checkpoint
from pcam.data import (
    Split,
    StreamedX,
    draw_color_jitter,
    draw_flip_rotate,
    flip_rotate,
    group_by_code,
    normalise,
)
from pcam.errors import PcamError
from pcam.inference import predict_logits, sigmoid
from pcam.models import build_model, init_weights, model_config
from pcam.params import TrainParams

# Exit status after a signal made the run save its checkpoint and stop (EX_TEMPFAIL: "try again
# later"); job scripts requeue on it.
EXIT_INTERRUPTED = 75
RESUME_ENV = "PCAM_RESUME"


class TrainingInterrupted(Exception):
    """SIGTERM/SIGUSR1 arrived; the checkpoint is saved."""


def set_determinism(seed: int, threads: int) -> None:
    # cuBLAS needs this for deterministic matmuls; it must be set before CUDA initialises.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.set_num_threads(threads)
    numerics.configure_torch()


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise PcamError("train.device is 'cuda' but no CUDA device is available")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def epoch_order(
    sampler: str, y: torch.Tensor, gen: torch.Generator, block_rows: int | None = None
) -> torch.Tensor:
    """One epoch's sample indices: a permutation (`shuffle`), or a class-balanced draw with
    replacement (`weighted`, the seeds' WeightedRandomSampler). With `block_rows` (a streamed
    split) the draws are regrouped block by block in a random block order, so each contiguous
    HDF5 block is read once per epoch."""
    n = len(y)
    if sampler == "shuffle":
        order = torch.randperm(n, generator=gen, device=y.device)
    else:
        counts = torch.bincount(y.long(), minlength=2).clamp_min(1).to(torch.float64)
        weights = (1.0 / counts)[y.long()]
        order = torch.multinomial(weights, n, replacement=True, generator=gen)
    if block_rows:
        n_blocks = (n + block_rows - 1) // block_rows
        block_rank = torch.randperm(n_blocks, generator=gen, device=y.device)[order // block_rows]
        order = order[torch.sort(block_rank, stable=True).indices]
    return order


@dataclass
class Stepper:
    """One optimisation step on a ready batch. The benchmark times the same `step` on a pre-made
    batch, so it and the loop differ by exactly the data path and the logging."""

    model: nn.Module  # holds the parameters
    net: nn.Module  # what runs forward: the model, or its DDP / torch.compile wrapper
    optimizer: torch.optim.Optimizer
    scheduler: object
    per_step_scheduler: bool
    max_norm: float
    autocast: torch.autocast
    loss_fn: nn.Module = field(default_factory=nn.BCEWithLogitsLoss)

    @classmethod
    def build(cls, p: TrainParams, device: torch.device, steps_per_epoch: int, world: int = 1):
        """The model initialised from train.seed (call set_determinism first), on `device`."""
        model = build_model(model_config(p))
        init_weights(model)
        model.to(device)
        if p.channels_last:
            model.to(memory_format=torch.channels_last)
        net = model
        if world > 1:
            net = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )
        if p.optimizer == "sgd":
            optimizer = torch.optim.SGD(
                model.parameters(), lr=p.lr, momentum=p.momentum, weight_decay=p.weight_decay
            )
        else:
            optimizer = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=p.weight_decay)
        lr_scheduler, total = torch.optim.lr_scheduler, p.epochs * steps_per_epoch
        scheduler = None
        if p.scheduler == "cosine":
            scheduler = lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
        elif p.scheduler == "onecycle":
            scheduler = lr_scheduler.OneCycleLR(optimizer, max_lr=p.lr, total_steps=total)
        elif p.scheduler == "plateau":  # stepped on the val loss at each epoch end
            scheduler = lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="min", factor=p.plateau_factor, patience=p.plateau_patience
            )
        return cls(
            model,
            torch.compile(net) if p.compile else net,
            optimizer,
            scheduler,
            p.scheduler in ("cosine", "onecycle"),
            # Clipping off: max_norm=inf only measures the norm (logged), in the same fused pass.
            p.grad_clip_norm if p.grad_clip_norm > 0 else float("inf"),
            torch.autocast(device.type, dtype=torch.bfloat16, enabled=p.precision == "bf16"),
        )

    def step(self, xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The batch loss, the grad L2 norm before clipping and the lr the step used."""
        with self.autocast:
            loss = self.loss_fn(self.net(xb).float(), yb.float())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = nn.utils.clip_grad_norm_(self.model.parameters(), self.max_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        if self.per_step_scheduler:
            self.scheduler.step()
        return loss, gnorm, lr


@dataclass
class Progress:
    """Where training is: what a resume needs besides model, optimizer and scheduler."""

    epoch: int = 0  # epochs completed
    batch: int = 0  # batches completed inside the current epoch
    step: int = 0  # optimizer steps overall
    loss_sum: float = 0.0  # train loss summed over the current epoch's samples so far
    gen_state: torch.Tensor | None = None  # epoch generator state after `batch` batches
    best_epoch: int = 0
    best_roc_auc: float = -1.0
    best_state: dict | None = None
    epochs_without_gain: int = 0
    finished: bool = False
    stopped_early: bool = False
    history: list[dict] = field(default_factory=list)  # one row per epoch
    steps: list[list[float]] = field(default_factory=list)  # [step, loss, grad_norm, lr] per step
    images_per_s: list[float] = field(default_factory=list)  # a timing: never saved


def evaluate_split(model, split: Split, mean, std, batch_size: int, device) -> dict[str, float]:
    logits = predict_logits(model, split.x, mean, std, batch_size, device)
    y = split.y.cpu().numpy().astype(np.float64)
    loss = nn.functional.binary_cross_entropy_with_logits(
        torch.from_numpy(logits), torch.from_numpy(y)
    ).item()
    prob = sigmoid(logits)
    # 0.5 only for monitoring; the deployed threshold is chosen by `evaluate` on valid.
    return {
        "loss": loss,
        "roc_auc": float(roc_auc_score(y, prob)),
        "f2": float(fbeta_score(y, prob >= 0.5, beta=2.0, zero_division=0.0)),
    }


def _restore(path: Path, provenance: dict, stepper: Stepper) -> Progress:
    """Load an interrupted run's state; refuse one made from other params, code or data."""
    ckpt = load_checkpoint(path)
    diff = []
    for part in ("params", "code", "data"):
        before = _flatten(ckpt["provenance"].get(part) or {})
        now = _flatten(provenance.get(part) or {})
        diff += [
            f"{part} {k}: {before.get(k)!r} -> {now.get(k)!r}"
            for k in sorted(set(before) | set(now))
            if before.get(k) != now.get(k)
        ]
    if diff:
        more = f" (+{len(diff) - 3} more)" if len(diff) > 3 else ""
        raise PcamError(
            f"{path}: cannot resume: the checkpoint was made from other inputs "
            f"({'; '.join(diff[:3])}{more}); delete it or run without {RESUME_ENV}=1"
        )
    load_state_strict(stepper.model, ckpt["model_state"], path)
    stepper.optimizer.load_state_dict(ckpt["optimizer_state"])
    if stepper.scheduler is not None:
        stepper.scheduler.load_state_dict(ckpt["scheduler_state"])
    return Progress(**ckpt["progress"])


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out |= _flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out


def _log(live, steps: list, epochs: list[dict]) -> None:
    """Per-step rows ([step, loss, grad_norm, lr]) and per-epoch validation rows to DVCLive.

    Steps are set, not counted with next_step(): DVCLive's next_step re-reads every metric file
    (for Studio, even when Studio is off), so its cost grows with the run (README: The training
    data path). No timings: DVC hashes dvclive/, and it must be equal on twin runs.
    """
    for step, loss, gnorm, lr in steps:
        live.step = int(step)
        live.log_metric("train/loss", loss)
        live.log_metric("train/grad_norm", gnorm)
        live.log_metric("train/lr", lr)
    for row in epochs:
        live.step = row["step"]
        for key in ("loss", "roc_auc", "f2"):
            live.log_metric(f"val/{key}", row[f"val_{key}"])


def train(
    p: TrainParams,
    train_split: Split,
    valid_split: Split,
    mean: torch.Tensor,
    std: torch.Tensor,
    out_path: str | os.PathLike,
    provenance: dict,
    live=None,
    rank: int = 0,
    world: int = 1,
    *,
    checkpoint_path: str | os.PathLike | None = None,
) -> Progress:
    """Train to p.epochs (or an early stop); write the finished model to `out_path` at the end.

    The resumable state goes to `checkpoint_path` (default `out_path` + ".partial") at each epoch
    end and on SIGTERM/SIGUSR1 (then TrainingInterrupted is raised), and is deleted once the model
    is written. With $PCAM_RESUME=1 a run continues from it (refused when made from other params,
    code or data; `live` gets the rows logged so far). With world > 1 this is one rank of an
    initialised torch.distributed group: DDP, each rank taking every world-th sample of each
    global batch, rank 0 alone writing files.
    """
    out_path = Path(out_path)
    checkpoint_path = Path(checkpoint_path or f"{out_path}.partial")
    keep_freed_memory()
    set_determinism(p.seed, p.threads)
    device = resolve_device(p.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    n = len(train_split)
    # Under DDP a last batch smaller than the world would leave a rank without samples: drop it.
    steps_per_epoch = n // p.batch_size if world > 1 else (n + p.batch_size - 1) // p.batch_size
    stepper = Stepper.build(p, device, steps_per_epoch, world)
    model, optimizer, scheduler = stepper.model, stepper.optimizer, stepper.scheduler
    streamed = isinstance(train_split.x, StreamedX)
    x_all = train_split.x if streamed else train_split.x.to(device)
    y_all = train_split.y.to(device)
    mean, std = mean.to(device), std.to(device)
    log = print if rank == 0 else (lambda *a, **k: None)

    prog = Progress()
    if os.environ.get(RESUME_ENV) == "1" and checkpoint_path.is_file():
        prog = _restore(checkpoint_path, provenance, stepper)
        log(f"train: resuming from {checkpoint_path} at epoch {prog.epoch + 1}, batch {prog.batch}")
        if live is not None:  # a fresh directory: each step appears once however often resumed
            _log(live, prog.steps, prog.history)
            # A summary only from an epoch end on, as the uninterrupted run writes it: its keys
            # then come in the same order, so dvclive/metrics.json gets the same bytes.
            if prog.history:
                live.make_summary()

    def save(path: Path) -> None:
        if rank == 0:
            ckpt = {
                "model_config": model_config(p),
                "model_state": model.state_dict(),
                "optimizer_state": optimizer.state_dict(),
                "scheduler_state": scheduler.state_dict() if scheduler is not None else None,
                "progress": {k: v for k, v in vars(prog).items() if k != "images_per_s"},
                "normalisation": {"mean": mean.tolist(), "std": std.tolist()},
                "provenance": provenance,
            }
            save_checkpoint(path, ckpt)
        if world > 1:
            dist.barrier()

    # SLURM sends SIGUSR1 (with --signal) before a time limit and SIGTERM on preemption/scancel:
    # finishing the step and writing a checkpoint beats dying mid-write. The loop checks the flag.
    stop: dict = {}
    previous = {
        s: signal.signal(s, lambda num, _: stop.update(signal=signal.Signals(num).name))
        for s in (signal.SIGTERM, signal.SIGUSR1)
    }
    signame = None
    try:
        for epoch in range(prog.epoch, p.epochs):
            # A generator per epoch: an epoch's order and augmentation do not depend on earlier ones.
            gen = torch.Generator(device=device).manual_seed(p.seed * 1_000_003 + epoch)
            order = epoch_order(p.sampler, y_all, gen, x_all.block_rows if streamed else None)
            if prog.gen_state is not None:  # resuming inside this epoch
                gen.set_state(prog.gen_state)
            model.train()
            t0, seen = time.perf_counter(), 0
            bar = tqdm(  # disable=None: no bar when stdout is not a terminal (CI, SLURM logs)
                range(prog.batch, steps_per_epoch),
                desc=f"epoch {epoch + 1}/{p.epochs}",
                leave=False,
                disable=None if rank == 0 else True,
            )
            for b in bar:
                idx = order[b * p.batch_size : (b + 1) * p.batch_size]
                # Random draws cover the global batch, so every rank's stream stays the same.
                codes = draw_flip_rotate(gen, len(idx), p.augment.flips, p.augment.rot90, device)
                jitter = None
                if p.augment.color_jitter > 0:
                    jitter = draw_color_jitter(gen, len(idx), p.augment.color_jitter, device)
                if world > 1:
                    idx, codes = idx[rank::world], codes[rank::world]
                    jitter = jitter[rank::world] if jitter is not None else None
                # Gathered grouped by code, so flip_rotate copies contiguous slices.
                grouped, counts = group_by_code(codes)
                idx = idx[grouped]
                jitter = jitter[grouped] if jitter is not None else None
                xb = x_all[idx].to(device)  # no-op when resident on the device already
                xb = normalise(flip_rotate(xb, counts), mean, std, jitter)
                loss, gnorm, lr = stepper.step(xb, y_all[idx])
                prog.steps.append([prog.step, loss.item(), gnorm.item(), lr])
                seen += len(idx)
                img_s = seen / (time.perf_counter() - t0)
                bar.set_postfix(loss=f"{prog.steps[-1][1]:.4f}", img_s=f"{img_s:.0f}")
                if live is not None:
                    _log(live, prog.steps[-1:], [])
                # One small all-reduce per step: the global batch's loss sum, and whether any
                # rank got a signal (every rank must stop at the same step, or the rest hang).
                shared = torch.tensor(
                    [prog.steps[-1][1] * len(idx), 1.0 if stop else 0.0], dtype=torch.float64
                )
                if world > 1:
                    shared = shared.to(device)
                    dist.all_reduce(shared)
                signame = stop.get("signal") or ("SIGTERM" if shared[1].item() > 0 else None)
                prog.step += 1
                prog.batch = b + 1
                prog.loss_sum += shared[0].item()
                if signame and prog.batch < steps_per_epoch:
                    prog.gen_state = gen.get_state()
                    save(checkpoint_path)
                    raise TrainingInterrupted(f"{signame} at epoch {epoch + 1}, step {prog.step}")
            images_per_s = world * seen / max(time.perf_counter() - t0, 1e-9)
            prog.images_per_s.append(images_per_s)
            if world > 1:
                # BatchNorm running stats differ per rank; rank 0's go to every rank so all ranks
                # score the same model and take the same early-stopping decision.
                for buf in model.buffers():
                    dist.broadcast(buf, src=0)
            val = evaluate_split(model, valid_split, mean, std, max(p.batch_size, 256), device)
            if p.scheduler == "plateau":
                scheduler.step(val["loss"])
            row = {
                "epoch": epoch + 1,
                "train_loss": prog.loss_sum / min(n, steps_per_epoch * p.batch_size),
                **{f"val_{k}": v for k, v in val.items()},
                "lr": optimizer.param_groups[0]["lr"],
                "step": prog.step,
            }
            prog.history.append(row)
            prog.epoch, prog.batch, prog.loss_sum, prog.gen_state = epoch + 1, 0, 0.0, None
            if val["roc_auc"] > prog.best_roc_auc:
                prog.best_epoch, prog.best_roc_auc = epoch + 1, val["roc_auc"]
                prog.best_state = copy.deepcopy(model.state_dict())
                prog.epochs_without_gain = 0
            else:
                prog.epochs_without_gain += 1
            prog.stopped_early = 0 < p.early_stopping_patience <= prog.epochs_without_gain
            prog.finished = prog.epoch == p.epochs or prog.stopped_early
            if live is not None:
                _log(live, [], [row])
                live.make_summary()
            log(
                f"epoch {epoch + 1}/{p.epochs}: train_loss {row['train_loss']:.4f} "
                f"val_loss {row['val_loss']:.4f} val_roc_auc {row['val_roc_auc']:.4f} "
                f"val_f2@0.5 {row['val_f2']:.4f} lr {row['lr']:.2e} ({images_per_s:.0f} img/s)",
                flush=True,
            )
            if not prog.finished:
                save(checkpoint_path)
            if prog.stopped_early:
                log(f"train: early stop: no val ROC-AUC gain for {prog.epochs_without_gain} epochs")
                break
            if signame and not prog.finished:
                raise TrainingInterrupted(f"{signame} at epoch {epoch + 2}, step {prog.step}")
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    save(out_path)
    if rank == 0:
        checkpoint_path.unlink(missing_ok=True)
    return prog
