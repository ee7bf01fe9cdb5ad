"""The two-phase pipeline (paper §4): train the convolution phase, convert it exactly, train the attention phase.

A run directory holds ``config.yaml``, one directory per phase (``phase1/``, ``phase2/``: ``metrics.jsonl``,
``model.json``, checkpoints ``last/`` and ``best/``), ``convert.json`` (the transfer error), ``curves.png`` and
``summary.md`` / ``summary.json``. Every step resumes: re-running the same command continues where it stopped.
"""
from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import timm
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from . import data as cmdata
from .atomic import atomic_path
from .checkpoint import load_weights, read_optimizer_state
from .config import PHASES, RunConfig, TrainConfig, load_config
from .engine import (TrainState, all_ranks_agree, build_optimizer, evaluate, fit, init_distributed, is_main_process,
                     resolve_device, resolve_precision, seed_everything, steps_per_epoch, transfer_optimizer_state)
from .models import CMHSA, continued_parameter, convert_model, scale_position_biases_, transfer_error
from .plots import plot_curves
from .provenance import git_state
from .rundir import PhaseDir, RunDir

__all__ = ["build_loaders", "create_model", "model_spec", "converted_spec", "spec_label", "convert_settings",
           "run_config_path", "data_config", "load_model", "open_run", "train_phase", "PositionBiasAnnealer",
           "position_bias_annealer", "run_pipeline"]


def build_loaders(config: RunConfig, batch_size: int, in_chans: int) -> Tuple[DataLoader, DataLoader, Any]:
    """Train and validation loaders for ``config.data``; distributed samplers under torchrun."""
    d = config.data
    train_set, val_set, info = cmdata.create_datasets(
        d.dataset, img_size=d.img_size, in_chans=in_chans, data_dir=d.data_dir, train_subset=d.train_subset,
        val_subset=d.val_subset, augment=d.augment, resize=d.resize, seed=config.train.seed, hflip=d.hflip,
    )
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    train = cmdata.create_loader(train_set, batch_size, training=True, num_workers=d.num_workers,
                                 distributed=distributed)
    val = cmdata.create_loader(val_set, batch_size, training=False, num_workers=d.num_workers,
                               distributed=distributed)
    return train, val, info


def with_epochs(config: RunConfig, progress: bool = False) -> RunConfig:
    """``config`` with a budget in steps as the epochs it comes to for the images this run trains on, split over
    the processes of a torchrun (:meth:`RunConfig.in_epochs`); the run directory keeps this, what ran. With
    ``progress`` it says how many epochs that is."""
    if not config.budget_in_steps:
        return config
    d = config.data
    images = cmdata.train_image_count(d.dataset, d.data_dir, d.train_subset)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    resolved = config.in_epochs(images, torch.distributed.get_world_size() if distributed else 1)
    if progress and is_main_process():
        epochs = ", ".join(f"{phase} {resolved.phase_config(phase).epochs}" for phase in PHASES)
        print(f"budget in steps: {images} training images make it {epochs} epochs")
    return resolved


def takes_img_size(name: str, kwargs: Dict[str, Any], img_size: Any) -> bool:
    """Whether timm's model ``name`` (with ``kwargs``) takes ``img_size``: transformers fix their token grid to it,
    CNNs take images of any size and reject the argument. Probed on the meta device (no memory, no init cost)."""
    try:
        with torch.device("meta"):
            timm.create_model(name, **{**kwargs, "img_size": img_size})
    except TypeError as e:
        return "img_size" not in str(e)
    except Exception:  # an unknown name or a model that cannot be built on meta: creating it for real will tell
        return True
    return True


def model_spec(config: RunConfig) -> Dict[str, Any]:
    """``{'name': timm name, 'kwargs': {...}}`` of the config's model, with sizes taken from the data (the image
    size only for models that take one)."""
    info = cmdata.dataset_info(config.data.dataset, config.data.data_dir)
    kwargs = {"num_classes": info.num_classes, "in_chans": info.in_chans, "img_size": config.data.img_size,
              **config.model.kwargs}
    if "img_size" not in config.model.kwargs and not takes_img_size(config.model.name, kwargs, config.data.img_size):
        del kwargs["img_size"]
    return {"name": config.model.name, "kwargs": kwargs}


def converted_spec(model: CMHSA) -> Dict[str, Any]:
    """The spec of a converted (attention-phase) CMHSA: its class and its own full config."""
    return {"class": "CMHSA", "kwargs": dict(model.config)}


def spec_label(spec: Dict[str, Any]) -> str:
    """A short name for a spec, for messages and tables."""
    return spec.get("name") or f"{spec['class']}({spec['kwargs'].get('mixer', '')})"


def create_model(spec: Dict[str, Any], seed: Optional[int] = None) -> nn.Module:
    """The model of a spec: ``CMHSA(**kwargs)`` for a CMHSA config, else ``timm.create_model(name, **kwargs)``.
    With ``seed`` the initial weights are repeatable."""
    if seed is not None:
        seed_everything(seed)
    if spec.get("class") == "CMHSA":
        return CMHSA(**spec["kwargs"])
    try:
        return timm.create_model(spec["name"], **spec["kwargs"])
    except RuntimeError as e:
        if "Unknown model" in str(e):
            close = difflib.get_close_matches(spec["name"], timm.list_models(), n=3)
            hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
            raise ValueError(f"unknown model {spec['name']!r}; {hint}CMHSA models: {timm.list_models('cmhsa*')}, "
                             f"or any timm model name (timm.list_models())") from e
        raise
    except TypeError as e:
        if "unexpected" in str(e):  # a misspelt or foreign argument in model.kwargs
            raise ValueError(f"model {spec['name']!r} rejects an argument of model.kwargs: {e}. Check its spelling "
                             f"against the model's constructor (kwargs given: {sorted(spec['kwargs'])})") from e
        raise


def convert_settings(config: RunConfig) -> Dict[str, Any]:
    """``convert_model`` keyword arguments of the config's ``convert`` section."""
    c = config.convert
    return dict(bias_strength=c.bias_strength, null_key=c.null_key, qk_std=c.qk_std, form=c.form, qk_dim=c.qk_dim,
                **c.kwargs)


def run_config_path(ckpt: Path) -> Optional[Path]:
    """The ``config.yaml`` of the run a checkpoint belongs to: two levels up (run/phase/which) or one (run/phase)."""
    for root in (ckpt.parent.parent, ckpt.parent):
        if RunDir(root).config_path.exists():
            return RunDir(root).config_path
    return None


def data_config(config_path: Optional[Path], dataset: Optional[str] = None, data_dir: Optional[str] = None,
                overrides: Iterable[str] = (), img_size: Any = None) -> RunConfig:
    """The config whose data section evaluates a model: its run's ``config.yaml`` (:func:`run_config_path`) with
    ``overrides``, then ``dataset`` and ``data_dir`` if given (another dataset drops the run's data_dir, which holds
    the run's own data). A model outside a run (`cmhsa convert`'s output) has no config, so ``dataset`` must name
    its data: the default dataset would score it on data it may never have seen; its images are brought to
    ``img_size``, the input size the model was built for (its spec's), unless ``overrides`` set data.img_size."""
    if config_path is None and dataset is None:
        raise ValueError("the model is not inside a run directory (no config.yaml), so nothing says which data it "
                         "was trained on: pass --dataset NAME (dataset= in Python), and --data-dir if its files "
                         "are not in the default place")
    square = img_size if isinstance(img_size, int) else \
        img_size[0] if isinstance(img_size, (list, tuple)) and len(set(img_size)) == 1 else None
    if config_path is None and square is not None:
        overrides = [f"data.img_size={square}", *overrides]
    config = load_config(config_path, overrides)
    changes = {"data.dataset": dataset} if dataset is not None else {}
    if data_dir is not None:
        changes["data.data_dir"] = data_dir
    elif dataset not in (None, config.data.dataset):
        changes["data.data_dir"] = None
    return config.set(changes) if changes else config


def load_model(path: str | Path, which: str = "last") -> Tuple[nn.Module, Dict[str, Any], Path]:
    """A model from a phase directory (``.../phase2``), a checkpoint directory (``.../phase2/best``) or a run
    directory (its last phase). Returns (model, spec, checkpoint dir)."""
    path = Path(path)
    run = RunDir(path)
    candidates = [run.phase(p).root for p in ("phase2", "phase1", "train")] if run.config_path.exists() else [path]
    for root in candidates:
        phase, parent = PhaseDir(root), PhaseDir(root.parent)
        if phase.spec_path.exists():
            # a phase dir holds last/ and best/; `cmhsa convert` writes its weights beside model.json
            ckpt = root / which if (root / which).exists() else root
            break
        if parent.spec_path.exists():
            phase, ckpt = parent, root
            break
    else:
        raise FileNotFoundError(f"no model.json in {path} or its parent: pass a run directory, a phase "
                                f"directory (runs/<name>/phase2) or a checkpoint directory (runs/<name>/phase2/best)")
    spec = phase.read_spec()
    model = create_model(spec)
    load_weights(ckpt, model)
    return model, spec, ckpt


def open_run(config: RunConfig, resume: bool = True) -> RunDir:
    """The run directory, locked and holding ``config`` (see :meth:`RunDir.start`); rank 0 writes, every rank
    raises if it fails."""
    run = RunDir(config.run_dir())
    error: Optional[Exception] = None
    if is_main_process():
        try:
            run.start(config, resume)
        except (ValueError, RuntimeError) as e:
            error = e
    if not all_ranks_agree(error is None):
        raise error or RuntimeError(f"rank 0 could not open the run directory {run.root}; see its error")
    return run


def train_phase(model: nn.Module, spec: Dict[str, Any], config: RunConfig, phase: str, phase_dir: PhaseDir,
                resume: bool = True, progress: bool = True,
                loaders: Optional[Tuple[DataLoader, DataLoader, Any]] = None,
                on_start: Optional[Callable[[TrainState], None]] = None,
                on_epoch_start: Optional[Callable[[int, nn.Module], None]] = None) -> Dict[str, Any]:
    """Train ``model`` with the ``phase`` settings of ``config`` into ``phase_dir``; returns the final metrics.
    ``loaders`` (train, val, dataset info) are built from the config unless given; ``on_start``, ``on_epoch_start``
    as in :func:`fit`. With ``progress`` it first says what it trains on what."""
    cfg = config.phase_config(phase, spec["kwargs"]["num_classes"])
    train_loader, val_loader, info = loaders or build_loaders(config, cfg.batch_size, spec["kwargs"]["in_chans"])
    if is_main_process():
        phase_dir.write_spec(spec)
        if progress:
            params = sum(p.numel() for p in model.parameters()) / 1e6
            print(f"[{phase}] {spec_label(spec)} ({params:.2f}M parameters) on {info.name}: "
                  f"{len(train_loader.dataset)} training images, {len(val_loader.dataset)} validation; "
                  f"{cfg.epochs} epoch{'s' * (cfg.epochs != 1)} of {steps_per_epoch(train_loader, cfg)} steps "
                  f"(batch {cfg.batch_size}"
                  f"{f' x {cfg.grad_accum_steps}' if cfg.grad_accum_steps > 1 else ''}); augmentation "
                  f"{cmdata.describe_augmentation(config.data.augment, config.data.hflip, info)}")
    return fit(model, train_loader, val_loader, cfg, phase_dir, resume=resume, phase=phase, progress=progress,
               on_start=on_start, on_epoch_start=on_epoch_start)


class PositionBiasAnnealer:
    """Phase 2's ``on_epoch_start`` for ``convert.anneal_bias_to``: at the start of each of its first ``epochs``
    epochs every position bias is scaled by the same factor, ``start`` -> ``end`` bias strength in all (geometric
    steps)."""

    def __init__(self, start: float, end: float, epochs: int):
        self.epochs, self.factor = epochs, (end / start) ** (1 / epochs)

    def __call__(self, epoch: int, model: nn.Module) -> None:
        if epoch < self.epochs:
            scale_position_biases_(model, self.factor)


def position_bias_annealer(config: RunConfig, phase2_epochs: int) -> Optional[PositionBiasAnnealer]:
    """The annealer of ``convert.anneal_bias_to`` over ``round(anneal_fraction * phase2_epochs)`` epochs (at least
    one; the fraction defaults to 0.25), or None without annealing."""
    c = config.convert
    if c.anneal_bias_to is None:
        return None
    return PositionBiasAnnealer(c.bias_strength, c.anneal_bias_to,
                                max(1, round(c.resolved_anneal_fraction * phase2_epochs)))


def _carry_optimizer_state(conv_model: nn.Module, cfg1: TrainConfig, phase1: PhaseDir) -> Callable[[TrainState], None]:
    """Phase 2's ``on_start`` under ``convert.continue_schedule``: every parameter the conversion kept (outside the
    mixers; a tied mixer's kernel and bias) starts phase 2 with the optimizer state it ended phase 1 with."""
    def carry(state: TrainState) -> None:
        optimizer1 = build_optimizer(conv_model, cfg1)
        optimizer1.load_state_dict(read_optimizer_state(phase1.last))
        transfer_optimizer_state(conv_model, optimizer1, state.model, state.optimizer, continued_parameter)
    return carry


def _convert(conv_model: CMHSA, config: RunConfig, sample: torch.Tensor) -> Tuple[CMHSA, Dict[str, Any]]:
    """Convert phase 1 -> phase 2 and measure the transfer error in float64 (exactness) and float32. With
    ``convert.keep_conv`` phase 2's model is a copy of the convolution model (the restart-only control)."""
    c = config.convert
    kw = convert_settings(config)
    convert = copy.deepcopy if c.keep_conv else lambda model: convert_model(model, **kw)
    conv_model = conv_model.cpu().float().eval()
    attn_model = convert(conv_model)
    conv64 = CMHSA(**conv_model.config).double()
    conv64.load_state_dict(conv_model.state_dict())
    report = {
        "float64": transfer_error(conv64, convert(conv64), sample.double()),
        "float32": transfer_error(conv_model, attn_model, sample.float()),
        "bias_strength": c.bias_strength, "null_key": c.null_key, "qk_std": c.qk_std, "form": c.form,
        "keep_conv": c.keep_conv, "continue_schedule": c.continue_schedule,
        "anneal_bias_to": c.anneal_bias_to,
    }
    return attn_model, report


def run_pipeline(config: RunConfig, resume: bool = True, progress: bool = True) -> Dict[str, Any]:
    """Phase 1 -> convert -> phase 2 -> final evaluation, into ``config.run_dir()``. Returns the summary.

    The directory is locked while the run writes it; resuming refuses a directory that holds another config."""
    init_distributed()
    config = with_epochs(config, progress)
    spec1 = model_spec(config)
    conv_model = create_model(spec1, seed=config.phase_config("phase1").seed)
    if not isinstance(conv_model, CMHSA) or conv_model.config["mixer"] != "conv":
        raise ValueError(f"the pipeline starts from a CMHSA convolution model (e.g. cmhsa5_conv_tiny), got "
                         f"{spec1['name']!r}; use `cmhsa train` for other models")
    with open_run(config, resume) as run:
        num_classes = spec1["kwargs"]["num_classes"]
        phase1 = train_phase(conv_model, spec1, config, "phase1", run.phase("phase1"), resume, progress)

        cfg2 = config.phase_config("phase2", num_classes)
        train_loader2, val_loader, info = build_loaders(config, cfg2.batch_size, spec1["kwargs"]["in_chans"])
        sample = next(iter(val_loader))[0][:16]
        attn_model, transfer = _convert(conv_model, config, sample)
        device = resolve_device(cfg2)
        precision = resolve_precision(device, cfg2.precision, attn_model)
        after = evaluate(attn_model.to(device), val_loader, device, precision, num_classes)
        transfer["val_after_conversion"] = after
        transfer["val_before_conversion"] = {k: phase1[k] for k in ("val_loss", "val_top1", "val_top5")}
        annealer = position_bias_annealer(config, cfg2.epochs)
        transfer["anneal_epochs"] = annealer.epochs if annealer else 0
        if is_main_process():
            run.write_json(run.convert_path, {**transfer, "git": git_state()})
        if progress and is_main_process():
            print(f"converted phase 1 -> phase 2: logits error float64 {transfer['float64']['logits_error']:.2e}, "
                  f"float32 {transfer['float32']['logits_error']:.2e}; val top-1 {phase1['val_top1']:.2f} -> "
                  f"{after['top1']:.2f} (before -> after conversion)")

        carry = (_carry_optimizer_state(conv_model, config.phase_config("phase1", num_classes), run.phase("phase1"))
                 if config.convert.continue_schedule else None)
        phase2 = train_phase(attn_model, converted_spec(attn_model), config, "phase2", run.phase("phase2"), resume,
                             progress, loaders=(train_loader2, val_loader, info), on_start=carry,
                             on_epoch_start=annealer)
        summary = _summarize(config, run, phase1, phase2, transfer, conv_model, attn_model,
                             train_images=len(train_loader2.dataset),
                             augmentation=cmdata.describe_augmentation(config.data.augment, config.data.hflip, info))
        if is_main_process():
            with atomic_path(run.curves_path) as tmp:
                plot_curves({p: run.phase(p).read_metrics() for p in ("phase1", "phase2")}, tmp, title=config.name)
            run.write_json(run.summary_json, summary)
            run.write_text(run.summary_md, _summary_markdown(summary))
            if progress:
                print(_summary_markdown(summary))
                done = phase1["epochs_run"] == phase2["epochs_run"] == 0
                print(f"report: {run.summary_md}" + (" (the run had already finished: nothing trained now; "
                                                     "--no-resume starts over)" if done else ""))
    return summary


def _phase_row(phase_dir: PhaseDir, final: Dict[str, Any], params: int) -> Dict[str, Any]:
    lines = phase_dir.read_metrics()
    return {"epochs": final["epoch"] + 1 if "epoch" in final else len(lines), "params": params,
            "val_top1": final["val_top1"], "val_top5": final["val_top5"], "val_loss": final["val_loss"],
            "best_top1": final.get("best_top1"), "train_seconds": sum(m["epoch_seconds"] for m in lines),
            "images_per_second": sum(m["images_per_second"] for m in lines) / max(len(lines), 1)}


def _summarize(config: RunConfig, run: RunDir, phase1, phase2, transfer, conv_model: nn.Module,
               attn_model: nn.Module, train_images: int, augmentation: str) -> Dict[str, Any]:
    count = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    return {
        "name": config.name, "dataset": config.data.dataset, "train_subset": config.data.train_subset,
        "train_images": train_images, "augmentation": augmentation,
        "phase1": _phase_row(run.phase("phase1"), phase1, count(conv_model)),
        "phase2": _phase_row(run.phase("phase2"), phase2, count(attn_model)),
        "transfer": transfer, "git": git_state(),  # the code that wrote this summary
    }


def _summary_markdown(s: Dict[str, Any]) -> str:
    t = s["transfer"]
    rows = [
        "| phase | params | epochs | val top-1 | val top-5 | val loss | train time (s) | img/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    phase2 = "2: convolution, kept" if t.get("keep_conv") else "2: self-attention"
    for name, label in (("phase1", "1: convolution"), ("phase2", phase2)):
        r = s[name]
        rows.append(f"| {label} | {r['params'] / 1e6:.2f}M | {r['epochs']} | {r['val_top1']:.2f} | "
                    f"{r['val_top5']:.2f} | {r['val_loss']:.4f} | {r['train_seconds']:.0f} | "
                    f"{r['images_per_second']:.0f} |")
    return "\n".join([
        f"# {s['name']}", "", f"Dataset: {s['dataset']}, {s['train_images']} training images; augmentation "
        f"{s['augmentation']}.", "", *rows, "",
        ("No conversion (convert.keep_conv, a control): phase 2 trained the convolution model on; max "
         if t.get("keep_conv") else
         f"Conversion ({t.get('form', 'paper')} form, bias strength {t['bias_strength']:g}, null key "
         f"{'on' if t['null_key'] else 'off'}): max ") +
        f"|logits error| {t['float64']['logits_error']:.2e} in float64, {t['float32']['logits_error']:.2e} in "
        f"float32; val top-1 {t['val_before_conversion']['val_top1']:.2f} before, "
        f"{t['val_after_conversion']['top1']:.2f} right after." +
        (" Phase 2 continued phase 1's run (convert.continue_schedule): one lr schedule over both phases, and "
         "the optimizer state of every parameter the conversion kept." if t.get("continue_schedule") else "") +
        (f" Phase 2 annealed the position biases from bias strength {t['bias_strength']:g} to "
         f"{t['anneal_bias_to']:g} over its first {t['anneal_epochs']} of {s['phase2']['epochs']} epochs "
         f"(convert.anneal_bias_to)." if t.get("anneal_epochs") else ""),
        "", "![curves](curves.png)", "",
    ])
