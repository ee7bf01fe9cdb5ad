"""Two-rank DDP run of ``fit`` (gloo on CPU), launched through torchrun like the CLI will be."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cmhsa.checkpoint import load_weights
from cmhsa.engine import evaluate

NUM_TRAIN, NUM_VAL = 1408, 388  # NUM_VAL even: DistributedSampler splits it exactly, no padding

WORKER = textwrap.dedent(
    f"""
    import json, sys
    from pathlib import Path

    import torch
    import torch.distributed as dist
    from sklearn.datasets import load_digits
    from torch import nn
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    from cmhsa.engine import TrainConfig, fit, init_distributed, is_main_process

    out = Path(sys.argv[1])
    rank, world_size, local_rank = init_distributed()
    assert dist.is_initialized() and dist.get_backend() == "gloo" and world_size == 2
    assert is_main_process() == (rank == 0)
    torch.set_num_threads(1)  # two ranks on two cores

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    train = TensorDataset(x[:{NUM_TRAIN}], y[:{NUM_TRAIN}])
    val = TensorDataset(x[{NUM_TRAIN}:{NUM_TRAIN + NUM_VAL}], y[{NUM_TRAIN}:{NUM_TRAIN + NUM_VAL}])
    train_loader = DataLoader(train, batch_size=32, sampler=DistributedSampler(train, seed=0), drop_last=True)
    val_loader = DataLoader(val, batch_size=64, sampler=DistributedSampler(val, shuffle=False))

    torch.manual_seed(100 + rank)  # different init per rank: fit must start every rank from rank 0's weights
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Dropout(0.1), nn.Linear(64, 10))
    # 2 batches a step: the first backward skips DDP's all-reduce (no_sync), the second syncs the summed gradients
    cfg = TrainConfig(epochs=1, lr=3e-3, precision="fp32", mixup=0.2, ema_decay=0.9, grad_accum_steps=2)
    result = fit(model, train_loader, val_loader, cfg, out / "run", progress=False)

    torch.save(model.state_dict(), out / f"rank{{rank}}.pt")
    (out / f"rank{{rank}}.json").write_text(json.dumps(result))
    dist.destroy_process_group()
    """
)


def test_two_rank_fit(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
         str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # Both ranks end with identical weights (with gradient accumulation too), equal to the checkpoint rank 0 wrote.
    weights = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name

    run = tmp_path / "run"
    assert sorted(os.listdir(run)) == ["best", "last", "metrics.jsonl"]  # no leftovers, no per-rank files
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1  # written once, by rank 0
    record = json.loads(lines[0])
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for key in ("train_loss", "val_loss", "val_top1", "val_top5", "ema_val_top1"):
        assert results[0][key] == results[1][key] == record[key], key

    # The all-reduced validation metrics equal a single-process evaluation of the same weights.
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32)[NUM_TRAIN:NUM_TRAIN + NUM_VAL] / 16.0
    y = torch.tensor(digits.target)[NUM_TRAIN:NUM_TRAIN + NUM_VAL]
    val_loader = DataLoader(TensorDataset(x, y), batch_size=100)
    for weights_file, prefix in (("model.safetensors", "val_"), ("ema.safetensors", "ema_val_")):
        model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Dropout(0.1), nn.Linear(64, 10))
        load_weights(run / "last" / weights_file, model)
        if weights_file == "model.safetensors":
            for name, value in model.state_dict().items():
                assert torch.equal(value, weights[0][name]), name
        metrics = evaluate(model, val_loader, "cpu", "fp32", num_classes=10)
        assert metrics["top1"] == pytest.approx(record[prefix + "top1"], abs=1e-6)
        assert metrics["top5"] == pytest.approx(record[prefix + "top5"], abs=1e-6)
        assert metrics["loss"] == pytest.approx(record[prefix + "loss"], rel=1e-5)


def test_torchrun_cmhsa_train_cli(tmp_path):
    """`torchrun --nproc_per_node=2 -m cmhsa train ...` with gloo on CPU: one run directory, resumable weights."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "cmhsa",
           "train", "--output", str(out), "--device", "cpu", "--precision", "fp32", "--set",
           "data.dataset=digits", "data.img_size=8", "data.train_subset=null", "data.val_subset=null",
           "data.augment=none", "model.name=cmhsa3_conv_tiny",
           "model.kwargs={patch_size: 2, pixel_dim: 8, depth: 2, mlp_ratio: 2.0}", "train.batch_size=32",
           "phase1.epochs=2", "phase1.lr=3.0e-3", "phase1.warmup_epochs=0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (out / "train" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2  # written once, by rank 0
    assert proc.stdout.count("val top-1") == 2  # each rank prints its final line
    assert (out / "train" / "last" / "model.safetensors").exists() and (out / "config.yaml").exists()
