"""Tests for the synthetic PCAM generator: determinism, format, labels, metadata, geometry."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from pcam import synthetic
from pcam.h5io import SPLITS
from pcam.synthetic import generate_split, slide_ids_for

SLIDES = slide_ids_for("train", 4)


def _split(n=64, seed=0, hard=0.3, slides=SLIDES):
    return generate_split(n, slides, seed, hard)


def test_same_arguments_give_byte_identical_data():
    a, b = _split(n=300), _split(n=300)  # 300 spans two generation chunks
    assert a.x.tobytes() == b.x.tobytes()
    assert a.y.tobytes() == b.y.tobytes()
    for name in ("coord_y", "coord_x", "tumor_patch", "center_tumor_patch", "wsi"):
        assert np.array_equal(getattr(a.meta, name), getattr(b.meta, name)), name


def test_other_seed_or_other_slides_give_other_data():
    base = _split()
    assert not np.array_equal(base.x, _split(seed=1).x)
    # Splits are often generated with one seed: their slide ids alone must make them differ.
    assert not np.array_equal(base.x, _split(slides=slide_ids_for("test", 4)).x)


def test_shapes_and_dtypes():
    s = _split(n=10)
    assert s.x.shape == (10, 96, 96, 3) and s.x.dtype == np.uint8
    assert s.y.shape == (10,) and s.y.dtype == np.uint8
    assert set(np.unique(s.y)) <= {0, 1}
    m = s.meta
    assert len(m) == 10
    assert m.coord_y.dtype == np.int64 and m.coord_x.dtype == np.int64
    assert (m.coord_y >= 0).all() and (m.coord_x >= 0).all()
    assert m.tumor_patch.dtype == bool and m.center_tumor_patch.dtype == bool


def test_empty_split_is_well_formed():
    s = _split(n=0)
    assert s.x.shape == (0, 96, 96, 3) and s.y.shape == (0,) and len(s.meta) == 0


@pytest.mark.parametrize("n", [64, 65, 300])  # 300 spans two generation chunks
def test_labels_are_exactly_half_positive_and_shuffled(n):
    y = _split(n=n).y
    assert int(y.sum()) == n // 2
    assert not (y[: n // 2] == 1).all(), "positives must not all come first"


def test_meta_matches_labels_and_hard_negatives():
    s = _split(n=64, hard=0.25)
    m = s.meta
    assert np.array_equal(m.center_tumor_patch, s.y == 1)
    assert m.tumor_patch[s.y == 1].all()
    hard = m.tumor_patch & ~m.center_tumor_patch
    assert hard.sum() == round(0.25 * 32)
    assert not _split(n=64, hard=0.0).meta.tumor_patch[s.y == 0].any()


def test_patches_spread_evenly_over_the_given_slides():
    s = _split(n=66)
    names, counts = np.unique(s.meta.wsi, return_counts=True)
    assert set(names) == set(SLIDES)
    assert counts.max() - counts.min() <= 1


def test_slide_ids_are_disjoint_across_splits():
    ids = {split: set(slide_ids_for(split, 20)) for split in SPLITS}
    assert all(len(v) == 20 for v in ids.values())
    assert not ids["train"] & ids["valid"]
    assert not ids["train"] & ids["test"]
    assert not ids["valid"] & ids["test"]
    assert slide_ids_for("train", 4)[3] == "train_slide_003"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n": -1},
        {"slides": []},
        {"slides": ["a", "a"]},
        {"hard": 1.5},
        {"seed": -3},
    ],
)
def test_invalid_arguments_are_rejected(kwargs):
    with pytest.raises(ValueError):
        _split(**kwargs)


def test_unknown_split_is_rejected():
    with pytest.raises(ValueError):
        slide_ids_for("training", 3)


def test_tumour_pixels_touch_the_centre_iff_label_is_one():
    s = generate_split(256, SLIDES, 3, 0.5, keep_tumour_mask=True)
    mask = s.tumour_mask
    centre = mask[:, 32:64, 32:64].any(axis=(1, 2))
    assert np.array_equal(centre, s.y == 1)
    hard = s.meta.tumor_patch & ~s.meta.center_tumor_patch
    assert hard.any()
    assert mask[hard].any(axis=(1, 2)).all(), "hard negatives must show tumour (outer ring)"
    assert not mask[~s.meta.tumor_patch].any(), "plain negatives must have no tumour"
    # The mask is only a by-product: asking for it must not change the data.
    assert np.array_equal(s.x, generate_split(256, SLIDES, 3, 0.5).x)


def test_label_holds_even_when_the_nest_misses_the_centre(monkeypatch):
    # Shrink every nest to a speck in a corner: only the one nucleus each tumour patch is
    # guaranteed remains, and it alone must make positives positive and hard negatives tumorous.
    real_draw_nests = synthetic._draw_nests

    def speck_nests(rng, positive, hard):
        nests = real_draw_nests(rng, positive, hard)
        corner = np.full_like(nests.cy, 2.0)
        return dataclasses.replace(
            nests, cy=corner, cx=corner, radius=np.full_like(nests.radius, 0.1)
        )

    monkeypatch.setattr(synthetic, "_draw_nests", speck_nests)
    s = generate_split(64, SLIDES, 7, 1.0, keep_tumour_mask=True)
    mask = s.tumour_mask
    assert np.array_equal(mask[:, 32:64, 32:64].any(axis=(1, 2)), s.y == 1)
    assert np.array_equal(mask.any(axis=(1, 2)), s.meta.tumor_patch)
    assert s.meta.tumor_patch.all()


def test_tumour_nuclei_are_darker_than_their_patch():
    s = generate_split(32, SLIDES, 4, 0.0, keep_tumour_mask=True)
    mask = s.tumour_mask
    pos = np.flatnonzero(s.y == 1)
    lum = s.x[pos].astype(np.float32).mean(axis=-1)
    assert (lum[mask[pos]].mean()) < lum.mean() - 30


def test_patches_look_like_h_and_e():
    s = _split(n=128, hard=0.0, slides=slide_ids_for("valid", 8))
    x = s.x.astype(np.float32)
    mean_rgb = x.reshape(-1, 3).mean(axis=0)
    # Pink/purple tissue: green is absorbed most by both stains.
    assert mean_rgb[1] < mean_rgb[0] - 20 and mean_rgb[1] < mean_rgb[2] - 10
    lum = x.mean(axis=-1)
    glass = (lum > 200).mean(axis=(1, 2))
    assert (glass > 0.1).mean() > 0.15, "some patches must be partly empty glass"
    assert (glass < 0.02).mean() > 0.3, "most patches are mostly tissue"
    assert (lum < 110).mean(axis=(1, 2)).min() > 0, "every patch has dark nuclei"
    # Textured, not flat: pixel spread within patches well above the scanner noise.
    assert x.std(axis=(1, 2)).mean() > 15
    # Slides differ in darkness, so a "darkest slides" slice means something.
    slide_lum = [lum[s.meta.wsi == w].mean() for w in np.unique(s.meta.wsi)]
    assert max(slide_lum) - min(slide_lum) > 15


def test_mean_colour_alone_does_not_predict_the_label():
    s = generate_split(384, slide_ids_for("train", 8), 5, 0.2)
    features = s.x.reshape(len(s.x), -1, 3).astype(np.float64).mean(axis=1)
    scores = LogisticRegression().fit(features, s.y).decision_function(features)
    # In-sample, so an upper bound on what it can learn. About 0.56 as built; without the
    # haematoxylin budget (tumour simply added on top of normal tissue) it is about 0.67.
    assert roc_auc_score(s.y, scores) < 0.65


@pytest.mark.parametrize("shift_px", [0, 6])
def test_stamp_puts_each_nucleus_at_its_nominal_pixel(shift_px):
    c = synthetic._TUMOUR_CELL_PX
    bank = np.zeros((2, c * c, 2 * c, 2 * c), dtype=np.uint8)  # shape 0: a dot; shape 1: blank
    for oy in range(c):
        for ox in range(c):
            bank[0, oy * c + ox, c // 2 + oy, c // 2 + ox] = 1
    shape_idx = np.ones((1, 8, 8), dtype=np.intp)
    offset_idx = np.zeros((1, 8, 8), dtype=np.intp)
    shape_idx[0, 2, 5], offset_idx[0, 2, 5] = 0, 3 * c + 7
    img = synthetic._stamp(bank, shape_idx, offset_idx, c, shift_px)
    assert img.shape == (1, 96, 96)
    assert list(zip(*np.nonzero(img[0]), strict=True)) == [
        (2 * c + 3 + shift_px, 5 * c + 7 + shift_px)
    ]


def test_every_tumour_sprite_covers_its_centre_and_fits_its_window():
    bank = synthetic._sprite_bank(tumour=True)
    c = synthetic._TUMOUR_CELL_PX
    shapes = bank.mask[:-1]
    oy, ox = np.divmod(np.arange(c * c), c)
    assert shapes[:, np.arange(c * c), c // 2 + oy, c // 2 + ox].all()
    edges = shapes[..., 0, :], shapes[..., -1, :], shapes[..., :, 0], shapes[..., :, -1]
    assert not any(e.any() for e in edges), "a sprite touching its window edge was clipped"
    assert not bank.density_u8[-1].any() and not bank.mask[-1].any()
