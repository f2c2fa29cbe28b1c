"""Benchmark helpers: timing excludes warm-up, summaries are medians with spread."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch

from pcam import benchmark as bench
from pcam.params import load_params
from tests.conftest import REPO


def tiny_train(**changes):
    p = load_params(REPO / "params.yaml").train
    base = dict(batch_size=16, width=4, threads=1, device="cpu", epochs=4)
    return dataclasses.replace(p, **(base | changes))


def test_timed_excludes_warmup_and_counts_repeats():
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.3 if len(calls) <= 3 else 0.01)  # the warm-up calls are the slow ones

    seconds = bench.timed(fn, warmup=3, repeats=5, device=torch.device("cpu"))
    assert len(calls) == 8 and len(seconds) == 5
    # each figure is one timed call: at least its sleep, none of the warm-up's
    assert (seconds >= 0.01).all() and (seconds < 0.3).all(), seconds


def test_summary_is_median_based():
    s = bench.summary(np.array([0.1, 0.1, 0.1, 10.0]), items_per_call=10)
    assert s["images_per_s"] == 100.0  # the outlier does not move the median
    assert s["latency_ms_p50"] == 100.0 and s["latency_ms_p95"] > 1000.0


class SlowForward(torch.nn.Module):
    """A model whose forward takes at least `seconds`: what the timing must then report."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds, self.calls, self.linear = seconds, 0, torch.nn.Linear(3, 1)

    def forward(self, x):
        self.calls += 1
        time.sleep(self.seconds)
        return self.linear(x.mean(dim=(2, 3))).squeeze(1)


def test_inference_times_the_forward_passes():
    model = SlowForward(0.02)
    r = bench.time_inference(model, 4, 1, 3, torch.device("cpu"), channels_last=False)
    assert model.calls == 1 + 3 and r["repeats"] == 3
    # 4 images per forward of >= 20 ms: at most 200 images/s, each call counted as 4 images
    assert r["latency_ms_p50"] >= 20 and r["images_per_s"] <= 200, r
    assert r["images_per_s"] == pytest.approx(4e3 / r["latency_ms_p50"]), r


def test_train_step_times_training_steps(monkeypatch):
    from pcam.training import Stepper

    real_step, steps = Stepper.step, []

    def slow_step(self, xb, yb):
        steps.append(len(xb))
        time.sleep(0.02)
        return real_step(self, xb, yb)

    monkeypatch.setattr(Stepper, "step", slow_step)
    for scheduler in ("onecycle", "cosine", "plateau", "none"):
        # onecycle raises if stepped past its total: the reference sizes it for warm-up + repeats
        steps.clear()
        t = bench.time_train_step(tiny_train(scheduler=scheduler), 3, 4, torch.device("cpu"))
        assert steps == [16] * (3 + 4) and t["repeats"] == 4  # batch_size 16
        assert t["latency_ms_p50"] >= 20 and t["images_per_s"] <= 16 / 0.02, t
        assert t["images_per_s"] == pytest.approx(16e3 / t["latency_ms_p50"]), t


def test_loop_and_premade_are_interleaved_and_compared_per_round():
    from pcam.data import Split

    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(0, 256, size=(40, 96, 96, 3), dtype=np.uint8))
    y = torch.from_numpy((np.arange(40) % 2).astype(np.uint8))
    split = Split("train", x, y, np.arange(40))
    mean, std = torch.full((3,), 0.5), torch.full((3,), 0.25)
    r = bench.compare_loop_to_premade(tiny_train(), split, split, mean, std, rounds=3)
    assert len(r["rounds"]) == 3 and r["steps_per_epoch"] == 3  # 40 patches in batches of 16
    ratios = [x["premade_images_per_s"] / x["loop_images_per_s"] - 1 for x in r["rounds"]]
    assert r["overhead"] == float(np.median(ratios))
    assert r["overhead_min"] <= r["overhead"] <= r["overhead_max"]
    assert all(x["loop_images_per_s"] > 0 and x["premade_images_per_s"] > 0 for x in r["rounds"])


@pytest.mark.parametrize("workers", [0, 1])
def test_loaders_deliver_the_same_normalised_batches(tiny_raw, workers):
    """The benchmark's ratio compares two ways of delivering the same thing: the same patches,
    normalised alike, in batches of the same size (the naive loader shuffles them)."""
    from pcam import h5io

    x_path = h5io.split_files(tiny_raw, "train")[0]
    mean, std = torch.tensor([0.6, 0.5, 0.7]), torch.tensor([0.2, 0.25, 0.15])
    ours = list(bench.batches_ours(x_path, 14, 4, mean, std))  # 14 of the file's 16 patches
    naive = list(bench.batches_naive(x_path, 14, 4, workers, mean, std))
    assert (
        [b.shape for b in ours]
        == [b.shape for b in naive]
        == [(4, 3, 96, 96)] * 3 + [(2, 3, 96, 96)]
    )
    a, b = torch.cat(ours).flatten(1), torch.cat(naive).flatten(1)
    assert a.dtype == b.dtype == torch.float32
    # the naive loader's patch i is ours[match[i]]: each of ours exactly once
    gap = (b[:, None] - a[None]).abs().amax(dim=2)
    match = gap.argmin(dim=1)
    assert sorted(match.tolist()) == list(range(14)), match
    assert gap.min(dim=1).values.max() < 1e-5  # same values; fused arithmetic rounds apart
    assert match.tolist() != list(range(14))  # shuffled, as the seeds' sampler did
    # ...and they are the file's patches, normalised: the first 14 rows, in order, in ours
    from pcam.data import read_x

    x = torch.from_numpy(read_x(x_path)).float() / 255
    expected = ((x[:14] - mean) / std).permute(0, 3, 1, 2).flatten(1)
    torch.testing.assert_close(a, expected, rtol=1e-5, atol=1e-5)


def test_timed_train_params_ignore_what_does_not_change_the_work():
    p = tiny_train()
    other = dataclasses.replace(
        p,
        seed=7,
        lr=0.5,
        epochs=9,
        scheduler="cosine",
        momentum=0.5,
        weight_decay=0.1,
        grad_clip_norm=1.0,
        early_stopping_patience=3,
        plateau_patience=4,
        plateau_factor=0.5,
        sampler="weighted",
        use_exclusions=not p.use_exclusions,
        device="auto",
        devices=2,
        precision="bf16",
        compile=True,
        threads=7,
    )
    assert bench.timed_train_params(p, 2) == bench.timed_train_params(other, 2)
    assert bench.timed_train_params(p, 2).threads == 2
    assert bench.timed_train_params(dataclasses.replace(p, width=8), 2).width == 8
    # A new train param must be classified: timed (declared in dvc.yaml) or fixed here.
    timed = {k.split(".")[0] for k in bench.TIMED_TRAIN_PARAMS}
    unclassified = {f.name for f in dataclasses.fields(p)} - timed - set(bench.FIXED_TRAIN_PARAMS)
    assert unclassified <= {"threads"}  # benchmark.threads


def test_cpu_pins_arms_differ_only_in_the_pins(monkeypatch):
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")  # as this process's own pins set it
    pinned, unpinned = bench._arm_env(True), bench._arm_env(False)
    assert (pinned["PCAM_CPU_PINS"], unpinned["PCAM_CPU_PINS"]) == ("1", "0")
    assert pinned["ATEN_CPU_CAPABILITY"] == "avx2" and "ATEN_CPU_CAPABILITY" not in unpinned
    assert {k: v for k, v in pinned.items() if k not in ("PCAM_CPU_PINS",) + bench.PINNED_VARS} == {
        k: v for k, v in unpinned.items() if k != "PCAM_CPU_PINS"
    }


def test_cpu_pins_are_compared_in_interleaved_rounds_of_two_processes():
    r = bench.compare_cpu_pins(tiny_train(), steps=2, warmup=1, rounds=3)
    assert len(r["rounds"]) == 3 and r["steps_per_round"] == 2 and r["batch_size"] == 16
    costs = [x["unpinned_images_per_s"] / x["pinned_images_per_s"] - 1 for x in r["rounds"]]
    assert r["cost"] == float(np.median(costs))
    assert r["cost_min"] <= r["cost"] <= r["cost_max"]
    assert all(x["pinned_images_per_s"] > 0 and x["unpinned_images_per_s"] > 0 for x in r["rounds"])
