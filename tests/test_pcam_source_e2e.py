"""`data.source: pcam` end to end: the real dvc CLI downloads small PCAM-format files from a local
HTTP server (127.0.0.1, never Zenodo), then every later stage runs on them.

Two copies are served: the Zenodo layout (gzipped x/y HDF5 plus the meta CSVs), and the six x/y
files alone, written the way torchvision's PCAM test fixture writes them (`f["x"] = array`: one
contiguous, unchunked dataset per file), as torchvision's and TFDS's copies have no meta CSVs.
The md5 table is the served files' own (`data.pcam.checksums`: a JSON file).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import json
import shutil
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest
from dvc.api import artifacts_show
from dvc.repo import Repo

from pcam import h5io
from tests.e2e import STAGES, TINY, copy_repo, dvc, read_json, run

pytestmark = pytest.mark.e2e

N = {"train": TINY["data.synthetic.n_train"], "valid": 128, "test": 128}


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args) -> None:
        pass


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> Path:
    """Small PCAM-format files (synthetic tissue, with the injected defects) from `prepare`."""
    gen = copy_repo(tmp_path_factory.mktemp("gen") / "repo", TINY)
    run(["python", "stages/prepare.py"], gen)
    return gen / "data" / "raw"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Serves tmp/files/<name> at http://127.0.0.1:PORT/files/<name>; stopped at the end."""
    root = tmp_path_factory.mktemp("served")
    (root / "files").mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield root / "files", f"http://127.0.0.1:{srv.server_port}/files"
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)


def _serve(originals: Path, files: Path, with_meta: bool, torchvision_style: bool) -> Path:
    """Put one copy of the data into the served directory; return its md5 table (JSON)."""
    for old in files.iterdir():
        old.unlink()
    for split in h5io.SPLITS:
        xp, yp, mp = h5io.split_files(originals, split)
        for path, name in ((xp, "x"), (yp, "y")):
            if torchvision_style:
                with h5py.File(path, "r") as f:
                    data = f[name][()]
                plain = files / f"{path.name}.plain"
                with h5py.File(plain, "w") as f:
                    f[name] = data
                raw = plain.read_bytes()
                plain.unlink()
            else:
                raw = path.read_bytes()
            (files / f"{path.name}.gz").write_bytes(gzip.compress(raw, compresslevel=1, mtime=0))
        if with_meta:
            shutil.copyfile(mp, files / mp.name)
    table = files.parent / "md5.json"
    md5 = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in files.glob("*.gz")}
    table.write_text(json.dumps(md5))
    return table


def _pcam_repo(tmp_path: Path, url: str, table: Path, **overrides) -> Path:
    params = {**TINY, "data.source": "pcam", "data.pcam.base_url": url}
    return copy_repo(tmp_path / "repo", {**params, "data.pcam.checksums": str(table), **overrides})


def _excluded(repo: Path, split: str) -> set[int]:
    doc = read_json(repo / "data/validated/exclusions.json")
    return {e["index"] for e in doc["splits"][split]["excluded"]}


def test_download_path_runs_all_seven_stages(originals, server, tmp_path):
    files, url = server
    table = _serve(originals, files, with_meta=True, torchvision_style=False)
    # The published protocol: train on every patch; exclusions still found and reported.
    repo = _pcam_repo(tmp_path, url, table, **{"train.use_exclusions": False})
    out = dvc(["repro"], repo).stdout
    for stage in STAGES:
        assert f"Running stage '{stage}'" in out, out
    assert "skipped" not in out
    raw = repo / "data" / "raw"
    for split in h5io.SPLITS:
        for path in h5io.split_files(originals, split):
            assert (raw / path.name).read_bytes() == path.read_bytes(), path.name
    assert "skipped" not in read_json(repo / "metrics/details/data.json")
    slices = read_json(repo / "metrics/details/slices.json")
    assert "hard_negative" in slices["slices"] and "skipped" not in slices
    assert any(name.startswith("slide:test_slide_") for name in slices["slices"])

    # train.use_exclusions false: every train patch in training and in the statistics
    assert _excluded(repo, "train")
    assert read_json(repo / "metrics/details/train.json")["n_train"] == N["train"]
    assert read_json(repo / "data/stats.json")["n_patches"] == N["train"]
    assert read_json(repo / "data/drift_reference.json")["n_patches"] == N["train"]
    _assert_headline_test_is_the_whole_test_split(repo)
    _assert_model_is_a_registry_artifact_with_a_card(repo, tmp_path)


def _assert_model_is_a_registry_artifact_with_a_card(repo: Path, tmp_path: Path) -> None:
    """dvc.yaml's `artifacts:` entry, as DVC's model registry tools see it, and the model card
    generated from these very outputs."""
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-q", "-m", "repro"], repo)
    run(["git", "tag", "-a", "pcam-classifier@v1.0.0", "-m", "register"], repo)  # = gto register
    head = run(["git", "rev-parse", "HEAD"], repo).stdout.strip()
    shown = artifacts_show("pcam-classifier", repo=str(repo))
    assert shown == {"rev": head, "path": "models/model.pt"}
    (artifact,) = Repo(str(repo)).artifacts.read()["dvc.yaml"].values()
    assert artifact.type == "model" and "pcam" in artifact.labels
    got = tmp_path / "got.pt"
    dvc(["artifacts", "get", str(repo), "pcam-classifier", "-o", str(got)], repo)
    assert got.read_bytes() == (repo / "models/model.pt").read_bytes()

    run(["python", "-m", "pcam.modelcard", "--out", "reports/model_card.md"], repo)
    card = (repo / "reports/model_card.md").read_text()
    ev, tr = (
        read_json(repo / "metrics/details/eval.json"),
        read_json(repo / "metrics/details/train.json"),
    )
    for split in ("test", "valid"):
        for key in ("roc_auc", "f2", "sensitivity", "specificity"):
            m = ev[split][key]
            assert f"{m['value']:.3f} ({m['ci_low']:.3f}–{m['ci_high']:.3f})" in card, (split, key)
    assert f"Threshold **{ev['threshold']['value']:.4f}**" in card
    assert f"best epoch {tr['best_epoch']}" in card and "## Not recorded" not in card
    assert "![ROC, valid and test](../plots/eval/roc.png)" in card


def test_copy_without_meta_csvs_runs_and_says_what_it_skipped(originals, server, tmp_path):
    files, url = server
    table = _serve(originals, files, with_meta=False, torchvision_style=True)
    repo = _pcam_repo(tmp_path, url, table)
    out = dvc(["repro", "slice"], repo).stdout  # every stage but the benchmark
    for stage in STAGES[:-1]:
        assert f"Running stage '{stage}'" in out, out
    assert out.count("continuing without it (the meta CSVs are optional)") == 3
    for split in h5io.SPLITS:
        assert (
            f"validate-data: {split}: skipped meta_label_mismatches, slides: "
            f"camelyonpatch_level_2_split_{split}_meta.csv absent (the meta CSVs are optional)"
        ) in out
    assert "validate-data: skipped slides_shared: no meta CSV for train, valid, test" in out
    assert "slice: skipped hard_negative, slide:*: camelyonpatch_level_2_split_test_meta.csv" in out
    assert sorted(p.name for p in (repo / "data/raw").iterdir()) == sorted(
        f(s) for s in h5io.SPLITS for f in (h5io.x_name, h5io.y_name)
    )
    with h5py.File(repo / "data/raw" / h5io.x_name("train"), "r") as f:
        assert f["x"].chunks is None and f["x"].shape == (N["train"], 96, 96, 3)

    data = read_json(repo / "metrics/details/data.json")
    assert set(data["splits"]["test"]["skipped"]) == {"meta_label_mismatches", "slides"}
    assert data["slides_shared"] == {} and "slides_shared" in data["skipped"]
    slices = read_json(repo / "metrics/details/slices.json")
    assert set(slices["skipped"]) == {"hard_negative", "slide:*"}
    assert {"dark", "bright", "low_contrast", "high_saturation"} <= set(slices["slices"])
    assert not any(k == "hard_negative" or k.startswith("slide:") for k in slices["slices"])
    # train.use_exclusions true (the default): train's exclusions are left out of training
    n_train = N["train"] - len(_excluded(repo, "train"))
    assert read_json(repo / "metrics/details/train.json")["n_train"] == n_train < N["train"]
    assert read_json(repo / "data/stats.json")["n_patches"] == n_train
    assert read_json(repo / "data/drift_reference.json")["n_patches"] == n_train
    _assert_headline_test_is_the_whole_test_split(repo)


def _assert_headline_test_is_the_whole_test_split(repo: Path) -> None:
    """The policy: headline test metrics on the untouched official test split; the exclusions'
    effect only beside them."""
    excluded = _excluded(repo, "test")
    assert excluded, "the served test split carries defects: something must be flagged"
    ev = read_json(repo / "metrics/details/eval.json")
    saved = np.load(repo / "data/predictions/test.npz")
    assert saved["index"].tolist() == list(range(N["test"]))
    assert ev["test"]["n"] == N["test"]
    assert ev["test_without_exclusions"]["n"] == N["test"] - len(excluded)
