"""Benchmark helpers: timing excludes warm-up, summaries are medians with spread."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from pcam import benchmark as bench
from pcam.models import build_model
from pcam.params import load_params
from tests.conftest import REPO


def tiny_train(**changes):
    p = load_params(REPO / "params.yaml").train
    base = dict(batch_size=16, width=4, threads=1, device="cpu", epochs=4)
    return dataclasses.replace(p, **(base | changes))


def test_timed_excludes_warmup_and_counts_repeats():
    calls = []
    seconds = bench.timed(lambda: calls.append(1), warmup=3, repeats=5, device=torch.device("cpu"))
    assert len(calls) == 8 and len(seconds) == 5 and (seconds >= 0).all()


def test_summary_is_median_based():
    s = bench.summary(np.array([0.1, 0.1, 0.1, 10.0]), items_per_call=10)
    assert s["images_per_s"] == 100.0  # the outlier does not move the median
    assert s["latency_ms_p50"] == 100.0 and s["latency_ms_p95"] > 1000.0


def test_inference_and_train_step_measure_something():
    model = build_model({"model": "cnn", "width": 4})
    r = bench.time_inference(model, 4, 1, 2, torch.device("cpu"), channels_last=False)
    assert r["images_per_s"] > 0 and r["repeats"] == 2
    for scheduler in ("onecycle", "cosine", "plateau", "none"):
        # onecycle raises if stepped past its total: the reference sizes it for warm-up + repeats
        t = bench.time_train_step(tiny_train(scheduler=scheduler), 3, 4, torch.device("cpu"))
        assert t["images_per_s"] > 0 and t["repeats"] == 4


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


def test_loaders_deliver_the_same_normalised_batches(tiny_raw):
    from pcam import h5io

    x_path = h5io.split_files(tiny_raw, "train")[0]
    mean, std = torch.full((3,), 0.5), torch.full((3,), 0.25)
    bench.loader_ours(x_path, 16, 4, mean, std)()
    ds = bench.PerIndexH5(x_path, 16, mean, std)
    from pcam.data import normalise, read_x

    ours = normalise(torch.from_numpy(read_x(x_path))[3:4], mean, std)[0]
    assert torch.allclose(ds[3], ours, atol=1e-5)  # same values; fused arithmetic rounds apart
    bench.loader_naive(x_path, 16, 4, 0, mean, std)()


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
