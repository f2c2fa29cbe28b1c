"""Statistics of the train split: per-channel normalisation (no leakage from valid/test), and the
per-patch colour and stain features that drift checks compare (pcam.drift).

The features are a few numbers that move when the staining, the scanner or the tissue mix
changes, and that are cheap enough to compute on every patch a site sends:

- red, green, blue: mean of each channel (0..1): scanner white balance, overall stain intensity.
- saturation: mean HSV saturation (max - min) / max: how strongly stained.
- haematoxylin, eosin: mean stain concentration over tissue pixels, from a simple colour
  deconvolution (Ruifrok & Johnston 2001): optical density OD = -ln((RGB + 1) / 256), projected by
  least squares on fixed reference H and E directions (Macenko et al. 2009's).
- od_residual: the share of tissue OD the two reference stains do not explain (|OD - projection|
  / |OD|): grows when the stain *colours* change (another haematoxylin, a third dye), not only
  their amounts.
- tissue_fraction: share of pixels with saturation >= 0.07 (PCAM's own background rule).

Patches without tissue get 0 for haematoxylin, eosin and od_residual.

The population stability index (PSI) compares binned proportions: sum (p_new - p_ref) *
ln(p_new / p_ref) over the reference's quantile bins. Convention: < 0.1 no real change, 0.1-0.25
moderate, > 0.25 a major shift. The KS statistic is the largest gap between the two empirical
CDFs. Both are effect sizes: with thousands of patches any difference is "significant", and
slide-to-slide stain variation is real, so p-values are reported but not used to flag.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from pcam import h5io
from pcam.errors import PcamError

FEATURES = (
    *("red", "green", "blue", "saturation"),
    *("haematoxylin", "eosin", "od_residual", "tissue_fraction"),
)
TISSUE_MIN_SATURATION = 0.07
# Reference stain OD directions (RGB), Macenko et al. 2009; rows: haematoxylin, eosin.
STAINS = np.array([[0.5626, 0.7201, 0.4062], [0.2159, 0.8012, 0.5581]], dtype=np.float32)
STAINS /= np.linalg.norm(STAINS, axis=1, keepdims=True)
# OD (.., 3) @ UNMIX -> concentrations (.., 2): the least-squares solution for OD ~ C @ STAINS.
UNMIX = np.linalg.pinv(STAINS).astype(np.float32)
# Patches per vectorised step: ~10 float32 arrays of (128, 9216, 3) stay near 100 MiB.
_CHUNK_PATCHES = 128
# Floor for an empty bin's proportion in the PSI (ln 0 is undefined).
PSI_FLOOR = 1e-4


def channel_stats(
    x_path: str | os.PathLike,
    excluded: np.ndarray,
    chunk_rows: int,
    on_block: Callable[[int, np.ndarray], None] | None = None,
) -> dict[str, object]:
    """Mean and std per RGB channel on the 0..1 scale, over all rows not in `excluded`.

    Reads contiguous chunks of `chunk_rows` patches, so memory is bounded by one chunk whatever
    the split size, and the result matches numpy on the whole array. Float images (accepted by
    validate-data only when they hold integers 0..255) are cast to uint8 per chunk, reading
    fewer rows at a time so a chunk stays the same number of bytes. `on_block(start, block)`
    sees every uint8 block (excluded rows included) in the same pass, e.g. to sample features.
    """
    f, ds = h5io.open_dataset(x_path, "x")
    # Integer sums are exact (no float rounding however many patches), and fast on uint8 data;
    # 255**2 * 3e9 pixels still fits int64 by a wide margin.
    total, total_sq, count = np.zeros(3, np.int64), np.zeros(3, np.int64), 0
    excluded = np.asarray(excluded, dtype=np.int64)
    with f:
        for rows in h5io.iter_chunks(ds.shape[0], max(1, chunk_rows // ds.dtype.itemsize)):
            block = h5io.pixels_as_uint8(x_path, h5io.read_rows(ds, rows, x_path), rows.start)
            if on_block is not None:
                on_block(rows.start, block)
            drop = excluded[(excluded >= rows.start) & (excluded < rows.stop)] - rows.start
            if len(drop):
                block = np.delete(block, drop, axis=0)
            pixels = block.reshape(-1, 3)
            total += pixels.sum(axis=0, dtype=np.int64)
            total_sq += np.square(pixels, dtype=np.uint16).sum(axis=0, dtype=np.int64)
            count += pixels.shape[0]
    if count == 0:
        raise PcamError(f"{x_path}: no patches left after exclusions; cannot compute statistics")
    mean = total.astype(np.float64) / count / 255.0
    # Var = E[x^2] - E[x]^2, with both terms from exact integer sums, in float64.
    var = total_sq.astype(np.float64) / count / 255.0**2 - mean**2
    return {
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in np.sqrt(np.maximum(var, 0.0))],
        "n_patches": count // (96 * 96),
        "n_excluded": int(len(excluded)),
    }


def patch_features(x_uint8: np.ndarray) -> np.ndarray:
    """(n, len(FEATURES)) float64 features of (n, 96, 96, 3) uint8 RGB patches."""
    out = np.empty((len(x_uint8), len(FEATURES)), dtype=np.float64)
    for rows in h5io.iter_chunks(len(x_uint8), _CHUNK_PATCHES):
        rgb = x_uint8[rows].reshape(rows.stop - rows.start, -1, 3).astype(np.float32)
        hi, lo = rgb.max(axis=2), rgb.min(axis=2)
        saturation = np.where(hi > 0, (hi - lo) / np.maximum(hi, 1.0), 0.0)
        tissue = saturation >= TISSUE_MIN_SATURATION
        n_tissue = np.maximum(tissue.sum(axis=1), 1)
        od = -np.log((rgb + 1.0) / 256.0)
        conc = od @ UNMIX
        residual = np.linalg.norm(od - conc @ STAINS, axis=2)
        od_norm = np.linalg.norm(od, axis=2)
        out[rows, 0:3] = rgb.mean(axis=1) / 255.0
        out[rows, 3] = saturation.mean(axis=1)
        out[rows, 4:6] = (conc * tissue[..., None]).sum(axis=1) / n_tissue[:, None]
        out[rows, 6] = (residual * tissue).sum(axis=1) / np.maximum(
            (od_norm * tissue).sum(axis=1), 1e-6
        )
        out[rows, 7] = tissue.mean(axis=1)
    return out


def reference_rows(n: int, excluded: np.ndarray, k: int) -> np.ndarray:
    """Up to k rows evenly spaced over [0, n) minus `excluded`: a deterministic sample that
    covers the whole split (PCAM's files are ordered, e.g. by slide)."""
    kept = np.setdiff1d(np.arange(n), excluded)
    if len(kept) <= k:
        return kept
    return kept[np.unique(np.linspace(0, len(kept) - 1, k).round().astype(np.int64))]


class FeatureSample:
    """Collects the features of chosen rows while a split is streamed in contiguous blocks."""

    def __init__(self, rows: np.ndarray):
        self.rows = np.asarray(rows, dtype=np.int64)
        self.parts: list[np.ndarray] = []

    def add(self, start: int, block: np.ndarray) -> None:
        """`block` holds rows start..start+len(block); it may be reused after this call."""
        pick = self.rows[(self.rows >= start) & (self.rows < start + len(block))] - start
        if len(pick):
            self.parts.append(patch_features(block[pick]))

    def reference(self) -> dict:
        """The drift reference document (data/drift_reference.json)."""
        feats = np.concatenate(self.parts) if self.parts else np.empty((0, len(FEATURES)))
        # 6 significant digits: ample for histograms and KS, a third of the bytes.
        values = {name: [float(f"{v:.6g}") for v in feats[:, i]] for i, name in enumerate(FEATURES)}
        return {"features": list(FEATURES), "n_patches": len(feats), "values": values}


def psi(reference: np.ndarray, new: np.ndarray, bins: int) -> float:
    """Population stability index of `new` against `reference`, on the reference's quantile bins
    (ties merged, so a feature with few distinct values gets fewer bins)."""
    cuts = np.unique(np.quantile(reference, np.linspace(0.0, 1.0, bins + 1)[1:-1]))
    ref = np.bincount(np.searchsorted(cuts, reference, side="right"), minlength=len(cuts) + 1)
    cur = np.bincount(np.searchsorted(cuts, new, side="right"), minlength=len(cuts) + 1)
    p = np.maximum(ref / len(reference), PSI_FLOOR)
    q = np.maximum(cur / len(new), PSI_FLOOR)
    return float(np.sum((q - p) * np.log(q / p)))
