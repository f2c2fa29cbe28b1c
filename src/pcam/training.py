"""The training loop: one readable function, seeded end to end, checkpointed atomically, resumable.

Determinism: the model is initialised from train.seed; every later random draw (sampling order,
augmentation) comes from a torch.Generator seeded from (train.seed, epoch); deterministic
algorithms are enforced, the thread count is fixed and the CPU kernels are pinned
(pcam/numerics.py). Same code + params + data => byte-identical model on any x86-64 machine with
AVX2, also when the run was interrupted and resumed: the checkpoint holds the epoch generator's
state, the position inside the epoch and every metric row logged so far.

Two files: the resumable checkpoint (`checkpoint_path`, outside DVC's outputs, written at every
epoch end and on SIGTERM/SIGUSR1) and the finished model (`out_path`), written once, at the end.
A killed or failed run therefore never replaces the last finished model, and DVC can run-cache
the stage (it refuses to for `persist` outputs).
"""

from __future__ import annotations

import contextlib
import copy
import os
import random
import signal
import time
from collections.abc import Iterator
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

# Exit status of a run stopped by SIGTERM/SIGUSR1 after saving its checkpoint (EX_TEMPFAIL:
# "try again later"); job scripts requeue on it.
EXIT_INTERRUPTED = 75
RESUME_ENV = "PCAM_RESUME"


class TrainingInterrupted(Exception):
    def __init__(self, signame: str, epoch: int, step: int):
        super().__init__(f"{signame} at epoch {epoch + 1}, step {step}")
        self.signame = signame


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


def epoch_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    """A generator per epoch: an epoch's order and augmentation do not depend on earlier epochs."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + epoch)


def epoch_order(
    sampler: str, y: torch.Tensor, gen: torch.Generator, block_rows: int | None = None
) -> torch.Tensor:
    """Sample indices for one epoch: a permutation, or a class-balanced draw with replacement.

    `weighted` is the seeds' WeightedRandomSampler: each class gets half the draws in expectation.
    With `block_rows` (a streamed split), the draws are regrouped block by block in a random
    block order, so each contiguous HDF5 block is read once per epoch.
    """
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


def make_optimizer(p: TrainParams, model: nn.Module) -> torch.optim.Optimizer:
    if p.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=p.lr, momentum=p.momentum, weight_decay=p.weight_decay
        )
    return torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=p.weight_decay)


def make_scheduler(p: TrainParams, optimizer, steps_per_epoch: int):
    """Per-step schedulers (cosine, onecycle) and the per-epoch plateau scheduler on val loss."""
    total = p.epochs * steps_per_epoch
    if p.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    if p.scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=p.lr, total_steps=total)
    if p.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=p.plateau_factor, patience=p.plateau_patience
        )
    return None


@dataclass
class Stepper:
    """One optimisation step on a ready batch: forward, loss, backward, global grad norm (clipped
    when train.grad_clip_norm > 0), optimizer and per-step scheduler.

    The training loop and the benchmark's pre-made-tensor reference both call `step`, so the
    two differ by exactly the data path (gather, augmentation, normalisation) and the logging.
    """

    config: dict
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
        config = model_config(p)
        model = build_model(config)
        init_weights(model)
        model.to(device)
        if p.channels_last:
            model.to(memory_format=torch.channels_last)
        net = model
        if world > 1:
            net = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )
        optimizer = make_optimizer(p, model)
        return cls(
            config,
            model,
            torch.compile(net) if p.compile else net,
            optimizer,
            make_scheduler(p, optimizer, steps_per_epoch),
            p.scheduler in ("cosine", "onecycle"),
            # With clipping off, max_norm=inf only measures the norm (logged); one fused
            # (foreach) computation either way.
            p.grad_clip_norm if p.grad_clip_norm > 0 else float("inf"),
            torch.autocast(device.type, dtype=torch.bfloat16, enabled=p.precision == "bf16"),
        )

    def step(self, xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Returns the batch loss, the grad L2 norm before clipping and the lr the step used."""
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


@contextlib.contextmanager
def stop_on_signals() -> Iterator[dict]:
    """Turn SIGTERM/SIGUSR1 into a flag the loop checks after each step.

    SLURM sends SIGUSR1 (with --signal) before a time limit and SIGTERM on preemption/scancel;
    finishing the current step and writing a checkpoint beats dying mid-write.
    """
    flag: dict = {"signal": None}

    def handler(signum, _frame):
        flag["signal"] = signal.Signals(signum).name

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@dataclass
class EpochResult:
    epoch: int
    train_loss: float
    val_loss: float
    val_roc_auc: float
    val_f2: float
    lr: float


@dataclass
class Progress:
    """Where training is: everything besides model/optimizer/scheduler that a resume needs."""

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
    history: list[dict] = field(default_factory=list)  # one row per epoch (EpochResult + step)
    # One row per optimizer step: (step, loss, grad_norm, lr). A resumed run replays them into a
    # fresh DVCLive directory, so each step appears once however often the run was interrupted.
    steps: list[list[float]] = field(default_factory=list)
    # Training images/s per epoch of this process: a timing, so never saved (see _checkpoint).
    images_per_s: list[float] = field(default_factory=list)


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


def _checkpoint(config, model, optimizer, scheduler, prog: Progress, mean, std, provenance):
    return {
        "model_config": config,
        "model_state": model.state_dict(),
        "optimizer_state": optimizer.state_dict(),
        "scheduler_state": scheduler.state_dict() if scheduler is not None else None,
        "progress": {k: v for k, v in vars(prog).items() if k != "images_per_s"},
        "normalisation": {"mean": mean.tolist(), "std": std.tolist()},
        "provenance": provenance,
    }


def _restore(path: Path, provenance: dict, model, optimizer, scheduler) -> Progress:
    """Load an interrupted run's state; refuse one made from other params, code or data."""
    ckpt = load_checkpoint(path)
    saved = ckpt["provenance"]
    diff = []
    for part in ("params", "code", "data"):
        before, now = _flatten(saved.get(part) or {}), _flatten(provenance.get(part) or {})
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
    load_state_strict(model, ckpt["model_state"], path)
    optimizer.load_state_dict(ckpt["optimizer_state"])
    if scheduler is not None:
        scheduler.load_state_dict(ckpt["scheduler_state"])
    return Progress(**ckpt["progress"])


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _replay(live, prog: Progress) -> None:
    """Write the rows of the steps and epochs done so far into a fresh DVCLive directory."""
    for step, loss, gnorm, lr in prog.steps:
        live.step = int(step)
        live.log_metric("train/loss", loss)
        live.log_metric("train/grad_norm", gnorm)
        live.log_metric("train/lr", lr)
    for row in prog.history:
        live.step = row["step"]
        for key in ("loss", "roc_auc", "f2"):
            live.log_metric(f"val/{key}", row[f"val_{key}"])
    # A summary only from an epoch end on, as the uninterrupted run writes it: its keys then come
    # in the same order (train, val, step), so dvclive/metrics.json gets the same bytes.
    if prog.history:
        live.make_summary()


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
    """Train to p.epochs (or early stop); write the finished model to `out_path` at the end.

    The resumable state goes to `checkpoint_path` at every epoch end and on SIGTERM/SIGUSR1, and
    is deleted once the model is written (default: `out_path` + ".partial"). With $PCAM_RESUME=1 a run continues from it (refused
    when it was made from other params, code or data; `live` gets the rows logged so far). Raises
    TrainingInterrupted after saving a checkpoint when a signal arrived. With world > 1 this runs
    as one rank of an initialised torch.distributed group: DistributedDataParallel, each rank
    taking every world-th sample of each global batch, rank 0 alone writing files.
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
    config, model, optimizer, scheduler = (
        stepper.config,
        stepper.model,
        stepper.optimizer,
        stepper.scheduler,
    )
    streamed = isinstance(train_split.x, StreamedX)
    x_all = train_split.x if streamed else train_split.x.to(device)
    y_all = train_split.y.to(device)
    block_rows = train_split.x.block_rows if streamed else None
    mean, std = mean.to(device), std.to(device)

    prog = Progress()
    if os.environ.get(RESUME_ENV) == "1" and checkpoint_path.is_file():
        prog = _restore(checkpoint_path, provenance, model, optimizer, scheduler)
        if rank == 0:
            print(
                f"train: resuming from {checkpoint_path} at epoch {prog.epoch + 1}, "
                f"batch {prog.batch}"
            )
        if live is not None:
            _replay(live, prog)

    def save(path: Path) -> None:
        if rank == 0:
            ckpt = _checkpoint(config, model, optimizer, scheduler, prog, mean, std, provenance)
            save_checkpoint(path, ckpt)
        if world > 1:
            dist.barrier()

    signame = None
    with stop_on_signals() as stop:
        for epoch in range(prog.epoch, p.epochs):
            gen = epoch_generator(p.seed, epoch, device)
            order = epoch_order(p.sampler, y_all, gen, block_rows)
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
                loss_value, gnorm_value = loss.item(), gnorm.item()
                prog.steps.append([prog.step, loss_value, gnorm_value, lr])
                seen += len(idx)
                bar.set_postfix(
                    loss=f"{loss_value:.4f}", img_s=f"{seen / (time.perf_counter() - t0):.0f}"
                )
                if live is not None:
                    # Steps are set, not counted with next_step(): DVCLive's next_step re-reads
                    # every metric file (for Studio, even when Studio is off), so its cost grows
                    # with the run (README: The training data path). Rows are appended at once
                    # either way; the summary is written at each epoch end.
                    live.step = prog.step
                    live.log_metric("train/loss", loss_value)
                    live.log_metric("train/grad_norm", gnorm_value)
                    live.log_metric("train/lr", lr)
                # One small all-reduce per step: the global batch's loss sum, and whether any
                # rank got a signal (every rank must stop at the same step, or the rest hang).
                shared = torch.tensor(
                    [loss_value * len(idx), 1.0 if stop["signal"] else 0.0], dtype=torch.float64
                )
                if world > 1:
                    shared = shared.to(device)
                    dist.all_reduce(shared)
                signame = stop["signal"] or ("SIGTERM" if shared[1].item() > 0 else None)
                prog.step += 1
                prog.batch = b + 1
                prog.loss_sum += shared[0].item()
                if signame and prog.batch < steps_per_epoch:
                    prog.gen_state = gen.get_state()
                    save(checkpoint_path)
                    raise TrainingInterrupted(signame, epoch, prog.step)
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
            result = EpochResult(
                epoch + 1,
                prog.loss_sum / min(n, steps_per_epoch * p.batch_size),
                val["loss"],
                val["roc_auc"],
                val["f2"],
                optimizer.param_groups[0]["lr"],
            )
            prog.history.append(vars(result) | {"step": prog.step})
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
                live.step = prog.step
                for key in ("loss", "roc_auc", "f2"):
                    live.log_metric(f"val/{key}", val[key])
                # No timings in dvclive/: DVC hashes it, and it must be equal on twin runs. The
                # benchmark stage measures throughput; the log line below shows it.
                live.make_summary()
            log = print if rank == 0 else (lambda *a, **k: None)
            log(
                f"epoch {result.epoch}/{p.epochs}: train_loss {result.train_loss:.4f} "
                f"val_loss {result.val_loss:.4f} val_roc_auc {result.val_roc_auc:.4f} "
                f"val_f2@0.5 {result.val_f2:.4f} lr {result.lr:.2e} ({images_per_s:.0f} img/s)",
                flush=True,
            )
            if not prog.finished:
                save(checkpoint_path)
            if prog.stopped_early:
                log(f"train: early stop: no val ROC-AUC gain for {prog.epochs_without_gain} epochs")
                break
            if signame and not prog.finished:
                raise TrainingInterrupted(signame, epoch + 1, prog.step)
    save(out_path)
    if rank == 0:
        checkpoint_path.unlink(missing_ok=True)
    return prog
