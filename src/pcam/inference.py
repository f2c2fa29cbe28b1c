"""Batched inference on uint8 patches resident in memory."""

from __future__ import annotations

import numpy as np
import torch
from scipy.special import expit
from torch import nn

from pcam.data import normalise


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    x_uint8: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    batch_size: int,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Logits for every patch of an (N,96,96,3) uint8 tensor, in order, as float64 numpy."""
    model.eval()
    batches = (x_uint8[i : i + batch_size].to(device) for i in range(0, len(x_uint8), batch_size))
    out = [model(normalise(xb, mean, std)).float().cpu() for xb in batches]
    return torch.cat(out).double().numpy() if out else np.empty(0)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return expit(logits)  # no overflow warning for very negative logits, unlike 1/(1+exp(-x))
