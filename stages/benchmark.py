"""benchmark stage (`dvc repro benchmark`): inference, training-step, training-loop and
data-delivery throughput, and the cost of the CPU numerics pins; `benchmark.profile: full` runs the
long version. It times code and architecture on fresh weights and reads only the train params
that change the work (pcam.benchmark.TIMED_TRAIN_PARAMS), so an lr or seed experiment does not
re-run it. Timings are the pipeline's only non-deterministic outputs; every configuration is
measured in this one run, so ratios hold even on a noisy shared machine.
"""

import dataclasses
import itertools
from functools import partial
from pathlib import Path

import pcam  # noqa: F401  (first: pins the CPU numerics before numpy and torch load)

# isort: split
import numpy as np
import torch

from pcam import benchmark as bench
from pcam import h5io
from pcam.allocator import keep_freed_memory
from pcam.data import Split, load_stats, read_x
from pcam.errors import exit_on_user_error
from pcam.fileio import write_csv, write_json
from pcam.models import build_model, init_weights, model_config
from pcam.params import declared_params, load_params, to_dict
from pcam.plots import curve_png
from pcam.provenance import library_versions, machine_info

RAW_DIR = Path("data/raw")
STATS = Path("data/stats.json")
METRICS = Path("metrics/benchmark.json")
DETAILS = Path("metrics/details/benchmark.json")
PLOTS = Path("plots/benchmark")


@exit_on_user_error
def main() -> None:
    params = load_params()
    p = params.benchmark
    tp = bench.timed_train_params(params.train, p.threads)
    full = p.profile == "full"
    repeats = p.repeats * (3 if full else 1)
    torch.set_num_threads(p.threads)
    keep_freed_memory()  # as training does, so both sides of each ratio allocate alike
    torch.manual_seed(tp.seed)
    model = build_model(model_config(tp))  # fresh weights time like trained ones
    init_weights(model)
    mean, std = load_stats(STATS)
    x_path, y_path, _ = h5io.split_files(RAW_DIR, "train")
    f, ds = h5io.open_dataset(x_path, "x")
    with f:
        n_train = ds.shape[0]
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])

    rows = []  # (configuration, batch size, images/s): the throughput plot
    inference, training = {}, {}
    for device in devices:
        precisions = ["fp32"] + (["bf16"] if full and bench.bf16_supported(device) else [])
        configs = itertools.product(precisions, ("cl", "nchw"), (False, True) if full else (False,))
        for precision, layout, compiled in configs:
            name = f"{device.type}_{precision}_{layout}{'_compiled' if compiled else ''}"
            for bs in p.batch_sizes:
                r = bench.time_inference(
                    model, bs, p.warmup, repeats, device, precision, layout == "cl", compiled
                )
                inference[f"{name}_bs{bs}"] = r
                rows.append((f"infer_{name}", bs, r["images_per_s"]))
                print(
                    f"benchmark: infer {name:24s} bs {bs:4d}: {r['images_per_s']:9.0f} "
                    f"img/s, p50 {r['latency_ms_p50']:.2f} ms"
                )
        for bs in p.batch_sizes if full else p.train_batch_sizes:
            r = bench.time_train_step(
                dataclasses.replace(tp, batch_size=bs), p.warmup, repeats, device
            )
            training[f"{device.type}_fp32_bs{bs}"] = r
            rows.append((f"train_step_{device.type}_fp32", bs, r["images_per_s"]))
            print(f"benchmark: train step {device.type} bs {bs:4d}: {r['images_per_s']:9.0f} img/s")

    # Data delivery, HDF5 -> normalised batches, on the same file in the same run.
    n = min(p.loader_patches, n_train)
    ours = partial(bench.batches_ours, x_path, n, tp.batch_size, mean, std)
    delivery = {"ours": bench.time_delivery(ours, n, 1, repeats)}
    for workers in (0, p.loader_workers):
        naive = partial(bench.batches_naive, x_path, n, tp.batch_size, workers, mean, std)
        delivery[f"naive_workers{workers}"] = bench.time_delivery(naive, n, 0, max(1, repeats // 3))
    best_naive = max(v["images_per_s"] for k, v in delivery.items() if k.startswith("naive"))
    for k, v in delivery.items():
        print(f"benchmark: data delivery {k:16s}: {v['images_per_s']:9.0f} img/s")

    # The real training loop (CPU) vs the same steps on a pre-made batch.
    m = min(p.train_loop_patches, n_train)
    x, y = read_x(x_path, np.arange(m)), h5io.read_labels(y_path)[:m]
    loop_split = Split("train", torch.from_numpy(x), torch.from_numpy(y), np.arange(m))
    v = min(256, m)
    valid_small = Split("valid", loop_split.x[:v], loop_split.y[:v], loop_split.index[:v])
    loop = bench.compare_loop_to_premade(tp, loop_split, valid_small, mean, std, repeats)
    print(
        f"benchmark: train loop {loop['loop_images_per_s']:.0f} img/s vs pre-made batch "
        f"{loop['premade_images_per_s']:.0f} img/s: data path overhead {loop['overhead']:.1%} "
        f"(median of {repeats} interleaved rounds, {loop['overhead_min']:.1%} to "
        f"{loop['overhead_max']:.1%})"
    )

    # Training steps with and without the CPU numerics pins, each in its own process.
    pins = bench.compare_cpu_pins(tp, loop["steps_per_epoch"], p.warmup, repeats)
    print(
        f"benchmark: training {pins['pinned_images_per_s']:.0f} img/s with the CPU pins, "
        f"{pins['unpinned_images_per_s']:.0f} without: cost {pins['cost']:.1%} (median of "
        f"{repeats} interleaved rounds, {pins['cost_min']:.1%} to {pins['cost_max']:.1%})"
    )

    names = ("configuration", "batch_size", "images_per_s")
    columns = dict(zip(names, zip(*rows, strict=True), strict=True))
    write_csv(PLOTS / "throughput.csv", columns, float_format="{:.1f}")
    configs = sorted({r[0] for r in rows})
    curve_png(
        PLOTS / "scaling.png",
        {c: np.array([r[1:] for r in rows if r[0] == c]).T for c in configs},  # (sizes, rates)
        "batch size",
        "images/s",
        "throughput by batch size",
        log_x=True,
        unit_square=False,
    )
    best = max(inference.items(), key=lambda kv: kv[1]["images_per_s"])
    headline = {
        "train_loop_images_per_s": loop["loop_images_per_s"],
        "train_loop_overhead": loop["overhead"],
        "best_inference_images_per_s": best[1]["images_per_s"],
        "cpu_pins_cost": pins["cost"],
    }
    batch1 = inference["cpu_fp32_cl_bs1"]["latency_ms_p50"] if p.batch_sizes[0] == 1 else None
    write_json(METRICS, headline)
    write_json(
        DETAILS,
        headline
        | {
            "best_inference_configuration": best[0],
            "batch1_latency_ms_p50": batch1,
            "train_step_images_per_s": loop["premade_images_per_s"],
            "loader_speedup_vs_naive": delivery["ours"]["images_per_s"] / best_naive,
            "inference": inference,
            "train_step": training,
            "train_loop_vs_premade": loop,
            "cpu_pins": pins,
            "data_delivery": delivery,
            "machine": machine_info(devices[-1])
            | {"versions": library_versions(), "threads": p.threads},
            "params": declared_params("benchmark"),
            "train_params_timed": to_dict(tp),
        },
    )


if __name__ == "__main__":
    main()
