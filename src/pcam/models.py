"""Models, chosen by train.model: `cnn` (default, fast on CPU), `resnet` (for GPU runs on real PCAM)
and `mlp` (the seeds' baseline, for comparison)."""

from __future__ import annotations

import torch
from torch import nn

from pcam import numerics
from pcam.params import TrainParams


def global_avg_pool(x: torch.Tensor) -> torch.Tensor:
    # A plain mean, not AdaptiveAvgPool2d: its CUDA backward is non-deterministic and would make
    # torch.use_deterministic_algorithms(True) raise on GPU.
    return x.mean(dim=(2, 3))


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """A 4x4 stride-4 patchify stem (as in ConvNeXt), conv blocks (channels doubling from
    `width`), global average pool, linear. Full-resolution 3x3 convs cost most of a step on the
    pinned CPU path and add little for nuclei several pixels wide (README: Measured)."""

    def __init__(self, width: int):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 4, stride=4, bias=False),  # 96 -> 24
            nn.BatchNorm2d(w),
            nn.ReLU(inplace=True),
            _conv_block(w, 2 * w),
            nn.MaxPool2d(2),  # 24 -> 12
            _conv_block(2 * w, 4 * w),
            nn.MaxPool2d(2),  # 12 -> 6
            _conv_block(4 * w, 4 * w),
        )
        self.head = nn.Linear(4 * w, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(global_avg_pool(self.features(x))).squeeze(1)


class BasicBlock(nn.Module):
    """Two 3x3 convs with an identity or projected shortcut, as in ResNet-18. The projection
    average-pools before its 1x1 conv (ResNet-D): it keeps all the input, and a strided 1x1
    conv's backward crashed oneDNN (torch 2.13 CPU) in our tests."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
        )
        self.shortcut = (
            nn.Identity()
            if stride == 1 and c_in == c_out
            else nn.Sequential(
                nn.AvgPool2d(stride) if stride > 1 else nn.Identity(),
                nn.Conv2d(c_in, c_out, 1, bias=False),
                nn.BatchNorm2d(c_out),
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class ResNet(nn.Module):
    """4 stages of 2 blocks, widths w, 2w, 4w, 8w: at width 64 ResNet-18's body (11M parameters)
    with a lighter stem (no 7x7/maxpool: 96 px patches are small)."""

    def __init__(self, width: int):
        super().__init__()
        w = width
        self.stem = _conv_block(3, w)
        stages, c_in = [], w
        for i, c_out in enumerate((w, 2 * w, 4 * w, 8 * w)):
            stride = 1 if i == 0 else 2
            stages += [BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)]
            c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(c_in, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(global_avg_pool(self.stages(self.stem(x)))).squeeze(1)


class MLP(nn.Module):
    """flatten -> hidden_units -> 1: the seeds' baseline, kept for comparison."""

    def __init__(self, hidden_units: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(96 * 96 * 3, hidden_units),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_units, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(1)


def init_weights(model: nn.Module) -> None:
    """Explicit initialisation, so results do not depend on torch's default-init of the day."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# Each model's size parameter in params.yaml (train.*) and in a checkpoint's model_config.
MODEL_SIZE_KEY = {"cnn": "width", "resnet": "width", "mlp": "hidden_units"}


def model_config(p: TrainParams) -> dict:
    """What defines the architecture: stored in checkpoints so inference rebuilds the same model."""
    size = MODEL_SIZE_KEY[p.model]
    return {"model": p.model, size: getattr(p, size)}


def build_model(config: dict) -> nn.Module:
    numerics.configure_torch()  # oneDNN off, VML warmed up: before the model runs anything
    name = config["model"]
    if name not in MODEL_SIZE_KEY:
        raise ValueError(f"unknown model {name!r}")
    return {"cnn": SmallCNN, "resnet": ResNet, "mlp": MLP}[name](config[MODEL_SIZE_KEY[name]])
