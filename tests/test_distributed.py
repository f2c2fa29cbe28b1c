"""DistributedDataParallel on CPU: a 2-process gloo run trains and writes one valid checkpoint."""

from __future__ import annotations

import pytest

from pcam.checkpoint import load_checkpoint, load_model
from tests.e2e import TINY, copy_repo, dvc, read_json

pytestmark = pytest.mark.e2e


def test_two_process_gloo_run_writes_one_checkpoint_and_metrics(tmp_path):
    repo = copy_repo(tmp_path / "repo", TINY | {"train.devices": 2, "train.threads": 1})
    out = dvc(["repro", "train"], repo)
    assert "Running stage 'train'" in out.stdout
    ckpt = load_checkpoint(repo / "models/model.pt")
    assert ckpt["progress"]["finished"]
    assert ckpt["provenance"]["world_size"] == 2
    load_model(ckpt, "model.pt")  # plain module weights, no DDP 'module.' prefix
    metrics = read_json(repo / "metrics/details/train.json")
    assert metrics["provenance"]["world_size"] == 2
    assert 0.0 <= metrics["final"]["val_roc_auc"] <= 1.0
    # rank 0 alone printed the epoch summary, once per epoch
    assert out.stdout.count("epoch 1/1:") == 1
