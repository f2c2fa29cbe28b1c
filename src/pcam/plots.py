"""Static figures (matplotlib, no display) for people reading the repo without DVC."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # no display on cluster nodes or CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pcam.fileio import write_bytes  # noqa: E402


def save_figure(fig, path: str | os.PathLike, dpi: int = 100) -> None:
    """Save a PNG atomically with fixed metadata, so identical figures give identical bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    plt.close(fig)
    write_bytes(path, buf.getvalue())


def curve_png(
    path: str | os.PathLike,
    curves: dict[str, tuple[np.ndarray, np.ndarray]],
    xlabel: str,
    ylabel: str,
    title: str,
    diagonal: bool = False,
    log_x: bool = False,
    unit_square: bool = True,
) -> None:
    """Line plot of named (x, y) curves; `unit_square` fixes both axes to [0, 1]."""
    fig, ax = plt.subplots(figsize=(6, 5))
    for label, (x, y) in curves.items():
        ax.plot(x, y, label=label, marker="o" if log_x else None, ms=3)
    if diagonal:
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if unit_square:
        ax.set(xlim=(0, 1), ylim=(0, 1.02))
    if log_x:
        ax.set_xscale("log", base=2)
    ax.legend(loc="best", fontsize=7)
    save_figure(fig, path)


def patch_grid(
    path: str | os.PathLike,
    patches: np.ndarray,
    captions: Sequence[str],
    title: str,
    cols: int = 8,
) -> None:
    """A grid of uint8 RGB patches, each with a caption (index, label, probability...)."""
    n = len(patches)
    rows = max(1, (n + cols - 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.4, rows * 1.6 + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, patch, caption in zip(axes.flat, patches, captions, strict=False):
        ax.imshow(patch)
        ax.set_title(caption, fontsize=6)
    if n == 0:
        axes[0, 0].text(0, 0.5, "nothing flagged", fontsize=10)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    # ~1 screen pixel per patch pixel: sharper than upsampled tiles, and half the bytes in git.
    save_figure(fig, path, dpi=70)
