"""validate-data at PCAM scale: throughput (patches/s) and peak memory (RSS).

    python scripts/validate_scale.py [--train 262144] [--valid 32768] [--test 32768]
        [--unique-train 8192] [--unique-eval 2048] [--compression none|gzip]
        [--repeats 2] [--workdir /tmp/validate_scale]

Builds PCAM-size splits (7.2 GB of train x uncompressed, as the official files) by tiling a few
thousand distinct synthetic patches per split, with the default defect rates. Every tile but the
first gets one marker pixel of its own, so the tiles are not duplicates of each other and the
findings scale like real data (duplicates, blanks, triggers x tiles; leakage only from the first
tile). Then times the real stage (in a scratch directory whose data/raw points at the built
files) and the library call alone (pcam.validation.validate: no galleries), each in a fresh
process, --repeats times, and prints a markdown table: load average, wall time, patches/s, CPU
time and the child's peak RSS. On a shared machine wall time follows the load; CPU time much less.
Targets: >= 10,000 patches/s on 2 cores, peak RSS <= 2 GiB whatever the split size. The built
files are kept in --workdir for re-runs (delete them by hand: ~9 GB).
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from pcam import h5io
from pcam.params import load_params
from pcam.synthetic import defect_count, generate_split, inject, slide_ids_for, take_donors

REPO = Path(__file__).resolve().parents[1]
# Marker grey levels per split, so a tile of one split never equals a tile of another.
MARKER_BASE = {"train": 0, "valid": 64, "test": 128}
# Appended to each measured child: its CPU time, ru_maxrss and VmHWM (KiB). VmHWM is the
# child's own peak; Linux carries the spawning process's high-water mark into ru_maxrss (this
# script's, when it has just generated the patches), so that one can overstate the child.
USAGE = """
import resource
u = resource.getrusage(resource.RUSAGE_SELF)
hwm = [int(s.split()[1]) for s in open('/proc/self/status') if s.startswith('VmHWM')]
print('usage', u.ru_utime + u.ru_stime, u.ru_maxrss, hwm[0])"""


def build(workdir: Path, sizes: dict, unique: dict, compression: str | None) -> Path:
    raw = workdir / ("raw_" + (compression or "none"))
    if all(
        h5io.split_files(raw, s)[2].is_file()
        and h5py.File(h5io.split_files(raw, s)[0], "r")["x"].shape[0] == sizes[s]
        for s in h5io.SPLITS
    ):
        return raw
    p = load_params(REPO / "params.yaml").data.synthetic
    donors: dict = {}
    for i, split in enumerate(h5io.SPLITS):
        base = generate_split(unique[split], slide_ids_for(split, 16), p.seed + i, 0.2)
        truth = inject(split, base, p.defects, p.seed, donors.get(split))
        if split == "train":
            counts = {
                s: defect_count(p.defects.cross_split_rate, unique[s]) for s in ("valid", "test")
            }
            donors = take_donors(base, truth, counts, p.seed)
        write_tiled(raw, split, base, sizes[split], compression)
        print(
            f"built {split}: {sizes[split]:,} patches from {unique[split]:,} distinct", flush=True
        )
    return raw


def write_tiled(raw: Path, split: str, base, n: int, compression: str | None) -> None:
    copies = -(-n // len(base.y))
    if copies > 63:
        raise SystemExit(f"{split}: {copies} tiles need more marker levels; raise --unique-*")
    raw.mkdir(parents=True, exist_ok=True)
    xp, yp, mp = h5io.split_files(raw, split)
    kw = {"compression": "gzip", "compression_opts": 1} if compression == "gzip" else {}
    with h5py.File(xp, "w") as f:
        ds = f.create_dataset(
            "x", (n, 96, 96, 3), np.uint8, chunks=(h5io.WRITE_CHUNK_ROWS, 96, 96, 3), **kw
        )
        for k in range(copies):
            tile = base.x.copy()
            if k:  # one grey pixel: no colour, so blank tiles stay blank by every rule
                tile[:, 0, 0, :] = MARKER_BASE[split] + k
            start = k * len(tile)
            ds[start : min(n, start + len(tile))] = tile[: n - start]
    with h5py.File(yp, "w") as f:
        f.create_dataset("y", data=np.resize(base.y, n).reshape(-1, 1, 1, 1), chunks=True, **kw)
    m = base.meta
    h5io.write_meta(mp, h5io.Meta(*(np.resize(getattr(m, c), n) for c in h5io.META_COLUMNS)))


def measure(what: str, body: str, cwd: Path) -> tuple:
    """Run `body` in a fresh Python process: (what, 1-minute load when it started, wall s, CPU s
    (user + system, all threads: less sensitive to other users of the CPU), peak RSS GiB,
    ru_maxrss GiB, its stdout)."""
    load, t0 = os.getloadavg()[0], time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", body + USAGE], cwd=cwd, capture_output=True, text=True
    )
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{what} failed:\n{proc.stderr}")
    out, _, usage = proc.stdout.rpartition("usage ")
    cpu, maxrss, hwm = (float(v) for v in usage.split())
    return what, load, seconds, cpu, hwm / 2**20, maxrss / 2**20, out  # KiB -> GiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name, default in (("train", 262_144), ("valid", 32_768), ("test", 32_768)):
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--unique-train", type=int, default=8192)
    ap.add_argument("--unique-eval", type=int, default=2048)
    ap.add_argument("--compression", choices=("none", "gzip"), default="none")
    ap.add_argument(
        "--repeats", type=int, default=2, help="runs of each; the first warms the page cache"
    )
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "validate_scale")
    args = ap.parse_args()
    sizes = {"train": args.train, "valid": args.valid, "test": args.test}
    unique = {"train": args.unique_train, "valid": args.unique_eval, "test": args.unique_eval}

    t0 = time.perf_counter()
    raw = build(args.workdir, sizes, unique, None if args.compression == "none" else "gzip")
    print(f"data ready in {time.perf_counter() - t0:.0f} s: {raw}", flush=True)
    bodies = {
        "pcam.validation.validate (read, hash, pixel checks)": "\n".join(
            (
                "from pcam.params import load_params",
                "from pcam.validation import validate",
                "validate('data/raw', load_params().validate)",
            )
        ),
        "stages/validate_data.py (+ reports, 7 galleries)": "import runpy\nrunpy.run_path("
        f"{str(REPO / 'stages/validate_data.py')!r}, run_name='__main__')",
    }
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        shutil.copy(REPO / "params.yaml", scratch / "params.yaml")
        (scratch / "data").mkdir()
        (scratch / "data" / "raw").symlink_to(raw)
        for _ in range(args.repeats):
            runs += [measure(what, body, scratch) for what, body in bodies.items()]

    p = load_params(REPO / "params.yaml").validate
    x_bytes = sum(h5io.split_files(raw, s)[0].stat().st_size for s in h5io.SPLITS)
    total = sum(sizes.values())
    print(runs[-1][-1])
    print(
        f"\n{datetime.date.today()} | {os.cpu_count()} CPUs, validate.threads={p.threads}, "
        f"chunk_rows={p.chunk_rows} | x files {x_bytes / 1e9:.1f} GB on disk "
        f"({args.compression}) | each run a fresh process, imports included\n"
    )
    print(
        "| what | patches | load | seconds | patches/s | CPU s | patches per CPU s | peak RSS GiB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for what, load, seconds, cpu, peak, maxrss, _ in runs:
        print(
            f"| {what} | {total:,} | {load:.1f} | {seconds:.1f} | {total / seconds:,.0f} | "
            f"{cpu:.1f} | {total / cpu:,.0f} | {peak:.2f} (ru_maxrss {maxrss:.2f}) |"
        )


if __name__ == "__main__":
    main()
