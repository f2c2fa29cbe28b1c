"""Synthetic PCAM-like H&E patches: the pipeline's embedded default dataset.

Every later stage (validation, training, evaluation, slicing) runs on these patches when
`data.source: synthetic`, so they imitate what matters about PatchCamelyon:

- Colour comes from a Beer-Lambert stain model: each pixel holds a haematoxylin and an eosin
  concentration, and RGB = glass_brightness * exp(-strength * (H * h_od + E * e_od)). Each slide
  draws its own stain vectors, strength and glass brightness, so stain variation between slides
  (some clearly darker) dominates a patch's mean colour, as it does in real PCAM.
- Pink, textured eosin stroma; small dark round/spindle nuclei; white glass (fat holes, tissue
  edges).
- Tumour: clusters of larger, darker, irregular, crowded nuclei. Label 1 iff a tumour nucleus
  touches the centre 32x32 px. Hard negatives carry tumour only in the outer ring.
- Tumour does not give itself away through mean colour: each patch draws a label-independent
  target for its total haematoxylin, and normal nuclei fill whatever tumour nuclei leave of it.
  Telling tumour from dense normal tissue needs nucleus size and shape, i.e. a CNN.

Generation is vectorised over chunks of patches; nuclei are stamped from precomputed sprite banks
on a jittered lattice (one nucleus at most per lattice cell), which needs no per-nucleus loop.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np

from pcam.h5io import PATCH_SHAPE, SPLITS, Meta

PATCH_PX = PATCH_SHAPE[0]
# The label's region: PCAM's "centre 32x32 px" is pixels 32..63 in both axes.
CENTER_START_PX = 32
CENTER_STOP_PX = 64

# Reference stain optical-density directions (RGB), Macenko et al. 2009; slides perturb them.
_H_OD_REF = np.array([0.5626, 0.7201, 0.4062])
_E_OD_REF = np.array([0.2159, 0.8012, 0.5581])

# Lattice cells: one nucleus at most per cell, its sprite window twice the cell so a nucleus
# anywhere in its cell still fits. Normal nuclei (radius <= 4 px) live on 8 px cells (12x12
# lattice), tumour nuclei (radius <= 6 px) on 12 px cells (8x8 lattice).
_NORMAL_CELL_PX = 8
_TUMOUR_CELL_PX = 12
_TUMOUR_GRID = PATCH_PX // _TUMOUR_CELL_PX
# Tumour cells whose sprite window cannot reach the centre square: rows/cols 0,1 and 6,7.
# Hard negatives put tumour only there, which keeps them negative by construction.
_RING_CELLS = np.array([i not in (2, 3, 4, 5) for i in range(_TUMOUR_GRID)])
# Cells 3 and 4 lie inside the centre square (px 36..59), so a nucleus centred there is a
# positive by construction.
_CENTRE_CELLS = (3, 4)

# Patches per vectorised chunk: big enough to amortise numpy overhead, small enough that the
# float32 temporaries (~40 MiB) stay in cache-friendly sizes. Fixed, so output is deterministic.
_CHUNK_PATCHES = 256
# Fixed seed of the sprite banks: nucleus shapes are part of the generator, not of the data seed.
_SPRITE_BANK_SEED = 20240611


@dataclass(frozen=True)
class SyntheticSplit:
    """One split as the PCAM files hold it."""

    x: np.ndarray  # (n, 96, 96, 3) uint8 RGB
    y: np.ndarray  # (n,) uint8 in {0, 1}
    meta: Meta


@dataclass(frozen=True)
class _Slides:
    """Per-slide staining, one row per slide."""

    h_od: np.ndarray  # (s, 3) haematoxylin OD direction
    e_od: np.ndarray  # (s, 3) eosin OD direction
    strength: np.ndarray  # (s,) section thickness / stain uptake: multiplies all OD
    glass_rgb: np.ndarray  # (s, 3) brightness of empty glass (illumination, scanner white balance)
    eosin_level: np.ndarray  # (s,) how pink this lab's eosin bath left the stroma


@dataclass(frozen=True)
class _SpriteBank:
    """Nuclei pre-rendered at every integer offset inside their lattice cell."""

    density: np.ndarray  # (shapes, cell*cell, 2*cell, 2*cell) float32 haematoxylin concentration
    mask: np.ndarray  # same shape, bool: the nucleus's pixels (what "tumour pixels" means)
    mean_density_per_cell_px: float  # sprite mass / cell area: mean H a fully occupied lattice adds


def slide_ids_for(split: str, n_slides: int) -> list[str]:
    """Slide ids of one split, e.g. "train_slide_003"; the split prefix keeps splits disjoint."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n_slides < 1:
        raise ValueError(f"n_slides must be >= 1, got {n_slides}")
    return [f"{split}_slide_{i:03d}" for i in range(n_slides)]


def generate_split(
    n: int, slide_ids: Sequence[str], seed: int, hard_negative_fraction: float
) -> SyntheticSplit:
    """n patches (n // 2 positives, shuffled) spread evenly over `slide_ids`.

    The RNG stream is derived from `seed` *and* the slide ids, so train/valid/test generated with
    the same seed are still different data (their slide ids differ). Same arguments give
    byte-identical arrays.
    """
    split, _ = _generate(n, slide_ids, seed, hard_negative_fraction, keep_tumour_mask=False)
    return split


def _generate(
    n: int,
    slide_ids: Sequence[str],
    seed: int,
    hard_negative_fraction: float,
    keep_tumour_mask: bool,
) -> tuple[SyntheticSplit, np.ndarray | None]:
    """generate_split, optionally also returning the (n, 96, 96) bool mask of tumour pixels."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if len(slide_ids) == 0:
        raise ValueError("slide_ids must not be empty")
    if len(set(slide_ids)) != len(slide_ids):
        raise ValueError("slide_ids must be unique")
    if not 0.0 <= hard_negative_fraction <= 1.0:
        raise ValueError(f"hard_negative_fraction must be in [0, 1], got {hard_negative_fraction}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")

    slide_ids = [str(s) for s in slide_ids]
    rng = np.random.default_rng(np.random.SeedSequence([seed, *_ids_entropy(slide_ids)]))
    slides = _draw_slides(seed, slide_ids)

    n_pos = n // 2
    y = np.zeros(n, dtype=np.uint8)
    y[:n_pos] = 1
    n_neg = n - n_pos
    hard = np.zeros(n, dtype=bool)
    hard[n_pos : n_pos + int(round(hard_negative_fraction * n_neg))] = True
    order = rng.permutation(n)
    y, hard = y[order], hard[order]
    # Round-robin then shuffled: slide sizes differ by at most one, and slide is independent of
    # label (otherwise a slide's stain colour would leak the label into mean colour).
    slide_idx = rng.permutation(np.arange(n) % len(slide_ids))

    x = np.empty((n, PATCH_PX, PATCH_PX, 3), dtype=np.uint8)
    tumour_mask = np.zeros((n, PATCH_PX, PATCH_PX), dtype=bool) if keep_tumour_mask else None
    for start in range(0, n, _CHUNK_PATCHES):
        rows = slice(start, min(n, start + _CHUNK_PATCHES))
        x[rows], mask = _render_chunk(rng, slides, slide_idx[rows], y[rows] == 1, hard[rows])
        if tumour_mask is not None:
            tumour_mask[rows] = mask

    # Patch positions on the slide grid (level-0 px); only need to be plausible and deterministic.
    coord_y = rng.integers(0, 1024, size=n).astype(np.int64) * PATCH_PX
    coord_x = rng.integers(0, 1024, size=n).astype(np.int64) * PATCH_PX
    meta = Meta(
        coord_y=coord_y,
        coord_x=coord_x,
        tumor_patch=(y == 1) | hard,
        center_tumor_patch=y == 1,
        wsi=np.asarray(slide_ids, dtype=str)[slide_idx],
    )
    return SyntheticSplit(x=x, y=y, meta=meta), tumour_mask


def _ids_entropy(slide_ids: Sequence[str]) -> list[int]:
    """Stable 64-bit words from a list of ids (Python's hash() is salted per process)."""
    digest = hashlib.sha256("\n".join(slide_ids).encode()).digest()
    return [int.from_bytes(digest[i : i + 8], "little") for i in range(0, 32, 8)]


def _draw_slides(seed: int, slide_ids: Sequence[str]) -> _Slides:
    """Each slide's staining depends only on (seed, its id), not on which other slides exist."""
    rows = []
    for sid in slide_ids:
        r = np.random.default_rng(np.random.SeedSequence([seed, *_ids_entropy([sid])]))
        h_od = _H_OD_REF * r.uniform(0.85, 1.15, 3)
        e_od = _E_OD_REF * r.uniform(0.85, 1.15, 3)
        # Thick or over-stained sections: about one slide in five is markedly darker, which is
        # what gives a "darkest 10 % of patches" slice something to find.
        strength = r.lognormal(0.0, 0.15) * (1.45 if r.random() < 0.2 else 1.0)
        glass = r.uniform(212.0, 248.0) + r.uniform(-7.0, 7.0, 3)
        rows.append(
            (
                h_od / np.linalg.norm(h_od),
                e_od / np.linalg.norm(e_od),
                strength,
                glass,
                r.uniform(0.45, 0.95),
            )
        )
    h_od, e_od, strength, glass, eosin = zip(*rows, strict=True)
    return _Slides(
        h_od=np.array(h_od, dtype=np.float32),
        e_od=np.array(e_od, dtype=np.float32),
        strength=np.array(strength, dtype=np.float32),
        glass_rgb=np.clip(np.array(glass, dtype=np.float32), 0.0, 255.0),
        eosin_level=np.array(eosin, dtype=np.float32),
    )


def _render_chunk(
    rng: np.random.Generator,
    slides: _Slides,
    slide_idx: np.ndarray,
    positive: np.ndarray,
    hard: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """RGB uint8 patches and their tumour-pixel masks for one chunk."""
    n = len(slide_idx)
    f32 = np.float32
    normal_bank, tumour_bank = _normal_bank(), _tumour_bank()

    # Tumour: a blob of lattice cells, stamped first so normal nuclei can fill in around it.
    region, forced = _tumour_cells(rng, positive, hard)  # (n, 8, 8) bool each
    occupied = region & (rng.random(region.shape) < rng.uniform(0.75, 0.97, (n, 1, 1)))
    occupied |= forced
    t_gain = occupied * rng.uniform(0.85, 1.15, region.shape).astype(f32)
    t_shape, t_pos = _sprite_ids(rng, tumour_bank, region.shape)
    tumour_h = _stamp_lattice(tumour_bank.density, t_shape, t_pos, t_gain, _TUMOUR_CELL_PX)
    tumour_mask = _stamp_lattice(tumour_bank.mask, t_shape, t_pos, occupied, _TUMOUR_CELL_PX)
    # Soft footprint of the tumour nest: less pink stroma, purplish cytoplasm, never empty glass.
    region_px = np.clip(1.6 * _upsample(region.astype(f32)), 0.0, 1.0)

    tissue = np.maximum(_tissue_alpha(rng, n), region_px)

    # Normal nuclei fill whatever is left of a label-independent haematoxylin budget, so
    # positives are not bluer or darker on average than negatives (mean colour must not
    # reveal the label; only nucleus size and shape should).
    h_target = rng.uniform(0.12, 0.55, n).astype(f32)
    tumour_mean = tumour_h.mean(axis=(1, 2))
    room = region_px[:, 4::_NORMAL_CELL_PX, 4::_NORMAL_CELL_PX]  # tumour footprint per cell
    free_cells = (1.0 - room) * tissue[:, 4::_NORMAL_CELL_PX, 4::_NORMAL_CELL_PX]
    free_fraction = np.maximum(free_cells.mean(axis=(1, 2)), 0.05)
    p_normal = (h_target - tumour_mean) / (normal_bank.mean_density_per_cell_px * free_fraction)
    p_normal = np.clip(p_normal, 0.03, 1.0)
    n_occ = rng.random(room.shape) < p_normal[:, None, None] * (1.0 - 0.9 * room)
    n_gain = n_occ * rng.uniform(0.8, 1.15, room.shape).astype(f32)
    n_shape, n_pos = _sprite_ids(rng, normal_bank, room.shape)
    normal_h = _stamp_lattice(normal_bank.density, n_shape, n_pos, n_gain, _NORMAL_CELL_PX)

    # Stroma: two octaves of smooth noise plus directional fibres; tumour nests replace stroma.
    fibres = _upsample_aniso(rng, n)
    texture = (
        1.0
        + 0.22 * _upsample(rng.standard_normal((n, 6, 6), dtype=f32))
        + 0.12 * _upsample(rng.standard_normal((n, 24, 24), dtype=f32))
        + 0.18 * fibres
    )
    eosin_level = slides.eosin_level[slide_idx] * rng.uniform(0.75, 1.25, n).astype(f32)
    eosin = eosin_level[:, None, None] * np.clip(texture, 0.2, None) * (1.0 - 0.35 * region_px)
    # The nest's pale-purple cytoplasm compensates the stroma it replaces, so the nest is not a
    # large pale hole.
    haem = tissue * (normal_h + 0.06 + 0.12 * region_px) + tumour_h
    eosin = eosin * tissue

    s = slide_idx
    od = slides.strength[s, None, None, None] * (
        haem[..., None] * slides.h_od[s, None, None, :]
        + eosin[..., None] * slides.e_od[s, None, None, :]
    )
    rgb = slides.glass_rgb[s, None, None, :] * np.exp(-od)
    # Scanner noise: mostly luminance (shared by channels), a little per channel.
    rgb += 2.5 * rng.standard_normal((n, PATCH_PX, PATCH_PX, 1), dtype=f32)
    rgb += 1.5 * rng.standard_normal(rgb.shape, dtype=f32)
    rgb += 0.5  # round, not truncate
    np.clip(rgb, 0.0, 255.0, out=rgb)
    return rgb.astype(np.uint8), tumour_mask


def _tumour_cells(
    rng: np.random.Generator, positive: np.ndarray, hard: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Tumour lattice cells per patch, and within them one cell that must hold a nucleus.

    Positives: an irregular nest over the centre, from a small cluster to a whole patch of
    tumour; the forced cell is the central cell (3 or 4 in both axes, i.e. inside the centre
    square) nearest the nest centre, which makes the label true by construction. Hard negatives:
    a nest entering from one border, cut to the outer ring so it cannot reach the centre; its
    forced cell is the ring cell holding the nest centre. Other negatives: no tumour.
    """
    n = len(positive)
    g = _TUMOUR_GRID
    centres = (np.arange(g) + 0.5) * _TUMOUR_CELL_PX

    cy = 48.0 + rng.uniform(-22.0, 22.0, n)
    cx = 48.0 + rng.uniform(-22.0, 22.0, n)
    radius = rng.uniform(14.0, 80.0, n)

    side = rng.integers(0, 4, n)
    along = rng.uniform(0.0, PATCH_PX, n)
    # Distance of the nest centre inside the border (negative: outside). At most 8 px inside,
    # so the centre's cell is in the ring (cell 0 or 7 along that axis).
    depth = rng.uniform(-18.0, 8.0, n)
    edge_y = np.select([side == 0, side == 1], [depth, PATCH_PX - depth], along)
    edge_x = np.select([side == 2, side == 3], [depth, PATCH_PX - depth], along)
    cy = np.where(hard, edge_y, cy)
    cx = np.where(hard, edge_x, cx)
    radius = np.where(hard, rng.uniform(16.0, 36.0, n), radius)

    dy = centres[None, :, None] - cy[:, None, None]
    dx = centres[None, None, :] - cx[:, None, None]
    wobble = 1.0 + 0.3 * rng.uniform(-1.0, 1.0, (n, g, g))  # ragged, non-circular nest edges
    region = np.hypot(dy, dx) < radius[:, None, None] * wobble
    ring = _RING_CELLS[:, None] | _RING_CELLS[None, :]
    region = np.where(hard[:, None, None], region & ring, region)
    region &= (positive | hard)[:, None, None]

    forced = np.zeros_like(region)
    cell_y = (np.clip(cy, 0.0, PATCH_PX - 1e-3) // _TUMOUR_CELL_PX).astype(np.intp)
    cell_x = (np.clip(cx, 0.0, PATCH_PX - 1e-3) // _TUMOUR_CELL_PX).astype(np.intp)
    lo, hi = _CENTRE_CELLS
    rows = np.arange(n)
    pos = rows[positive]
    forced[pos, np.clip(cell_y[pos], lo, hi), np.clip(cell_x[pos], lo, hi)] = True
    hrd = rows[hard]
    forced[hrd, cell_y[hrd], cell_x[hrd]] = True
    return region | forced, forced


def _tissue_alpha(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 96, 96) tissue coverage in [0, 1]; 0 is empty glass.

    About half the patches are solid tissue, a quarter have white holes (fat cells, lumina), a
    quarter sit on the edge of the section (a wavy boundary with glass beyond).
    """
    f32 = np.float32
    kind = rng.random(n)
    # Holes: thresholded smooth noise; the threshold sets how much of the patch is glass.
    field = _upsample(rng.standard_normal((n, 6, 6), dtype=f32))
    field /= field.std(axis=(1, 2), keepdims=True) + 1e-6
    threshold = rng.uniform(0.4, 1.6, n).astype(f32)[:, None, None]
    holes = np.clip(2.5 * (threshold - field) + 0.5, 0.0, 1.0)
    # Edge: a half-plane at a random angle and offset, its border roughened by smooth noise.
    angle = rng.uniform(0.0, 2.0 * np.pi, n)
    offset = rng.uniform(-5.0, 45.0, n)
    yy, xx = np.mgrid[0:PATCH_PX, 0:PATCH_PX].astype(f32) - (PATCH_PX - 1) / 2
    signed_px = (
        yy[None] * np.sin(angle)[:, None, None].astype(f32)
        + xx[None] * np.cos(angle)[:, None, None].astype(f32)
        - offset[:, None, None].astype(f32)
        + 5.0 * _upsample(rng.standard_normal((n, 8, 8), dtype=f32))
    )
    edge = np.clip(0.5 - signed_px / 1.5, 0.0, 1.0)
    solid = np.ones_like(edge)
    kind = kind[:, None, None]
    return np.where(kind < 0.5, solid, np.where(kind < 0.75, holes, edge)).astype(f32)


def _sprite_ids(
    rng: np.random.Generator, bank: _SpriteBank, shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """A random nucleus shape and a random offset inside its cell, per lattice cell."""
    n_shapes, n_offsets = bank.density.shape[:2]
    return rng.integers(0, n_shapes, shape), rng.integers(0, n_offsets, shape)


def _stamp_lattice(
    bank: np.ndarray, shape_idx: np.ndarray, offset_idx: np.ndarray, gain: np.ndarray, cell_px: int
) -> np.ndarray:
    """(n, 96, 96) image of one nucleus per lattice cell, scaled by gain (0 = empty cell).

    A bool bank with bool gain stamps masks instead (gain False = empty cell).
    """
    windows = bank[shape_idx, offset_idx]  # (n, g, g, 2c, 2c)
    if gain.dtype != np.bool_:
        windows *= gain[..., None, None]
    else:
        windows &= gain[..., None, None]
    return _fold_windows(windows, cell_px)


def _fold_windows(windows: np.ndarray, cell_px: int) -> np.ndarray:
    """Overlay (n, g, g, 2c, 2c) windows, one per cell with stride c, into (n, g*c, g*c).

    Window (i, j) covers image px [i*c - c/2, i*c + 3c/2): its four c x c quadrants land on
    canvas blocks (i, j), (i, j+1), (i+1, j), (i+1, j+1) of a canvas shifted by c/2. Overlaps take
    the maximum, so touching nuclei do not add up to impossible darkness.
    """
    n, g = windows.shape[0], windows.shape[1]
    c = cell_px
    canvas = np.zeros((n, g + 1, g + 1, c, c), dtype=windows.dtype)
    canvas[:, :g, :g] = windows[..., :c, :c]
    for dy, dx in ((0, 1), (1, 0), (1, 1)):
        block = canvas[:, dy : dy + g, dx : dx + g]
        np.maximum(block, windows[..., dy * c : (dy + 1) * c, dx * c : (dx + 1) * c], out=block)
    full = canvas.transpose(0, 1, 3, 2, 4).reshape(n, (g + 1) * c, (g + 1) * c)
    half = c // 2
    return full[:, half : half + g * c, half : half + g * c]


@cache
def _smoothing_matrix(n_coarse: int, n_fine: int = PATCH_PX) -> np.ndarray:
    """(n_fine, n_coarse) Gaussian interpolation from coarse cell centres to fine pixels.

    Gaussian rather than bilinear weights: bilinear leaves visible diamond artefacts on a grid.
    """
    cell = n_fine / n_coarse
    u = (np.arange(n_fine) + 0.5) / cell - 0.5
    w = np.exp(-0.5 * ((u[:, None] - np.arange(n_coarse)[None, :]) / 0.6) ** 2)
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def _upsample(grid: np.ndarray) -> np.ndarray:
    """(n, gy, gx) coarse values to a smooth (n, 96, 96) field (two small matmuls)."""
    return _smoothing_matrix(grid.shape[1]) @ grid @ _smoothing_matrix(grid.shape[2]).T


def _upsample_aniso(rng: np.random.Generator, n: int) -> np.ndarray:
    """Collagen-fibre streaks: noise fine across and coarse along the fibres, in two directions."""
    streaks = _upsample(rng.standard_normal((n, 32, 4), dtype=np.float32))
    across = rng.random(n) < 0.5
    streaks[across] = streaks[across].transpose(0, 2, 1)
    return streaks / (streaks.std(axis=(1, 2), keepdims=True) + 1e-6)


@cache
def _normal_bank() -> _SpriteBank:
    """Lymphocytes (small, round, uniformly dark) and stromal spindle nuclei (thin, elongated)."""
    rng = np.random.default_rng(_SPRITE_BANK_SEED)
    k = 48
    spindle = rng.random(k) < 0.25
    r = rng.uniform(2.0, 3.2, k)
    rx = np.where(spindle, rng.uniform(3.0, 3.5, k), r)
    ry = np.where(spindle, rng.uniform(1.0, 1.5, k), r * rng.uniform(0.8, 1.0, k))
    return _build_bank(
        rng,
        _NORMAL_CELL_PX,
        rx,
        ry,
        irregularity=0.04,
        conc=rng.uniform(1.3, 1.8, k),
        vesicular=False,
    )


@cache
def _tumour_bank() -> _SpriteBank:
    """Carcinoma nuclei: larger, pleomorphic (varied size, lumpy outline), coarse chromatin,
    a dark rim and a nucleolus."""
    rng = np.random.default_rng(_SPRITE_BANK_SEED + 1)
    k = 32
    r = rng.uniform(3.6, 5.2, k)
    aspect = rng.uniform(0.65, 1.0, k)
    return _build_bank(
        rng,
        _TUMOUR_CELL_PX,
        r,
        r * aspect,
        irregularity=0.14,
        conc=rng.uniform(1.6, 2.3, k),
        vesicular=True,
    )


def _build_bank(
    rng: np.random.Generator,
    cell_px: int,
    radius_x: np.ndarray,
    radius_y: np.ndarray,
    irregularity: float,
    conc: np.ndarray,
    vesicular: bool,
) -> _SpriteBank:
    """Render k nucleus shapes at every integer offset in a cell, in a 2c x 2c window."""
    k, c, w = len(conc), cell_px, 2 * cell_px
    edge_px = 1.2  # anti-aliased border width
    # Lumpy outline: boundary radius 1 + sum_m a_m cos(m*phi + p_m) in the ellipse's own frame.
    harmonics = np.arange(2, 6)
    amp = rng.uniform(0.3, 1.0, (k, len(harmonics))) * irregularity
    phase = rng.uniform(0.0, 2.0 * np.pi, (k, len(harmonics)))
    # Shrink shapes whose lumpiest point would not fit between centre and window edge.
    reach_px = np.maximum(radius_x, radius_y) * (1.0 + amp.sum(axis=1)) + edge_px / 2
    shrink = np.minimum(1.0, (c / 2 + 0.5 - 0.2) / reach_px)
    radius_x, radius_y = radius_x * shrink, radius_y * shrink
    theta = rng.uniform(0.0, np.pi, k)

    off = np.arange(c)
    centre_y = (c / 2 + off + 0.5)[:, None].repeat(c, axis=1).reshape(-1)  # (c*c,)
    centre_x = (c / 2 + off + 0.5)[None, :].repeat(c, axis=0).reshape(-1)
    pix = np.arange(w) + 0.5
    dy = pix[None, :, None] - centre_y[:, None, None]  # (c*c, w, 1)
    dx = pix[None, None, :] - centre_x[:, None, None]  # (c*c, 1, w)

    def per_shape(a: np.ndarray) -> np.ndarray:
        return a[:, None, None, None]

    cos_t, sin_t = per_shape(np.cos(theta)), per_shape(np.sin(theta))
    u = (dx * cos_t + dy * sin_t) / per_shape(radius_x)  # (k, c*c, w, w)
    v = (-dx * sin_t + dy * cos_t) / per_shape(radius_y)
    r_norm = np.hypot(u, v)
    phi = np.arctan2(v, u)
    boundary = 1.0 + sum(
        per_shape(amp[:, i]) * np.cos(m * phi + per_shape(phase[:, i]))
        for i, m in enumerate(harmonics)
    )
    mean_r = per_shape(np.sqrt(radius_x * radius_y))
    inside_px = (boundary - r_norm) * mean_r  # approximate distance inside the outline
    alpha = np.clip(inside_px / edge_px + 0.5, 0.0, 1.0)

    # Chromatin texture: a few fixed-phase waves in the nucleus frame (same for every offset).
    ux, vy = u * per_shape(radius_x), v * per_shape(radius_y)
    freq = rng.uniform(0.9, 1.6, (k, 3))
    wave_dir = rng.uniform(0.0, np.pi, (k, 3))
    wave_phase = rng.uniform(0.0, 2.0 * np.pi, (k, 3))
    texture = sum(
        np.cos(
            per_shape(freq[:, i])
            * (ux * per_shape(np.cos(wave_dir[:, i])) + vy * per_shape(np.sin(wave_dir[:, i])))
            + per_shape(wave_phase[:, i])
        )
        for i in range(3)
    )
    if vesicular:
        # Dark membrane, paler interior with coarse chromatin clumps, one dark nucleolus.
        rim = np.clip(1.0 - inside_px / 1.8, 0.0, 1.0)
        nucl_y, nucl_x = rng.uniform(-0.3, 0.3, (2, k))
        nucleolus = np.exp(-((u - per_shape(nucl_x)) ** 2 + (v - per_shape(nucl_y)) ** 2) / 0.04)
        profile = 0.72 + 0.4 * rim + 0.12 * texture + 0.45 * nucleolus
    else:
        profile = 1.0 + 0.04 * texture
    density = (alpha * per_shape(conc) * profile).astype(np.float32)
    mask = inside_px > 0.0
    return _SpriteBank(
        density=density,
        mask=mask,
        mean_density_per_cell_px=float(density.sum(axis=(2, 3)).mean() / (c * c)),
    )
