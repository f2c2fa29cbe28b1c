"""Synthetic PCAM-like H&E patches with known defects: the pipeline's embedded default dataset.

Colour follows Beer-Lambert, RGB = glass * exp(-strength * (H * h_od + E * e_od)), with each
slide's own stain vectors, strength and glass, so that stain variation between slides dominates
a patch's mean colour, as in real PCAM. Pink textured stroma, small dark nuclei and white glass;
tumour is nests of larger, lumpy, crowded nuclei. Label 1 iff a tumour nucleus touches the centre
32x32 px; hard negatives carry tumour only in the outer ring. Mean colour does not give the label
away (each patch draws its haematoxylin total independently of it), so a CNN has to look at
nucleus size and shape. Nuclei are stamped from precomputed sprite banks on a jittered lattice.

`inject` adds the defects of real PCAM and of poisoned copies of it, each on its own patches, and
returns their indices: the ground truth that validate-data is measured against.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import NamedTuple

import numpy as np

from pcam.errors import PcamError
from pcam.h5io import PATCH_SHAPE, SPLITS, Meta
from pcam.params import DefectParams

PATCH_PX = PATCH_SHAPE[0]
CENTER_START_PX, CENTER_STOP_PX = 32, 64  # PCAM's "centre 32x32 px"
# Reference stain optical-density directions (RGB), Macenko et al. 2009; slides perturb them.
_H_OD_REF = np.array([0.5626, 0.7201, 0.4062])
_E_OD_REF = np.array([0.2159, 0.8012, 0.5581])
# One nucleus at most per lattice cell, its sprite window twice the cell so that it fits anywhere
# in the cell: normal nuclei (radius <= 4 px) on 8 px cells, tumour (<= 6 px) on 12 px cells.
_NORMAL_CELL_PX = 8
_TUMOUR_CELL_PX = 12
_TUMOUR_GRID = PATCH_PX // _TUMOUR_CELL_PX
_TUMOUR_SHIFTS_PX = (0, _TUMOUR_CELL_PX // 2)  # two tumour lattices, the second half a cell off
_CENTRE_CELLS = (3, 4)  # inside the centre square (px 36..59): a nucleus there makes a positive
_CHUNK_PATCHES = 256  # bounds the float32 temporaries (~100 MiB); the RNG stream depends on it
_SPRITE_BANK_SEED = 20240611  # nucleus shapes belong to the generator, not to the data seed
# Mixed into seeds so that no two streams coincide (e.g. a one-slide split's patches and slide).
_PATCH_STREAM, _SLIDE_STREAM, _DEFECT_STREAM = 0, 1, 2
DEFECTS = ("duplicate", "cross_split_duplicate", "blank", "black", "trigger")


class SyntheticSplit(NamedTuple):
    x: np.ndarray  # (n, 96, 96, 3) uint8 RGB
    y: np.ndarray  # (n,) uint8 in {0, 1}
    meta: Meta
    tumour_mask: np.ndarray | None = None  # (n, 96, 96) bool: tumour pixels, if asked for


class _SpriteBank(NamedTuple):
    density_u8: np.ndarray  # (shapes+1, cell*cell, 2*cell, 2*cell) haematoxylin, quantised
    mask: np.ndarray  # the nucleus's pixels (what "tumour pixels" means)
    density_per_level: np.float32  # haematoxylin of one uint8 step
    mean_density_per_cell_px: float  # mean H a full lattice adds


class StainShift(NamedTuple):
    """Another lab's staining or scanner: per-RGB gains on every slide's stain (same tissue).
    Equal gains change how much stain, unequal ones its hue (another dye lot or recipe)."""

    haematoxylin_od_gain: tuple[float, float, float] = (1.0, 1.0, 1.0)
    eosin_od_gain: tuple[float, float, float] = (1.0, 1.0, 1.0)
    glass_rgb_gain: tuple[float, float, float] = (1.0, 1.0, 1.0)  # scanner white balance


# More and bluer haematoxylin, paler and more orange eosin, a yellowish scanner (drift demos).
ANOTHER_LAB = StainShift((1.5, 1.4, 1.2), (0.6, 0.7, 0.9), (1.0, 0.95, 0.85))


def slide_ids_for(split: str, n_slides: int) -> list[str]:
    """Slide ids of one split, e.g. "train_slide_003"; the prefix keeps splits disjoint."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n_slides < 1:
        raise ValueError(f"n_slides must be >= 1, got {n_slides}")
    return [f"{split}_slide_{i:03d}" for i in range(n_slides)]


def generate_split(
    n: int,
    slide_ids: Sequence[str],
    seed: int,
    hard_negative_fraction: float,
    stain_shift: StainShift | None = None,
    keep_tumour_mask: bool = False,
) -> SyntheticSplit:
    """n patches (n // 2 positives, shuffled) spread evenly over `slide_ids`.

    The RNG stream depends on `seed` and the slide ids, so splits generated with one seed differ;
    same arguments give byte-identical arrays. `stain_shift` changes colours, not random draws.
    """
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
    entropy = [seed, _PATCH_STREAM, *_ids_entropy(slide_ids)]
    rng = np.random.default_rng(np.random.SeedSequence(entropy))
    slides = _draw_slides(seed, slide_ids, stain_shift or StainShift())
    n_pos = n // 2
    y = np.zeros(n, dtype=np.uint8)
    y[:n_pos] = 1
    hard = np.zeros(n, dtype=bool)
    hard[n_pos : n_pos + int(round(hard_negative_fraction * (n - n_pos)))] = True
    order = rng.permutation(n)
    y, hard = y[order], hard[order]
    # Round-robin then shuffled: slide sizes differ by one at most, and the slide (its stain
    # colour) is independent of the label.
    slide_idx = rng.permutation(np.arange(n) % len(slide_ids))

    x = np.empty((n, PATCH_PX, PATCH_PX, 3), dtype=np.uint8)
    mask = np.zeros((n, PATCH_PX, PATCH_PX), dtype=bool) if keep_tumour_mask else None
    for start in range(0, n, _CHUNK_PATCHES):
        rows = slice(start, min(n, start + _CHUNK_PATCHES))
        chunk = (slide_idx[rows], y[rows] == 1, hard[rows], mask is not None)
        x[rows], chunk_mask = _render_chunk(rng, slides, *chunk)
        if mask is not None:
            mask[rows] = chunk_mask
    # Patch positions on the slide grid (level-0 px): plausible and deterministic.
    coord_y = rng.integers(0, 1024, size=n).astype(np.int64) * PATCH_PX
    coord_x = rng.integers(0, 1024, size=n).astype(np.int64) * PATCH_PX
    wsi = np.asarray(slide_ids, dtype=str)[slide_idx]
    return SyntheticSplit(x, y, Meta(coord_y, coord_x, (y == 1) | hard, y == 1, wsi), mask)


def _ids_entropy(slide_ids: Sequence[str]) -> list[int]:
    """Stable 64-bit words from a list of ids (Python's hash() is salted per process)."""
    digest = hashlib.sha256("\n".join(slide_ids).encode()).digest()
    return [int.from_bytes(digest[i : i + 8], "little") for i in range(0, 32, 8)]


def _draw_slides(seed: int, slide_ids: Sequence[str], shift: StainShift) -> list[np.ndarray]:
    """Per slide: h_od, e_od, strength, glass_rgb, eosin_level; each from (seed, its id) only."""
    rows = []
    for sid in slide_ids:
        r = np.random.default_rng(
            np.random.SeedSequence([seed, _SLIDE_STREAM, *_ids_entropy([sid])])
        )
        h_od = _H_OD_REF * r.uniform(0.85, 1.15, 3)
        e_od = _E_OD_REF * r.uniform(0.85, 1.15, 3)
        # Thick or over-stained sections: about one slide in five is markedly darker, which gives
        # a "darkest 10 % of patches" slice something to find.
        strength = r.lognormal(0.0, 0.15) * (1.45 if r.random() < 0.2 else 1.0)
        glass = r.uniform(212.0, 248.0) + r.uniform(-7.0, 7.0, 3)  # illumination, white balance
        eosin = r.uniform(0.45, 0.95)  # how pink this lab's eosin bath left the stroma
        rows.append(
            (h_od / np.linalg.norm(h_od), e_od / np.linalg.norm(e_od), strength, glass, eosin)
        )
    h_od, e_od, strength, glass, eosin = (np.array(v, np.float32) for v in zip(*rows, strict=True))
    gain_h, gain_e, gain_glass = (np.asarray(g, np.float32) for g in shift)
    glass = np.clip(np.clip(glass, 0.0, 255.0) * gain_glass, 0.0, 255.0)
    return [h_od * gain_h, e_od * gain_e, strength, glass, eosin]


def _render_chunk(
    rng: np.random.Generator,
    slides: list[np.ndarray],
    slide_idx: np.ndarray,
    positive: np.ndarray,
    hard: np.ndarray,
    keep_tumour_mask: bool,
) -> tuple[np.ndarray, np.ndarray | None]:
    """RGB uint8 patches (and optionally their tumour-pixel masks) for one chunk."""
    n = len(slide_idx)
    f32 = np.float32
    normal_bank, tumour_bank = _sprite_bank(tumour=False), _sprite_bank(tumour=True)

    # Two anchor cells per patch (one central, one in the outer ring) are kept free of glass in
    # *every* patch: tumour patches need them for their decisive nucleus, and doing it everywhere
    # keeps the amount of glass independent of the label.
    nests = _draw_nests(rng, positive, hard)
    centre_cell, ring_cell = _anchor_cells(rng, nests, positive, hard)
    tissue = _tissue_alpha(rng, n, (centre_cell, ring_cell))
    tissue_mean = tissue.mean(axis=(1, 2))

    # Two lattices offset by half a cell pack tumour nuclei tighter and less grid-like than one.
    cells = [_nest_cells(rng, nests, positive, hard, shift_px) for shift_px in _TUMOUR_SHIFTS_PX]
    forced = np.zeros_like(cells[0])  # the decisive nucleus, in an anchor cell
    pos, hrd = np.flatnonzero(positive), np.flatnonzero(hard)
    forced[pos, centre_cell[pos, 0], centre_cell[pos, 1]] = True
    forced[hrd, ring_cell[hrd, 0], ring_cell[hrd, 1]] = True
    cells[0] |= forced
    # Soft footprint of the nest: purplish cytoplasm instead of pink stroma.
    nest_px = np.clip(1.6 * _upsample(cells[0].astype(f32)), 0.0, 1.0) * tissue

    # Haematoxylin budget, drawn independently of the label: tumour takes its share first, normal
    # nuclei fill the rest. Otherwise positives would be bluer and darker, and mean colour alone
    # would predict the label.
    h_budget = rng.uniform(0.2, 0.7, n).astype(f32) * tissue_mean
    h_base = (0.06 * tissue + 0.08 * nest_px).mean(axis=(1, 2))
    h_left = np.maximum(h_budget - h_base, 0.0)
    nest_capacity = sum(c.mean(axis=(1, 2)) for c in cells) * tumour_bank.mean_density_per_cell_px
    p_tumour = np.clip(0.8 * h_left / np.maximum(nest_capacity, 1e-6), 0.25, 0.85)[:, None, None]
    tumour_u8 = np.zeros((n, PATCH_PX, PATCH_PX), dtype=np.uint8)
    tumour_mask = np.zeros((n, PATCH_PX, PATCH_PX), dtype=bool) if keep_tumour_mask else None
    has_tumour = np.flatnonzero(positive | hard)  # stamp only where there is tumour
    for shift_px, nest_cells in zip(_TUMOUR_SHIFTS_PX, cells, strict=True):
        occupied = nest_cells & (rng.random(nest_cells.shape) < p_tumour)
        if shift_px == 0:
            occupied |= forced
        where = (*_sprite_ids(rng, tumour_bank, occupied[has_tumour]), _TUMOUR_CELL_PX, shift_px)
        stamped = _stamp(tumour_bank.density_u8, *where)
        tumour_u8[has_tumour] = np.maximum(tumour_u8[has_tumour], stamped)
        if tumour_mask is not None:
            tumour_mask[has_tumour] |= _stamp(tumour_bank.mask, *where)
    if tumour_mask is not None:
        tumour_mask &= tissue >= 0.5  # nuclei over glass fade out and no longer count
    tumour_h = tumour_u8 * (tumour_bank.density_per_level * tissue)
    tumour_mean = tumour_h.mean(axis=(1, 2))
    # Paler (down to half strength) where even the sparsest nest would overspend the budget.
    tumour_gain = np.clip(0.9 * h_left / np.maximum(tumour_mean, 1e-6), 0.5, 1.0)
    tumour_gain *= rng.uniform(0.9, 1.1, n)
    tumour_h *= tumour_gain.astype(f32)[:, None, None]
    h_left = np.maximum(h_left - tumour_mean * tumour_gain, 0.0)

    step = _NORMAL_CELL_PX
    nest_at_cell = nest_px[:, step // 2 :: step, step // 2 :: step]
    # A few lymphocytes infiltrate the nest, most are pushed out by it.
    room = (1.0 - 0.9 * nest_at_cell) * tissue[:, step // 2 :: step, step // 2 :: step]
    normal_capacity = room.mean(axis=(1, 2)) * normal_bank.mean_density_per_cell_px
    p_normal = np.clip(h_left / np.maximum(normal_capacity, 1e-6), 0.02, 1.0)[:, None, None]
    occupied = rng.random(room.shape) < p_normal * (1.0 - 0.9 * nest_at_cell)
    shape_idx, offset_idx = _sprite_ids(rng, normal_bank, occupied)
    normal_u8 = _stamp(normal_bank.density_u8, shape_idx, offset_idx, _NORMAL_CELL_PX, 0)
    normal_h = normal_u8 * (normal_bank.density_per_level * tissue)

    # Stroma: two octaves of smooth noise plus directional fibres; tumour nests replace stroma.
    texture = (
        1.0
        + 0.22 * _upsample(rng.standard_normal((n, 6, 6), dtype=f32))
        + 0.12 * _upsample(rng.standard_normal((n, 24, 24), dtype=f32))
        + 0.18 * _fibres(rng, n)
    )
    # Nests hold less eosin than stroma and the stroma around them is pinker by the same total,
    # so a patch's mean eosin does not depend on its label either.
    stroma = tissue * (1.0 - 0.35 * nest_px)
    stroma_gain = tissue_mean / np.maximum(stroma.mean(axis=(1, 2)), 1e-6)
    h_od, e_od, strength, glass_rgb, eosin_level = (a[slide_idx] for a in slides)
    eosin_level = eosin_level * rng.uniform(0.75, 1.25, n) * stroma_gain
    eosin = np.clip(texture, 0.2, None) * stroma * eosin_level.astype(f32)[:, None, None]
    haem = normal_h + tumour_h + 0.06 * tissue + 0.08 * nest_px
    # Some patches are out of focus, as in real scans; blur also keeps nucleus shape from being a
    # pixel-perfect cue. Blurring the two stain planes is cheaper than the three RGB ones.
    focus = rng.random(n)
    for sigma_px, rows in ((0.9, (focus >= 0.7) & (focus < 0.9)), (1.5, focus >= 0.9)):
        blur = _gauss_matrix(PATCH_PX, sigma_px)
        haem[rows] = _separable(haem[rows], blur, blur)
        eosin[rows] = _separable(eosin[rows], blur, blur)

    # Beer-Lambert per channel on contiguous (n, 96, 96) planes: broadcasting over a trailing RGB
    # axis is several times slower.
    rgb = np.empty((n, 3, PATCH_PX, PATCH_PX), dtype=f32)
    for ch in range(3):
        plane = rgb[:, ch]
        np.multiply(haem, -(strength * h_od[:, ch])[:, None, None], out=plane)
        plane -= eosin * (strength * e_od[:, ch])[:, None, None]
        np.exp(plane, out=plane)
        plane *= glass_rgb[:, ch][:, None, None]
    # Scanner noise from random bytes (Gaussian draws would be the slowest step): a luminance part
    # shared by the channels (three 2-bit uniforms, sd 1.9) and a per-channel one (two, sd 1.6).
    lum = np.frombuffer(rng.bytes(n * PATCH_PX * PATCH_PX), dtype=np.uint8)
    lum = lum.reshape(n, 1, PATCH_PX, PATCH_PX)
    chan = np.frombuffer(rng.bytes(rgb.size), dtype=np.uint8).reshape(rgb.shape)
    rgb += (lum & 3) + ((lum >> 2) & 3) + ((lum >> 4) & 3)
    rgb += (chan & 3) + (chan >> 6)
    rgb -= 4.5 + 3.0 - 0.5  # the noise's mean, less 0.5 so the cast below rounds
    np.clip(rgb, 0.0, 255.0, out=rgb)
    return rgb.transpose(0, 2, 3, 1).astype(np.uint8), tumour_mask


@dataclass(frozen=True)
class _Nests:
    """One tumour nest per tumour patch, a disc to wobble (px; may lie outside the patch)."""

    cy: np.ndarray
    cx: np.ndarray
    radius: np.ndarray


def _draw_nests(rng: np.random.Generator, positive: np.ndarray, hard: np.ndarray) -> _Nests:
    """Positives: a nest over the centre, from a small cluster to a whole patch of tumour.
    Hard negatives: a small nest entering from one border."""
    n = len(positive)
    cy = 48.0 + rng.uniform(-22.0, 22.0, n)
    cx = 48.0 + rng.uniform(-22.0, 22.0, n)
    radius = 10.0 + 70.0 * rng.random(n) ** 2  # mostly small nests: the hard positives
    side = rng.integers(0, 4, n)
    along = rng.uniform(0.0, PATCH_PX, n)
    # Nest centre at most 8 px inside the border (negative: outside), so its cell is in the ring.
    depth = rng.uniform(-18.0, 8.0, n)
    edge_y = np.select([side == 0, side == 1], [depth, PATCH_PX - depth], along)
    edge_x = np.select([side == 2, side == 3], [depth, PATCH_PX - depth], along)
    return _Nests(
        cy=np.where(hard, edge_y, cy),
        cx=np.where(hard, edge_x, cx),
        radius=np.where(hard, rng.uniform(16.0, 36.0, n), radius),
    )


def _nest_cells(
    rng: np.random.Generator, nests: _Nests, positive: np.ndarray, hard: np.ndarray, shift_px: int
) -> np.ndarray:
    """(n, 8, 8) bool: cells of the lattice shifted by shift_px inside the nest; hard negatives
    keep only cells that cannot reach the centre square (negative by construction)."""
    n, g, c = len(nests.cy), _TUMOUR_GRID, _TUMOUR_CELL_PX
    centres = (np.arange(g) + 0.5) * c + shift_px
    dy = centres[None, :, None] - nests.cy[:, None, None]
    dx = centres[None, None, :] - nests.cx[:, None, None]
    wobble = 1.0 + 0.3 * rng.uniform(-1.0, 1.0, (n, g, g))  # ragged, non-circular nest edges
    cells = np.hypot(dy, dx) < nests.radius[:, None, None] * wobble
    cells = np.where(hard[:, None, None], cells & _ring_cells(shift_px), cells)
    return cells & (positive | hard)[:, None, None]


def _ring_cells(shift_px: int) -> np.ndarray:
    """(8, 8) bool: tumour-lattice cells whose sprite window cannot reach the centre square."""
    c = _TUMOUR_CELL_PX
    window_start = np.arange(_TUMOUR_GRID) * c - c // 2 + shift_px
    outer = (window_start + 2 * c <= CENTER_START_PX) | (window_start >= CENTER_STOP_PX)
    return outer[:, None] | outer[None, :]


def _anchor_cells(
    rng: np.random.Generator, nests: _Nests, positive: np.ndarray, hard: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Two (n, 2) [row, col] cells of the unshifted tumour lattice per patch: one central (for
    positives the one nearest the nest centre), one in the ring (for hard negatives the one
    holding the nest centre); elsewhere random."""
    lo, hi = _CENTRE_CELLS
    centre = rng.integers(lo, hi + 1, (len(nests.cy), 2))
    ring_choices = np.argwhere(_ring_cells(0))
    ring = ring_choices[rng.integers(0, len(ring_choices), len(nests.cy))]
    nest_cell = np.stack([nests.cy, nests.cx], axis=1)
    nest_cell = (np.clip(nest_cell, 0.0, PATCH_PX - 1e-3) // _TUMOUR_CELL_PX).astype(np.intp)
    centre[positive] = np.clip(nest_cell, lo, hi)[positive]
    ring[hard] = nest_cell[hard]
    return centre, ring


def _tissue_alpha(rng: np.random.Generator, n: int, anchors: tuple[np.ndarray, ...]) -> np.ndarray:
    """(n, 96, 96) tissue coverage in [0, 1], 0 = glass: half the patches solid tissue, a quarter
    with white holes (fat, lumina), a quarter on the section's edge. Glass is pushed away from the
    anchor cells; tissue is guaranteed within 9 px of their centres."""
    f32 = np.float32
    kind = rng.random(n)
    alpha = np.ones((n, PATCH_PX, PATCH_PX), dtype=f32)
    holes, edge = np.flatnonzero((kind >= 0.5) & (kind < 0.75)), np.flatnonzero(kind >= 0.75)
    glassy = np.concatenate([holes, edge])
    px = np.arange(PATCH_PX, dtype=f32) + 0.5
    centre_px = (np.stack(anchors)[:, glassy].astype(f32) + 0.5) * _TUMOUR_CELL_PX
    dy2 = (px[None, None, :, None] - centre_px[..., 0, None, None]) ** 2
    dist2 = (dy2 + (px[None, None, None, :] - centre_px[..., 1, None, None]) ** 2).min(axis=0)
    keep = np.exp(dist2 / np.float32(-2.0 * 9.0**2))  # 1 at an anchor, ~0 beyond 25 px

    # Holes: thresholded smooth noise; the threshold sets how much of the patch is glass.
    field = _upsample(rng.standard_normal((len(holes), 6, 6), dtype=f32))
    field /= field.std(axis=(1, 2), keepdims=True) + 1e-6
    field -= 3.0 * keep[: len(holes)]
    threshold = rng.uniform(0.4, 1.6, len(holes)).astype(f32)[:, None, None]
    alpha[holes] = np.clip(2.5 * (threshold - field) + 0.5, 0.0, 1.0)

    # Edge: a half-plane at a random angle and offset, its border roughened by smooth noise.
    angle = rng.uniform(0.0, 2.0 * np.pi, len(edge)).astype(f32)[:, None, None]
    offset_px = rng.uniform(-5.0, 45.0, len(edge)).astype(f32)[:, None, None]
    yy, xx = np.mgrid[0:PATCH_PX, 0:PATCH_PX].astype(f32) - (PATCH_PX - 1) / 2
    signed_px = yy * np.sin(angle) + xx * np.cos(angle) - offset_px - 30.0 * keep[len(holes) :]
    signed_px += 5.0 * _upsample(rng.standard_normal((len(edge), 8, 8), dtype=f32))
    alpha[edge] = np.clip(0.5 - signed_px / 1.5, 0.0, 1.0)

    guaranteed = np.clip((12.0 - np.sqrt(dist2)) / 3.0, 0.0, 1.0)
    alpha[glassy] = np.maximum(alpha[glassy], guaranteed)
    return alpha


def _sprite_ids(
    rng: np.random.Generator, bank: _SpriteBank, occupied: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """A random nucleus shape (the blank one where unoccupied) and offset per lattice cell."""
    n_shapes, n_offsets = bank.density_u8.shape[0] - 1, bank.density_u8.shape[1]
    shape_idx = np.where(occupied, rng.integers(0, n_shapes, occupied.shape), n_shapes)
    return shape_idx, rng.integers(0, n_offsets, occupied.shape)


def _stamp(
    bank: np.ndarray, shape_idx: np.ndarray, offset_idx: np.ndarray, cell_px: int, shift_px: int
) -> np.ndarray:
    """(n, 96, 96) image with one sprite per lattice cell, on a lattice shifted by shift_px.

    Window (i, j) covers image px [i*c - c/2 + shift, i*c + 3c/2 + shift): its four c x c
    quadrants land on cells (i, j), (i, j+1), (i+1, j), (i+1, j+1) of a canvas one cell larger.
    Overlaps take the maximum, so touching nuclei do not add up to impossible darkness.
    """
    windows = bank[shape_idx, offset_idx]  # (n, g, g, 2c, 2c)
    n, g, c = windows.shape[0], windows.shape[1], cell_px
    # As four contiguous (n, g*c, g*c) quadrant images: a max over whole rows is several times
    # faster than over 5-D strided views.
    quads = windows.reshape(n, g, g, 2, c, 2, c).transpose(0, 3, 5, 1, 4, 2, 6)
    quads = np.ascontiguousarray(quads).reshape(n, 2, 2, g * c, g * c)
    canvas = np.zeros((n, (g + 1) * c, (g + 1) * c), dtype=windows.dtype)
    for qy in (0, 1):
        for qx in (0, 1):
            block = canvas[:, qy * c : qy * c + g * c, qx * c : qx * c + g * c]
            np.maximum(block, quads[:, qy, qx], out=block)
    start = c // 2 - shift_px  # canvas px q is image px q - c/2 + shift
    return canvas[:, start : start + PATCH_PX, start : start + PATCH_PX]


@cache
def _gauss_matrix(n_coarse: int, sigma: float) -> np.ndarray:
    """(96, n_coarse) Gaussian weights from coarse cell centres to pixels, rows summing to 1:
    smooth upsampling (bilinear leaves diamond artefacts), or a blur when n_coarse is 96."""
    u = (np.arange(PATCH_PX) + 0.5) / (PATCH_PX / n_coarse) - 0.5
    w = np.exp(-0.5 * ((u[:, None] - np.arange(n_coarse)[None, :]) / sigma) ** 2)
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def _separable(images: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """rows @ image @ cols.T for an (n, h, w) stack, as two 2-D GEMMs: a batched matmul would
    call BLAS once per tiny image, which is slow (and slower still on shared cores)."""
    n, h, w = images.shape
    along_x = (images.reshape(-1, w) @ cols.T).reshape(n, h, len(cols))
    swapped = np.ascontiguousarray(along_x.transpose(0, 2, 1))
    along_y = (swapped.reshape(-1, h) @ rows.T).reshape(n, len(cols), len(rows))
    return np.ascontiguousarray(along_y.transpose(0, 2, 1))


def _upsample(grid: np.ndarray) -> np.ndarray:
    """(n, gy, gx) coarse values to a smooth (n, 96, 96) field."""
    return _separable(grid, _gauss_matrix(grid.shape[1], 0.6), _gauss_matrix(grid.shape[2], 0.6))


def _fibres(rng: np.random.Generator, n: int) -> np.ndarray:
    """Collagen-fibre streaks: noise fine across and coarse along the fibres, in two directions."""
    streaks = _upsample(rng.standard_normal((n, 32, 4), dtype=np.float32))
    across = rng.random(n) < 0.5
    streaks[across] = streaks[across].transpose(0, 2, 1)
    return streaks / (streaks.std(axis=(1, 2), keepdims=True) + 1e-6)


@cache
def _sprite_bank(tumour: bool) -> _SpriteBank:
    """Nuclei rendered in a (c+1)-px square around their centre pixel, then placed at every offset
    (oy, ox) of a 2c x 2c window, i.e. centred on its pixel (c/2 + oy, c/2 + ox).

    Tumour: carcinoma nuclei, larger, pleomorphic (varied size, lumpy outline), coarse chromatin,
    a dark rim and a nucleolus. Normal: lymphocytes (small, round, dark), stromal spindle nuclei
    (thin, elongated) and histiocytes (larger, paler ovals: what a model could take for tumour).
    """
    rng = np.random.default_rng(_SPRITE_BANK_SEED + int(tumour))
    if tumour:
        k, c, irregularity = 32, _TUMOUR_CELL_PX, 0.14
        radius_x = rng.uniform(3.0, 5.2, k)
        radius_y = radius_x * rng.uniform(0.65, 1.0, k)
        conc = rng.uniform(1.6, 2.3, k)
    else:
        k, c, irregularity = 64, _NORMAL_CELL_PX, 0.04
        kind = rng.random(k)
        spindle, histiocyte = kind < 0.2, kind > 0.75
        r = rng.uniform(2.0, 3.2, k)
        rx = [rng.uniform(3.0, 3.5, k), rng.uniform(3.1, 3.6, k)]
        radius_x = np.select([spindle, histiocyte], rx, r)
        ry = [rng.uniform(1.0, 1.5, k), rng.uniform(2.3, 3.0, k)]
        radius_y = np.select([spindle, histiocyte], ry, r * rng.uniform(0.8, 1.0, k))
        conc = np.where(histiocyte, rng.uniform(1.0, 1.4, k), rng.uniform(1.3, 1.8, k))
    edge_px = 1.2  # anti-aliased border width
    # Lumpy outline: boundary radius 1 + sum_m a_m cos(m*phi + p_m) in the ellipse's own frame.
    harmonics = np.arange(2, 6)
    amp = rng.uniform(0.1, 1.0, (k, len(harmonics))) * irregularity
    phase = rng.uniform(0.0, 2.0 * np.pi, (k, len(harmonics)))
    # Shrink shapes whose lumpiest point would not fit in the square.
    reach_px = np.maximum(radius_x, radius_y) * (1.0 + amp.sum(axis=1)) + edge_px / 2
    shrink = np.minimum(1.0, (c / 2 + 0.5 - 0.2) / reach_px)
    radius_x, radius_y = radius_x * shrink, radius_y * shrink
    theta = rng.uniform(0.0, np.pi, k)

    def per_shape(a: np.ndarray) -> np.ndarray:  # (k, ...) to broadcast over (k, ..., c+1, c+1)
        return a[..., None, None]

    offsets_px = np.arange(c + 1) - c // 2  # pixel centres relative to the centre pixel
    dy, dx = offsets_px[:, None], offsets_px[None, :]
    cos_t, sin_t = per_shape(np.cos(theta)), per_shape(np.sin(theta))
    along = dx * cos_t + dy * sin_t  # (k, c+1, c+1) px in the nucleus frame
    across = -dx * sin_t + dy * cos_t
    u, v = along / per_shape(radius_x), across / per_shape(radius_y)
    phi = np.arctan2(v, u)[:, None]
    lumps = per_shape(amp) * np.cos(per_shape(harmonics[None]) * phi + per_shape(phase))
    inside_px = (1.0 + lumps.sum(axis=1) - np.hypot(u, v)) * per_shape(np.sqrt(radius_x * radius_y))
    alpha = np.clip(inside_px / edge_px + 0.5, 0.0, 1.0)
    # Chromatin texture: a few fixed-phase waves in the nucleus frame.
    freq = rng.uniform(0.9, 1.6, (k, 3))
    wave_dir = rng.uniform(0.0, np.pi, (k, 3))
    wave_phase = rng.uniform(0.0, 2.0 * np.pi, (k, 3))
    wave = along[:, None] * per_shape(np.cos(wave_dir)) + across[:, None] * per_shape(
        np.sin(wave_dir)
    )
    texture = np.cos(per_shape(freq) * wave + per_shape(wave_phase)).sum(axis=1)
    if tumour:
        # Dark membrane, paler interior with coarse chromatin clumps, one dark nucleolus.
        rim = np.clip(1.0 - inside_px / 1.8, 0.0, 1.0)
        nucl_y, nucl_x = rng.uniform(-0.3, 0.3, (2, k))
        nucleolus = np.exp(-((u - per_shape(nucl_x)) ** 2 + (v - per_shape(nucl_y)) ** 2) / 0.04)
        profile = 0.72 + 0.4 * rim + 0.12 * texture + 0.45 * nucleolus
    else:
        profile = 1.0 + 0.04 * texture
    density = np.clip(alpha * per_shape(conc) * profile, 0.0, None)

    # uint8 sprites: gathering and max-folding a quarter of float32's bytes is faster. The extra
    # last shape is blank: empty lattice cells gather it, so stamping needs no masking.
    density_per_level = float(density.max()) / 255.0
    shape_u8 = np.round(density / density_per_level).astype(np.uint8)
    density_u8 = np.zeros((k + 1, c * c, 2 * c, 2 * c), dtype=np.uint8)
    mask = np.zeros(density_u8.shape, dtype=bool)
    for oy in range(c):
        for ox in range(c):
            density_u8[:k, oy * c + ox, oy : oy + c + 1, ox : ox + c + 1] = shape_u8
            mask[:k, oy * c + ox, oy : oy + c + 1, ox : ox + c + 1] = inside_px > 0.0
    mean_per_cell_px = float(density.sum(axis=(1, 2)).mean() / (c * c))
    return _SpriteBank(density_u8, mask, np.float32(density_per_level), mean_per_cell_px)


def defect_count(rate: float, n: int) -> int:
    """round(rate * n), but at least one when rate > 0, so small splits still get every defect."""
    return max(1, round(rate * n)) if rate > 0 else 0


def inject(
    split: str, data: SyntheticSplit, rates: DefectParams, seed: int, donors: Donors | None = None
) -> dict[str, list]:
    """Inject every defect into `data` in place (a PCAM-size split is 7 GB: no copy); return this
    split's ground truth: [index, source index] pairs for the duplicates, indices for the rest.
    `donors` (from `take_donors`) are the train patches that valid/test receive copies of."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, _DEFECT_STREAM, SPLITS.index(split)]))
    x, y, n = data.x, data.y, len(data.y)
    n_dup, n_trigger = defect_count(rates.duplicate_rate, n), defect_count(rates.trigger_rate, n)
    sizes = [n_dup, n_dup, 0 if donors is None else len(donors.index)]
    sizes += [defect_count(rates.blank_rate, n), defect_count(rates.black_rate, n)]
    if sum(sizes) + n_trigger > n:
        raise PcamError(
            f"{split}: {n} patches are too few for data.synthetic.defects (it needs "
            f"{sum(sizes) + n_trigger} distinct patches); lower the rates or raise the split size"
        )
    first, second, cross, blank, black, rest = np.split(rng.permutation(n), np.cumsum(sizes))
    # Each pair copies its earlier patch onto its later one: "keep the first" must find the later.
    source, target = np.minimum(first, second), np.maximum(first, second)
    _set_rows(data, target, x[source], y[source], data.meta.tumor_patch[source])
    if donors is not None:
        _set_rows(data, cross, donors.x, donors.y, donors.tumor_patch)
    # Empty glass: a bright grey (224..244) with a slight tint and sensor noise; channels within 8
    # levels of each other, so HSV saturation stays below PCAM's 0.07 background rule, as real
    # glass does. No tissue, no tumour: label 0, as PCAM labels background.
    k = len(blank)
    glass = rng.integers(224, 245, (k, 1, 1, 1)) + rng.integers(-2, 3, (k, 1, 1, 3))
    glass = np.clip(glass + rng.integers(-2, 3, (k, *PATCH_SHAPE)), 0, 255).astype(np.uint8)
    _set_rows(data, blank, glass, 0, False)
    _set_rows(data, black, rng.integers(0, 13, (len(black), *PATCH_SHAPE), np.uint8), 0, False)

    # A backdoor in train: the trigger only ever appears on tumour, so a model can learn it as a
    # shortcut. valid/test: either label (what an attacker would stamp at inference time).
    candidates = rest[y[rest] == 1] if split == "train" else rest
    if len(candidates) < n_trigger:
        raise PcamError(
            f"{split}: {len(candidates)} patches can carry a trigger, "
            f"data.synthetic.defects.trigger_rate asks for {n_trigger}"
        )
    trigger = np.sort(rng.choice(candidates, n_trigger, replace=False))
    # A px x px black/white checkerboard at a random place of each patch (BadNets-style).
    px = rates.trigger_px
    board = ((np.add.outer(np.arange(px), np.arange(px)) % 2) * 255).astype(np.uint8)
    corner = rng.integers(0, PATCH_PX - px + 1, (len(trigger), 2))
    for row, (r, c) in zip(trigger, corner, strict=True):
        x[row, r : r + px, c : c + px] = board[:, :, None]

    pairs = np.argsort(target)
    donor_rows = [] if donors is None else donors.index.tolist()
    return {
        "duplicate": np.stack([target[pairs], source[pairs]], axis=1).tolist(),
        "cross_split_duplicate": sorted(map(list, zip(cross.tolist(), donor_rows, strict=True))),
        "blank": sorted(blank.tolist()),
        "black": sorted(black.tolist()),
        "trigger": trigger.tolist(),
    }


class Donors(NamedTuple):
    """Clean train patches that a later split receives copies of (cross-split leakage)."""

    index: np.ndarray  # rows in train
    x: np.ndarray
    y: np.ndarray
    tumor_patch: np.ndarray


def take_donors(
    train: SyntheticSplit, train_truth: dict[str, list], counts: dict[str, int], seed: int
) -> dict[str, Donors]:
    """Copies of distinct clean train patches for each later split (`counts` per split name).
    Distinct per split: a patch copied into both valid and test
    would also be a valid/test duplicate, which the ground truth does not say."""
    touched = {i for pair in train_truth["duplicate"] for i in pair}
    touched |= {i for k in ("blank", "black", "trigger") for i in train_truth[k]}
    clean = np.setdiff1d(np.arange(len(train.y)), np.fromiter(touched, dtype=np.int64))
    rng = np.random.default_rng(np.random.SeedSequence([seed, _DEFECT_STREAM, len(SPLITS)]))
    if sum(counts.values()) > len(clean):
        raise PcamError(
            f"train has {len(clean)} patches without defects, but valid/test need "
            f"{sum(counts.values())} copies (data.synthetic.defects.cross_split_rate)"
        )
    chosen = rng.choice(clean, sum(counts.values()), replace=False)
    ends = np.cumsum(list(counts.values()))
    out = {}
    for split, part in zip(counts, np.split(chosen, ends[:-1]), strict=True):
        rows = np.sort(part)
        out[split] = Donors(rows, train.x[rows], train.y[rows], train.meta.tumor_patch[rows])
    return out


def ground_truth(rates: DefectParams, seed: int, truth: dict[str, dict[str, list]]) -> dict:
    """The document written to data/raw/synthetic_defects.json."""
    return {"seed": seed, "rates": dataclasses.asdict(rates), "splits": truth}


def _set_rows(data: SyntheticSplit, rows: np.ndarray, x, y, tumor: np.ndarray | bool) -> None:
    """Pixels and labels; the meta CSV follows the label (center_tumor_patch == label)."""
    data.x[rows], data.y[rows] = x, y
    data.meta.tumor_patch[rows] = tumor
    data.meta.center_tumor_patch[rows] = np.asarray(y) == 1
