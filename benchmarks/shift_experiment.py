"""Shift consistency and local attention, measured on a small Fashion-MNIST budget (one process, CPU).

Per seed, three CMHSA-5 two-phase runs of ``configs/fmnist_tiny.yaml`` on a smaller budget:
- ``baseline``: zero padding, fixed patch grid (the project's CMHSA-5);
- ``aps_circular``: ``anchor='aps'`` and ``padding_mode='circular'`` (phase 2 is its exact circular conversion);
- ``local``: the baseline's phase-1 model converted with ``form='local'`` and trained in phase 2 as the baseline's
  global attention is, then also run at 56 px (upsampled images) with the same weights.
For every phase-1 and phase-2 model: top-1 on the validation subset and shift consistency at 1..P px, circular and
zero-filled (black), as ``cmhsa analyze`` measures it. One JSON per run under ``--out`` (with the git commit), and a
table on stdout.

    python benchmarks/shift_experiment.py --seeds 0 1 2     # local on the first seed only (its 56 px runs are slow)
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from cmhsa.analysis import shift_consistency
from cmhsa.config import RunConfig, load_config
from cmhsa.data import create_datasets, create_loader
from cmhsa.experiments import hardware
from cmhsa.provenance import git_state
from cmhsa.models import convert_model, with_img_size
from cmhsa.pipeline import convert_settings, converted_spec, load_model, run_pipeline, train_phase
from cmhsa.rundir import RunDir

VARIANTS = {"baseline": {}, "aps_circular": {"anchor": "aps", "padding_mode": "circular"}}


def config_for(args, variant: str, seed: int) -> RunConfig:
    kwargs = {"drop_path_rate": 0.05, **VARIANTS.get(variant, {})}
    overrides = [f"name=shift-{variant}-s{seed}", f"output={args.runs}/{variant}-s{seed}",
                 f"data.train_subset={args.train_subset}", f"data.val_subset={args.val_subset}",
                 f"phase1.epochs={args.phase1_epochs}", f"phase2.epochs={args.phase2_epochs}",
                 f"train.seed={seed}", f"train.batch_size={args.batch_size}", "train.precision=fp32",
                 f"model.kwargs={json.dumps(kwargs)}"]
    return load_config("configs/fmnist_tiny.yaml", overrides)


def val_batches(config: RunConfig, img_size: int):
    d = config.data
    _, val, info = create_datasets(d.dataset, img_size=img_size, in_chans=1, data_dir=d.data_dir,
                                   val_subset=d.val_subset, augment="none",
                                   resize="resize" if img_size != 28 else "pad")
    black = [-m / s for m, s in zip(info.mean, info.std)]
    return list(create_loader(val, 250, training=False)), black


@torch.no_grad()
def measure(model, batches, black, shifts) -> dict:
    model.eval()
    correct = sum(int((model(x).argmax(-1) == y).sum()) for x, y in batches)
    total = sum(len(y) for _, y in batches)
    return {"top1": 100.0 * correct / total, "images": total,
            "shift_circular": shift_consistency(model, batches, shifts=shifts, mode="circular"),
            "shift_zero": shift_consistency(model, batches, shifts=shifts, mode="zero", fill=black)}


def run_variant(args, variant: str, seed: int, code: dict) -> dict:
    start = time.time()
    config = config_for(args, "baseline" if variant == "local" else variant, seed)
    batches, black = val_batches(config, 28)
    shifts = list(range(1, 5))
    if variant == "local":
        conv, _, _ = load_model(config.run_dir() / "phase1")
        local = convert_model(conv.float(), **{**convert_settings(config), "form": "local"})
        out = Path(args.runs) / f"local-s{seed}"
        train_phase(local, converted_spec(local), config, "phase2", RunDir(out).phase("phase2"), resume=True,
                    progress=False)
        local = load_model(out / "phase2")[0]
        batches56, black56 = val_batches(config, 56)
        record = {"phase1": measure(conv, batches, black, shifts), "phase2": measure(local, batches, black, shifts),
                  # 2 and 8 px at 56 px are the 1 and 4 px shifts of the 28 px image
                  "phase1_at_56px": measure(with_img_size(conv, 56), batches56, black56, [2, 8]),
                  "phase2_at_56px": measure(with_img_size(local, 56), batches56, black56, [2, 8])}
    else:
        run_pipeline(config, resume=True, progress=False)
        conv, _, _ = load_model(config.run_dir() / "phase1")
        attn, _, _ = load_model(config.run_dir() / "phase2")
        record = {"phase1": measure(conv, batches, black, shifts), "phase2": measure(attn, batches, black, shifts)}
    record.update(variant=variant, seed=seed, seconds=time.time() - start, code=code, hardware=hardware(),
                  budget={k: getattr(args, k) for k in ("train_subset", "val_subset", "phase1_epochs",
                                                        "phase2_epochs", "batch_size")},
                  model_kwargs=config.model.kwargs)
    return record


def row(record: dict, phase: str) -> str:
    m = record[phase]
    fmt = lambda c: " ".join(f"{c[s]:.3f}" for s in sorted(c))  # noqa: E731
    return (f"{record['variant']:<13} {record['seed']:>4} {phase:<15} {m['top1']:>6.2f}  circ {fmt(m['shift_circular'])}"
            f"  zero {fmt(m['shift_zero'])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variants", nargs="+", default=["baseline", "aps_circular", "local"],
                        choices=["baseline", "aps_circular", "local"])
    parser.add_argument("--train-subset", type=int, default=1000)
    parser.add_argument("--val-subset", type=int, default=300)
    parser.add_argument("--phase1-epochs", type=int, default=3)
    parser.add_argument("--phase2-epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--runs", default="runs/shift")
    parser.add_argument("--out", default="results/shift")
    args = parser.parse_args()
    code = git_state()  # the code as it was when the measurements started
    Path(args.out).mkdir(parents=True, exist_ok=True)
    print(f"{'variant':<13} {'seed':>4} {'phase':<15} {'top-1':>6}  shift consistency at 1..P px")
    for seed in args.seeds:
        for variant in args.variants if seed == args.seeds[0] else [v for v in args.variants if v != "local"]:
            record = run_variant(args, variant, seed, code)
            (Path(args.out) / f"{variant}_s{seed}.json").write_text(json.dumps(record, indent=2))
            for phase in [k for k in record if k.startswith("phase") and isinstance(record[k], dict)]:
                print(row(record, phase), flush=True)


if __name__ == "__main__":
    main()
