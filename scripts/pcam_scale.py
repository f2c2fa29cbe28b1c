"""Time one full training epoch and one full inference pass at PCAM scale (262,144 patches).

    python scripts/pcam_scale.py [--patches 262144] [--workdir /tmp/pcam_scale] [--device auto]
        [--models cnn,resnet] [--subset-on-cpu 4096]

The split is a real camelyonpatch_level_2_split_train_x.h5 (--train-x, with its _y file) or
--unique synthetic patches tiled to --patches rows (uncompressed like the official files, 7.2 GB
at full size; repeated content changes nothing for throughput). Prints a markdown table; the
resnet on CPU, too slow for a full epoch, is timed on --subset-on-cpu patches and says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from pcam import h5io
from pcam.benchmark import time_train_loop
from pcam.data import Split, read_x
from pcam.inference import predict_logits
from pcam.models import build_model, init_weights, model_config
from pcam.params import load_params
from pcam.provenance import machine_info
from pcam.synthetic import generate_split, slide_ids_for
from pcam.training import resolve_device


def build_split(workdir: Path, patches: int, unique: int, seed: int) -> tuple[Path, Path]:
    xp, yp = workdir / h5io.x_name("train"), workdir / h5io.y_name("train")
    if xp.is_file() and h5py.File(xp, "r")["x"].shape[0] == patches:
        return xp, yp
    base = generate_split(unique, slide_ids_for("train", 16), seed, 0.2)
    workdir.mkdir(parents=True, exist_ok=True)
    with h5py.File(xp, "w") as f:
        ds = f.create_dataset(
            "x",
            shape=(patches, 96, 96, 3),
            dtype=np.uint8,
            chunks=(h5io.WRITE_CHUNK_ROWS, 96, 96, 3),
        )
        for start in range(0, patches, unique):
            stop = min(patches, start + unique)
            ds[start:stop] = base.x[: stop - start]
    h5io.write_h5_dataset(yp, "y", np.resize(base.y, patches).astype(np.uint8).reshape(-1, 1, 1, 1))
    return xp, yp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--patches", type=int, default=262_144)
    ap.add_argument("--unique", type=int, default=8192)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "pcam_scale")
    ap.add_argument("--train-x", type=Path, default=None)
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--models", default="cnn,resnet")
    ap.add_argument("--resnet-width", type=int, default=64)
    ap.add_argument("--subset-on-cpu", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    params = load_params()
    device = resolve_device(args.device)
    torch.set_num_threads(args.threads or params.train.threads)
    if args.train_x:
        xp, yp = args.train_x, args.train_x.with_name(args.train_x.name.replace("_x.h5", "_y.h5"))
    else:
        t0 = time.perf_counter()
        xp, yp = build_split(args.workdir, args.patches, args.unique, params.data.synthetic.seed)
        print(f"split ready at {xp} ({time.perf_counter() - t0:.0f} s)")
    t0 = time.perf_counter()
    x = torch.from_numpy(read_x(xp))
    y = torch.from_numpy(h5io.read_labels(yp))
    read_s = time.perf_counter() - t0
    n = len(y)
    rows: list[tuple] = []

    def record(*row) -> None:  # printed at once too: a killed run keeps what it measured
        rows.append(row)
        print("measured:", row, flush=True)

    record("(data)", "cpu", "HDF5 -> uint8 in memory", n, read_s)
    mean = x[:4096].float().div(255).mean(dim=(0, 1, 2))
    std = x[:4096].float().div(255).std(dim=(0, 1, 2))
    valid = Split("valid", x[:1024], y[:1024], np.arange(1024))

    for name in args.models.split(","):
        width = args.resnet_width if name == "resnet" else params.train.width
        p = dataclasses.replace(params.train, model=name, epochs=1, device=device.type, width=width)
        m = n if device.type == "cuda" or name != "resnet" else min(n, args.subset_on_cpu)
        what = "train epoch" if m == n else f"train, subset of {m}"
        split = Split("train", x[:m], y[:m], np.arange(m))
        t0 = time.perf_counter()
        loop_ips = time_train_loop(p, split, valid, mean, std, epochs=1)
        total = time.perf_counter() - t0
        record(name, device.type, f"{what} (loop only)", m, m / loop_ips)
        record(name, device.type, f"{what} (+ model set-up, validation)", m, total)

        model = build_model(model_config(p))
        init_weights(model)
        model.to(device)
        what = "inference pass" if m == n else f"inference, subset of {m}"
        for part in (x[:512], x[:m]):  # warm-up, then timed
            t0 = time.perf_counter()
            predict_logits(model, part, mean, std, 512, device)  # returns numpy: synchronised
        record(name, device.type, what, m, time.perf_counter() - t0)

    info = machine_info(device)
    print(
        f"\n{datetime.date.today()} | {info.get('gpu', info['cpu'])} | "
        f"torch {torch.__version__} | {torch.get_num_threads()} threads\n"
    )
    print("| model | device | timed | patches | seconds | images/s |")
    print("|---|---|---|---:|---:|---:|")
    for model_name, dev, what, count, seconds in rows:
        print(
            f"| {model_name} | {dev} | {what} | {count:,} | {seconds:.1f} | {count / seconds:,.0f} |"
        )


if __name__ == "__main__":
    main()
