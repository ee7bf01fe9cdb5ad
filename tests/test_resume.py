"""Exact resume for real: `cmhsa pipeline` killed with SIGKILL in the middle of a phase-2 epoch, then run again,
ends with the weights and metrics of an uninterrupted run; and the same with data-loader workers."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch.utils.data import Dataset

from cmhsa.config import TrainConfig
from cmhsa.data import create_loader
from cmhsa.engine import fit
from cmhsa.rundir import PhaseDir

# digits, a 1-layer CMHSA with a trainable embedding, fp32, no workers; mixup and dropout use the RNGs
TINY = ["data.dataset=digits", "data.img_size=8", "data.train_subset=300", "data.val_subset=100",
        "data.augment=light", "model.name=cmhsa3_conv_tiny",
        "model.kwargs={patch_size: 2, pixel_dim: 4, depth: 1, mlp_ratio: 1.0, drop_path_rate: 0.1}",
        "convert.qk_std=0.02", "convert.kwargs={drop_path_rate: 0.1}", "train.batch_size=16",
        "train.precision=fp32", "train.mixup=0.2", "train.lr=3.0e-3", "phase1.epochs=1", "phase2.epochs=3",
        "phase1.warmup_epochs=0", "phase2.warmup_epochs=1", "name=killed"]
TIMING = {"epoch_seconds", "images_per_second", "wall_time"}


def _metrics(run: Path, phase: str):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in PhaseDir(run / phase).read_metrics()]


def _phase2_epochs_done(run: Path) -> int:
    return len(PhaseDir(run / "phase2").read_metrics())


# `cmhsa pipeline` that SIGKILLs itself at the 5th optimizer step after phase 2's first checkpoint exists: in the
# middle of phase 2's second epoch, whatever the machine's speed (a timed kill raced fast machines to the end)
KILL_MID_EPOCH = """
import os, pathlib, signal, sys
from torch.optim.optimizer import register_optimizer_step_post_hook
from cmhsa.cli import main
checkpoint = pathlib.Path(sys.argv[1]) / "phase2" / "last" / "state.pt"
steps = []
def kill_mid_epoch(optimizer, args, kwargs):
    if checkpoint.exists():
        steps.append(1)
        if len(steps) == 5:
            os.kill(os.getpid(), signal.SIGKILL)
register_optimizer_step_post_hook(kill_mid_epoch)
sys.exit(main(sys.argv[2:]))
"""


def test_sigkill_in_phase2_then_rerun_equals_an_uninterrupted_run(tmp_path):
    # every run is a one-thread subprocess: the test process's own thread count would change reduction order
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight = tmp_path / "straight"
    done = subprocess.run([sys.executable, "-m", "cmhsa", "pipeline", "--output", str(straight), "--set", *TINY],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    killed = tmp_path / "killed"
    args = ["pipeline", "--output", str(killed), "--set", *TINY]
    cmd = [sys.executable, "-m", "cmhsa", *args]
    proc = subprocess.run([sys.executable, "-c", KILL_MID_EPOCH, str(killed), *args], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert _phase2_epochs_done(killed) == 1  # killed inside the second epoch

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    for phase in ("phase1", "phase2"):
        assert _metrics(killed, phase) == _metrics(straight, phase)
        for which in ("last", "best"):
            a, b = load_file(killed / phase / which / "model.safetensors"), \
                load_file(straight / phase / which / "model.safetensors")
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (phase, which)


class _NoisyDigits(Dataset):
    """Each item draws noise from the torch RNG of whichever process loads it (a worker, with workers)."""

    def __init__(self):
        from sklearn.datasets import load_digits
        digits = load_digits()
        self.x = torch.tensor(digits.data[:384], dtype=torch.float32) / 16
        self.y = torch.tensor(digits.target[:384])

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i] + 0.3 * torch.randn(64), self.y[i]


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.GELU(), torch.nn.Linear(32, 10))


def test_resume_with_two_workers_is_exact(tmp_path):
    cfg = TrainConfig(epochs=3, lr=3e-3, precision="fp32", seed=2)
    dataset = _NoisyDigits()

    val = torch.utils.data.TensorDataset(dataset.x, dataset.y)  # validation never augments

    def loaders():
        return (create_loader(dataset, 32, training=True, num_workers=2),
                create_loader(val, 128, training=False, num_workers=2))

    straight = _model()
    fit(straight, *loaders(), cfg, tmp_path / "straight", progress=False)

    def stop_after_epoch_0(epoch, _):
        if epoch == 0:
            raise KeyboardInterrupt

    try:
        fit(_model(), *loaders(), cfg, tmp_path / "resumed", progress=False, on_epoch_end=stop_after_epoch_0)
    except KeyboardInterrupt:
        pass
    resumed = _model()
    result = fit(resumed, *loaders(), cfg, tmp_path / "resumed", progress=False)  # fresh loaders, fresh workers
    assert result["epochs_run"] == 2
    assert all(torch.equal(a, b) for a, b in zip(resumed.state_dict().values(), straight.state_dict().values()))
    strip = lambda run: [{k: v for k, v in r.items() if k not in TIMING} for r in PhaseDir(run).read_metrics()]  # noqa: E731
    assert strip(tmp_path / "resumed") == strip(tmp_path / "straight")
