"""The run directory: its lock, atomic writes, and what resume does with a corrupt checkpoint."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cmhsa import atomic
from cmhsa.checkpoint import CheckpointCorrupt
from cmhsa.config import TrainConfig
from cmhsa.engine import fit
from cmhsa.rundir import PhaseDir, RunDir, RunDirLocked

HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from cmhsa.rundir import RunDir
    RunDir(sys.argv[1]).lock()
    print("locked", flush=True)
    time.sleep(60)
""")


def test_a_second_process_fails_at_once_and_a_killed_holder_does_not_block(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert holder.stdout.readline().strip() == "locked"
        start = time.perf_counter()
        with pytest.raises(RunDirLocked, match=f"in use by process {holder.pid}.*another --output"):
            RunDir(tmp_path).lock()
        assert time.perf_counter() - start < 1  # at once, no waiting
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    run = RunDir(tmp_path)
    run.lock()  # the kernel dropped the dead holder's lock; its PID is still in the file, harmlessly
    assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())
    run.unlock()


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    atomic.atomic_write_json(path, {"top1": 1})

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic.atomic_write_json(path, {"top1": 2})
    assert path.read_text() == '{\n  "top1": 1\n}' and sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_metrics_truncation_drops_later_epochs_and_torn_lines(tmp_path):
    phase = PhaseDir(tmp_path)
    for epoch in range(3):
        phase.append_metrics({"phase": "p", "epoch": epoch})
    with open(phase.metrics_path, "a") as f:
        f.write('{"phase": "p", "ep')  # torn by a crash
    assert [r["epoch"] for r in phase.read_metrics()] == [0, 1, 2]
    phase.truncate_metrics("p", 1)
    assert phase.metrics_path.read_text().splitlines() == ['{"phase": "p", "epoch": 0}', '{"phase": "p", "epoch": 1}']


# --------------------------------------------------------------------------------------- corrupt checkpoints


def _loaders():
    digits = load_digits()
    x, y = torch.tensor(digits.data, dtype=torch.float32) / 16, torch.tensor(digits.target)
    train = DataLoader(TensorDataset(x[:512], y[:512]), batch_size=64, shuffle=True,
                       generator=torch.Generator().manual_seed(0), drop_last=True)
    return train, DataLoader(TensorDataset(x[1500:], y[1500:]), batch_size=128)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.Dropout(0.1), nn.Linear(32, 10))


CFG = TrainConfig(epochs=3, lr=3e-3, precision="fp32", ema_decay=0.9, seed=1)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


CORRUPTIONS = {
    "truncated state.pt": ("state.pt", _truncate),
    "empty state.pt": ("state.pt", lambda p: p.write_bytes(b"")),
    "random state.pt": ("state.pt", lambda p: p.write_bytes(os.urandom(4096))),
    "truncated model.safetensors": ("model.safetensors", _truncate),
}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    model = _mlp()
    fit(model, *_loaders(), CFG, tmp_path_factory.mktemp("straight"), progress=False)
    return model.state_dict()


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_checkpoint_falls_back_to_the_previous_one(case, straight, tmp_path):
    """Stopped after epoch 2 of 3 with last/ damaged: resume says which file, goes back to epoch 1's checkpoint,
    and still ends exactly where an uninterrupted run does."""
    name, corrupt = CORRUPTIONS[case]
    with pytest.raises(KeyboardInterrupt):
        fit(_mlp(), *_loaders(), CFG, tmp_path, progress=False, on_epoch_end=_stop_after(1))
    corrupt(tmp_path / "last" / name)
    resumed = _mlp()
    with pytest.warns(UserWarning, match=rf"{tmp_path / 'last' / name} is corrupt.*checkpoint before it"):
        result = fit(resumed, *_loaders(), CFG, tmp_path, progress=False)
    assert result["epochs_run"] == 2  # epochs 1 and 2 again, from epoch 0's checkpoint
    assert all(torch.equal(resumed.state_dict()[k], v) for k, v in straight.items())
    assert [r["epoch"] for r in PhaseDir(tmp_path).read_metrics()] == [0, 1, 2]


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_checkpoint_without_a_previous_one_names_the_file(case, tmp_path):
    name, corrupt = CORRUPTIONS[case]
    with pytest.raises(KeyboardInterrupt):
        fit(_mlp(), *_loaders(), CFG, tmp_path, progress=False, on_epoch_end=_stop_after(0))
    assert not (tmp_path / ".last.previous").exists()  # after one epoch there is nothing before it
    corrupt(tmp_path / "last" / name)
    with pytest.raises(CheckpointCorrupt) as e:
        fit(_mlp(), *_loaders(), CFG, tmp_path, progress=False)
    message = str(e.value)
    assert str(tmp_path / "last" / name) in message and "--no-resume" in message
    assert "weights_only" not in message  # torch's hint about unpickling would mislead here


def _stop_after(stop: int):
    def hook(epoch, _):
        if epoch == stop:
            raise KeyboardInterrupt

    return hook
