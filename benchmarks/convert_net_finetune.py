"""Fine-tune an exact attention twin of a CNN's last stage against the CNN itself, on Fashion-MNIST.

Per seed: train a small timm ResNet (in_chans=1) on a 2k-image subset, convert its last stage (``layer4.*``)
exactly with :func:`cmhsa.convert_network`, then fine-tune the twin and, separately, the CNN with the same settings
and steps. Both are scored on the whole 10k test split; the twin's attention is measured before and after
(:func:`cmhsa.network.conv_attention_mass`: weight on the key each head's convolution reads).

    OMP_NUM_THREADS=1 python benchmarks/convert_net_finetune.py --out results/convert_net/finetune.json

The ResNet uses output_stride=16 at 56 px, so its last stage runs on a 4x4 map (dilation 2) instead of 1x1:
attention over 16 tokens rather than one. Checkpoints go to --runs (each run dir loads with ``cmhsa eval``).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from cmhsa.analysis.attention import attention_distance
from cmhsa.atomic import atomic_write_text
from cmhsa.config import RunConfig, save_config
from cmhsa.engine import evaluate, resolve_precision
from cmhsa.experiments import hardware
from cmhsa.network import conv_attention_mass, convert_network
from cmhsa.pipeline import build_loaders, create_model, train_phase
from cmhsa.provenance import git_state
from cmhsa.rundir import PhaseDir, RunDir

CNN = {"name": "resnet18", "kwargs": {"in_chans": 1, "num_classes": 10, "channels": [16, 32, 64, 128],
                                      "stem_width": 16, "output_stride": 16}}
LAYERS = "layer4.*"
CONVERT = {"bias_strength": 60.0, "qk_std": 0.02}  # the exact conversion of configs/fmnist_tiny.yaml


def settings(args) -> RunConfig:
    return RunConfig().set({
        "name": "convert-net-finetune", "data.dataset": "fashion_mnist", "data.img_size": args.img_size,
        "data.resize": "resize", "data.train_subset": args.train_subset, "data.val_subset": args.val_subset,
        "train.batch_size": 64, "train.precision": "auto", "train.log_interval": 1000,
        "phase1.epochs": args.pretrain_epochs, "phase1.lr": 2.0e-3, "phase1.warmup_epochs": 1,
        "phase2.epochs": args.finetune_epochs, "phase2.lr": 5.0e-4, "phase2.warmup_epochs": 0,
        **({"train.max_steps_per_epoch": 2} if args.quick else {})})


def relative_error(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def run_seed(seed: int, base: RunConfig, args) -> dict:
    config = base.set({"train.seed": seed, "output": str(args.runs / f"seed{seed}")})
    run = RunDir(config.run_dir())
    run.root.mkdir(parents=True, exist_ok=True)
    save_config(config, run.config_path)  # `cmhsa eval <run>/twin` reads the data settings from here
    loaders = build_loaders(config, 64, 1)  # train, val, dataset info
    test_loader = build_loaders(config.set({"data.val_subset": None}), 256, 1)[1]
    precision = resolve_precision("cpu", "auto")
    test = lambda model: evaluate(model, test_loader, "cpu", precision, 10)  # noqa: E731
    probe = next(iter(test_loader))[0][:args.probe_images]

    t0 = time.perf_counter()
    cnn = create_model(CNN, seed=seed)
    train_phase(cnn, CNN, config, "phase1", PhaseDir(run.root / "pretrain"), loaders=loaders, progress=False)
    pretrained = test(cnn)
    pretrain_seconds = time.perf_counter() - t0

    cnn = cnn.cpu().float().eval()
    # exactness on real images, in float64: the construction itself (qk_std 0) and as fine-tuned (qk_std 0.02)
    cnn64 = copy.deepcopy(cnn).double()
    with torch.no_grad():
        ref = cnn64(probe.double())
        exact = {f"qk_std_{q:g}": relative_error(convert_network(cnn64, layers=LAYERS, img_size=args.img_size,
                                                                 bias_strength=CONVERT["bias_strength"], qk_std=q,
                                                                 verify=False)[0](probe.double()), ref)
                 for q in (0.0, CONVERT["qk_std"])}
    twin, table = convert_network(cnn, layers=LAYERS, img_size=args.img_size, **CONVERT)
    twin_spec = {"name": "attention_twin", "kwargs": {
        "cnn": CNN["name"], "cnn_kwargs": CNN["kwargs"], "num_classes": 10, "in_chans": 1, "img_size": args.img_size,
        "patch_size": {r["name"]: r["P"] for r in table if r["converted"]},
        "layers": [r["name"] for r in table if r["converted"]], **CONVERT}}
    mass_before = conv_attention_mass(twin, probe)
    distance_before = attention_distance(twin, probe)["mean"]

    arms = {}
    for arm, model, spec in (("twin", twin, twin_spec), ("cnn", copy.deepcopy(cnn), CNN)):
        t0 = time.perf_counter()
        final = train_phase(model, spec, config, "phase2", PhaseDir(run.root / arm), loaders=loaders, progress=False)
        seconds = time.perf_counter() - t0
        arms[arm] = {"test": test(model), "finetune_seconds": seconds, "val_top1_last_epoch": final["val_top1"],
                     "params": sum(p.numel() for p in model.parameters())}
        print(f"seed {seed} {arm}: test top-1 {arms[arm]['test']['top1']:.2f} ({seconds:.0f} s fine-tuning)",
              flush=True)
    arms["twin"]["conv_attention_mass_before"] = mass_before
    arms["twin"]["conv_attention_mass_after"] = conv_attention_mass(twin.cpu().float(), probe)
    # mean attention distance per layer in patches (cmhsa.analysis; null-key weight left out)
    arms["twin"]["attention_distance_before"] = distance_before
    arms["twin"]["attention_distance_after"] = attention_distance(twin, probe)["mean"]
    return {"seed": seed, "pretrained_test": pretrained, "pretrain_seconds": pretrain_seconds,
            "conversion_logits_error_float64": exact, "layers": table, **arms}


def mean_std(values) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def markdown(record: dict) -> str:
    """The README table: test top-1 (mean +- std over seeds) and the twin's attention before / after."""
    s, seeds = record["summary"], record["seeds"]
    pm = lambda d: f"{d['mean']:.2f} +- {d['std']:.2f}"  # noqa: E731
    mass = lambda key: statistics.mean(statistics.mean(r["twin"][key].values()) for r in seeds)  # noqa: E731
    dist = lambda key: statistics.mean(statistics.mean(r["twin"][key]) for r in seeds)  # noqa: E731
    errors = [r["conversion_logits_error_float64"]["qk_std_0"] for r in seeds]
    return "\n".join([
        f"| model | test top-1 (%), {len(seeds)} seeds | fine-tuning time (s) | params |",
        "| --- | ---: | ---: | ---: |",
        f"| CNN after pre-training | {pm(s['pretrained_test_top1'])} | | {seeds[0]['cnn']['params'] / 1e6:.2f}M |",
        f"| CNN, fine-tuned | {pm(s['cnn']['test_top1'])} | {s['cnn']['finetune_seconds']['mean']:.0f} | "
        f"{seeds[0]['cnn']['params'] / 1e6:.2f}M |",
        f"| attention twin, fine-tuned | {pm(s['twin']['test_top1'])} | {s['twin']['finetune_seconds']['mean']:.0f} "
        f"| {seeds[0]['twin']['params'] / 1e6:.2f}M |",
        "",
        "Twin minus CNN after fine-tuning, per seed: " + ", ".join(
            f"{r['twin']['test']['top1'] - r['cnn']['test']['top1']:+.2f}" for r in seeds) + " points. "
        f"Conversion error (float64 logits, {record['args']['probe_images']} test images): at most {max(errors):.1e}. "
        f"Twin attention on the convolution's keys: {mass('conv_attention_mass_before'):.6f} before, "
        f"{mass('conv_attention_mass_after'):.6f} after fine-tuning; mean attention distance "
        f"{dist('attention_distance_before'):.4f} -> {dist('attention_distance_after'):.4f} patches. "
        f"Code {record['code']['commit'][:7]}{' (dirty)' if record['code']['dirty'] else ''}.",
    ])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--img-size", type=int, default=56)
    p.add_argument("--train-subset", type=int, default=2000)
    p.add_argument("--val-subset", type=int, default=500, help="test images scored after each epoch (logging only)")
    p.add_argument("--pretrain-epochs", type=int, default=12)
    p.add_argument("--finetune-epochs", type=int, default=6)
    p.add_argument("--probe-images", type=int, default=64, help="test images for the exactness and attention checks")
    p.add_argument("--runs", type=Path, default=Path("runs/convert_net"))
    p.add_argument("--out", type=Path, default=Path("results/convert_net/finetune.json"))
    p.add_argument("--quick", action="store_true", help="2 steps per epoch: a smoke test of the script")
    p.add_argument("--report", type=Path, default=None, help="print the table of a results JSON and exit")
    args = p.parse_args()
    if args.report is not None:
        print(markdown(json.loads(args.report.read_text())))
        return

    base = settings(args)
    code, start = git_state(), time.perf_counter()
    seeds = [run_seed(s, base, args) for s in args.seeds]
    summary = {arm: {"test_top1": mean_std([r[arm]["test"]["top1"] for r in seeds]),
                     "finetune_seconds": mean_std([r[arm]["finetune_seconds"] for r in seeds])}
               for arm in ("twin", "cnn")}
    summary["pretrained_test_top1"] = mean_std([r["pretrained_test"]["top1"] for r in seeds])
    summary["twin"]["conv_attention_mass_after"] = mean_std(
        [statistics.mean(r["twin"]["conv_attention_mass_after"].values()) for r in seeds])
    record = {"experiment": "convert_net_finetune", "cnn": CNN, "layers": LAYERS, "convert": CONVERT,
              "config": base.to_dict(), "args": {k: str(v) for k, v in vars(args).items()}, "code": code,
              "hardware": hardware(), "seconds": time.perf_counter() - start, "summary": summary, "seeds": seeds}
    atomic_write_text(args.out, json.dumps(record, indent=2, default=str))
    print(markdown(json.loads(args.out.read_text())))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
