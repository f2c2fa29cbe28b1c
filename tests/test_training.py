"""Training: byte-identical twins, byte-identical resume after SIGTERM, safe checkpoint loading."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from pcam.checkpoint import (
    load_checkpoint,
    load_model,
    load_state_strict,
    normalisation,
    save_checkpoint,
)
from pcam.data import (
    Split,
    draw_color_jitter,
    draw_flip_rotate,
    flip_rotate,
    group_by_code,
    normalise,
)
from pcam.errors import PcamError
from pcam.models import build_model
from pcam.params import load_params, to_dict
from pcam.training import RESUME_ENV, TrainingInterrupted, epoch_order, evaluate_split, train
from tests.conftest import REPO


def tiny_split(name: str, n: int, seed: int) -> Split:
    """Learnable toy data: positives have a dark centre square."""
    rng = np.random.default_rng(seed)
    x = rng.integers(120, 256, size=(n, 96, 96, 3), dtype=np.uint8)
    y = (np.arange(n) % 2).astype(np.uint8)
    x[y == 1, 32:64, 32:64] //= 3
    return Split(name, torch.from_numpy(x), torch.from_numpy(y), np.arange(n))


def params(**changes):
    p = load_params(REPO / "params.yaml").train
    base = dict(epochs=2, batch_size=16, width=4, threads=1, device="cpu")
    return dataclasses.replace(p, **(base | changes))


def prov(p) -> dict:
    return {"params": {"train": to_dict(p)}, "seed": p.seed}


MEAN = torch.tensor([0.5, 0.5, 0.5])
STD = torch.tensor([0.25, 0.25, 0.25])


class SignalAtStep:
    """Stands in for dvclive.Live; sends a real SIGTERM to this process after a chosen step's
    logging (counted 1, 2, ...)."""

    def __init__(self, at_step: int | None):
        self.at_step, self.steps, self.step = at_step, 0, 0

    def log_metric(self, name, *args, **kwargs):
        if name == "train/lr":  # the last of a step's three per-step metrics
            self.steps += 1
            if self.steps == self.at_step:
                os.kill(os.getpid(), signal.SIGTERM)

    def make_summary(self):
        pass


def md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def splits():
    return tiny_split("train", 80, 0), tiny_split("valid", 32, 1)


def test_twin_runs_are_byte_identical(tmp_path, splits):
    p = params()
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    hist_a = train(p, *splits, MEAN, STD, a, prov(p)).history
    hist_b = train(p, *splits, MEAN, STD, b, prov(p)).history
    assert md5(a) == md5(b)
    assert hist_a == hist_b
    # and the seed matters: another seed gives another model
    c = tmp_path / "c.pt"
    train(dataclasses.replace(p, seed=1), *splits, MEAN, STD, c, prov(p))
    assert md5(c) != md5(a)


@pytest.mark.parametrize("scheduler", ["onecycle", "plateau", "cosine", "none"])
def test_sigterm_mid_epoch_then_resume_is_byte_identical(tmp_path, splits, scheduler):
    p = params(scheduler=scheduler, sampler="weighted" if scheduler == "plateau" else "shuffle")
    whole = tmp_path / "whole.pt"
    train(p, *splits, MEAN, STD, whole, prov(p))

    part, partial = tmp_path / "part.pt", tmp_path / "ckpt" / "train.pt"
    part.write_bytes(b"the last finished model")
    with pytest.raises(TrainingInterrupted, match="SIGTERM"):  # mid epoch 1 (5 steps)
        train(p, *splits, MEAN, STD, part, prov(p), SignalAtStep(3), checkpoint_path=partial)
    # The interrupted run left its state aside and did not touch the finished model.
    assert part.read_bytes() == b"the last finished model"
    ckpt = load_checkpoint(partial)
    assert ckpt["progress"]["batch"] == 3 and not ckpt["progress"]["finished"]
    with pytest.raises(PcamError, match="unfinished run"):
        load_model(ckpt, partial)

    os.environ[RESUME_ENV] = "1"
    try:
        train(p, *splits, MEAN, STD, part, prov(p), checkpoint_path=partial)
    finally:
        del os.environ[RESUME_ENV]
    assert md5(part) == md5(whole)
    assert not partial.exists()  # removed once the model is written


# Step 2: inside epoch 1, before the first summary; step 6: inside epoch 2.
@pytest.mark.parametrize("stop_step", [2, 6])
def test_dvclive_logs_of_an_interrupted_run_match_an_uninterrupted_one(tmp_path, splits, stop_step):
    from dvclive import Live

    p = params()  # 80 patches in batches of 16: 5 steps per epoch, 2 epochs

    def logs(run_dir: Path) -> dict[str, list[str]]:
        metrics = run_dir / "plots" / "metrics"
        return {
            str(f.relative_to(metrics)): f.read_text().splitlines()
            for f in sorted(metrics.rglob("*.tsv"))
        }

    whole = Live(dir=str(tmp_path / "whole"), dvcyaml=False, save_dvc_exp=False)
    train(p, *splits, MEAN, STD, tmp_path / "whole.pt", prov(p), whole)
    whole.end()
    expected = logs(tmp_path / "whole")
    assert [r.split("\t")[0] for r in expected["train/loss.tsv"]] == ["step"] + [
        str(s) for s in range(10)
    ]
    assert [r.split("\t")[0] for r in expected["val/roc_auc.tsv"]] == ["step", "5", "10"]
    summary = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    assert summary["step"] == 10 and "roc_auc" in summary["val"]
    assert "perf" not in summary  # no timings in what DVC hashes

    live_dir = str(tmp_path / "part")

    class Interrupting(Live):
        def log_metric(self, name, *args, **kwargs):
            super().log_metric(name, *args, **kwargs)
            if name == "train/lr" and self.step == stop_step:
                os.kill(os.getpid(), signal.SIGTERM)

    live = Interrupting(dir=live_dir, dvcyaml=False, save_dvc_exp=False)
    with pytest.raises(TrainingInterrupted):
        train(p, *splits, MEAN, STD, tmp_path / "part.pt", prov(p), live)
    live.end()
    # Rows logged after the last save (none here: SIGTERM saves at the step) or a stray run
    # in between must not survive: the resumed run starts a fresh directory and replays.
    (Path(live_dir) / "plots" / "metrics" / "train" / "loss.tsv").write_text("step\tloss\n99\t9\n")
    live = Live(dir=live_dir, dvcyaml=False, save_dvc_exp=False)
    os.environ[RESUME_ENV] = "1"
    try:
        train(p, *splits, MEAN, STD, tmp_path / "part.pt", prov(p), live)
    finally:
        del os.environ[RESUME_ENV]
    live.end()
    assert logs(tmp_path / "part") == expected
    summary = (tmp_path / "part" / "metrics.json").read_bytes()
    assert summary == (tmp_path / "whole" / "metrics.json").read_bytes()
    assert md5(tmp_path / "part.pt") == md5(tmp_path / "whole.pt")


def test_resume_refuses_checkpoint_with_other_params(tmp_path, splits):
    p = params()
    path = tmp_path / "m.pt"
    with pytest.raises(TrainingInterrupted):
        train(p, *splits, MEAN, STD, path, prov(p), live=SignalAtStep(2))
    other = dataclasses.replace(p, lr=0.5)
    os.environ[RESUME_ENV] = "1"
    try:
        with pytest.raises(PcamError, match=r"cannot resume.*params train.lr: 0.002 -> 0.5"):
            train(other, *splits, MEAN, STD, path, prov(other))
        # Same params, other code (or data): refused too.
        changed = prov(p) | {"code": {"pcam/training.py": "0" * 32}}
        with pytest.raises(PcamError, match=r"cannot resume.*code pcam/training.py"):
            train(p, *splits, MEAN, STD, path, changed)
    finally:
        del os.environ[RESUME_ENV]


def inverted(split: Split) -> Split:
    """The split with every label flipped: the better a model learns the toy task, the worse
    its ROC-AUC and loss on this one."""
    return Split(split.name, split.x, 1 - split.y, split.index)


@pytest.fixture(scope="module")
def worsening_run(tmp_path_factory, splits):
    """A run whose validation gets worse as it learns: early stopping must end it."""
    p = params(epochs=8, early_stopping_patience=2, scheduler="none")
    path = tmp_path_factory.mktemp("worsening") / "m.pt"
    prog = train(p, splits[0], inverted(splits[1]), MEAN, STD, path, prov(p))
    return p, prog, path


def test_early_stopping_stops_after_patience_epochs_without_gain(worsening_run):
    p, prog, _ = worsening_run
    aucs = [h["val_roc_auc"] for h in prog.history]
    assert prog.stopped_early and prog.finished
    # exactly `patience` epochs after the best one, long before train.epochs
    assert len(aucs) == prog.best_epoch + p.early_stopping_patience < p.epochs, aucs
    assert prog.best_roc_auc == aucs[prog.best_epoch - 1] == max(aucs)
    assert all(a <= prog.best_roc_auc for a in aucs[prog.best_epoch :])


def test_load_model_returns_the_best_epochs_weights(worsening_run, splits):
    p, prog, path = worsening_run
    ckpt = load_checkpoint(path)
    last, best = prog.history[-1], prog.history[prog.best_epoch - 1]
    assert prog.best_epoch < len(prog.history) and best["val_loss"] != last["val_loss"]
    model = load_model(ckpt, path)
    scored = evaluate_split(model, inverted(splits[1]), MEAN, STD, 256, "cpu")
    # the best epoch's model scores as it did at that epoch's end, not as the last one did
    assert scored["loss"] == best["val_loss"] and scored["roc_auc"] == best["val_roc_auc"]
    differs = [
        k
        for k, v in ckpt["model_state"].items()
        if not torch.equal(v, ckpt["progress"]["best_state"][k])
    ]
    assert differs  # the file also holds the last weights (for a resume): they are not these


def test_plateau_scheduler_decays_the_lr_the_steps_use(tmp_path, splits):
    """train.scheduler plateau: after more than plateau_patience epochs without a val-loss
    improvement the lr drops by plateau_factor, and the next epoch's steps run at it."""
    p = params(epochs=4, scheduler="plateau", plateau_patience=1, plateau_factor=0.1)
    prog = train(p, splits[0], inverted(splits[1]), MEAN, STD, tmp_path / "m.pt", prov(p))
    expected, lr, best, bad = [], p.lr, float("inf"), 0
    for row in prog.history:
        if row["val_loss"] < best:
            best, bad = row["val_loss"], 0
        else:
            bad += 1
        if bad > p.plateau_patience:
            lr, bad = lr * p.plateau_factor, 0
        expected.append(lr)
    assert [row["lr"] for row in prog.history] == pytest.approx(expected, rel=1e-12)
    assert expected[-1] < p.lr  # the validation got worse: the lr did decay
    steps_per_epoch = len(prog.steps) // len(prog.history)
    step_lrs = [lr for _, _, _, lr in prog.steps]
    assert step_lrs == pytest.approx(
        [p.lr] * steps_per_epoch + [lr for lr in expected[:-1] for _ in range(steps_per_epoch)],
        rel=1e-12,
    )


@pytest.mark.parametrize("model", ["cnn", "mlp", "resnet"])
def test_each_model_trains_and_reloads(tmp_path, splits, model):
    p = params(model=model, epochs=1, hidden_units=8)
    path = tmp_path / "m.pt"
    train(p, *splits, MEAN, STD, path, prov(p))
    net = load_model(load_checkpoint(path), path)
    assert net(torch.zeros(2, 3, 96, 96)).shape == (2,)


def test_pickled_payload_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("this would run arbitrary code",))

    path = tmp_path / "evil.pt"
    buf = io.BytesIO()
    torch.save({"format": "pcam-checkpoint/1", "payload": Evil()}, buf)
    path.write_bytes(buf.getvalue())
    with pytest.raises(PcamError, match="refused to load"):
        load_checkpoint(path)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "junk.pt"
    path.write_bytes(b"not a zip file at all")
    with pytest.raises(PcamError, match="not a readable torch checkpoint"):
        load_checkpoint(path)
    truncated = tmp_path / "truncated.pt"
    save_checkpoint(truncated, {"w": torch.zeros(1000)})
    truncated.write_bytes(truncated.read_bytes()[:2000])
    with pytest.raises(PcamError, match="not a readable torch checkpoint"):
        load_checkpoint(truncated)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(PcamError, match="not a pcam checkpoint"):
        load_checkpoint(other)


def test_wrong_model_names_keys_and_shapes(tmp_path):
    cnn = build_model({"model": "cnn", "width": 8}).state_dict()
    with pytest.raises(PcamError, match=r"shape mismatch \[features.0.weight: checkpoint"):
        load_state_strict(build_model({"model": "cnn", "width": 4}), cnn, "x.pt")
    with pytest.raises(PcamError, match=r"missing keys \[net.1.bias.*unexpected keys"):
        load_state_strict(build_model({"model": "mlp", "hidden_units": 4}), cnn, "x.pt")


def test_weighted_sampler_balances_classes():
    y = torch.tensor([0] * 900 + [1] * 100, dtype=torch.uint8)
    order = epoch_order("weighted", y, torch.Generator().manual_seed(0))
    frac = y[order].float().mean().item()
    assert 0.45 < frac < 0.55
    perm = epoch_order("shuffle", y, torch.Generator().manual_seed(0))
    assert sorted(perm.tolist()) == list(range(1000))


def test_flip_rotate_only_moves_pixels():
    x = torch.randint(0, 256, (64, 96, 96, 3), dtype=torch.uint8)
    codes = draw_flip_rotate(torch.Generator().manual_seed(0), 64, True, True, "cpu")
    order, counts = group_by_code(codes)
    assert torch.equal(codes[order], codes.sort().values) and sum(counts) == 64
    out = flip_rotate(x[order], counts)
    for a, b, code in zip(x[order], out, codes[order].tolist(), strict=True):
        # each patch is its own source under the dihedral move its code names
        expected = torch.rot90(a.flip(1) if code & 4 else a, k=code & 3, dims=(0, 1))
        assert torch.equal(b, expected)
        assert torch.equal(a.flatten().sort().values, b.flatten().sort().values)
    assert len(set(codes.tolist())) == 8  # every code was exercised
    off_codes = draw_flip_rotate(torch.Generator().manual_seed(0), 64, False, False, "cpu")
    assert (off_codes == 0).all()
    off_order, off_counts = group_by_code(off_codes)
    assert torch.equal(off_order, torch.arange(64))  # stable: nothing moves
    assert torch.equal(flip_rotate(x, off_counts), x)
    with pytest.raises(ValueError, match="63 codes for a batch of 64"):
        flip_rotate(x, [63] + [0] * 7)


def test_normalise_matches_the_textbook_formula():
    x = torch.randint(0, 256, (5, 96, 96, 3), dtype=torch.uint8)
    mean, std = torch.tensor([0.6, 0.5, 0.7]), torch.tensor([0.2, 0.25, 0.15])
    gain = draw_color_jitter(torch.Generator().manual_seed(0), 5, 0.1, "cpu")
    for g in (None, gain):
        scaled = x.float() / 255 * (1 if g is None else g)
        expected = ((scaled - mean) / std).permute(0, 3, 1, 2)
        got = normalise(x, mean, std, g)
        assert got.shape == (5, 3, 96, 96) and got.dtype == torch.float32
        assert got.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_checkpoint_loads_with_weights_only_and_records_what_inference_needs(tmp_path, splits):
    p = params(epochs=1)
    path = tmp_path / "m.pt"
    train(p, *splits, MEAN, STD, path, prov(p))
    # the strict loader accepts it: nothing but tensors and plain containers inside
    torch.load(path, weights_only=True)
    # what predict and evaluate rebuild the model from: the architecture, the normalisation
    # training applied and the provenance it was given
    ckpt = load_checkpoint(path)
    assert ckpt["model_config"] == {"model": "cnn", "width": 4}
    mean, std = normalisation(ckpt)
    assert torch.equal(mean, MEAN) and torch.equal(std, STD)
    assert ckpt["provenance"] == prov(p)


def test_streamed_split_reads_like_resident_and_trains(tmp_path, splits):
    from pcam import h5io
    from pcam.data import StreamedX, load_split
    from tests.conftest import make_meta

    train_split, valid_split = splits
    x, y = train_split.x.numpy(), train_split.y.numpy()
    h5io.write_split(tmp_path, "train", x, y, make_meta(len(y), y))
    resident = load_split(tmp_path, "train")
    streamed = load_split(tmp_path, "train", memory_budget_gb=1e-6)
    assert isinstance(streamed.x, StreamedX) and isinstance(resident.x, torch.Tensor)
    streamed.x.block_rows = 16  # several blocks even for this tiny split
    idx = torch.tensor([70, 3, 17, 16, 79, 0])
    assert torch.equal(streamed.x[idx], resident.x[idx])
    assert torch.equal(streamed.x[10:40], resident.x[10:40])

    order = epoch_order("shuffle", streamed.y, torch.Generator().manual_seed(0), block_rows=16)
    assert sorted(order.tolist()) == list(range(len(y)))
    blocks = (order // 16).tolist()
    # each block's samples come together: the block id changes exactly n_blocks - 1 times
    assert sum(a != b for a, b in zip(blocks, blocks[1:], strict=False)) == 80 // 16 - 1

    # Trained from the streamed split, the model learns the toy task (dark centre = positive).
    p = params(epochs=4)
    prog = train(p, streamed, valid_split, MEAN, STD, tmp_path / "m.pt", prov(p))
    assert prog.finished and prog.history[-1]["val_roc_auc"] > 0.9, prog.history
