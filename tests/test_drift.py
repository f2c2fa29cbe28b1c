"""Drift check: stain features, PSI, the training reference, and the CLI on a synthetic site whose
stain is shifted against the same site unshifted."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pcam import drift, h5io, stats
from pcam.checkpoint import load_checkpoint, load_model
from pcam.data import Split
from pcam.inference import predict_logits, sigmoid
from pcam.synthetic import ANOTHER_LAB, generate_split, slide_ids_for
from pcam.training import train
from tests.test_training import params, prov

SITE = [f"site_slide_{i:03d}" for i in range(4)]


def test_features_of_plain_colours():
    x = np.zeros((4, 96, 96, 3), dtype=np.uint8)
    x[0] = 245  # glass
    # pure stains at concentration 1 (Beer-Lambert): no residual, one concentration each
    x[1] = np.round(255 * np.exp(-stats.STAINS[0])).astype(np.uint8)
    x[2] = np.round(255 * np.exp(-stats.STAINS[1])).astype(np.uint8)
    x[3] = (60, 200, 60)  # green: no H&E mixture makes it
    f = dict(zip(stats.FEATURES, stats.patch_features(x).T, strict=True))
    assert f["tissue_fraction"].tolist() == [0.0, 1.0, 1.0, 1.0]
    assert f["haematoxylin"][0] == f["eosin"][0] == f["od_residual"][0] == 0.0
    assert f["haematoxylin"][1] == pytest.approx(1.0, abs=0.02) and abs(f["eosin"][1]) < 0.02
    assert f["eosin"][2] == pytest.approx(1.0, abs=0.02) and abs(f["haematoxylin"][2]) < 0.02
    assert f["od_residual"][1] < 0.02 and f["od_residual"][2] < 0.02 and f["od_residual"][3] > 0.3
    assert f["red"][0] == pytest.approx(245 / 255) and f["saturation"][0] == 0.0


def test_psi_is_zero_for_equal_samples_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=5000)
    assert stats.psi(ref, ref, 10) == pytest.approx(0.0, abs=1e-12)
    assert stats.psi(ref, rng.normal(size=5000), 10) < 0.02
    assert stats.psi(ref, rng.normal(0.5, 1, 5000), 10) > 0.2
    # a constant feature: one bin, no shift to measure
    assert stats.psi(np.zeros(100), np.zeros(50), 10) == 0.0


def test_reference_rows_span_the_split_and_skip_exclusions():
    rows = stats.reference_rows(1000, np.array([0, 999, 500]), 5)
    assert rows.tolist() == [1, 250, 499, 749, 998]
    assert stats.reference_rows(10, np.array([3]), 50).tolist() == [0, 1, 2, 4, 5, 6, 7, 8, 9]


def test_feature_sample_over_blocks_equals_features_of_the_rows():
    x = generate_split(40, slide_ids_for("train", 2), 3, 0.2).x
    rows = np.array([0, 7, 8, 31, 39])
    sample = stats.FeatureSample(rows)
    for start in range(0, 40, 16):  # blocks as channel_stats hands them over
        sample.add(start, x[start : start + 16].copy())
    doc = sample.reference()
    expected = stats.patch_features(x[rows])
    assert doc["features"] == list(stats.FEATURES) and doc["n_patches"] == 5
    for i, name in enumerate(stats.FEATURES):
        assert doc["values"][name] == pytest.approx(expected[:, i].tolist(), rel=1e-5)


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """A trained model, its valid predictions and the training reference, as the pipeline
    leaves them; and a new site's patches, unshifted and shifted (same tissue)."""
    d = tmp_path_factory.mktemp("drift")
    tr = generate_split(384, slide_ids_for("train", 8), 11, 0.2)
    va = generate_split(256, slide_ids_for("valid", 4), 12, 0.2)
    sample = stats.FeatureSample(np.arange(len(tr.x)))
    sample.add(0, tr.x)
    (d / "reference.json").write_text(json.dumps(sample.reference()))
    mean = torch.tensor(tr.x.reshape(-1, 3).mean(axis=0) / 255.0, dtype=torch.float32)
    std = torch.tensor(tr.x.reshape(-1, 3).std(axis=0) / 255.0, dtype=torch.float32)

    def split(name, s):
        return Split(name, torch.from_numpy(s.x), torch.from_numpy(s.y), np.arange(len(s.y)))

    p = params(epochs=1)
    train(p, split("train", tr), split("valid", va), mean, std, d / "model.pt", prov(p))
    ckpt = load_checkpoint(d / "model.pt")
    prob = sigmoid(predict_logits(load_model(ckpt), torch.from_numpy(va.x), mean, std, 128))
    np.savez(d / "valid.npz", index=np.arange(len(prob)), probability=prob, label=va.y)
    for name, shift in (("unshifted", None), ("shifted", ANOTHER_LAB)):
        site = generate_split(256, SITE, 13, 0.2, stain_shift=shift)
        h5io.write_h5_dataset(d / f"{name}.h5", "x", site.x)
    return d


def run_drift(d, name: str, *extra: str, model_dir=None) -> dict:
    """The CLI on d/NAME.h5 with the model, reference and valid predictions of `model_dir`
    (default d); later options in `extra` override earlier ones."""
    m = model_dir or d
    drift.main(
        [
            str(d / f"{name}.h5"),
            *("--model", str(m / "model.pt"), "--reference", str(m / "reference.json")),
            *("--valid-predictions", str(m / "valid.npz")),
            *("--out", str(d / f"{name}.json"), "--plot", str(d / f"{name}.png")),
            *extra,
        ]
    )
    return json.loads((d / f"{name}.json").read_text())


def test_shifted_stain_is_flagged_and_unshifted_is_not(deployed, capsys):
    unshifted = run_drift(deployed, "unshifted")
    shifted = run_drift(deployed, "shifted")
    out = capsys.readouterr().out
    assert unshifted["drift"] is False and unshifted["flagged"] == []
    assert shifted["drift"] is True
    # the stain itself moved: the unmixed stain amounts or the residual colour
    assert {"haematoxylin", "eosin", "od_residual"} & set(shifted["flagged"])
    limit = shifted["thresholds"]["feature_shift_max"]
    for name in shifted["flagged"]:
        if name != "predictions":
            assert abs(shifted["features"][name]["shift_in_sd"]) > limit
    assert all(abs(c["shift_in_sd"]) <= limit for c in unshifted["features"].values())
    worst = max(abs(c["shift_in_sd"]) for c in shifted["features"].values())
    assert worst > 2 * max(abs(c["shift_in_sd"]) for c in unshifted["features"].values())
    assert unshifted["new"]["n_patches"] == 256 and unshifted["reference"]["n_patches"] == 384
    assert "256 patches: no drift" in out and "256 patches: drift in" in out
    assert (deployed / "shifted.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(out)  # the statistics, for `pytest -s`


def test_fail_on_drift_exits_3(deployed):
    with pytest.raises(SystemExit) as stop:
        run_drift(deployed, "shifted", "--fail-on-drift")
    assert stop.value.code == drift.EXIT_DRIFT


def test_too_few_patches_and_missing_reference_are_one_line_errors(deployed, tmp_path, capsys):
    few = generate_split(12, SITE, 1, 0.2).x
    h5io.write_h5_dataset(tmp_path / "few.h5", "x", few)
    with pytest.raises(SystemExit) as stop:
        run_drift(tmp_path, "few", model_dir=deployed)
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert "12 patches, fewer than drift.min_patches" in err and len(err.splitlines()) == 1
    with pytest.raises(SystemExit):
        run_drift(tmp_path, "few", "--reference", str(tmp_path / "absent.json"), model_dir=deployed)
    assert "absent.json: drift reference not found" in capsys.readouterr().err
