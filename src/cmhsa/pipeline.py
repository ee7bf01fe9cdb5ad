"""The two-phase pipeline (paper §4): train the convolution phase, convert it exactly, train the attention phase.

A run directory holds ``config.yaml``, one directory per phase (``phase1/``, ``phase2/``: ``metrics.jsonl``,
``model.json``, checkpoints ``last/`` and ``best/``), ``convert.json`` (the transfer error), ``curves.png`` and
``summary.md`` / ``summary.json``. Every step resumes: re-running the same command continues where it stopped.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import timm
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from . import data as cmdata
from .checkpoint import load_weights
from .config import save_config, train_config
from .engine import (evaluate, fit, init_distributed, is_main_process, resolve_device, resolve_precision,
                     seed_everything)
from .models import CMHSA, FORM_TAGS, convert_model, transfer_error
from .plots import plot_curves, read_metrics

__all__ = ["run_dir", "build_loaders", "create_model", "model_spec", "run_config_path", "load_model", "train_phase",
           "run_pipeline"]

MODEL_SPEC_FILE = "model.json"


def run_dir(config: Dict[str, Any]) -> Path:
    return Path(config.get("output") or Path("runs") / config["name"])


def build_loaders(config: Dict[str, Any], batch_size: int, in_chans: int) -> Tuple[DataLoader, DataLoader, Any]:
    """Train and validation loaders for ``config['data']``; distributed samplers under torchrun."""
    d = config["data"]
    train_set, val_set, info = cmdata.create_datasets(
        d["dataset"], img_size=d["img_size"], in_chans=in_chans, data_dir=d.get("data_dir"),
        train_subset=d.get("train_subset"), val_subset=d.get("val_subset"), augment=d.get("augment", "light"),
        resize=d.get("resize", "pad"), seed=config.get("train", {}).get("seed", 0),
    )
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    workers = d.get("num_workers", 0)
    train = cmdata.create_loader(train_set, batch_size, training=True, num_workers=workers, distributed=distributed)
    val = cmdata.create_loader(val_set, batch_size, training=False, num_workers=workers, distributed=distributed)
    return train, val, info


def model_spec(config: Dict[str, Any]) -> Dict[str, Any]:
    """``{'name': timm name, 'kwargs': {...}}`` of the config's model, with sizes taken from the data."""
    info = cmdata.dataset_info(config["data"]["dataset"], config["data"].get("data_dir"))
    kwargs = {"num_classes": info.num_classes, "in_chans": info.in_chans, "img_size": config["data"]["img_size"],
              **config["model"].get("kwargs", {})}
    return {"name": config["model"]["name"], "kwargs": kwargs}


def create_model(spec: Dict[str, Any], seed: Optional[int] = None) -> nn.Module:
    """``timm.create_model`` from a spec; with ``seed`` the initial weights are repeatable."""
    if seed is not None:
        seed_everything(seed)
    try:
        return timm.create_model(spec["name"], **spec["kwargs"])
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ValueError(f"unknown model {spec['name']!r}; CMHSA models: {timm.list_models('cmhsa*')}, "
                             f"or any timm model name") from e
        raise


def converted_spec(model: CMHSA) -> Dict[str, Any]:
    """The model spec of a converted (attention-phase) CMHSA: its timm name and full config."""
    k = model.config["kernel_size"]
    size = "224" if model.config["img_size"] == 224 and model.config["patch_size"] == 16 else "tiny"
    kind = FORM_TAGS[model.config.get("form", "paper")]
    return {"name": f"cmhsa{k}_{kind}_{size}", "kwargs": dict(model.config)}


def _write_json(path: Path, obj: Any) -> None:
    if is_main_process():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj, indent=2))


def run_config_path(ckpt: Path) -> Optional[Path]:
    """The ``config.yaml`` of the run a checkpoint belongs to: two levels up (run/phase/which) or one (run/phase)."""
    return next((p / "config.yaml" for p in (ckpt.parent.parent, ckpt.parent) if (p / "config.yaml").exists()),
                None)


def load_model(path: str | Path, which: str = "last") -> Tuple[nn.Module, Dict[str, Any], Path]:
    """A model from a phase directory (``.../phase2``), a checkpoint directory (``.../phase2/best``) or a run
    directory (its last phase). Returns (model, spec, checkpoint dir)."""
    path = Path(path)
    candidates = [path / "phase2", path / "phase1", path / "train"] if (path / "config.yaml").exists() else [path]
    for phase_dir in candidates:
        if (phase_dir / MODEL_SPEC_FILE).exists():
            # a phase dir holds last/ and best/; `cmhsa convert` writes its weights beside model.json
            ckpt = phase_dir / which if (phase_dir / which).exists() else phase_dir
            break
        if (phase_dir.parent / MODEL_SPEC_FILE).exists():
            phase_dir, ckpt = phase_dir.parent, phase_dir
            break
    else:
        raise FileNotFoundError(f"no {MODEL_SPEC_FILE} in {path} or its parent: pass a run directory, a phase "
                                f"directory (runs/<name>/phase2) or a checkpoint directory (runs/<name>/phase2/best)")
    spec = json.loads((phase_dir / MODEL_SPEC_FILE).read_text())
    model = create_model(spec)
    load_weights(ckpt, model)
    return model, spec, ckpt


def train_phase(model: nn.Module, spec: Dict[str, Any], config: Dict[str, Any], phase: str, out_dir: Path,
                resume: bool = True, progress: bool = True,
                loaders: Optional[Tuple[DataLoader, DataLoader]] = None) -> Dict[str, Any]:
    """Train ``model`` with the ``phase`` settings of ``config`` into ``out_dir``; returns the final metrics.
    ``loaders`` (train, val) are built from the config unless given."""
    num_classes = spec["kwargs"]["num_classes"]
    cfg = train_config(config, phase, num_classes)
    train_loader, val_loader = loaders or build_loaders(config, cfg.batch_size, spec["kwargs"]["in_chans"])[:2]
    _write_json(out_dir / MODEL_SPEC_FILE, spec)
    return fit(model, train_loader, val_loader, cfg, out_dir, resume=resume, phase=phase, progress=progress)


def convert_kwargs(c: Dict[str, Any]) -> Dict[str, Any]:
    """The :func:`~cmhsa.models.convert_model` arguments of a run config's ``convert`` section."""
    return dict(bias_strength=c["bias_strength"], null_key=c["null_key"], qk_std=c.get("qk_std", 0.0),
                form=c.get("form", "paper"), qk_dim=c.get("qk_dim"), **c.get("kwargs", {}))


def _convert(conv_model: CMHSA, config: Dict[str, Any], sample: torch.Tensor) -> Tuple[CMHSA, Dict[str, Any]]:
    """Convert phase 1 -> phase 2 and measure the transfer error in float64 (exactness) and float32."""
    c = config["convert"]
    kw = convert_kwargs(c)
    conv_model = conv_model.cpu().float().eval()
    attn_model = convert_model(conv_model, **kw)
    conv64 = CMHSA(**conv_model.config).double()
    conv64.load_state_dict(conv_model.state_dict())
    report = {
        "float64": transfer_error(conv64, convert_model(conv64, **kw), sample.double()),
        "float32": transfer_error(conv_model, attn_model, sample.float()),
        "bias_strength": c["bias_strength"], "null_key": c["null_key"], "qk_std": c.get("qk_std", 0.0),
        "form": kw["form"],
    }
    return attn_model, report


def run_pipeline(config: Dict[str, Any], resume: bool = True, progress: bool = True) -> Dict[str, Any]:
    """Phase 1 -> convert -> phase 2 -> final evaluation, into ``run_dir(config)``. Returns the summary."""
    init_distributed()
    out = run_dir(config)
    if is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        save_config(config, out / "config.yaml")

    spec1 = model_spec(config)
    conv_model = create_model(spec1, seed=train_config(config, "phase1", spec1["kwargs"]["num_classes"]).seed)
    if not isinstance(conv_model, CMHSA) or conv_model.config["mixer"] != "conv":
        raise ValueError(f"the pipeline starts from a CMHSA convolution model (e.g. cmhsa5_conv_tiny), got "
                         f"{spec1['name']!r}; use `cmhsa train` for other models")
    phase1 = train_phase(conv_model, spec1, config, "phase1", out / "phase1", resume, progress)

    cfg2 = train_config(config, "phase2", spec1["kwargs"]["num_classes"])
    train_loader2, val_loader, _ = build_loaders(config, cfg2.batch_size, spec1["kwargs"]["in_chans"])
    sample = next(iter(val_loader))[0][:16]
    attn_model, transfer = _convert(conv_model, config, sample)
    device = resolve_device(cfg2)
    precision = resolve_precision(device, cfg2.precision, attn_model)
    after = evaluate(attn_model.to(device), val_loader, device, precision, cfg2.num_classes)
    transfer["val_after_conversion"] = after
    transfer["val_before_conversion"] = {k: phase1[k] for k in ("val_loss", "val_top1", "val_top5")}
    _write_json(out / "convert.json", transfer)
    if progress and is_main_process():
        print(f"converted phase 1 -> phase 2: logits error float64 {transfer['float64']['logits_error']:.2e}, "
              f"float32 {transfer['float32']['logits_error']:.2e}; val top-1 {phase1['val_top1']:.2f} -> "
              f"{after['top1']:.2f} (before -> after conversion)")

    phase2 = train_phase(attn_model, converted_spec(attn_model), config, "phase2", out / "phase2", resume,
                         progress, loaders=(train_loader2, val_loader))
    summary = _summarize(config, out, phase1, phase2, transfer, conv_model, attn_model)
    if is_main_process():
        plot_curves({p: read_metrics(out / p / "metrics.jsonl") for p in ("phase1", "phase2")}, out / "curves.png",
                    title=config["name"])
        _write_json(out / "summary.json", summary)
        (out / "summary.md").write_text(_summary_markdown(summary))
        if progress:
            print(_summary_markdown(summary))
            print(f"report: {out / 'summary.md'}")
    return summary


def _phase_row(metrics_path: Path, final: Dict[str, Any], params: int) -> Dict[str, Any]:
    lines = read_metrics(metrics_path)
    return {"epochs": final["epoch"] + 1 if "epoch" in final else len(lines), "params": params,
            "val_top1": final["val_top1"], "val_top5": final["val_top5"], "val_loss": final["val_loss"],
            "best_top1": final.get("best_top1"), "train_seconds": sum(m["epoch_seconds"] for m in lines),
            "images_per_second": sum(m["images_per_second"] for m in lines) / max(len(lines), 1)}


def _summarize(config, out: Path, phase1, phase2, transfer, conv_model: nn.Module,
               attn_model: nn.Module) -> Dict[str, Any]:
    count = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    return {
        "name": config["name"], "dataset": config["data"]["dataset"],
        "train_subset": config["data"].get("train_subset"),
        "phase1": _phase_row(out / "phase1" / "metrics.jsonl", phase1, count(conv_model)),
        "phase2": _phase_row(out / "phase2" / "metrics.jsonl", phase2, count(attn_model)),
        "transfer": transfer,
    }


def _summary_markdown(s: Dict[str, Any]) -> str:
    t = s["transfer"]
    rows = [
        "| phase | params | epochs | val top-1 | val top-5 | val loss | train time (s) | img/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, label in (("phase1", "1: convolution"), ("phase2", "2: self-attention")):
        r = s[name]
        rows.append(f"| {label} | {r['params'] / 1e6:.2f}M | {r['epochs']} | {r['val_top1']:.2f} | "
                    f"{r['val_top5']:.2f} | {r['val_loss']:.4f} | {r['train_seconds']:.0f} | "
                    f"{r['images_per_second']:.0f} |")
    subset = f", {s['train_subset']} training images" if s.get("train_subset") else ""
    return "\n".join([
        f"# {s['name']}", "", f"Dataset: {s['dataset']}{subset}.", "", *rows, "",
        f"Conversion ({t.get('form', 'paper')} form, bias strength {t['bias_strength']:g}, null key "
        f"{'on' if t['null_key'] else 'off'}): max "
        f"|logits error| {t['float64']['logits_error']:.2e} in float64, {t['float32']['logits_error']:.2e} in "
        f"float32; val top-1 {t['val_before_conversion']['val_top1']:.2f} before, "
        f"{t['val_after_conversion']['top1']:.2f} right after.", "", "![curves](curves.png)", "",
    ])
