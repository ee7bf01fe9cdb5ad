"""Shift consistency and local attention on Fashion-MNIST at Table 1's budget (one process, CPU).

The budget and recipe are ``configs/experiments/table1.yaml``'s: 2,000 training images, batch 128, DeiT-style
regularisation (label smoothing 0.1, mixup 0.2, drop path 0.1), two-phase rows 10 + 10 epochs, DeiT-base 20. Per seed:
- ``baseline``: CMHSA-5 two-phase, zero padding, fixed patch grid (the project's CMHSA-5);
- ``aps_circular``: ``anchor='aps'`` and ``padding_mode='circular'`` (phase 2 is its exact circular conversion);
- ``local``: the baseline's phase-1 model converted with ``form='local'`` and trained in phase 2 as the baseline's
  global attention is, then also run at 56 px (upsampled images) with the same weights;
- ``deit_base``: table1's DeiT-base (D = 128, 12 layers, P = 4), the ViT the issue compares against.
For every phase-1 and phase-2 model (DeiT-base: its one model, as ``phase2``): top-1 on the 2,000 fixed validation
images and shift consistency at 1..P px, circular and zero-filled (black), as ``cmhsa analyze`` measures it. One JSON
per run under ``--out`` (with the git commit), and a table on stdout.

    python benchmarks/shift_experiment.py --seeds 0 1 2     # ~30 min of one core per seed
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from cmhsa.analysis import shift_consistency
from cmhsa.config import RunConfig
from cmhsa.data import create_datasets, create_loader
from cmhsa.experiments import cell_configs, hardware, load_experiment
from cmhsa.provenance import git_state
from cmhsa.models import convert_model, with_img_size
from cmhsa.pipeline import (convert_settings, converted_spec, create_model, load_model, model_spec, open_run,
                            run_pipeline, train_phase)
from cmhsa.rundir import RunDir

MODEL_KWARGS = {"baseline": {}, "aps_circular": {"anchor": "aps", "padding_mode": "circular"}}
TABLE1 = "configs/experiments/table1.yaml"


def config_for(args, variant: str, seed: int) -> RunConfig:
    """Table 1's cell (``deit_base``, or ``cmhsa5`` with the product's factorized layer, which the local form
    restricts to a window) at this script's budget."""
    cell = "deit_base" if variant == "deit_base" else "cmhsa5"
    config = cell_configs(load_experiment(TABLE1), "full", [seed], only=[cell])[0]["config"]
    settings = {"name": f"shift-{variant}-s{seed}", "output": f"{args.runs}/{variant}-s{seed}",
                "data.train_subset": args.train_subset, "data.val_subset": args.val_subset,
                "train.batch_size": args.batch_size, "train.precision": "fp32"}
    if variant == "deit_base":
        settings["phase1.epochs"] = args.phase1_epochs + args.phase2_epochs
    else:
        settings.update({"phase1.epochs": args.phase1_epochs, "phase2.epochs": args.phase2_epochs,
                         "convert.form": "factorized",
                         "model.kwargs": {**config.model.kwargs, **MODEL_KWARGS[variant]}})
    return config.set(settings)


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
    if variant == "deit_base":
        spec = model_spec(config)
        with open_run(config, resume=True) as run:
            train_phase(create_model(spec, seed=seed), spec, config, "phase1", run.phase("train"), resume=True,
                        progress=False)
        record = {"phase2": measure(load_model(config.run_dir() / "train")[0], batches, black, shifts)}
    elif variant == "local":
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
    variants = ["baseline", "aps_circular", "local", "deit_base"]
    parser.add_argument("--variants", nargs="+", default=variants, choices=variants)
    parser.add_argument("--train-subset", type=int, default=2000)
    parser.add_argument("--val-subset", type=int, default=2000)
    parser.add_argument("--phase1-epochs", type=int, default=10)
    parser.add_argument("--phase2-epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--runs", default="runs/shift")
    parser.add_argument("--out", default="results/shift")
    args = parser.parse_args()
    code = git_state()  # the code as it was when the measurements started
    Path(args.out).mkdir(parents=True, exist_ok=True)
    print(f"{'variant':<13} {'seed':>4} {'phase':<15} {'top-1':>6}  shift consistency at 1..P px")
    for seed in args.seeds:
        for variant in args.variants:
            record = run_variant(args, variant, seed, code)
            (Path(args.out) / f"{variant}_s{seed}.json").write_text(json.dumps(record, indent=2))
            for phase in [k for k in record if k.startswith("phase") and isinstance(record[k], dict)]:
                print(row(record, phase), flush=True)


if __name__ == "__main__":
    main()
