"""CPU numerics pins (pcam/numerics.py): every stage loads them first, and they decide the bytes.

What this machine can show: each knob the pins set changes the trained weights when left to the
machine (PCAM_CPU_PINS=0), and with the pins on, whatever the environment asked for (another
ISA, another MKL branch, oneDNN) gives the same bytes. What it cannot show, another CPU model
or vendor, is checked by `make repro-check` against the committed dvc.lock on CI's machine.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

from pcam import numerics
from tests.conftest import REPO

# Trains the cnn for three steps and runs numpy's float32 exp/sin and a BLAS matmul; prints md5s.
PROBE = """
import hashlib, pcam, numpy as np, torch
from pcam.models import build_model, init_weights
from pcam.training import set_determinism
set_determinism(0, 2)
m = build_model({"model": "cnn", "width": 4}); init_weights(m)
m.to(memory_format=torch.channels_last)
opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
g = torch.Generator().manual_seed(1)
x = torch.randn(32, 3, 96, 96, generator=g).contiguous(memory_format=torch.channels_last)
y = (torch.rand(32, generator=g) > 0.5).float()
for _ in range(3):
    loss = torch.nn.functional.binary_cross_entropy_with_logits(m(x), y)
    opt.zero_grad(); loss.backward(); opt.step()
h = hashlib.md5(b"".join(t.detach().numpy().tobytes() for t in m.state_dict().values()))
a = np.linspace(-3, 3, 4099, dtype=np.float32).reshape(1, -1)
n = hashlib.md5(np.exp(a).tobytes() + np.sin(a).tobytes() + (a.T @ a).tobytes())
print(h.hexdigest(), n.hexdigest())
"""

# What another machine would pick on its own, simulated by the variables the libraries read.
ELSEWHERE = [
    {"ATEN_CPU_CAPABILITY": "default"},
    {"MKL_CBWR": "AVX"},
    {"ONEDNN_MAX_CPU_ISA": "AVX"},
    {"NPY_DISABLE_CPU_FEATURES": ""},
]


def probe(env: dict[str, str]) -> tuple[str, str]:
    base = {k: v for k, v in os.environ.items() if k not in numerics.ENV_PINS}
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        env=base | env,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout.split()
    return out[0], out[1]


@pytest.mark.skipif(numerics.check_cpu() is not None, reason="this CPU cannot run the pinned path")
def test_pins_decide_the_bytes_whatever_the_environment_asks_for():
    pinned = probe({})
    assert all(probe(env) == pinned for env in ELSEWHERE)
    native = probe({numerics.SWITCH_ENV: "0"})
    unpinned = {probe({numerics.SWITCH_ENV: "0", **env}) for env in ELSEWHERE[:2]}
    # Left to the machine, these knobs change the weights: they are what the pins fix. (ATen's
    # ISA always does; an MKL_CBWR branch only on Intel, oneMKL treats it as AUTO elsewhere.)
    assert len(unpinned | {native}) >= 2
    assert pinned not in unpinned | {native}


def test_every_stage_imports_pcam_before_numpy_and_torch():
    """The pins are environment variables the libraries read when they load."""
    for script in sorted((REPO / "stages").glob("*.py")):
        for node in ast.parse(script.read_text()).body:
            if isinstance(node, ast.Import | ast.ImportFrom):
                name = node.names[0].name if isinstance(node, ast.Import) else node.module
                top = (name or "").split(".")[0]
                if top in sys.stdlib_module_names or top == "__future__":
                    continue
                assert top == "pcam", f"{script.name}: imports {name} before pcam"
                break


def test_record_says_what_decides_the_kernels():
    record = numerics.record()
    assert record["env"] == numerics.ENV_PINS
    assert record["pinned"] is True  # conftest imports pcam before numpy and torch
    numerics.configure_torch()
    import torch

    assert torch.backends.mkldnn.enabled is False
    assert numerics.record()["mkldnn"] is False
