"""Tests of cmhsa.engine and cmhsa.checkpoint on tiny in-memory data (sklearn digits, 8x8)."""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from sklearn.datasets import load_digits
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models.vision_transformer import VisionTransformer
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cmhsa.checkpoint import has_checkpoint, load_checkpoint, load_weights, read_checkpoint_info, save_checkpoint
from cmhsa.config import SCHEDULERS
from cmhsa.engine import (
    TrainConfig,
    autocast_context,
    build_loss,
    build_optimizer,
    build_scheduler,
    evaluate,
    fit,
    init_distributed,
    is_main_process,
    resolve_device,
    resolve_precision,
    seed_everything,
    steps_per_epoch,
    train_one_epoch,
)

NUM_TRAIN = 1408  # 22 batches of 64; the remaining 389 digits are the validation set
RECORD_FIELDS = (
    "train_loss", "val_loss", "val_top1", "val_top5", "lr", "epoch_seconds", "images_per_second", "wall_time",
)


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    return TensorDataset(x[:NUM_TRAIN], y[:NUM_TRAIN]), TensorDataset(x[NUM_TRAIN:], y[NUM_TRAIN:])


def loaders(digits, batch_size=64, images=False):
    """Train loader with its own (fit-reseeded) shuffling generator, and a plain val loader."""
    train, val = digits
    if images:  # (N, 64) -> (N, 1, 8, 8) for the ViT
        train, val = (TensorDataset(ds.tensors[0].view(-1, 1, 8, 8), ds.tensors[1]) for ds in (train, val))
    train_loader = DataLoader(train, batch_size=batch_size, shuffle=True, drop_last=True, generator=torch.Generator())
    return train_loader, DataLoader(val, batch_size=128)


def mlp(seed=0, dropout=0.1):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Dropout(dropout), nn.Linear(64, 10))


def tiny_vit(seed=0):
    torch.manual_seed(seed)
    return VisionTransformer(img_size=8, patch_size=4, in_chans=1, embed_dim=32, depth=1, num_heads=2, num_classes=10)


def read_metrics(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_weights(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


# ------------------------------------------------------------------------------------------- training


def test_fit_learns_digits(digits, tmp_path):
    train_loader, val_loader = loaders(digits)
    cfg = TrainConfig(epochs=5, lr=1e-2, warmup_epochs=1, precision="fp32")
    result = fit(mlp(), train_loader, val_loader, cfg, tmp_path, progress=False)
    lines = read_metrics(tmp_path)
    assert [line["epoch"] for line in lines] == [0, 1, 2, 3, 4]
    assert lines[-1]["train_loss"] < 0.5 * lines[0]["train_loss"]
    assert result["val_top1"] > 85.0  # chance is 10%
    assert result["best_top1"] == max(line["val_top1"] for line in lines)
    assert result["epochs_run"] == 5
    assert all(line["precision"] == "fp32" for line in lines)  # what the run resolved, logged per epoch
    # an epoch that is the best so far saves its weights once: last/ links best/'s files
    same_file = os.path.samefile(tmp_path / "last/model.safetensors", tmp_path / "best/model.safetensors")
    assert same_file == (result["best_epoch"] == 4)


def test_metrics_fields_and_lr_follows_warmup_then_cosine(digits, tmp_path):
    train_loader, val_loader = loaders(digits)
    cfg = TrainConfig(epochs=4, lr=1e-2, warmup_epochs=1, warmup_lr=1e-5, min_lr=1e-4, precision="fp32")
    seen = []
    fit(mlp(), train_loader, val_loader, cfg, tmp_path, progress=False, phase="p1",
        on_epoch_end=lambda epoch, metrics: seen.append(epoch))
    lines = read_metrics(tmp_path)
    assert seen == [0, 1, 2, 3]
    for line in lines:
        assert line["phase"] == "p1"
        for field in RECORD_FIELDS:
            assert isinstance(line[field], float) and math.isfinite(line[field]), field
        assert 0 <= line["val_top1"] <= line["val_top5"] <= 100
    lrs = [line["lr"] for line in lines]
    # epoch 0 ends just before the peak, then the cosine decays towards min_lr
    steps = len(train_loader)
    assert lrs[0] == pytest.approx(1e-5 + (steps - 1) / steps * (1e-2 - 1e-5))
    assert lrs[1] > lrs[2] > lrs[3] > 1e-4
    assert lrs[3] < 0.1 * lrs[1]


@pytest.mark.parametrize("warmup_epochs", [0, 2])
def test_scheduler_per_step(warmup_epochs):
    cfg = TrainConfig(epochs=5, lr=1e-2, warmup_epochs=warmup_epochs, warmup_lr=1e-6, min_lr=1e-5)
    optimizer = build_optimizer(mlp(), cfg)
    updates = 10
    scheduler = build_scheduler(optimizer, cfg, updates_per_epoch=updates)
    lrs = []
    for num_updates in range(1, cfg.epochs * updates + 1):
        lrs.append(optimizer.param_groups[0]["lr"])  # lr used by this update
        scheduler.step_update(num_updates)
    warmup = warmup_epochs * updates
    assert lrs[0] == pytest.approx(1e-6 if warmup else 1e-2)
    assert lrs[warmup] == pytest.approx(1e-2)
    assert max(lrs) == pytest.approx(1e-2)
    assert all(a < b for a, b in zip(lrs[:warmup], lrs[1:warmup + 1]))  # linear rise
    assert all(a > b for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))  # cosine decay
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-5)  # min_lr at the end


def test_build_optimizer_betas_only_where_supported():
    cfg = TrainConfig(opt="adamw", opt_betas=[0.8, 0.9])
    assert build_optimizer(mlp(), cfg).param_groups[0]["betas"] == (0.8, 0.9)
    sgd = build_optimizer(mlp(), TrainConfig(opt="sgd", lr=0.1))
    assert "betas" not in sgd.param_groups[0]
    # biases get no weight decay
    assert sorted(group["weight_decay"] for group in sgd.param_groups) == [0.0, 0.05]


@pytest.mark.parametrize("warmup_epochs", [0, 1])
def test_lr_scale_groups_follow_the_schedule(warmup_epochs):
    """Each lr_scale pattern's parameters get lr x its factor at every update; the rest lr; 1-D params no decay."""
    cfg = TrainConfig(epochs=3, lr=1e-2, warmup_epochs=warmup_epochs, lr_scale={"3.*": 10.0, "0.weight": 0.1})
    model = mlp()
    optimizer = build_optimizer(model, cfg)
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    head, first, plain = (group_of[id(p)] for p in (model[3].weight, model[0].weight, model[0].bias))
    assert (head["weight_decay"], first["weight_decay"], plain["weight_decay"]) == (0.05, 0.05, 0.0)
    assert group_of[id(model[3].bias)]["weight_decay"] == 0.0 and group_of[id(model[3].bias)]["lr_scale"] == 10.0
    scheduler = build_scheduler(optimizer, cfg, updates_per_epoch=5)
    for update in range(1, 15):
        assert head["lr"] == pytest.approx(10 * plain["lr"]) and first["lr"] == pytest.approx(0.1 * plain["lr"])
        scheduler.step_update(update)
    assert plain["lr"] < 1e-2  # the schedule did move


def test_lr_scale_reaches_training_and_rejects_typos(digits, tmp_path):
    train_loader, val_loader = loaders(digits)
    model = mlp()
    before = copy.deepcopy(model)
    cfg = TrainConfig(epochs=1, lr=1e-2, precision="fp32", lr_scale={"3.*": 0.0}, max_steps_per_epoch=3)
    fit(model, train_loader, val_loader, cfg, tmp_path, progress=False)
    assert torch.equal(model[3].weight, before[3].weight) and torch.equal(model[3].bias, before[3].bias)
    assert not torch.equal(model[0].weight, before[0].weight)
    assert read_metrics(tmp_path)[0]["lr"] > 0  # the logged lr is the schedule's, not the frozen group's
    with pytest.raises(ValueError, match=r"\['head\.\*'\] match no parameter of Sequential.*'0.weight'"):
        build_optimizer(mlp(), TrainConfig(lr_scale={"head.*": 2.0}))
    with pytest.raises(ValueError, match=r"lr_scale\['3.\*'\] must be a number >= 0"):
        TrainConfig(lr_scale={"3.*": "fast"})
    with pytest.raises(ValueError, match="give one of them"):
        build_optimizer(mlp(), TrainConfig(lr_scale={"3.*": 2.0}), param_groups_fn=lambda m: m.parameters())


def test_losses():
    loss_fn, mixup_fn = build_loss(TrainConfig(mixup=0.2, label_smoothing=0.1))
    assert isinstance(loss_fn, SoftTargetCrossEntropy) and isinstance(mixup_fn, Mixup)
    loss_fn, mixup_fn = build_loss(TrainConfig(cutmix=1.0))
    assert isinstance(loss_fn, SoftTargetCrossEntropy) and isinstance(mixup_fn, Mixup)
    loss_fn, mixup_fn = build_loss(TrainConfig(label_smoothing=0.1))
    assert isinstance(loss_fn, LabelSmoothingCrossEntropy) and mixup_fn is None
    loss_fn, mixup_fn = build_loss(TrainConfig(label_smoothing=0.0))
    assert type(loss_fn) is nn.CrossEntropyLoss and mixup_fn is None


def test_fit_with_mixup_uses_soft_targets(digits, tmp_path, monkeypatch):
    calls = []
    forward = SoftTargetCrossEntropy.forward

    def spy(self, x, target):
        calls.append(target.shape)
        return forward(self, x, target)

    monkeypatch.setattr(SoftTargetCrossEntropy, "forward", spy)
    train_loader, val_loader = loaders(digits)
    cfg = TrainConfig(epochs=1, mixup=0.4, lr=3e-3, precision="fp32", max_steps_per_epoch=5)
    result = fit(mlp(), train_loader, val_loader, cfg, tmp_path, progress=False)
    assert calls == [torch.Size([64, 10])] * 5  # one-hot soft targets
    assert math.isfinite(result["train_loss"])


def test_mixup_odd_batch_is_rejected(digits):
    train, _ = digits
    loader = DataLoader(TensorDataset(*(t[:63] for t in train.tensors)), batch_size=63)
    model, cfg = mlp(), TrainConfig(mixup=0.2, precision="fp32")
    loss_fn, mixup_fn = build_loss(cfg)
    with pytest.raises(ValueError, match="even batch"):
        train_one_epoch(model, loader, build_optimizer(model, cfg), loss_fn, cfg, 0, mixup_fn=mixup_fn,
                        progress=False)


def test_a_batch_larger_than_the_data_is_an_error_with_the_fix(digits, tmp_path):
    train, val = digits
    small = TensorDataset(*(t[:100] for t in train.tensors))
    loader = DataLoader(small, batch_size=128, shuffle=True, drop_last=True, generator=torch.Generator())
    with pytest.raises(ValueError, match=r"100 training images, batch_size 128 and drop_last .*train.batch_size"):
        fit(mlp(), loader, DataLoader(val), TrainConfig(epochs=1, precision="fp32"), tmp_path, progress=False)
    loader = DataLoader(small, batch_size=64, shuffle=True, drop_last=True, generator=torch.Generator())
    with pytest.raises(ValueError, match=r"100 training images, batch_size 64 x grad_accum_steps 2 .* or "
                                         r"grad_accum_steps or train on more images"):
        fit(mlp(), loader, DataLoader(val), TrainConfig(epochs=1, precision="fp32", grad_accum_steps=2), tmp_path,
            progress=False)


def test_accumulated_batches_make_the_step_of_one_batch_their_size(digits):
    """grad_accum_steps=4 of 16 images is one step on their 64: the same loss, clipped gradient and update (a
    batch's loss is its mean, so each is divided by 4); the 5th batch of 16 left over is not used."""
    train, _ = digits
    data = TensorDataset(*(t[:80] for t in train.tensors))
    cfg = TrainConfig(epochs=1, lr=1e-2, precision="fp32", clip_grad=0.5, label_smoothing=0.0)
    one, accumulated = mlp(seed=0, dropout=0.0), mlp(seed=0, dropout=0.0)  # no dropout: no random draws
    results = []
    for model, batch, accum in ((one, 64, 1), (accumulated, 16, 4)):
        run_cfg = dataclasses.replace(cfg, grad_accum_steps=accum)
        loader = DataLoader(data, batch_size=batch, drop_last=True)
        assert steps_per_epoch(loader, run_cfg) == 1
        results.append(train_one_epoch(model, loader, build_optimizer(model, run_cfg), build_loss(run_cfg)[0],
                                       run_cfg, epoch=0, progress=False))
    assert results[0]["steps"] == results[1]["steps"] == 1 and results[1]["images_per_second"] > 0
    assert results[0]["train_loss"] == pytest.approx(results[1]["train_loss"], rel=1e-6)
    for a, b in zip(one.parameters(), accumulated.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(a, b) for a, b in zip(one.parameters(), mlp(seed=0).parameters()))  # it did step


def test_max_steps_per_epoch(digits):
    train_loader, _ = loaders(digits)
    assert steps_per_epoch(train_loader, TrainConfig()) == len(train_loader) == 22
    assert steps_per_epoch(train_loader, TrainConfig(max_steps_per_epoch=3)) == 3
    model, cfg = mlp(), TrainConfig(max_steps_per_epoch=3, precision="fp32")
    loss_fn, _ = build_loss(cfg)
    stats = train_one_epoch(model, train_loader, build_optimizer(model, cfg), loss_fn, cfg, 0, progress=False)
    assert stats["steps"] == 3
    assert stats["images_per_second"] > 0 and stats["epoch_seconds"] > 0


# ------------------------------------------------------------------------------------------ precision


def test_autocast_contexts():
    layer = nn.Linear(8, 8)
    x = torch.randn(2, 8)
    with autocast_context("cpu", "bf16"):
        assert layer(x).dtype == torch.bfloat16
    with autocast_context(torch.device("cpu"), "fp32"):
        assert layer(x).dtype == torch.float32
    assert resolve_precision("cpu", "fp32") == "fp32"
    assert resolve_precision("cpu", "auto") == "fp32"  # no model: never a bf16 guess
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("cpu", "fp64")


def test_cpu_auto_precision_rule():
    """bf16 only where measured faster: CMHSA models with AMX, CMHSA attention phases with AVX512-BF16."""
    from timm.models.vision_transformer import VisionTransformer

    from cmhsa.engine import cpu_auto_precision
    from cmhsa.models import CMHSA

    kw = dict(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed="pixel", pixel_dim=2, depth=1,
              kernel_size=3, mlp_ratio=1.0)
    conv, paper, fact = CMHSA(**kw), CMHSA(**kw, mixer="attn"), CMHSA(**kw, mixer="attn", form="factorized")
    vit = VisionTransformer(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=8, depth=1, num_heads=2)
    expected = {
        "amx": {"conv": "bf16", "paper": "bf16", "fact": "bf16", "vit": "fp32", "none": "fp32"},
        "avx512_bf16": {"conv": "fp32", "paper": "bf16", "fact": "bf16", "vit": "fp32", "none": "fp32"},
        "none": {"conv": "fp32", "paper": "fp32", "fact": "fp32", "vit": "fp32", "none": "fp32"},
    }
    models = {"conv": conv, "paper": paper, "fact": fact, "vit": vit, "none": None}
    for support, answers in expected.items():
        for name, precision in answers.items():
            assert cpu_auto_precision(support, models[name]) == precision, (support, name)
    wrapped = nn.Sequential()
    wrapped.module = fact  # a DDP-style wrapper is looked through
    assert cpu_auto_precision("avx512_bf16", wrapped) == "bf16"


def test_bf16_training_on_cpu_is_finite(digits):
    train_loader, val_loader = loaders(digits, images=True)
    model, cfg = tiny_vit(), TrainConfig(precision="bf16", lr=1e-3, max_steps_per_epoch=8)
    loss_fn, _ = build_loss(cfg)
    stats = train_one_epoch(model, train_loader, build_optimizer(model, cfg), loss_fn, cfg, 0, progress=False)
    assert math.isfinite(stats["train_loss"])
    metrics = evaluate(model, val_loader, "cpu", "bf16", num_classes=10)
    assert all(math.isfinite(v) for v in metrics.values())


def test_fp32_gives_float32_grads(digits):
    train_loader, _ = loaders(digits, images=True)
    model, cfg = tiny_vit(), TrainConfig(precision="fp32", max_steps_per_epoch=2)
    loss_fn, _ = build_loss(cfg)
    train_one_epoch(model, train_loader, build_optimizer(model, cfg), loss_fn, cfg, 0, progress=False)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 for g in grads)


# -------------------------------------------------------------------------------------------- evaluate


class LogitTable(nn.Module):
    """Returns a fixed row of logits per sample index: a model whose predictions we know exactly."""

    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(logits)

    def forward(self, index):
        return self.logits[index.long().squeeze(-1)]


@pytest.mark.parametrize("num_classes", [10, 3])
def test_evaluate_matches_manual_computation(num_classes):
    gen = torch.Generator().manual_seed(0)
    n = 37  # batches of 8: a short last batch checks the per-sample averaging
    logits = torch.randn(n, num_classes, generator=gen)
    targets = torch.randint(0, num_classes, (n,), generator=gen)
    loader = DataLoader(TensorDataset(torch.arange(n).float().unsqueeze(1), targets), batch_size=8)
    metrics = evaluate(LogitTable(logits), loader, "cpu", "fp32", num_classes=num_classes)

    k = min(5, num_classes)
    top1 = (logits.argmax(1) == targets).float().mean().item() * 100
    topk = (logits.topk(k, dim=1).indices == targets[:, None]).any(1).float().mean().item() * 100
    assert metrics["loss"] == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-6)
    assert metrics["top1"] == pytest.approx(top1, abs=1e-4)
    assert metrics["top5"] == pytest.approx(topk, abs=1e-4)
    if num_classes <= 5:
        assert metrics["top5"] == pytest.approx(100.0)


def test_evaluate_rejects_wrong_num_classes():
    loader = DataLoader(TensorDataset(torch.zeros(4, 1), torch.zeros(4, dtype=torch.int64)), batch_size=4)
    with pytest.raises(ValueError, match="outputs 3 classes but num_classes=10"):
        evaluate(LogitTable(torch.zeros(4, 3)), loader, "cpu", "fp32", num_classes=10)


# ------------------------------------------------------------------------------------------ checkpoint


class TiedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(6, 6)
        self.decoder = nn.Linear(6, 6)
        self.decoder.weight = self.encoder.weight  # tied: one storage under two names

    def forward(self, x):
        return self.decoder(torch.relu(self.encoder(x)))


def _train_steps(model, optimizer, scheduler, ema, steps, start=0):
    for step in range(start, start + steps):
        loss = model(torch.randn(4, 6)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step_update(step + 1)
        ema.update(model, step=step + 1)


def _rng_draws():
    return torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)]


def test_checkpoint_round_trip(tmp_path):
    cfg = TrainConfig(epochs=2, warmup_epochs=1)
    model = TiedNet()
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, updates_per_epoch=3)
    ema = ModelEmaV3(model, decay=0.5)
    _train_steps(model, optimizer, scheduler, ema, 3)
    random.gauss(0, 1)  # leaves a cached gaussian in python's RNG state
    saved_weights = {k: v.clone() for k, v in model.state_dict().items()}
    saved_ema = {k: v.clone() for k, v in ema.module.state_dict().items()}
    saved_optimizer = copy.deepcopy(optimizer.state_dict())  # state_dict() shares the live tensors
    saved_lr = optimizer.param_groups[0]["lr"]

    extra = {"note": "hi", "acc": 1.5}
    ckpt = save_checkpoint(tmp_path / "ckpt", model, optimizer, scheduler, ema, epoch=7, extra=extra)
    assert sorted(os.listdir(ckpt)) == ["ema.safetensors", "model.safetensors", "state.pt"]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # staging dirs cleaned up
    expected_draws = _rng_draws()

    # Files are plain safetensors and a weights_only-loadable state file.
    assert load_file(ckpt / "model.safetensors").keys() == saved_weights.keys()
    state = torch.load(ckpt / "state.pt", weights_only=True)
    assert state["epoch"] == 7 and state["extra"] == {"note": "hi", "acc": 1.5}

    # Move everything on, then restore into fresh objects.
    _train_steps(model, optimizer, scheduler, ema, 2, start=3)
    model2 = TiedNet()
    optimizer2 = build_optimizer(model2, cfg)
    scheduler2 = build_scheduler(optimizer2, TrainConfig(epochs=9), updates_per_epoch=1)
    ema2 = ModelEmaV3(model2, decay=0.5)
    info = load_checkpoint(ckpt, model2, optimizer2, scheduler2, ema2)
    assert info == {"epoch": 7, "extra": {"note": "hi", "acc": 1.5}}
    assert model2.decoder.weight is model2.encoder.weight  # tying survives loading
    for name, value in model2.state_dict().items():
        assert torch.equal(value, saved_weights[name]), name
    for name, value in ema2.module.state_dict().items():
        assert torch.equal(value, saved_ema[name]), name
    restored = optimizer2.state_dict()
    assert restored["param_groups"] == saved_optimizer["param_groups"]
    for param_id, param_state in saved_optimizer["state"].items():
        for key, value in param_state.items():
            assert torch.equal(restored["state"][param_id][key], value), key
    assert optimizer2.param_groups[0]["lr"] == saved_lr
    assert scheduler2.state_dict() == scheduler.state_dict()
    torch_draw, np_draw, py_draw = _rng_draws()
    assert torch.equal(torch_draw, expected_draws[0])
    assert np.array_equal(np_draw, expected_draws[1])
    assert py_draw == expected_draws[2]


def test_checkpoint_errors_and_crash_recovery(tmp_path):
    model = mlp()
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "missing")):
        load_checkpoint(tmp_path / "missing", model)
    assert not has_checkpoint(tmp_path / "missing")

    ckpt = save_checkpoint(tmp_path / "ckpt", model, epoch=0)
    with pytest.raises(ValueError, match="saved without optimizer state"):
        load_checkpoint(ckpt, model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="no ema.safetensors"):
        load_checkpoint(ckpt, model, ema=ModelEmaV3(model))

    # A crash between "move old aside" and "move new in" leaves only the aside copy: still loadable.
    os.replace(ckpt, tmp_path / ".ckpt.previous")
    assert has_checkpoint(ckpt)
    assert read_checkpoint_info(ckpt)["epoch"] == 0
    save_checkpoint(ckpt, model, epoch=1)  # the next save replaces it cleanly
    assert read_checkpoint_info(ckpt)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]

    (ckpt / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="non-checkpoint files"):
        save_checkpoint(ckpt, model, epoch=2)


def test_checkpoint_links_the_weights_of_one_just_saved(tmp_path):
    """``weights_from``: the weight files are hard links to that checkpoint's, and each directory stays its own
    when the other is saved again."""
    model = mlp()
    ema = ModelEmaV3(model, decay=0.5)
    best = save_checkpoint(tmp_path / "best", model, ema=ema, epoch=0)
    last = save_checkpoint(tmp_path / "last", model, torch.optim.SGD(model.parameters(), lr=0.1), ema=ema, epoch=0,
                           weights_from=best)
    for name in ("model.safetensors", "ema.safetensors"):
        assert os.path.samefile(best / name, last / name)
    kept = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    save_checkpoint(best, model, epoch=1)  # replaced, not written in place: last/ keeps the epoch-0 weights
    assert not os.path.samefile(best / "model.safetensors", last / "model.safetensors")
    assert all(torch.equal(v, kept[k]) for k, v in load_file(last / "model.safetensors").items())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in load_file(best / "model.safetensors").items())
    # a source without the file (no EMA saved there): written instead
    plain = save_checkpoint(tmp_path / "plain", model, epoch=1)
    again = save_checkpoint(tmp_path / "again", model, ema=ema, epoch=1, weights_from=plain)
    assert os.path.samefile(plain / "model.safetensors", again / "model.safetensors")
    assert load_file(again / "ema.safetensors").keys() == kept.keys()


def test_missing_ema_non_strict_starts_from_model(tmp_path):
    model = mlp()
    ckpt = save_checkpoint(tmp_path / "ckpt", model, epoch=0)
    ema = ModelEmaV3(mlp(seed=1))
    with pytest.warns(UserWarning, match="EMA starts from the loaded model weights"):
        load_checkpoint(ckpt, mlp(seed=2), ema=ema, strict=False)
    assert_same_weights(ema.module, model)


def test_load_weights_strips_wrapper_prefixes(tmp_path):
    source = mlp(seed=1)
    # As saved from DDP(torch.compile(model)) by someone else.
    wrapped = {f"module._orig_mod.{k}": v.contiguous() for k, v in source.state_dict().items()}
    save_file(wrapped, tmp_path / "wrapped.safetensors")
    target = mlp(seed=2)
    load_weights(tmp_path / "wrapped.safetensors", target)
    assert_same_weights(target, source)

    # Into a compiled model (torch.compile is lazy, wrapping costs nothing), from a checkpoint directory.
    save_checkpoint(tmp_path / "ckpt", source, epoch=0)
    target = mlp(seed=3)
    load_weights(tmp_path / "ckpt", torch.compile(target))
    assert_same_weights(target, source)

    # A plain directory holding model.safetensors (no state.pt) works too.
    plain = tmp_path / "plain"
    plain.mkdir()
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, plain / "model.safetensors")
    target = mlp(seed=4)
    load_weights(plain, target)
    assert_same_weights(target, source)

    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_weights(tmp_path / "nope.safetensors", target)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_weights(tmp_path / "missing_dir", target)


# ---------------------------------------------------------------------------------------- fit / resume


class Interrupt(Exception):
    pass


def _resume_cfg(**overrides):
    # Mixup (numpy RNG), dropout (torch RNG), EMA and warm-up all have to be replayed exactly.
    return TrainConfig(epochs=4, lr=3e-3, warmup_epochs=1, precision="fp32", mixup=0.3, ema_decay=0.9, seed=3,
                       **overrides)


def test_eval_every_skips_evaluations_and_leaves_training_unchanged(digits, tmp_path):
    every, sparse = mlp(seed=0), mlp(seed=0)
    fit(every, *loaders(digits), _resume_cfg(), tmp_path / "every", progress=False)
    result = fit(sparse, *loaders(digits), _resume_cfg(eval_every=3), tmp_path / "sparse", progress=False)
    assert_same_weights(sparse, every)  # evaluation draws no training randomness
    every_lines, sparse_lines = read_metrics(tmp_path / "every"), read_metrics(tmp_path / "sparse")
    # epochs 0-3: evaluated after the 3rd epoch (index 2) and after the last
    assert ["val_top1" in m for m in sparse_lines] == [False, False, True, True]
    assert not any(k.startswith(("val_", "ema_val_")) for k in sparse_lines[0])
    for a, b in zip(every_lines, sparse_lines):
        assert a["train_loss"] == b["train_loss"]
        assert all(a[k] == b[k] for k in b if k.startswith(("val_", "ema_val_")))
    assert result["val_top1"] == every_lines[-1]["val_top1"]
    assert result["best_top1"] == max(m["val_top1"] for m in sparse_lines if "val_top1" in m)
    assert result["best_epoch"] in (2, 3)


def test_eval_every_may_change_on_resume(digits, tmp_path, caplog):
    def stop_after_epoch_1(epoch, metrics):
        if epoch == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        fit(mlp(seed=0), *loaders(digits), _resume_cfg(eval_every=2), tmp_path, progress=False,
            on_epoch_end=stop_after_epoch_1)
    with caplog.at_level(logging.INFO, logger="cmhsa"):
        result = fit(mlp(seed=0), *loaders(digits), _resume_cfg(), tmp_path, progress=False)
    assert result["epochs_run"] == 2
    assert f"[train] resuming from {tmp_path / 'last'}: 2 of 4 epochs done" in caplog.messages
    assert ["val_top1" in m for m in read_metrics(tmp_path)] == [False, True, True, True]


def _shrink_first_weights(epoch, model):
    """An ``on_epoch_start`` that moves a parameter on a schedule (as an annealed position bias does)."""
    if epoch < 3:
        with torch.no_grad():
            next(model.parameters()).mul_(0.9)


def test_resume_is_exact(digits, tmp_path):
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    straight = mlp(seed=0)
    fit(straight, *loaders(digits), _resume_cfg(), straight_dir, progress=False, on_epoch_start=_shrink_first_weights)

    def stop_after_epoch_1(epoch, metrics):
        if epoch == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        fit(mlp(seed=0), *loaders(digits), _resume_cfg(), resumed_dir, progress=False,
            on_epoch_end=stop_after_epoch_1, on_epoch_start=_shrink_first_weights)
    assert read_checkpoint_info(resumed_dir / "last")["epoch"] == 1
    # Pretend epoch 2 had finished its metrics line when the process died, before its checkpoint landed.
    with open(resumed_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"phase": "train", "epoch": 2, "train_loss": 99.0}) + "\n")

    resumed = mlp(seed=42)  # different init: everything must come from the checkpoint
    result = fit(resumed, *loaders(digits), _resume_cfg(), resumed_dir, progress=False,
                 on_epoch_start=_shrink_first_weights)  # replays epoch 2's step, not 0's or 1's again
    assert result["epochs_run"] == 2
    assert_same_weights(resumed, straight)
    straight_ema = load_file(straight_dir / "last" / "ema.safetensors")
    resumed_ema = load_file(resumed_dir / "last" / "ema.safetensors")
    assert all(torch.equal(straight_ema[k], resumed_ema[k]) for k in straight_ema)

    straight_lines, resumed_lines = read_metrics(straight_dir), read_metrics(resumed_dir)
    assert [line["epoch"] for line in resumed_lines] == [0, 1, 2, 3]
    for a, b in zip(straight_lines, resumed_lines):
        for field in ("train_loss", "val_loss", "val_top1", "val_top5", "lr", "ema_val_top1"):
            assert a[field] == b[field], field


def test_resume_rejects_changed_config_or_phase(digits, tmp_path):
    cfg = TrainConfig(epochs=1, precision="fp32", max_steps_per_epoch=2)
    fit(mlp(), *loaders(digits), cfg, tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"config changed \(lr: 0.0005 -> 0.001\)"):
        fit(mlp(), *loaders(digits), TrainConfig(epochs=1, precision="fp32", max_steps_per_epoch=2, lr=1e-3),
            tmp_path, progress=False)
    with pytest.raises(ValueError, match="phase 'train', not 'finetune'"):
        fit(mlp(), *loaders(digits), cfg, tmp_path, phase="finetune", progress=False)
    # log_interval does not change results, so it may differ.
    fit(mlp(), *loaders(digits), TrainConfig(epochs=1, precision="fp32", max_steps_per_epoch=2, log_interval=1),
        tmp_path, progress=False)
    # resume=False starts over and replaces this phase's metrics.
    fit(mlp(), *loaders(digits), TrainConfig(epochs=1, precision="fp32", max_steps_per_epoch=2, lr=1e-3),
        tmp_path, resume=False, progress=False)
    assert len(read_metrics(tmp_path)) == 1


def test_finished_run_returns_immediately(digits, tmp_path):
    cfg = TrainConfig(epochs=2, lr=3e-3, precision="fp32", max_steps_per_epoch=5)
    trained = mlp()
    first = fit(trained, *loaders(digits), cfg, tmp_path, progress=False)
    lines_before = (tmp_path / "metrics.jsonl").read_text()

    called = []
    fresh = mlp(seed=7)
    again = fit(fresh, *loaders(digits), cfg, tmp_path, progress=False, on_epoch_end=lambda *a: called.append(a))
    assert (tmp_path / "metrics.jsonl").read_text() == lines_before
    assert not called and again["epochs_run"] == 0
    for key in ("val_top1", "val_loss", "train_loss", "best_top1", "best_epoch", "epoch"):
        assert again[key] == first[key]
    assert_same_weights(fresh, trained)  # the caller gets the trained weights


def test_ema_and_best_checkpoints(digits, tmp_path):
    cfg = TrainConfig(epochs=2, lr=3e-3, precision="fp32", ema_decay=0.9, max_steps_per_epoch=6)
    model = mlp()
    result = fit(model, *loaders(digits), cfg, tmp_path, progress=False)
    for name in ("last", "best"):
        assert (tmp_path / name / "ema.safetensors").is_file()
    ema_model = mlp(seed=1)
    load_weights(tmp_path / "last" / "ema.safetensors", ema_model)
    assert not torch.equal(ema_model[0].weight, model[0].weight)  # an average, not a copy
    assert "ema_val_top1" in result
    best = read_checkpoint_info(tmp_path / "best")
    assert best["epoch"] == result["best_epoch"]
    assert best["extra"]["metrics"]["val_top1"] == result["best_top1"]

    plain_dir = tmp_path / "plain"
    fit(mlp(), *loaders(digits), TrainConfig(epochs=1, precision="fp32", max_steps_per_epoch=2), plain_dir,
        progress=False)
    assert not (plain_dir / "last" / "ema.safetensors").exists()


# ----------------------------------------------------------------------------------------------- misc


def test_seed_everything_is_deterministic():
    seed_everything(5)
    first = _rng_draws()
    seed_everything(5)
    second = _rng_draws()
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1]) and first[2] == second[2]


def test_single_process_helpers(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert init_distributed() == (0, 1, 0)
    assert is_main_process()
    assert resolve_device(TrainConfig(device="cpu")) == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device(TrainConfig()) == torch.device("cpu")
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device(TrainConfig(device="cuda"))


@pytest.mark.parametrize("sched", SCHEDULERS)
def test_every_accepted_scheduler_name_is_one_timm_builds(sched):
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = build_scheduler(optimizer, TrainConfig(sched=sched, epochs=4, warmup_epochs=1), 5)
    assert (scheduler is None) == (sched == "none")


def test_config_validation():
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="half")
    with pytest.raises(ValueError, match="sched must be one of .*got 'plateau'"):
        TrainConfig(sched="plateau")
    with pytest.raises(ValueError, match="sched must be one of 'cosine'.*got 'cosin'"):
        TrainConfig(sched="cosin")
    with pytest.raises(ValueError, match="opt must be a timm optimizer name.*got 'adamww'"):
        TrainConfig(opt="adamww")
    assert TrainConfig(opt="lookahead_adamw").opt == "lookahead_adamw"
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match=r"warmup_epochs must be in \[0, epochs=2\), got 2: lower warmup_epochs"):
        TrainConfig(epochs=2, warmup_epochs=2)


def test_checkpoint_every_keeps_epoch_weights(digits, tmp_path):
    cfg = TrainConfig(epochs=4, lr=3e-3, precision="fp32", max_steps_per_epoch=3, checkpoint_every=2)
    model = mlp()
    fit(model, *loaders(digits), cfg, tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.glob("epoch_*")) == ["epoch_002", "epoch_004"]
    assert read_checkpoint_info(tmp_path / "epoch_002")["epoch"] == 1
    final = mlp(seed=3)
    load_weights(tmp_path / "epoch_004", final)
    assert_same_weights(final, model)  # the last epoch's weights are the final ones
    # how often weights are kept does not change training, so a finished run still counts as the same run
    again = fit(mlp(seed=5), *loaders(digits), dataclasses.replace(cfg, checkpoint_every=0), tmp_path, progress=False)
    assert again["epochs_run"] == 0
    with pytest.raises(ValueError, match="checkpoint_every"):
        TrainConfig(checkpoint_every=-1)
    with pytest.raises(ValueError, match="eval_every"):
        TrainConfig(eval_every=0)
