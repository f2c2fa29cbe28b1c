"""Throughput and latency, measured side by side in one run. Never estimated, never asserted.

Warm-up iterations are excluded (allocator, kernel selection, compilation); timed regions end
with a device synchronize, so asynchronous CUDA work counts where it happens; each figure is the
median over `repeats` with the interquartile range as spread; the caller pins the thread count.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import h5py
import numpy as np
import torch
from dvclive import Live
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pcam import numerics
from pcam.data import Split, normalise, read_x
from pcam.errors import PcamError
from pcam.params import AugmentParams, TrainParams, to_dict

# The train params that change what the benchmark times: the architecture, the batch, the memory
# layout, the optimizer's kind and the data path's augmentation. dvc.yaml declares exactly these
# (plus benchmark.*) for the benchmark stage; tests/test_dvc_yaml.py keeps the two equal.
TIMED_TRAIN_PARAMS = (
    "model",
    "width",
    "hidden_units",
    "batch_size",
    "channels_last",
    "optimizer",
    "augment.flips",
    "augment.rot90",
    "augment.color_jitter",
)
# The others change numbers, not work: fixed here, so an lr, seed or schedule experiment does not
# re-run the benchmark. Training is timed in fp32, eager (the full profile adds bf16 and
# torch.compile for inference only), on benchmark.threads threads.
FIXED_TRAIN_PARAMS = {
    "seed": 0,
    "epochs": 2,
    "lr": 1e-3,
    "momentum": 0.9,
    "weight_decay": 0.0,
    "scheduler": "none",
    "plateau_patience": 1,
    "plateau_factor": 0.1,
    "grad_clip_norm": 0.0,
    "early_stopping_patience": 0,
    "sampler": "shuffle",
    "use_exclusions": False,  # the benchmark times on the first train rows, whatever their flags
    "device": "cpu",
    "devices": 1,
    "precision": "fp32",
    "compile": False,
}


def timed_train_params(p: TrainParams, threads: int) -> TrainParams:
    return dataclasses.replace(p, **FIXED_TRAIN_PARAMS, threads=threads)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], warmup: int, repeats: int, device: torch.device) -> np.ndarray:
    """Seconds per call of `fn` over `repeats` calls, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        seconds.append(time.perf_counter() - t0)
    return np.asarray(seconds)


def summary(seconds: np.ndarray, items_per_call: int) -> dict[str, float]:
    """Median throughput, its spread (IQR of per-call throughput) and latency percentiles."""
    q1, q3 = np.percentile(items_per_call / seconds, [25, 75])
    return {
        "images_per_s": float(items_per_call / np.median(seconds)),
        "images_per_s_iqr": float(q3 - q1),
        "latency_ms_p50": float(np.percentile(seconds, 50) * 1e3),
        "latency_ms_p95": float(np.percentile(seconds, 95) * 1e3),
        "repeats": int(len(seconds)),
    }


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    # CPU autocast to bf16 runs everywhere but is only fast with native bf16 instructions.
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _input(batch_size: int, device, channels_last: bool) -> torch.Tensor:
    x = torch.randn(batch_size, 3, 96, 96, device=device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def time_inference(
    model: nn.Module,
    batch_size: int,
    warmup: int,
    repeats: int,
    device: torch.device,
    precision: str = "fp32",
    channels_last: bool = True,
    compiled: bool = False,
) -> dict[str, float]:
    """Forward passes at `batch_size` on resident input (no data loading in the timing)."""
    net = model.eval().to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    net = torch.compile(net) if compiled else net
    x = _input(batch_size, device, channels_last)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    @torch.no_grad()
    def step():
        with autocast:
            net(x)

    return summary(timed(step, warmup, repeats, device), batch_size)


def _step_seconds(p: TrainParams, x, y, warmup: int, repeats: int, device) -> np.ndarray:
    """Seconds per training.Stepper step (forward, backward, grad norm, optimizer, scheduler)
    on one resident batch, after `warmup` untimed steps."""
    from pcam.training import Stepper  # training imports this module's siblings; keep start-up lean

    # Sized so a per-step scheduler (onecycle refuses to step past its total) lasts the run.
    stepper = Stepper.build(p, device, steps_per_epoch=-(-(warmup + repeats) // p.epochs))
    return timed(lambda: stepper.step(x, y), warmup, repeats, device)


def time_train_step(
    p: TrainParams, warmup: int, repeats: int, device: torch.device
) -> dict[str, float]:
    """The training loop's own step on a pre-made batch: the compute ceiling at p.batch_size."""
    x = _input(p.batch_size, device, p.channels_last)
    y = torch.arange(p.batch_size, device=device) % 2
    return summary(_step_seconds(p, x, y, warmup, repeats, device), p.batch_size)


def time_train_loop(
    p: TrainParams, train_split: Split, valid_split: Split, mean, std, epochs: int = 2
) -> float:
    """images/s of the real training loop (pcam.training.train) as the train stage runs it,
    DVCLive logging into a temporary directory included. Of two epochs the last one's figure
    is kept: the first carries the warm-up that the pre-made-batch measurement excludes too."""
    from pcam.training import train

    p = dataclasses.replace(p, epochs=epochs, early_stopping_patience=0)
    with tempfile.TemporaryDirectory() as tmp:
        live = Live(dir=str(Path(tmp) / "live"), dvcyaml=False, save_dvc_exp=False)
        prog = train(
            p,
            train_split,
            valid_split,
            mean,
            std,
            Path(tmp) / "m.pt",
            {"params": {}},
            live,
            checkpoint_path=Path(tmp) / "checkpoint.pt",
        )
        live.end()
    return prog.images_per_s[-1]


def _compare_rounds(first: str, second: str, rates: dict[str, list], ratio: str) -> dict:
    """Medians of two interleaved arms and of the per-round ratio second / first - 1: on a shared
    machine throughput drifts by tens of percent over minutes, so each round compares like with
    like and measuring each side once, minutes apart, would compare the drift, not the code."""
    a, b = np.asarray(rates[first]), np.asarray(rates[second])
    per_round = b / a - 1.0
    return {
        f"{first}_images_per_s": float(np.median(a)),
        f"{second}_images_per_s": float(np.median(b)),
        ratio: float(np.median(per_round)),
        f"{ratio}_min": float(per_round.min()),
        f"{ratio}_max": float(per_round.max()),
        "rounds": [
            {f"{first}_images_per_s": x, f"{second}_images_per_s": y}
            for x, y in zip(rates[first], rates[second], strict=True)
        ],
    }


def compare_loop_to_premade(
    p: TrainParams, train_split: Split, valid_split: Split, mean, std, rounds: int
) -> dict:
    """The data path's cost: the training loop's images/s vs the same steps on a pre-made batch
    (the split's first, normalised, not augmented), round by round; overhead = pre-made / loop - 1.
    """
    from pcam.training import set_determinism

    p = dataclasses.replace(p, device="cpu", compile=False)
    steps = -(-len(train_split) // p.batch_size)
    b = min(p.batch_size, len(train_split))
    x, y = (
        normalise(train_split.x[:b], mean, std),
        train_split.y[:b],
    )  # channels_last, as the loop's
    rates: dict[str, list] = {"loop": [], "premade": []}
    for _ in range(rounds):
        rates["loop"].append(time_train_loop(p, train_split, valid_split, mean, std))
        # Measured like the loop's figure (a whole epoch, after an epoch of warm-up), under the
        # loop's settings: same seed, threads, deterministic algorithms, optimizer, scheduler.
        set_determinism(p.seed, p.threads)
        seconds = _step_seconds(p, x, y, steps, steps, torch.device("cpu"))
        rates["premade"].append(steps * b / seconds.sum())
    comparison = _compare_rounds("loop", "premade", rates, "overhead")
    return comparison | {"steps_per_epoch": steps, "batch_size": p.batch_size}


# pcam/__init__.py pins the CPU kernels (ISA caps, MKL's reproducible mode) before torch is
# imported, unless PCAM_CPU_PINS=0: each arm is therefore its own process. The pins this process
# got from its own import are removed from the unpinned arm's environment.
PINS_ENV = numerics.SWITCH_ENV
PINNED_VARS = tuple(numerics.ENV_PINS)


def _arm_env(pins: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if pins or k not in PINNED_VARS}
    env[PINS_ENV] = "1" if pins else "0"
    return env


def pins_worker(config_json: str) -> None:
    """Child process of `compare_cpu_pins`: warm up, print "ready", then for each line on stdin
    time `steps` training steps on a pre-made batch and print their images/s."""
    from pcam.training import Stepper, set_determinism

    config = json.loads(config_json)
    raw, steps, cpu = config["train"], config["steps"], torch.device("cpu")
    p = TrainParams(**{**raw, "augment": AugmentParams(**raw["augment"])})
    # As training runs: seeded, deterministic algorithms (which the pins interact with).
    set_determinism(p.seed, p.threads)
    stepper = Stepper.build(p, cpu, steps_per_epoch=1)  # scheduler "none": steps without end
    x, y = _input(p.batch_size, cpu, p.channels_last), torch.arange(p.batch_size) % 2
    timed(lambda: stepper.step(x, y), config["warmup"], 0, cpu)
    print("ready", flush=True)
    for _ in sys.stdin:
        seconds = timed(lambda: stepper.step(x, y), 0, steps, cpu)
        print(steps * p.batch_size / seconds.sum(), flush=True)


def compare_cpu_pins(p: TrainParams, steps: int, warmup: int, rounds: int) -> dict:
    """Training images/s with the CPU numerics pins (PCAM_CPU_PINS=1) and without (=0): two
    worker processes, started once, take turns, the order swapped every round (so a drift
    favours neither); cost = unpinned / pinned - 1 (how much faster training runs without)."""
    p = dataclasses.replace(p, scheduler="none")  # the workers step without an end
    config = json.dumps({"train": to_dict(p), "steps": steps, "warmup": warmup})
    cmd = [sys.executable, "-m", "pcam.benchmark", "pins-worker", config]
    arms = {
        pins: subprocess.Popen(
            cmd, env=_arm_env(pins), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        for pins in (True, False)
    }

    def read(pins: bool) -> str:
        line = arms[pins].stdout.readline()
        if not line:
            code = arms[pins].wait()
            raise PcamError(
                f"benchmark: the {PINS_ENV}={int(pins)} worker exited {code} (its error is above)"
            )
        return line

    try:
        for pins in arms:
            read(pins)  # "ready": both warmed up
        rates: dict[str, list] = {"pinned": [], "unpinned": []}
        for r in range(rounds):
            for pins in (True, False) if r % 2 == 0 else (False, True):
                arms[pins].stdin.write("go\n")
                arms[pins].stdin.flush()
                rates["pinned" if pins else "unpinned"].append(float(read(pins)))
    finally:
        for proc in arms.values():
            try:
                proc.communicate(timeout=60)  # closes its stdin: the worker's loop ends
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    comparison = _compare_rounds("pinned", "unpinned", rates, "cost")
    return comparison | {"steps_per_round": steps, "batch_size": p.batch_size}


def batches_ours(x_path: Path, n: int, batch_size: int, mean, std) -> Iterator[torch.Tensor]:
    """Our path: n rows read in large contiguous slices into uint8, then normalised per batch."""
    x = torch.from_numpy(read_x(x_path, np.arange(n)))
    for start in range(0, n, batch_size):
        yield normalise(x[start : start + batch_size], mean, std)


class PerIndexH5(Dataset):
    """The seeds' pattern: a Dataset doing one h5py read per index (opened lazily per worker)."""

    def __init__(self, path: Path, n: int, mean, std):
        self.path, self.n, self.mean, self.std = path, n, mean, std
        self.file = None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        if self.file is None:
            self.file = h5py.File(self.path, "r")
        x = torch.from_numpy(self.file["x"][i]).float().div_(255.0)
        return ((x - self.mean) / self.std).permute(2, 0, 1)


def batches_naive(x_path: Path, n: int, batch_size: int, workers: int, mean, std) -> DataLoader:
    """The seeds' path: a DataLoader over PerIndexH5, shuffled like the seeds' sampler (random
    single-row reads are what HDF5 is worst at)."""
    return DataLoader(
        PerIndexH5(x_path, n, mean, std),
        batch_size=batch_size,
        num_workers=workers,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )


def time_delivery(batches: Callable[[], Iterable], n: int, warmup: int, repeats: int) -> dict:
    """summary() of delivering n patches: every batch `batches()` yields made, then dropped."""

    def deliver():
        for _ in batches():
            pass

    return summary(timed(deliver, warmup, repeats, torch.device("cpu")), n)


if __name__ == "__main__":
    # `python -m pcam.benchmark pins-worker CONFIG`: the worker processes of compare_cpu_pins
    if len(sys.argv) != 3 or sys.argv[1] != "pins-worker":
        sys.exit(
            "usage: python -m pcam.benchmark pins-worker CONFIG_JSON (started by the benchmark)"
        )
    pins_worker(sys.argv[2])
