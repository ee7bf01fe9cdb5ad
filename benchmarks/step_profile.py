"""Where one training step of each phase goes: data loading and augmentation, forward, backward, optimizer.

Runs the presets' data pipeline (``configs/fmnist_tiny.yaml``: Fashion-MNIST, light augmentation, the loader
``cmhsa pipeline`` builds) into the CMHSA conv phase and both attention forms, each in the precision ``auto`` picks
for it, with mixup and the scheduler-free AdamW step as in ``engine.train_one_epoch``. Each part is timed over
``--steps`` steps after a warm-up, and printed as a markdown table with its share of the step.

    python benchmarks/step_profile.py                   # batch 128, 10 steps per model
    python benchmarks/step_profile.py --augment none    # the same without augmentation
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import timm
import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy

import cmhsa  # noqa: F401  (registers the CMHSA models)
from cmhsa.config import load_config
from cmhsa.engine import autocast_context, resolve_precision
from cmhsa.pipeline import build_loaders

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "fmnist_tiny.yaml"
PARTS = ("data + augmentation", "forward", "backward", "optimizer")


def profile(name: str, loader, steps: int, warmup: int = 2) -> dict:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).train()
    precision = resolve_precision("cpu", "auto", model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.05)
    mixup = Mixup(mixup_alpha=0.2, label_smoothing=0.1, num_classes=10)
    loss_fn = SoftTargetCrossEntropy()
    totals = dict.fromkeys(PARTS, 0.0)
    batches = iter(loader)
    for step in range(warmup + steps):
        t0 = time.perf_counter()
        try:
            images, targets = next(batches)
        except StopIteration:  # a new epoch, as the training loop would start one
            batches = iter(loader)
            images, targets = next(batches)
        images, targets = mixup(images, targets)
        t1 = time.perf_counter()
        with autocast_context("cpu", precision):
            output = model(images)
        loss = loss_fn(output.float(), targets)
        t2 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t3 = time.perf_counter()
        opt.step()
        t4 = time.perf_counter()
        if step >= warmup:
            for part, seconds in zip(PARTS, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                totals[part] += seconds / steps
    return dict(model=name, precision=precision, **totals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--augment", choices=["light", "none", "deit"], default="light")
    parser.add_argument("--models", nargs="+", default=["cmhsa5_conv_tiny", "cmhsa5_attn_tiny", "cmhsa5_fattn_tiny"])
    args = parser.parse_args()
    config = load_config(CONFIG, [f"data.augment={args.augment}"])
    loader = build_loaders(config, args.batch_size, in_chans=1)[0]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, "
          f"augment {args.augment}, {args.steps} steps\n")
    print("| model | precision | " + " | ".join(f"{p} (ms)" for p in PARTS) + " | step (ms) | data share |")
    print("| --- | --- | " + " | ".join("---:" for _ in PARTS) + " | ---: | ---: |")
    for name in args.models:
        r = profile(name, loader, args.steps)
        step = sum(r[p] for p in PARTS)
        print(f"| {name} | {r['precision']} | " + " | ".join(f"{1e3 * r[p]:.1f}" for p in PARTS)
              + f" | {1e3 * step:.1f} | {100 * r[PARTS[0]] / step:.1f}% |")


if __name__ == "__main__":
    main()
