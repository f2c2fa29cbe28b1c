"""What produced an artefact: params, code version, seed, library versions, device and threads."""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path

import torch

_LIBRARIES = ("torch", "numpy", "h5py", "scikit-learn", "dvc", "dvclive")


def git_commit(repo: str | Path = ".") -> str | None:
    """HEAD commit (with a '-dirty' suffix for uncommitted changes); None outside a git checkout.

    Only recorded, never hashed into outputs that DVC compares: under `dvc exp run` the tree is
    dirty by design and the commit is not part of what makes a result.
    """
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return sha + ("-dirty" if dirty else "")


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def device_info(device: torch.device | str = "cpu") -> dict[str, object]:
    device = torch.device(device)
    info: dict[str, object] = {
        "device": str(device),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def provenance(params: dict, seed: int | None, device: torch.device | str = "cpu") -> dict:
    """The record stored in checkpoints and metrics files: what produced them."""
    return {
        "params": params,
        "seed": seed,
        "git_commit": git_commit(),
        "versions": library_versions(),
        "device": device_info(device),
    }
