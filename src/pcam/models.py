"""Models, chosen by train.model: `cnn` (default, fast on CPU) and `mlp` (the seeds' baseline)."""

from __future__ import annotations

import torch
from torch import nn

from pcam.params import TrainParams


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """A stride-2 stem, then conv blocks each followed by 2x2 max-pool, global average pool, linear.

    The stem halves 96x96 straight away: full-resolution 3x3 convs cost most of the FLOPs and add
    little for nuclei that are several pixels wide. Channels double per block from `width`.
    """

    def __init__(self, width: int):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, stride=2, padding=1, bias=False),  # 96 -> 48
            nn.BatchNorm2d(w),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 48 -> 24
            _conv_block(w, 2 * w),
            nn.MaxPool2d(2),  # 24 -> 12
            _conv_block(2 * w, 4 * w),
            nn.MaxPool2d(2),  # 12 -> 6
            _conv_block(4 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(4 * w, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1)).squeeze(1)


class MLP(nn.Module):
    """flatten -> hidden_units -> 1: the seeds' baseline, kept for comparison."""

    def __init__(self, hidden_units: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(96 * 96 * 3, hidden_units), nn.ReLU(inplace=True),
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


def model_config(p: TrainParams) -> dict:
    """What defines the architecture: stored in checkpoints so inference rebuilds the same model."""
    if p.model == "cnn":
        return {"model": "cnn", "width": p.width}
    return {"model": "mlp", "hidden_units": p.hidden_units}


def build_model(config: dict) -> nn.Module:
    if config["model"] == "cnn":
        return SmallCNN(config["width"])
    if config["model"] == "mlp":
        return MLP(config["hidden_units"])
    raise ValueError(f"unknown model {config['model']!r}")
