"""CPU numerics pinned to one code path, so the same code + params + data give the same bytes on
any x86-64 machine with AVX2 and FMA (Intel or AMD, whatever its vector width or cache sizes).

Left alone, numpy, OpenBLAS, oneMKL, oneDNN and ATen each pick kernels per CPU at run time: by
ISA (AVX2 vs AVX-512 changes how sums are split across vector lanes), by vendor (oneMKL takes
other code paths on non-Intel CPUs) and, in oneDNN, by cache size (its blocking heuristics read
L1/L2 sizes, which changes the order of the reduction inside a convolution). Measured here: each
of ATEN_CPU_CAPABILITY, MKL_CBWR, ONEDNN_MAX_CPU_ISA and numpy's dispatch changes the trained
weights' bytes on one machine (tests/test_numerics.py shows the pinned path ignores them).

The pins, all read when a library loads, hence set by `pcam/__init__.py` before numpy or torch
is imported (stage scripts import pcam first):

- ATen (torch's own kernels): AVX2, the widest ISA every supported CPU has.
- oneMKL: MKL_CBWR=COMPATIBLE, conditional numerical reproducibility on the one branch Intel
  documents as identical on Intel and non-Intel CPUs (fixed cache sizes, deterministic
  reductions, static scheduling). Other branches fall back to AUTO on AMD.
- oneDNN and NNPACK: off for torch (`configure_torch`), so convolutions run ATen's im2col +
  oneMKL GEMM under CBWR. Neither has a switch for its cache-size heuristics; oneDNN's ISA is
  capped as well for any path that still reaches it.
- numpy: baseline SIMD only (its AVX2/AVX-512 loops differ from each other, and from libm);
  OpenBLAS (numpy's BLAS): the Haswell kernel on one thread.
- oneMKL VML: torch 2.13 bundles oneMKL 2024.2, whose VML resolves each function's kernel on
  first call with a race (pytorch issue 188792): concurrent first calls from two intra-op
  threads can run a low-accuracy kernel for one chunk. `configure_torch` calls each VML-backed
  op once on one element, on one thread, before training or inference runs anything in parallel.

Cost: the pinned path trains more slowly than the native one (the benchmark stage measures it:
`cpu_pins` in its output). `PCAM_CPU_PINS=0` turns every pin off, for speed comparisons only:
results then depend on the machine, and provenance says so.
"""

from __future__ import annotations

import os
import sys

SWITCH_ENV = "PCAM_CPU_PINS"

# Values chosen for x86-64 with AVX2+FMA (every Intel CPU since Haswell, every AMD since Zen).
ENV_PINS = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "COMPATIBLE",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    # numpy >= 2.3 names its dispatch targets X86_V3/X86_V4/AVX512_*; unknown names are ignored.
    "NPY_DISABLE_CPU_FEATURES": "X86_V3 X86_V4 AVX512_ICL AVX512_SPR AVX512_SKX AVX512_CLX",
    "OPENBLAS_CORETYPE": "Haswell",
    "OPENBLAS_NUM_THREADS": "1",
}

# torch ops that reach oneMKL VML on CPU (aten/src/ATen/cpu/vml.h), warmed up one by one.
_VML_OPS = (
    "abs", "acos", "asin", "atan", "cos", "erf", "erfc", "exp", "expm1", "log", "log10",
    "log1p", "log2", "sin", "sqrt", "tan", "tanh", "trunc", "rsqrt", "reciprocal", "sigmoid",
)  # fmt: skip

# Set by pin_environment(): whether numpy/torch were already loaded (then the pins came late).
_state: dict[str, object] = {"enabled": None, "late": []}


def enabled() -> bool:
    return os.environ.get(SWITCH_ENV, "1") != "0"


def pin_environment() -> None:
    """Set the pins in os.environ (overriding stray values); call before numpy/torch load."""
    _state["enabled"] = enabled()
    _state["late"] = [m for m in ("numpy", "torch") if m in sys.modules]
    if _state["enabled"]:
        os.environ.update(ENV_PINS)


def configure_torch() -> None:
    """The pins torch reads after import: oneDNN off on CPU, VML dispatch resolved up front."""
    if not enabled() or _state.get("torch_configured"):
        return
    import torch

    torch.backends.mkldnn.enabled = False
    # With oneDNN off, ATen runs 3x3 convolutions through NNPACK where it can, whose tiling also
    # follows the cache sizes; off too, so they run as im2col + oneMKL GEMM under CNR.
    torch.backends.nnpack.set_flags(False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for dtype in (torch.float32, torch.float64):
            one = torch.full((1,), 0.5, dtype=dtype)
            for op in _VML_OPS:
                getattr(torch, op)(one)
    finally:
        torch.set_num_threads(threads)
    _state["torch_configured"] = True


def record() -> dict[str, object]:
    """What decides the CPU kernels, for provenance: equal on every machine running the pinned
    path (so it may go into hashed outputs); the CPU model itself goes into benchmark output."""
    import torch

    pinned = bool(_state["enabled"]) and not _state["late"]
    return {
        "pinned": pinned,
        "aten_capability": torch.backends.cpu.get_cpu_capability(),
        "mkldnn": bool(torch.backends.mkldnn.enabled),
        "nnpack": bool(torch._C._get_nnpack_enabled()),
        "env": {k: os.environ.get(k) for k in ENV_PINS},
        **({"loaded_before_pins": list(_state["late"])} if _state["late"] else {}),
    }


def check_cpu() -> str | None:
    """Why this CPU cannot run the pinned path, or None when it can."""
    if not enabled():
        return f"{SWITCH_ENV}=0: CPU numerics not pinned; results depend on this machine"
    if _state["late"]:
        return f"{'/'.join(_state['late'])} imported before pcam: CPU numerics not pinned"
    import torch

    if torch.backends.cpu.get_cpu_capability() != "AVX2":
        return "this CPU lacks AVX2: results will differ from machines with AVX2"
    return None
