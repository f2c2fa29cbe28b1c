"""DistributedDataParallel on CPU (gloo): two ranks train what one process trains on the same
global batches; the train stage's two launch paths (its own spawn, torchrun) give the same bytes."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pcam.checkpoint import load_checkpoint, load_model
from pcam.training import train
from tests.e2e import LEARNS, TINY, copy_repo, dvc, free_port, read_json, run
from tests.test_training import MEAN, STD, params, prov, tiny_split

# No BatchNorm in the mlp: its per-rank batch statistics are the one thing DDP does not share,
# so with it two ranks train exactly what one process trains, up to float rounding.
DDP_PARAMS = params(model="mlp", hidden_units=8, epochs=2, batch_size=16)


def ddp_splits():
    return tiny_split("train", 64, 0), tiny_split("valid", 32, 1)


def _rank(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        p = DDP_PARAMS
        train(p, *ddp_splits(), MEAN, STD, out, prov(p), rank=rank, world=world)
    finally:
        dist.destroy_process_group()


def test_two_ranks_train_what_one_process_trains(tmp_path):
    """Each rank takes every 2nd sample of each global batch, with that sample's augmentation;
    DDP averages the gradients: the same steps as one process on the whole batch."""
    p = DDP_PARAMS
    train(p, *ddp_splits(), MEAN, STD, tmp_path / "single.pt", prov(p))
    mp.spawn(_rank, args=(2, free_port(), str(tmp_path / "ddp.pt")), nprocs=2)
    one, two = load_checkpoint(tmp_path / "single.pt"), load_checkpoint(tmp_path / "ddp.pt")
    assert two["progress"]["step"] == one["progress"]["step"] == 2 * 64 // 16
    # float rounding apart (the all-reduce sums the two halves' gradients in another order):
    # weights agree to ~1e-8 here; a rank training on other samples would be ~1e-3 away
    for key, w in one["model_state"].items():
        torch.testing.assert_close(two["model_state"][key], w, rtol=1e-5, atol=1e-6, msg=key)
    for a, b in zip(one["progress"]["history"], two["progress"]["history"], strict=True):
        assert a["lr"] == b["lr"] and a["val_roc_auc"] == b["val_roc_auc"]
        # the epoch's train loss is the global batches', not one rank's share
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-6)


@pytest.mark.e2e
def test_two_process_gloo_run_learns_and_torchrun_gives_the_same_bytes(tmp_path):
    repo = copy_repo(tmp_path / "repo", TINY | LEARNS | {"train.devices": 2})
    out = dvc(["repro", "train"], repo)
    assert "Running stage 'train'" in out.stdout
    ckpt = load_checkpoint(repo / "models/model.pt")
    assert ckpt["progress"]["finished"]
    assert ckpt["provenance"]["world_size"] == 2
    load_model(ckpt, "model.pt")  # plain module weights, no DDP 'module.' prefix
    metrics = read_json(repo / "metrics/details/train.json")
    assert metrics["provenance"]["world_size"] == 2
    # it learnt: chance is 0.5 (TINY's own schedule, which does not learn, stays there)
    assert metrics["best_val_roc_auc"] > 0.75, metrics
    # rank 0 alone printed the epoch summary, once per epoch
    for epoch in (1, 2, 3):
        assert out.stdout.count(f"epoch {epoch}/3:") == 1, out.stdout

    # torchrun launches the ranks instead of the stage's own spawn: the same bytes
    outputs = ("models/model.pt", "metrics/train.json", "metrics/details/train.json")
    spawned = {rel: (repo / rel).read_bytes() for rel in outputs}
    for rel in outputs:
        (repo / rel).unlink()
    torchrun = Path(sys.executable).parent / "torchrun"
    launched = run(
        [
            str(torchrun),
            "--nnodes=1",
            "--nproc-per-node=2",
            "--master-addr=127.0.0.1",
            f"--master-port={free_port()}",
            "stages/train.py",
        ],
        repo,
    )
    assert launched.stdout.count("epoch 3/3:") == 1, launched.stdout
    for rel in outputs:
        assert (repo / rel).read_bytes() == spawned[rel], rel
