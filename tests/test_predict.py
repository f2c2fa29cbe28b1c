"""The inference CLI: .h5 files, images and directories in; CSV with stored threshold out."""

from __future__ import annotations

import csv
import hashlib
import io
import json

import numpy as np
import pytest
from PIL import Image

from pcam import h5io
from pcam.predict import main
from pcam.training import train
from tests.conftest import make_meta
from tests.test_training import MEAN, STD, params, prov, tiny_split


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    p = params(epochs=1)
    train(
        p,
        tiny_split("train", 48, 0),
        tiny_split("valid", 16, 1),
        MEAN,
        STD,
        d / "model.pt",
        prov(p),
    )
    md5 = hashlib.md5((d / "model.pt").read_bytes()).hexdigest()
    (d / "threshold.json").write_text(json.dumps({"threshold": 0.5, "model_md5": md5}))
    return d


def read_rows(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text)))


def save_png(path, size=(96, 96), seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)


def test_h5_images_and_directory(tmp_path, model_dir, capsys):
    x = tiny_split("test", 6, 2).x.numpy()
    y = np.zeros(6, dtype=np.uint8)
    h5io.write_split(tmp_path, "test", x, y, make_meta(6, y))
    images = tmp_path / "images"
    images.mkdir()
    save_png(images / "a.png")
    Image.fromarray(x[0]).save(images / "b.jpg", quality=95)
    out = tmp_path / "pred.csv"
    main(
        [
            "--model",
            str(model_dir / "model.pt"),
            str(tmp_path / h5io.x_name("test")),
            str(images),
            "--out",
            str(out),
        ]
    )
    rows = read_rows(out.read_text())
    assert len(rows) == 6 + 2
    assert [int(r["index"]) for r in rows[:6]] == list(range(6))
    for r in rows:
        p = float(r["probability"])
        assert 0.0 <= p <= 1.0 and int(r["label"]) == int(p >= 0.5)
    # same patch from the .h5 and the JPEG: close probabilities (JPEG is lossy)
    assert abs(float(rows[0]["probability"]) - float(rows[7]["probability"])) < 0.2


def test_stdout_and_threshold_override(tmp_path, model_dir, capsys):
    save_png(tmp_path / "a.png")
    main(["--model", str(model_dir / "model.pt"), str(tmp_path / "a.png"), "--threshold", "0"])
    rows = read_rows(capsys.readouterr().out)
    assert len(rows) == 1 and rows[0]["label"] == "1"


def run_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_wrong_size_is_an_error_unless_center_crop(tmp_path, model_dir, capsys):
    save_png(tmp_path / "big.png", size=(128, 100))
    model = str(model_dir / "model.pt")
    err = run_error(["--model", model, str(tmp_path / "big.png")], capsys)
    assert "big.png: image is 100x128, expected 96x96" in err and "--center-crop" in err
    main(["--model", model, str(tmp_path / "big.png"), "--center-crop"])
    assert len(read_rows(capsys.readouterr().out)) == 1


def test_unreadable_and_missing_inputs(tmp_path, model_dir, capsys):
    model = str(model_dir / "model.pt")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    assert "broken.png: not a readable image" in run_error(
        ["--model", model, str(tmp_path / "broken.png")], capsys
    )
    assert "nope.h5: no such file" in run_error(
        ["--model", model, str(tmp_path / "nope.h5")], capsys
    )
    (tmp_path / "bad.h5").write_bytes(b"not hdf5")
    assert "bad.h5: not a readable HDF5 file" in run_error(
        ["--model", model, str(tmp_path / "bad.h5")], capsys
    )


def test_checkpoint_from_another_model_or_threshold_is_refused(tmp_path, model_dir, capsys):
    save_png(tmp_path / "a.png")
    other = tmp_path / "other"
    other.mkdir()
    (other / "model.pt").write_bytes((model_dir / "model.pt").read_bytes())
    (other / "threshold.json").write_text(json.dumps({"threshold": 0.5, "model_md5": "0" * 32}))
    err = run_error(["--model", str(other / "model.pt"), str(tmp_path / "a.png")], capsys)
    assert "threshold was chosen for another model" in err
    (other / "model.pt").write_bytes(b"PK not a checkpoint")
    err = run_error(["--model", str(other / "model.pt"), str(tmp_path / "a.png")], capsys)
    assert "not a readable torch checkpoint" in err
