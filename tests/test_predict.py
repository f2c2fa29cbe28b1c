"""The inference CLI: .h5 files, images, PCAM directories in; CSV with stored threshold out; both
backends (torch, onnx); every bad input one line."""

from __future__ import annotations

import csv
import io
import json
import struct
import subprocess
import sys
import zlib

import h5py
import numpy as np
import pytest
from PIL import Image

from pcam import h5io
from pcam.predict import main, read_image
from tests.conftest import REPO, make_meta
from tests.test_training import tiny_split

# CSV probabilities have 6 decimals (each off by <= 5e-7) and the backends differ by ~1e-7 in
# float32 (export's parity report): 2e-6 bounds the sum with room to spare.
BACKEND_TOL = 2e-6


@pytest.fixture(scope="module")
def model_dir(deployed_model):
    return deployed_model


def read_rows(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text)))


def save_png(path, size=(96, 96), seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)


def save_png16(path, pixels: np.ndarray) -> None:
    """A 16-bit PNG (gray (h,w) or RGB (h,w,3) uint16), written by hand: Pillow cannot."""
    h, w = pixels.shape[:2]
    colour_type = 2 if pixels.ndim == 3 else 0
    raw = b"".join(b"\x00" + pixels[r].astype(">u2").tobytes() for r in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def rgb(seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (96, 96, 3), dtype=np.uint8)


def test_h5_images_and_directory(tmp_path, model_dir, capsys):
    x = tiny_split("test", 6, 2).x.numpy()
    y = np.array([0, 1, 0, 1, 1, 0], dtype=np.uint8)
    h5io.write_split(tmp_path, "test", x, y, make_meta(6, y))
    images = tmp_path / "images"
    images.mkdir()
    save_png(images / "a.png")
    Image.fromarray(x[0]).save(images / "b.jpg", quality=95)
    Image.fromarray(x[0]).save(images / "c.png")
    # the JPEG's pixels as Pillow decodes them, in an .h5 of their own
    decoded = np.asarray(Image.open(images / "b.jpg").convert("RGB"))
    assert not (decoded == x[0]).all()  # JPEG is lossy: other pixels, another probability
    h5io.write_h5_dataset(tmp_path / "decoded.h5", "x", decoded[None])
    out = tmp_path / "pred.csv"
    main(
        [
            "--model",
            str(model_dir / "model.pt"),
            str(tmp_path / h5io.x_name("test")),
            str(images),
            str(tmp_path / "decoded.h5"),
            "--out",
            str(out),
        ]
    )
    rows = read_rows(out.read_text())
    assert len(rows) == 6 + 3 + 1
    assert [int(r["index"]) for r in rows[:6]] == list(range(6))
    # the _y.h5 next to the _x.h5 gives the true labels; images have none
    assert [r["true_label"] for r in rows] == [str(v) for v in y] + [""] * 4
    for r in rows:
        p = float(r["probability"])
        assert 0.0 <= p <= 1.0 and int(r["label"]) == int(p >= 0.5)
    # the same pixels score the same whatever file they came in: the .h5 row and its lossless
    # PNG; the JPEG and its decoded pixels. Batches differ (6 rows, 3 images, 1 row): the
    # CSV's 6 decimals may round apart by one unit.
    prob = [float(r["probability"]) for r in rows]
    assert abs(prob[8] - prob[0]) <= 1e-6 + 1e-12, (prob[0], prob[8])
    assert abs(prob[7] - prob[9]) <= 1e-6 + 1e-12, (prob[7], prob[9])


def test_stdout_and_threshold_override(tmp_path, model_dir, capsys):
    save_png(tmp_path / "a.png")
    main(["--model", str(model_dir / "model.pt"), str(tmp_path / "a.png"), "--threshold", "0"])
    rows = read_rows(capsys.readouterr().out)
    assert len(rows) == 1 and rows[0]["label"] == "1"


def test_pcam_directory_scores_x_files_and_uses_y(tmp_path, model_dir, capsys):
    """A copy of data/raw: x files scored, y files give true_label, CSVs ignored."""
    for i, split in enumerate(("valid", "test")):
        x = tiny_split(split, 3 + i, i).x.numpy()
        y = (np.arange(3 + i) % 2).astype(np.uint8)
        h5io.write_split(tmp_path, split, x, y, make_meta(3 + i, y))
    main(["--model", str(model_dir / "model.onnx"), str(tmp_path)])
    rows = read_rows(capsys.readouterr().out)
    assert {r["source"] for r in rows} == {
        str(tmp_path / h5io.x_name("test")),
        str(tmp_path / h5io.x_name("valid")),
    }
    assert len(rows) == 4 + 3
    assert [r["true_label"] for r in rows] == ["0", "1", "0", "1", "0", "1", "0"]


def test_keep_going_writes_good_rows_and_lists_failures(tmp_path, model_dir, capsys):
    save_png(tmp_path / "good.png")
    Image.fromarray(rgb()).convert("L").save(tmp_path / "gray.png")
    x = tiny_split("test", 3, 2).x.numpy()
    h5io.write_h5_dataset(tmp_path / "patches.h5", "x", x)
    inputs = [str(tmp_path / n) for n in ("good.png", "gray.png", "missing.png", "patches.h5")]
    model = ["--model", str(model_dir / "model.onnx")]
    out = tmp_path / "pred.csv"

    # Without --keep-going the first bad input stops everything and nothing is written.
    err = run_error([*model, *inputs, "--out", str(out)], capsys)
    assert "missing.png: no such file" in err and not out.exists()

    with pytest.raises(SystemExit) as exc:
        main([*model, *inputs, "--out", str(out), "--keep-going"])
    assert exc.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 3
    assert "missing.png: no such file" in errors[0] and "gray.png: image is grayscale" in errors[1]
    assert "2 of 4 inputs failed" in errors[2]
    rows = read_rows(out.read_text())
    assert [r["source"].rsplit("/", 1)[1] for r in rows] == ["good.png"] + ["patches.h5"] * 3


def run_error(argv, capsys) -> str:
    """Run predict expecting a user error: exit 1, one line on stderr, no traceback."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def _palette(p):
    Image.fromarray(rgb()).convert("P").save(p)


def _rgba(p):
    Image.fromarray(rgb()).convert("RGBA").save(p)


def _gray(p):
    Image.fromarray(rgb()).convert("L").save(p)


def _gray16(p):
    save_png16(p, np.full((96, 96), 40000, dtype=np.uint16))


def _rgb16(p):
    save_png16(p, np.full((96, 96, 3), 40000, dtype=np.uint16))


def _empty_h5(p):
    with h5py.File(p, "w") as f:  # unchunked: our writer's chunks need at least one row
        f.create_dataset("x", data=np.zeros((0, 96, 96, 3), dtype=np.uint8))


def _wrong_shape_h5(p):
    h5io.write_h5_dataset(p, "x", np.zeros((2, 32, 32, 3), dtype=np.uint8))


def _y_only(p):
    h5io.write_h5_dataset(p, "y", np.zeros((2, 1, 1, 1), dtype=np.uint8))


def _short_y(p):
    h5io.write_h5_dataset(p, "x", rgb()[None].repeat(3, axis=0))
    h5io.write_h5_dataset(p.with_name("set_y.h5"), "y", np.zeros((2, 1, 1, 1), dtype=np.uint8))


def _bad_threshold_json(p):
    save_png(p)
    p.with_name("thr.json").write_text('{"threshold": 0.5,, }')


def _threshold_not_a_number(p):
    save_png(p)
    p.with_name("thr.json").write_text('{"threshold": "high"}')


# name, input file, how to make it, extra arguments, what the one line must say
BAD_INPUTS = [
    ("rgba", "a.png", _rgba, [], "a.png: image is RGBA (alpha channel), expected 8-bit RGB (--convert-rgb"),
    ("grayscale", "a.png", _gray, [], "a.png: image is grayscale, expected 8-bit RGB"),
    ("gray 16-bit", "a.png", _gray16, [], "a.png: image is 16-bit grayscale, expected 8-bit RGB"),
    ("rgb 16-bit", "a.png", _rgb16, [], "a.png: image is 16-bit RGB, expected 8-bit RGB"),
    ("palette", "a.png", _palette, [], "a.png: image is palette, expected 8-bit RGB"),
    ("too small", "a.png", lambda p: save_png(p, (50, 50)), [], "a.png: image is 50x50, expected 96x96 (smaller than 96x96 both ways: cropping cannot help)"),
    ("too narrow to crop", "a.png", lambda p: save_png(p, (128, 50)), ["--center-crop"], "a.png: image is 50x128, expected 96x96 (smaller than 96x96 one way"),
    ("larger", "a.png", lambda p: save_png(p, (128, 100)), [], "a.png: image is 100x128, expected 96x96 (use --center-crop"),
    ("not an image", "a.png", lambda p: p.write_bytes(b"\x89PNG not really"), [], "a.png: not a readable image"),
    ("missing", "nope.h5", lambda p: None, [], "nope.h5: no such file or directory"),
    ("not hdf5", "a.h5", lambda p: p.write_bytes(b"not hdf5"), [], "a.h5: not a readable HDF5 file"),
    ("0 rows", "a.h5", _empty_h5, [], "a.h5: dataset 'x' holds 0 patches"),
    ("wrong x shape", "a.h5", _wrong_shape_h5, [], "a.h5: dataset 'x' is (2, 32, 32, 3) uint8, expected (N,96,96,3) uint8"),
    ("label file", "set_y.h5", _y_only, [], "set_y.h5: dataset 'x' missing (found ['y']) (a PCAM label file"),
    ("labels too short", "set_x.h5", _short_y, [], "set_y.h5: 2 labels for the 3 patches of set_x.h5"),
    ("empty directory", "empty", lambda p: p.mkdir(), [], "empty: directory holds no .h5, .png or .jpg files"),
    ("batch size 0", "a.png", save_png, ["--batch-size", "0"], "argument --batch-size: must be a positive integer, got '0'"),
    ("unknown option", "a.png", save_png, ["--centre-crop"], "unrecognized arguments: --centre-crop"),
    ("malformed threshold JSON", "a.png", _bad_threshold_json, ["--threshold-file", "thr.json"], "thr.json: not valid JSON (Expecting property name enclosed in double quotes at line 1 column 19)"),
    ("threshold not a number", "a.png", _threshold_not_a_number, ["--threshold-file", "thr.json"], "thr.json: key 'threshold' must be a number in [0, 1], got 'high'"),
    ("threshold out of range", "a.png", save_png, ["--threshold", "2"], "--threshold 2.0 must be within [0, 1]"),
    ("onnx model on torch", "a.png", save_png, ["--backend", "torch", "--model", "{model_dir}/model.onnx"], "model.onnx: an ONNX model needs --backend onnx"),
    ("checkpoint on onnx", "a.png", save_png, ["--backend", "onnx", "--model", "{model_dir}/model.pt"], "model.pt: --backend onnx needs the exported .onnx model"),
    ("cuda on onnx", "a.png", save_png, ["--model", "{model_dir}/model.onnx", "--device", "cuda"], "--device cuda needs --backend torch"),
    ("not an onnx model", "a.png", save_png, ["--model", "{tmp}/fake.onnx"], "fake.onnx: not a loadable ONNX model"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("make", "extra", "expected", "name"),
    [(m, e, x, n) for _, n, m, e, x in BAD_INPUTS],
    ids=[row[0] for row in BAD_INPUTS],
)
def test_bad_input_is_one_line_and_writes_nothing(
    tmp_path, model_dir, capsys, monkeypatch, make, extra, expected, name
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fake.onnx").write_bytes(b"not onnx")
    make(tmp_path / name)
    extra = [a.format(model_dir=model_dir, tmp=tmp_path) for a in extra]
    model = [] if "--model" in extra else ["--model", str(model_dir / "model.pt")]
    err = run_error([*model, name, *extra, "--out", "pred.csv"], capsys)
    assert expected in err
    assert not (tmp_path / "pred.csv").exists()


def test_convert_rgb(tmp_path):
    """What --convert-rgb does to each mode: the pixels, not just that it runs."""
    pixels = rgb()
    _gray(tmp_path / "gray.png")
    gray = read_image(tmp_path / "gray.png", False, True)
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    assert (gray[..., 0] == np.asarray(Image.fromarray(pixels).convert("L"))).all()

    rgba = np.dstack([pixels, np.full((96, 96), 255, np.uint8)])
    rgba[0, 0, 3] = 0  # transparent: white shows through
    rgba[0, 1, 3] = 128  # half: halfway to white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    out = read_image(tmp_path / "rgba.png", False, True)
    assert (out[0, 0] == 255).all()
    half = pixels[0, 1].astype(int)
    assert np.abs(out[0, 1].astype(int) - (half + (255 - half) * 127 / 255)).max() <= 1
    assert (out[1:] == pixels[1:]).all()

    _gray16(tmp_path / "g16.png")
    _rgb16(tmp_path / "rgb16.png")
    for name in ("g16.png", "rgb16.png"):
        assert (read_image(tmp_path / name, False, True) == 40000 >> 8).all()

    Image.fromarray(pixels).convert("P").save(tmp_path / "p.png")
    palette = Image.open(tmp_path / "p.png").convert("RGB")
    assert (read_image(tmp_path / "p.png", False, True) == np.asarray(palette)).all()


def test_center_crop_cuts_the_centre(tmp_path):
    big = np.random.default_rng(1).integers(0, 256, (128, 100, 3), dtype=np.uint8)
    Image.fromarray(big).save(tmp_path / "big.png")
    assert (read_image(tmp_path / "big.png", True, False) == big[16:112, 2:98]).all()


def test_checkpoint_from_another_model_or_threshold_is_refused(tmp_path, model_dir, capsys):
    save_png(tmp_path / "a.png")
    other = tmp_path / "other"
    other.mkdir()
    for name in ("model.pt", "model.onnx"):
        (other / name).write_bytes((model_dir / name).read_bytes())
    (other / "threshold.json").write_text(json.dumps({"threshold": 0.5, "model_md5": "0" * 32}))
    for name in ("model.pt", "model.onnx"):
        err = run_error(["--model", str(other / name), str(tmp_path / "a.png")], capsys)
        assert "threshold was chosen for another model" in err
    (other / "model.pt").write_bytes(b"PK not a checkpoint")
    err = run_error(["--model", str(other / "model.pt"), str(tmp_path / "a.png")], capsys)
    assert "not a readable torch checkpoint" in err


def test_onnx_and_torch_backends_agree(tmp_path, model_dir, capsys):
    save_png(tmp_path / "a.png")
    x_file = str(model_dir / "raw" / h5io.x_name("test"))
    probs = {}
    for model in ("model.pt", "model.onnx"):
        main(["--model", str(model_dir / model), x_file, str(tmp_path / "a.png")])
        rows = read_rows(capsys.readouterr().out)
        probs[model] = np.array([float(r["probability"]) for r in rows])
        assert len(rows) == 64 + 1
    assert np.abs(probs["model.pt"] - probs["model.onnx"]).max() <= BACKEND_TOL


def test_onnx_backend_imports_no_torch(tmp_path, model_dir):
    """The point of the onnx backend: start-up without torch (or scipy, scikit-learn)."""
    save_png(tmp_path / "a.png")
    code = (
        "import sys\n"
        "from pcam.predict import main\n"
        f"main(['--model', {str(model_dir / 'model.onnx')!r}, {str(tmp_path / 'a.png')!r}])\n"
        "heavy = [m for m in ('torch', 'scipy', 'sklearn', 'pcam.data') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert len(read_rows(done.stdout)) == 1


def test_h5_read_in_blocks(tmp_path, model_dir, capsys, monkeypatch):
    """Rows come out in order when a file spans several read blocks."""
    monkeypatch.setattr("pcam.predict.H5_BLOCK_ROWS", 5)
    x_file = model_dir / "raw" / h5io.x_name("test")
    main(["--model", str(model_dir / "model.onnx"), str(x_file), "--batch-size", "3"])
    rows = read_rows(capsys.readouterr().out)
    with h5py.File(model_dir / "raw" / h5io.y_name("test")) as f:
        y = f["y"][:].reshape(-1)
    assert [int(r["index"]) for r in rows] == list(range(64))
    assert [int(r["true_label"]) for r in rows] == y.tolist()
