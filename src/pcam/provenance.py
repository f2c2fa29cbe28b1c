"""What produced an artefact: params, seed, the hashes of the code and data it was made from,
library versions, device and the CPU numerics pins.

Everything here goes into files DVC hashes (model.pt, metrics), so it must be equal for equal
inputs on any machine: no git commit (it changes with every README edit and says "dirty" under
`dvc exp run`), clock time, host name or absolute path. DVC maps commits to outputs itself, through
dvc.lock. The CPU model explains timings, not results (the numerics are pinned): it goes into
the benchmark's output (`machine_info`), which holds timings anyway.
"""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from pathlib import Path

import torch

from pcam import numerics
from pcam.fileio import md5_file
from pcam.params import declared_params

_LIBRARIES = ("torch", "numpy", "scipy", "h5py", "scikit-learn", "dvc", "dvclive")
_PACKAGE_DIR = Path(__file__).resolve().parent


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def code_hashes() -> dict[str, str]:
    """md5 of the running script (a stage) and of every pcam module it has loaded, by path
    relative to the package's parent (`pcam/training.py`, `stages/train.py`)."""
    files = {
        Path(m.__file__).resolve()
        for name, m in list(sys.modules.items())
        if (name == "pcam" or name.startswith("pcam.")) and getattr(m, "__file__", None)
    }
    main = getattr(sys.modules.get("__main__"), "__file__", None)
    if main and Path(main).name != "__main__.py" and Path(main).parent.name == "stages":
        files.add(Path(main).resolve())
    hashes = {}
    for path in files:
        rel = path.relative_to(_PACKAGE_DIR.parent) if path.is_relative_to(_PACKAGE_DIR) else None
        hashes[str(rel) if rel else f"stages/{path.name}"] = md5_file(path)
    # Ordered by the relative name, not the absolute path: the order is part of the bytes.
    return dict(sorted(hashes.items()))


def data_hashes(paths) -> dict[str, str]:
    """md5 of each input file, by the path the stage gave (relative to the repo)."""
    out = {}
    for path in paths:
        path = Path(path)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            out[f.as_posix()] = md5_file(f)
    return out


def device_info(device: torch.device | str = "cpu") -> dict[str, object]:
    """The device and what decides its kernels; equal on every machine running the pinned path."""
    device = torch.device(device)
    info: dict[str, object] = {
        "device": device.type,
        "machine": platform.machine(),
        # No thread count: a stage that computes with threads declares it as a param (recorded
        # above); the launcher's default (cores, OMP_NUM_THREADS) would tie the bytes to a machine.
        "cpu_numerics": numerics.record(),
    }
    if device.type == "cuda":
        # GPU kernels are not pinned: results are identical on the same GPU model only.
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def machine_info(device: torch.device | str = "cpu") -> dict[str, object]:
    """The machine itself, for outputs that hold timings: CPU model, ISA flags, cores, GPU."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        cpuinfo = []
    fields = dict(line.split(":", 1) for line in reversed(cpuinfo) if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    wanted = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile")
    info = device_info(device) | {
        "torch_threads": torch.get_num_threads(),
        "cpu": fields.get("model name") or platform.processor() or "unknown",
        "cpu_isa": [f for f in wanted if f in flags],
        "cores": os.cpu_count(),
    }
    if torch.device(device).type == "cuda":
        info["gpu_memory_gib"] = round(
            torch.cuda.get_device_properties(device).total_memory / 2**30, 1
        )
    return info


def provenance(stage: str, seed: int | None, device: torch.device | str = "cpu", inputs=()) -> dict:
    """The record stored in checkpoints and metrics files: what produced them. Its params are
    those dvc.yaml declares for `stage`, no more: the outputs change only when DVC re-runs it."""
    return {
        "params": declared_params(stage),
        "seed": seed,
        "code": code_hashes(),
        "data": data_hashes(inputs),
        "versions": library_versions(),
        "device": device_info(device),
    }
