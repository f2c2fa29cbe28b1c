"""An offline bundle for a machine without network: the model, its threshold, the inference code
and every wheel it needs, in one archive (README: Deployment).

    make bundle                 # make export (ONNX + parity check), then this
    python -m pcam.bundle       # dist/pcam-bundle-cp311-manylinux_2_28_x86_64.tar.gz

wheels/ holds a pcam wheel whose dependencies are the onnx backend's (numpy, onnxruntime, pillow,
h5py) and those wheels for the target (default CPython 3.11, manylinux glibc >= 2.28, x86_64).
torch is left out: its CPU wheel alone is ~190 MB, and onnxruntime gives the same probabilities
(onnx_parity.json). Wheels come from the package index once, through `pip download`, and are
kept in --wheel-cache (one folder per platform and set of pins); later builds need no network.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from pcam import __version__
from pcam.errors import PcamError, exit_on_user_error
from pcam.fileio import atomic_path, md5_file, write_json, write_text
from pcam.predict import Parser, load_onnx, load_threshold
from pcam.readme import read

# What `python -m pcam.predict --backend onnx` imports beyond the standard library.
RUNTIME_PACKAGES = ("numpy", "onnxruntime", "pillow", "h5py")
PLATFORM = "manylinux_2_28_x86_64"
PYTHON_VERSION = "3.11"
MODEL_FILES = ("model.onnx", "model.pt", "threshold.json", "onnx_parity.json")


def pinned_requirements(constraints: Path) -> list[str]:
    """The runtime packages at their versions in constraints.txt (the versions tested here)."""
    if not constraints.is_file():
        raise PcamError(f"{constraints}: not found (the exact versions; see --constraints)")
    lines = [line.partition("==") for line in constraints.read_text().splitlines()]
    pins = {
        re.sub(r"[-_.]+", "-", n.strip().lower()): v.strip()
        for n, eq, v in lines
        if eq and not n.startswith("#")
    }
    if missing := [p for p in RUNTIME_PACKAGES if p not in pins]:
        raise PcamError(f"{constraints}: no exact pin for {', '.join(missing)}")
    return [f"{p}=={pins[p]}" for p in RUNTIME_PACKAGES]


def pip(*args: str, **kwargs) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pip", *args, "--disable-pip-version-check", "-q"]
    return subprocess.run(cmd, capture_output=True, text=True, **kwargs)


def wheel_folder(
    requirements: list[str], constraints: Path, cache: Path, platform: str, python_version: str
) -> Path:
    """The cache folder of one (target, pins): it holds exactly one resolved set of wheels."""
    key = "\n".join([platform, python_version, *requirements, constraints.read_text()])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache / f"{platform}-cp{python_version.replace('.', '')}-{digest}"


def download_wheels(
    requirements: list[str], constraints: Path, cache: Path, platform: str, python_version: str
) -> list[Path]:
    """The wheels of `requirements` and their dependencies for the target: from the cache
    without network when it has them, else from the index (into the cache)."""
    folder = wheel_folder(requirements, constraints, cache, platform, python_version)
    abi = f"cp{python_version.replace('.', '')}"
    target = ["--only-binary=:all:", "--platform", platform, "--python-version", python_version]
    args = ["download", *target, "--implementation", "cp", "--abi", abi, "-c", str(constraints)]
    cached = ["--no-index", "--find-links", str(folder), "-d", str(folder)]
    if not folder.is_dir() or pip(*args, *cached, *requirements).returncode != 0:
        # Into a fresh folder, renamed into place when complete: a failed download leaves no
        # half-filled cache that a later build would trust.
        cache.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=cache))
        done = pip(*args, "-d", str(partial), *requirements)
        if done.returncode != 0:
            shutil.rmtree(partial, ignore_errors=True)
            last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise PcamError(f"pip download for {platform} cp{python_version} failed: {last}")
        shutil.rmtree(folder, ignore_errors=True)
        partial.chmod(0o755)  # mkdtemp makes it private
        partial.rename(folder)
    return sorted(folder.glob("*.whl"))


def build_pcam_wheel(src: Path, requirements: list[str], out_dir: Path) -> Path:
    """A wheel of the pcam package whose dependencies are the runtime ones only: the project's
    own metadata asks for torch, dvc and the rest of the pipeline."""
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp)
        shutil.copytree(src, project / "pcam", ignore=shutil.ignore_patterns("__pycache__"))
        (project / "pyproject.toml").write_text(f"""\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "pcam"
version = "{__version__}"
description = "pcam inference (python -m pcam.predict --backend onnx)"
requires-python = ">=3.11"
dependencies = [{", ".join(json.dumps(r) for r in requirements)}]
""")
        wheel_args = ["--no-deps", "--no-build-isolation", "--no-index", "-w", str(out_dir)]
        # Zip entry times from this date, not the files' mtimes: the same code, the same wheel.
        env = {**os.environ, "SOURCE_DATE_EPOCH": "315532800"}
        done = pip("wheel", *wheel_args, str(project), env=env)
        if done.returncode != 0:
            raise PcamError(f"building the pcam wheel failed: {done.stderr.strip()[-300:]}")
    (wheel,) = out_dir.glob("pcam-*.whl")
    return wheel


def readme(name: str, platform: str, python_version: str, pins: list[str], parity: dict) -> str:
    p = parity["parity"]
    return f"""# {name}

The pcam tumour-patch classifier for a machine without network: the model, its decision
threshold, the inference code and the wheels it needs for CPython {python_version} on
{platform} (Linux x86_64, glibc >= 2.28). Backend: onnxruntime (no torch).

## Install (no network needed)

```bash
tar xzf {name}.tar.gz && cd {name}
python{python_version} -m venv .venv && . .venv/bin/activate
pip install --no-index --find-links wheels pcam
```

## Use

```bash
python -m pcam.predict --model model.onnx patches.h5 images/ one.png --out predictions.csv
```

Inputs: PCAM .h5 files (dataset "x", (N,96,96,3) uint8), 96x96 8-bit RGB PNG/JPEG images, or
directories of them. Output: CSV `source,index,probability,label,true_label`; `label` is 1 where
probability >= the threshold in threshold.json (chosen on the validation split by the pipeline's
`evaluate` stage). `python -m pcam.predict --help` lists the options (--center-crop,
--convert-rgb, --keep-going).

## Contents

- `model.onnx`: uint8 NHWC patches in, logit out; the normalisation is inside the graph.
- `model.pt`: the PyTorch checkpoint it was exported from: the record, and what
  `--backend torch` reads in a full pcam install (torch and the pipeline's dependencies are not
  in this bundle).
- `threshold.json`: threshold, the rule that chose it, md5 of model.pt.
- `normalisation.json`: per-channel mean/std on the 0..1 scale (train split), for reference.
- `onnx_parity.json`: onnxruntime against PyTorch on the test split ({p["patches"]} patches):
  max |Δ probability| {p["max_abs_diff_probability"]:.2e}, {p["labels_differ"]} labels differ at the threshold.
- `requirements.txt`: the exact version of every wheel in wheels/; pcam needs
  {", ".join(pins)}.
"""


def check_models(model_dir: Path) -> dict:
    """The files to ship, and a refusal where they do not belong together."""
    for name in MODEL_FILES:
        if not (model_dir / name).is_file():
            hint = "run `make export`" if "onnx" in name else "run `dvc repro evaluate`"
            raise PcamError(f"{model_dir / name}: not found ({hint})")
    onnx_model = load_onnx(model_dir / "model.onnx")
    pt_md5 = md5_file(model_dir / "model.pt")
    if onnx_model.source_md5 != pt_md5:
        raise PcamError(
            f"{model_dir / 'model.onnx'}: exported from another model.pt (md5 differs): run "
            "`make export`"
        )
    load_threshold(model_dir / "threshold.json", pt_md5, model_dir / "model.pt")
    parity = read(model_dir, "onnx_parity.json")  # a file that is not JSON: one line, not a trace
    if parity.get("onnx_md5") != md5_file(model_dir / "model.onnx"):
        raise PcamError(f"{model_dir / 'onnx_parity.json'}: reports another model.onnx")
    return {"normalisation": onnx_model.normalisation, "parity": parity}


def build(
    model_dir: Path,
    out: Path,
    src: Path,
    constraints: Path,
    wheel_cache: Path,
    platform: str = PLATFORM,
    python_version: str = PYTHON_VERSION,
) -> Path:
    """Write the bundle archive to `out` (atomically) and return it."""
    checked = check_models(model_dir)
    requirements = pinned_requirements(constraints)
    wheels = download_wheels(requirements, constraints, wheel_cache, platform, python_version)
    name = out.name.removesuffix(".tar.gz")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / name
        (root / "wheels").mkdir(parents=True)
        for f in MODEL_FILES:
            shutil.copy(model_dir / f, root / f)
        write_json(root / "normalisation.json", checked["normalisation"])
        for w in wheels:
            shutil.copy(w, root / "wheels" / w.name)
        wheels.append(build_pcam_wheel(src, requirements, root / "wheels"))
        pins = sorted("==".join(w.name.split("-")[:2]) for w in wheels)
        write_text(root / "requirements.txt", "\n".join(pins) + "\n")
        text = readme(name, platform, python_version, requirements, checked["parity"])
        write_text(root / "README.md", text)

        def normalise(info: tarfile.TarInfo) -> tarfile.TarInfo:
            """Bytes that depend on the contents only: no times, owners or umask."""
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            info.mode = 0o755 if info.isdir() else 0o644
            return info

        with (
            atomic_path(out) as tmp_out,
            open(tmp_out, "wb") as fh,
            gzip.GzipFile(filename="", mode="wb", fileobj=fh, mtime=0) as gz,
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
        ):
            for path in [root, *sorted(root.rglob("*"))]:  # sorted names: the same order
                arcname = str(path.relative_to(root.parent))
                tar.add(path, arcname=arcname, recursive=False, filter=normalise)
    return out


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    ap = Parser(prog="python -m pcam.bundle", description=__doc__.split("\n")[0])
    ap.add_argument("--models", type=Path, default=Path("models"), help="model.onnx, model.pt, ...")
    ap.add_argument("--out-dir", type=Path, default=Path("dist"))
    ap.add_argument("--platform", default=PLATFORM, help="a pip --platform tag")
    ap.add_argument("--python-version", default=PYTHON_VERSION)
    ap.add_argument("--constraints", type=Path, default=Path("constraints.txt"))
    ap.add_argument("--wheel-cache", type=Path, default=Path(".cache/bundle-wheels"))
    args = ap.parse_args(argv)
    tag = f"cp{args.python_version.replace('.', '')}-{args.platform}"
    out = args.out_dir / f"pcam-bundle-{tag}.tar.gz"
    src = Path(__file__).resolve().parent
    build(
        args.models,
        out,
        src,
        args.constraints,
        args.wheel_cache,
        args.platform,
        args.python_version,
    )
    print(f"bundle: {out} ({out.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
