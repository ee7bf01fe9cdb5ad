"""The ``cmhsa`` command."""
from __future__ import annotations

import argparse
import collections
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import timm
import torch
import torch.nn as nn

from . import __version__
from .layout import BUDGETS

if TYPE_CHECKING:  # for annotations only: each command imports its modules where it runs
    from .rundir import PhaseDir

__all__ = ["main", "build_parser"]

DTYPES = {"float64": torch.float64, "float32": torch.float32}


def _add_conv_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("convolution (a random kernel unless --weights is given)")
    g.add_argument("--kernel-size", type=int, nargs="+", default=[5], metavar="K",
                   help="kernel size K, or KH KW for a rectangular kernel (default: 5)")
    g.add_argument("--in-chans", type=int, default=3, help="input channels C_in (default: 3)")
    g.add_argument("--out-chans", type=int, default=3, help="output channels C_out (default: 3)")
    g.add_argument("--dilation", type=int, default=1, help="kernel dilation (default: 1)")
    g.add_argument("--stride", type=int, default=1,
                   help="stride; must divide the patch size; output tokens then hold (P/stride)^2*C_out values")
    g.add_argument("--groups", type=int, default=1, help="channel groups; --groups C_in is depthwise (default: 1)")
    g.add_argument("--no-bias", action="store_true", help="convolution without bias")
    g.add_argument("--padding-mode", choices=["zeros", "circular"], default="zeros",
                   help="the convolution's padding: zeros (the null key reproduces the border) or circular "
                        "(offsets wrap around the grid; no border) (default: zeros)")
    g.add_argument("--weights", type=Path, default=None,
                   help="load the kernel (C_out, C_in/groups, KH, KW) from a .safetensors or .pt file instead; "
                        "sizes are then read from it")
    g.add_argument("--key", default=None, help="tensor name inside --weights when it holds several "
                                               "(a conv's 'weight'; '<prefix>.bias' is used if present)")
    g.add_argument("--patch-size", type=int, default=16, help="patch size P; 1 is the pixel-input case (default: 16)")
    g.add_argument("--seed", type=int, default=0, help="seed for the random kernel and input (default: 0)")


def _add_form_args(p: argparse.ArgumentParser) -> None:
    from .convert import FORMS

    p.add_argument("--form", choices=sorted(FORMS), default="paper",
                   help="attention form: 'paper' (full-width heads, W_V and W_O), 'factorized' (one value map "
                        "M_h = W_V^h W_O^h per head, small Q/K heads; same function, less compute), 'tied' (the "
                        "factorized layer whose value maps stay the conv kernel's, so phase 2 trains the filters as "
                        "a convolution and learns only where heads look) or 'local' (the paper's heads over the "
                        "kernel's window of offsets; runs at any image size) (default: paper)")
    p.add_argument("--qk-dim", type=int, default=None,
                   help="Q/K head size of the factorized and tied forms (default: token width // heads)")


def _check_conv_args(args: argparse.Namespace) -> None:
    """Flag-level checks, so that a bad value is named by its flag instead of failing deep inside torch."""
    if len(args.kernel_size) > 2 or min(args.kernel_size) < 1:
        raise ValueError(f"--kernel-size takes K or KH KW, each >= 1, got {' '.join(map(str, args.kernel_size))}")
    for flag in ("in_chans", "out_chans", "dilation", "stride", "groups", "patch_size"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.weights is None and (args.in_chans % args.groups or args.out_chans % args.groups):
        raise ValueError(f"--groups {args.groups} must divide --in-chans {args.in_chans} and "
                         f"--out-chans {args.out_chans}")


def _load_tensors(path: Path) -> dict:
    if not path.exists():
        raise ValueError(f"--weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    return obj if isinstance(obj, dict) else {"weight": obj}


def _build_conv(args: argparse.Namespace) -> nn.Conv2d:
    _check_conv_args(args)
    torch.manual_seed(args.seed)
    if args.weights is None:
        k = args.kernel_size
        kernel = (k[0], k[0]) if len(k) == 1 else (k[0], k[1])
        padding = "same" if args.stride == 1 else tuple(args.dilation * (s - 1) // 2 for s in kernel)
        return nn.Conv2d(args.in_chans, args.out_chans, kernel, stride=args.stride, padding=padding,
                         dilation=args.dilation, groups=args.groups, bias=not args.no_bias,
                         padding_mode=args.padding_mode)
    tensors = _load_tensors(args.weights)
    kernels = {k: v for k, v in tensors.items() if v.ndim == 4}
    if args.key is None and len(kernels) != 1:
        raise ValueError(f"{args.weights} holds {len(kernels)} 4-d tensors; pick one with --key "
                         f"(candidates: {', '.join(sorted(kernels)) or 'none'})")
    key = args.key or next(iter(kernels))
    if key not in kernels:
        raise ValueError(f"no 4-d tensor {key!r} in {args.weights}; candidates: {', '.join(sorted(kernels))}")
    weight = kernels[key].double()
    bias = tensors.get(key.rsplit(".", 1)[0] + ".bias" if "." in key else "bias")
    c_out, c_in_group, kh, kw = weight.shape
    if c_out % args.groups:
        raise ValueError(f"--groups {args.groups} must divide the kernel's C_out {c_out} ({key} in {args.weights})")
    padding = "same" if args.stride == 1 else (args.dilation * (kh - 1) // 2, args.dilation * (kw - 1) // 2)
    conv = nn.Conv2d(c_in_group * args.groups, c_out, (kh, kw), stride=args.stride, padding=padding,
                     dilation=args.dilation, groups=args.groups, bias=bias is not None, dtype=torch.float64,
                     padding_mode=args.padding_mode)
    with torch.no_grad():
        conv.weight.copy_(weight)
        if bias is not None:
            conv.bias.copy_(bias)
    return conv


def cmd_verify(args: argparse.Namespace) -> int:
    from .exactness import verify

    conv = _build_conv(args)  # checks the convolution's flags first
    if len(args.image_size) > 2 or min(args.image_size) < 1:
        raise ValueError(f"--image-size takes S or H W, each >= 1, got {' '.join(map(str, args.image_size))}")
    if any(s % args.patch_size for s in args.image_size):
        raise ValueError(f"--image-size {' '.join(map(str, args.image_size))} is not divisible by --patch-size "
                         f"{args.patch_size}; use a multiple of the patch size")
    if not math.isfinite(args.bias_strength) or args.bias_strength < 0:
        raise ValueError(f"--bias-strength must be a finite number >= 0, got {args.bias_strength}")
    image_size = tuple(args.image_size) if len(args.image_size) == 2 else args.image_size[0]
    print(f"conv: {conv}")
    report = verify(conv, args.patch_size, image_size, dtype=DTYPES[args.dtype], null_key=not args.no_null_key,
                    bias_strength=args.bias_strength, seed=args.seed, form=args.form, qk_dim=args.qk_dim)
    print(report)
    return 0


def cmd_bounds(args: argparse.Namespace) -> int:
    from .bounds import best_fit_errors, head_lower_bound

    conv = _build_conv(args)
    kw = dict(dilation=conv.dilation, stride=conv.stride, groups=conv.groups)
    bound = head_lower_bound(conv.weight, args.patch_size, **kw)
    errors = best_fit_errors(conv.weight, args.patch_size, **kw)
    print(f"conv: {conv}, patch size {args.patch_size}")
    print(f"patch offsets the kernel reads (heads the construction uses): {len(errors) - 1}")
    print(f"rank certificate (least heads that can be exact):             {bound}")
    print("\nheads  best-fit relative error")
    for h, e in enumerate(errors[1:], start=1):
        print(f"{h:5d}  {e:.3e}{'   <- exact from here' if h == bound else ''}")
    return 0


def _load_run_config(args: argparse.Namespace):
    from .config import load_config

    config = load_config(args.config, args.set or [])
    flags = {"output": args.output, "train.device": args.device, "train.precision": args.precision}
    return config.set({key: value for key, value in flags.items() if value is not None})


def cmd_print_config(args: argparse.Namespace) -> int:
    """``--print-config``: the config a run command would use, every key with its value, as YAML; runs nothing."""
    import yaml

    print(yaml.safe_dump(_load_run_config(args).to_dict(), sort_keys=False), end="")
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    from .engine import distributed_session
    from .pipeline import run_pipeline

    config = _load_run_config(args)
    with distributed_session():
        run_pipeline(config, resume=not args.no_resume)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .engine import distributed_session
    from .pipeline import create_model, model_spec, open_run, spec_label, train_phase, with_epochs

    config = _load_run_config(args)
    with distributed_session():
        config = with_epochs(config, progress=True)
        spec = model_spec(config)
        model = create_model(spec, config.phase_config(args.phase).seed)
        with open_run(config, resume=not args.no_resume) as run:
            final = train_phase(model, spec, config, args.phase, run.phase("train"), resume=not args.no_resume)
    done = " (already finished: nothing trained now; --no-resume starts over)" if final["epochs_run"] == 0 else ""
    print(f"{spec_label(spec)}: val top-1 {final['val_top1']:.2f}, top-5 {final['val_top5']:.2f}, "
          f"loss {final['val_loss']:.4f}; checkpoints in {run.phase('train').root}{done}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from .config import TrainConfig
    from .engine import evaluate, resolve_device, resolve_precision
    from .pipeline import build_loaders, data_config, load_model, run_config_path, spec_label

    model, spec, ckpt = load_model(args.checkpoint, which=args.which)
    config = data_config(run_config_path(ckpt), args.dataset, args.data_dir, args.set or [],
                         img_size=spec["kwargs"].get("img_size"))
    if args.full_val:
        config = config.set({"data.val_subset": None})
    cfg = TrainConfig(device=args.device or "auto", precision=args.precision,
                      num_classes=spec["kwargs"]["num_classes"])
    _, val_loader, info = build_loaders(config, args.batch_size, spec["kwargs"]["in_chans"])
    if info.num_classes != cfg.num_classes:
        raise ValueError(f"the model predicts {cfg.num_classes} classes, {config.data.dataset} has "
                         f"{info.num_classes}: evaluate it on data with the classes it was trained on")
    device = resolve_device(cfg)
    metrics = evaluate(model.to(device), val_loader, device, resolve_precision(device, cfg.precision, model),
                       cfg.num_classes)
    print(json.dumps({"checkpoint": str(ckpt), "model": spec_label(spec), "dataset": config.data.dataset,
                      "images": len(val_loader.dataset), **metrics}, indent=2))
    return 0


def _write_converted(out: Path, model: nn.Module, spec: dict, record: dict) -> PhaseDir:
    """Write a converted model as `cmhsa eval` loads it: ``model.safetensors`` (float32) and ``model.json`` (its
    spec), with ``record`` and the code's git state in ``convert.json``."""
    from safetensors.torch import save_file

    from .atomic import atomic_path, atomic_write_json
    from .provenance import git_state
    from .rundir import PhaseDir

    phase = PhaseDir(out)
    phase.root.mkdir(parents=True, exist_ok=True)
    with atomic_path(phase.root / "model.safetensors") as tmp:
        save_file({k: v.float().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    phase.write_spec(spec)
    atomic_write_json(phase.root / "convert.json", {**record, "git": git_state()})
    return phase


def cmd_convert(args: argparse.Namespace) -> int:
    from .models import CMHSA, convert_model, transfer_error
    from .pipeline import converted_spec, load_model, spec_label

    model, spec, ckpt = load_model(args.checkpoint, which=args.which)
    if not isinstance(model, CMHSA) or model.config["mixer"] != "conv":
        raise ValueError(f"{ckpt} is not a CMHSA convolution-phase checkpoint ({spec_label(spec)}): pass a phase-1 "
                         f"directory (runs/<name>/phase1); any other CNN converts with `cmhsa convert-net`")
    model = model.double().eval()
    attn = convert_model(model, bias_strength=args.bias_strength, null_key=not args.no_null_key, form=args.form,
                         qk_dim=args.qk_dim)
    x = torch.randn(8, model.config["in_chans"], *model.patch_embed.img_size, dtype=torch.float64)
    report = transfer_error(model, attn, x)
    out = _write_converted(args.out, attn, converted_spec(attn), {"source": str(ckpt), **report})
    print(f"converted {ckpt} -> {out.root / 'model.safetensors'} ({attn.num_heads} heads per layer)")
    print(f"float64 check on random input: per-layer max error "
          f"{', '.join(f'{e:.1e}' for e in report['layer_errors'])}; logits error {report['logits_error']:.2e}")
    return 0


def cmd_convert_net(args: argparse.Namespace) -> int:
    """`cmhsa convert-net`: a timm CNN -> its exact attention twin (model.safetensors, model.json, convert.json)."""
    import json

    from .network import convert_network, format_table

    img_size = args.img_size[0] if len(args.img_size) == 1 else tuple(args.img_size)
    name, kwargs, cnn = _cnn_to_convert(args, img_size)
    if args.patch_size != "auto" and not args.patch_size.isdigit():
        raise ValueError(f"--patch-size must be 'auto' or a positive int, got {args.patch_size!r}")
    patch_size = "auto" if args.patch_size == "auto" else int(args.patch_size)
    cnn = cnn.double().eval()
    settings = dict(form=args.form, bias_strength=args.bias_strength, qk_std=args.qk_std)
    twin, table = convert_network(cnn, patch_size, args.layers, strict=args.strict, img_size=img_size, **settings)
    print(format_table(table))
    in_chans = next(m for m in cnn.modules() if isinstance(m, nn.Conv2d)).in_channels
    x = torch.randn(4, in_chans, *((img_size,) * 2 if isinstance(img_size, int) else img_size),
                    generator=torch.Generator().manual_seed(args.seed), dtype=torch.float64)
    with torch.no_grad():
        ref = cnn(x)
        error = ((twin(x) - ref).abs().max() / ref.abs().max()).item()
    print(f"float64 logits error on random input: {error:.2e} (max |twin - cnn| / max |cnn|)")
    # the exact per-layer settings, so `attention_twin` rebuilds this structure whatever 'auto' picks later
    converted = {r["name"]: r["P"] for r in table if r["converted"]}
    spec = {"name": "attention_twin", "kwargs": {
        "cnn": name, "cnn_kwargs": kwargs, "num_classes": cnn.num_classes, "in_chans": in_chans,
        "img_size": img_size, "patch_size": converted, "layers": list(converted), **settings}}
    out = _write_converted(args.out, twin, spec, {"source": str(args.checkpoint) if args.checkpoint else None,
                                                  "logits_error_float64": error, "layers": table})
    print(f"wrote {out.root / 'model.safetensors'} and {out.spec_path} ({len(converted)} layers as attention)")
    return 0


def _cnn_to_convert(args: argparse.Namespace, img_size) -> Tuple[str, Dict[str, Any], nn.Module]:
    """(name, kwargs, model) of the CNN `convert-net` converts: a cmhsa run or checkpoint directory's own model
    (its model.json says how to build it), else --model with --model-kwargs and, optionally, --checkpoint weights."""
    import json

    from .checkpoint import load_weights
    from .pipeline import create_model, load_model, spec_label, takes_img_size

    if args.checkpoint is not None and Path(args.checkpoint).is_dir():
        try:
            cnn, spec, _ = load_model(args.checkpoint)
        except FileNotFoundError:
            pass  # a directory with weights but no model.json: --model builds it
        else:
            if "name" not in spec:  # built from its class, e.g. a pipeline's attention phase: not a timm model
                raise ValueError(f"{args.checkpoint} holds a {spec_label(spec)}, not a timm CNN; a pipeline run's "
                                 f"convolution phase converts with `cmhsa convert <run>/phase1`")
            if args.model not in (None, spec["name"]) or args.model_kwargs is not None:
                raise ValueError(f"{args.checkpoint} holds a {spec['name']} built with {spec['kwargs']} (its "
                                 f"model.json); drop --model and --model-kwargs, which would build another model")
            return spec["name"], spec["kwargs"], cnn
    if args.model is None:
        raise ValueError("--model is needed unless --checkpoint is a cmhsa run or checkpoint directory, whose "
                         "model.json names the model")
    try:
        kwargs = json.loads(args.model_kwargs or "{}")
    except json.JSONDecodeError:
        kwargs = None
    if not isinstance(kwargs, dict):
        raise ValueError(f"--model-kwargs must be a JSON object, e.g. '{{\"in_chans\": 1}}', got {args.model_kwargs}")
    if "img_size" not in kwargs and takes_img_size(args.model, kwargs, img_size):  # a fixed grid, e.g. a ViT's
        kwargs["img_size"] = img_size
    cnn = create_model({"name": args.model, "kwargs": kwargs}, seed=args.seed)
    if args.checkpoint is not None:
        load_weights(args.checkpoint, cnn)
    return args.model, kwargs, cnn


def _add_convert_net_parser(sub) -> None:
    from .convert import DEFAULT_BIAS_STRENGTH

    p = sub.add_parser("convert-net", help="any timm CNN -> its exact attention twin, with the per-layer table",
                       description="Replace the selected convolutions of a timm CNN (random, or --checkpoint) by "
                                   "exactly equivalent attention layers; prints the per-layer table and the float64 "
                                   "logits error, writes model.safetensors, model.json and convert.json. "
                                   "`cmhsa eval DIR` loads the result; a config with model.name=attention_twin and "
                                   "these kwargs plus checkpoint_path trains it with `cmhsa train`.")
    p.add_argument("--model", default=None, help="timm model name, e.g. resnet18 (not needed with a --checkpoint "
                                                   "from `cmhsa train`: its model.json names the model)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="CNN weights: a run, phase or checkpoint directory of `cmhsa train` (the model is rebuilt "
                        "from its model.json), or a .safetensors file / directory holding model.safetensors for "
                        "--model")
    p.add_argument("--model-kwargs", default=None, help="JSON kwargs for timm.create_model, e.g. "
                                                        "'{\"in_chans\": 1, \"num_classes\": 10}' (default: {})")
    p.add_argument("--layers", nargs="+", default=None, metavar="PATTERN",
                   help="fnmatch patterns on module names, e.g. 'layer4.*' (default: every Conv2d)")
    p.add_argument("--patch-size", default="auto", help="'auto' (cheaper per layer) or an int P (default: auto)")
    p.add_argument("--img-size", type=int, nargs="+", required=True, metavar="S",
                   help="input size S or H W the twin is built for")
    p.add_argument("--form", default="paper", help="attention layer form of conv_to_mhsa (default: paper)")
    p.add_argument("--bias-strength", type=float, default=DEFAULT_BIAS_STRENGTH,
                   help=f"relative position bias beta on each head's offset (default: {DEFAULT_BIAS_STRENGTH:g})")
    p.add_argument("--qk-std", type=float, default=0.0,
                   help="> 0 starts W_Q, W_K small and random so fine-tuning can learn content attention")
    p.add_argument("--strict", action="store_true", help="fail on the first selected layer that cannot convert")
    p.add_argument("--seed", type=int, default=0, help="seed of the random CNN weights and check input")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.set_defaults(func=cmd_convert_net)


def cmd_experiment(args: argparse.Namespace) -> int:
    from .experiments import STATUSES, UNFINISHED, grid_status, load_experiment, run_experiment

    config = args.config or Path("configs/experiments") / f"{args.name}.yaml"
    spec = load_experiment(config)
    if spec["name"] != args.name:
        raise ValueError(f"{config} defines experiment {spec['name']!r}, not {args.name!r}")
    if args.status:
        rows = grid_status(spec, budget=args.budget, seeds=args.seeds, results_root=args.results,
                           runs_root=args.runs, only=args.cells)
        counts = collections.Counter(row["status"] for row in rows)
        print(f"{spec['name']} ({args.budget} budget): {len(rows)} cells, "
              + ", ".join(f"{counts[s]} {s}" for s in STATUSES if counts[s]))
        width = max(len(row["cell"]) for row in rows)
        for row in rows:
            took = f"{row['minutes']:.0f} min" if row["minutes"] is not None else ""
            print(f"  {row['cell']:<{width}}  seed {row['seed']:<3} {row['status']:<8} {took:>8}  {row['detail']}"
                  .rstrip())
        left = [row for row in rows if row["status"] in UNFINISHED]
        if left:
            known = [row["minutes"] for row in left if row["minutes"] is not None]
            parts = [f"{len(known)} of them should take ~{sum(known):.0f} CPU-min (the mean of their cell's "
                     "finished seeds; a resumed run takes less)"] if known else []
            if len(known) < len(left):
                parts.append(f"{len(left) - len(known)} have no finished seed to estimate from")
            print(f"left: {len(left)} runs; " + ", ".join(parts))
        return 0
    out = run_experiment(spec, budget=args.budget, seeds=args.seeds, results_root=args.results,
                         runs_root=args.runs, only=args.cells)
    print(f"results in {out}; `cmhsa report {args.results}` writes the report")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    print(f"wrote {write_report(args.results, budget=args.budget, configs=args.configs)}")
    return 0


def add_which_argument(p: argparse.ArgumentParser) -> None:
    """``--which``: the checkpoint a command reads from a phase directory (eval, convert, analyze)."""
    p.add_argument("--which", choices=["last", "best"], default="last",
                   help="checkpoint in a phase dir: the final epoch's or the best val top-1's (default: last)")


def _add_run_args(p: argparse.ArgumentParser) -> None:
    from .config import PRECISIONS

    p.add_argument("--config", type=Path, default=None,
                   help="YAML preset (see configs/); without it the built-in defaults are used")
    p.add_argument("--set", nargs="*", metavar="KEY=VALUE",
                   help="override config values, e.g. --set phase1.epochs=3 data.train_subset=1000 (YAML values, "
                        "checked against the config's keys and types)")
    p.add_argument("--output", default=None, help="run directory (default: runs/<config name>)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="auto = AMP on CUDA; on a CPU bf16 autocast only for the models measured faster in it "
                        "(CMHSA's attention phase on AVX512-BF16, any CMHSA with AMX), else fp32 (default: auto)")
    p.add_argument("--print-config", action="store_true",
                   help="print the config this command would run (defaults, --config and --set together; lengths "
                        "in steps as given, the run's config.yaml holds the epochs they come to) as YAML, and exit")
    p.add_argument("--no-resume", action="store_true",
                   help="start again, clearing what the run directory holds (default: resume; resuming refuses a "
                        "directory whose config.yaml differs from this config)")


def build_parser() -> argparse.ArgumentParser:
    from .config import PRECISIONS
    from .convert import DEFAULT_BIAS_STRENGTH

    parser = argparse.ArgumentParser(
        prog="cmhsa",
        description="Exact convolution -> multi-head self-attention, and Vision Transformers that start as CNNs.",
    )
    parser.add_argument("--version", action="version",
                        version=f"cmhsa {__version__} (torch {torch.__version__}, timm {timm.__version__})")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("verify", help="convert a convolution to MHSA and measure the error against F.conv2d",
                       description="Build the Theorem 1 MHSA for a convolution (random, or loaded with --weights) "
                                   "and print the heads used, the lower bound, and the max error on interior "
                                   "and border patches.")
    _add_conv_args(p)
    p.add_argument("--image-size", type=int, nargs="+", default=[224], metavar="S",
                   help="image size S, or H W (default: 224); must be a multiple of the patch size")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float64", help="precision of the check (default: float64)")
    p.add_argument("--no-null-key", action="store_true",
                   help="build the paper's MHSA without the null key (border patches are then wrong)")
    p.add_argument("--bias-strength", type=float, default=DEFAULT_BIAS_STRENGTH,
                   help=f"relative position bias beta on each head's offset; the error falls like N*exp(-beta/2) "
                        f"(default: {DEFAULT_BIAS_STRENGTH:g})")
    _add_form_args(p)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("bounds", help="lower bound on heads for a kernel, and the best fit with fewer heads",
                       description="Theorems 5/6 as numbers: the rank of the kernel's stacked per-offset blocks is "
                                   "the least number of heads that can express it; the table gives the best "
                                   "relative error reachable with 1, 2, ... heads (Eckart-Young).")
    _add_conv_args(p)
    p.set_defaults(func=cmd_bounds)

    p = sub.add_parser("pipeline", help="phase 1 (conv) -> exact conversion -> phase 2 (attention) -> report",
                       description="Train the convolution phase of a CMHSA model, convert it exactly into "
                                   "self-attention (printing the transfer error), train the attention phase, and "
                                   "write metrics, checkpoints, curves.png and summary.md into the run directory. "
                                   "Re-running the same command resumes.")
    _add_run_args(p)
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser("train", help="train one model (any timm name, CMHSA or baseline) with a config",
                       description="Train config.model with the settings of one phase into <run>/train/. Works "
                                   "under torchrun --nproc_per_node=N -m cmhsa train ... (gloo on CPU).")
    _add_run_args(p)
    p.add_argument("--phase", choices=["phase1", "phase2"], default="phase1",
                   help="which phase section of the config holds the training settings (default: phase1)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint on a dataset",
                       description="Evaluate a run, phase or checkpoint directory on the validation split of its "
                                   "own config's dataset, or of --dataset (which a model outside a run, such as "
                                   "`cmhsa convert`'s output, needs).")
    p.add_argument("checkpoint", type=Path, help="run dir, phase dir (runs/x/phase2) or checkpoint dir")
    add_which_argument(p)
    p.add_argument("--dataset", default=None,
                   help="dataset name (default: the run's own; a model outside a run needs it)")
    p.add_argument("--data-dir", default=None, help="dataset location (default: the run's own)")
    p.add_argument("--full-val", action="store_true", help="evaluate on the whole validation split")
    p.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="override the run's config, e.g. data.img_size=32")
    p.add_argument("--batch-size", type=int, default=256, help="images per batch (default: 256)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="default: auto (what it picks: cmhsa train --help)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("convert", help="phase-1 checkpoint -> phase-2 checkpoint, with the verified error",
                       description="Convert a trained CMHSA convolution checkpoint into the equivalent attention "
                                   "model; writes model.safetensors, model.json and convert.json (float64 error).")
    p.add_argument("checkpoint", type=Path, help="phase-1 dir or checkpoint dir (runs/x/phase1 or runs/x/phase1/last)")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    add_which_argument(p)
    p.add_argument("--bias-strength", type=float, default=DEFAULT_BIAS_STRENGTH,
                   help=f"relative position bias beta on each head's offset: exact for large beta, softer (e.g. 12) "
                        f"lets phase 2 learn (default: {DEFAULT_BIAS_STRENGTH:g})")
    p.add_argument("--no-null-key", action="store_true", help="the paper's layer, without the null key")
    _add_form_args(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("experiment", help="run a grid of resumable runs (configs/experiments/: converged, ...)",
                       description="Run every unfinished cell of an experiment grid; finished cells are skipped, "
                                   "interrupted ones resume. Results (JSON per cell) go to results/<name>/, "
                                   "checkpoints to runs/experiments/ (not committed). Several processes may run "
                                   "one grid side by side (e.g. OMP_NUM_THREADS=1 in each, one per core): each "
                                   "skips the cells another is running.")
    p.add_argument("name", help="experiment name, e.g. table1")
    p.add_argument("--config", type=Path, default=None, help="default: configs/experiments/<name>.yaml")
    p.add_argument("--budget", choices=BUDGETS, default="full",
                   help="quick: minutes, tiny sizes (smoke test, results/<name>-quick); full: the real grid")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default: the grid's own seeds")
    p.add_argument("--cells", nargs="+", default=None,
                   help="run only these cells (a grid with sizes names them <cell>_n<size>, e.g. conv_n2000)")
    p.add_argument("--results", type=Path, default=Path("results"), help="results root (default: results)")
    p.add_argument("--runs", type=Path, default=Path("runs/experiments"), help="checkpoint root")
    p.add_argument("--status", action="store_true",
                   help="run nothing: list every cell and seed as finished, reused, running (in another process), "
                        "to resume or to run, with the CPU minutes each took or should take (its cell's finished "
                        "seeds)")
    p.set_defaults(func=cmd_experiment)

    p = sub.add_parser("report", help="write results/REPORT.md from the experiment and analysis results",
                       description="Tables (with the paper's Table 1 beside ours), figures and summary CSVs from "
                                   "results/<grid>/cells/*.json and results/analysis/*/analysis.json.")
    p.add_argument("results", type=Path, nargs="?", default=Path("results"), help="results root (default: results)")
    p.add_argument("--budget", choices=BUDGETS, default="full", help="which grids' results to report")
    p.add_argument("--configs", type=Path, default=Path("configs/experiments"),
                   help="grid configs whose header comments describe the setup")
    p.set_defaults(func=cmd_report)

    _add_convert_net_parser(sub)

    from .analysis import add_analyze_parser

    add_analyze_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    from .rundir import RunDirLocked

    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # `cmhsa train phase1.epochs=3` is a config override without its --set
        overrides = hasattr(args, "set") and all("=" in a and not a.startswith("-") for a in unknown)
        parser.error(f"unrecognized arguments: {' '.join(unknown)}"
                     + (f"; config overrides go after --set: --set {' '.join(unknown)}" if overrides else ""))
    if getattr(args, "print_config", False):
        args.func = cmd_print_config
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RunDirLocked) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        resumable = args.func in (cmd_pipeline, cmd_train, cmd_experiment)
        print("interrupted" + ("; run the same command again to resume after the last finished epoch"
                               if resumable else ""), file=sys.stderr)
        return 130  # the shell's code for a process ended by Ctrl-C (128 + SIGINT)


if __name__ == "__main__":
    sys.exit(main())
