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
