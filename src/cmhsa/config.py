"""Run configuration: YAML presets, dotted command-line overrides, and the merged per-phase training settings.

A config has sections ``data``, ``model``, ``convert``, ``train`` (shared training settings), ``phase1`` and
``phase2`` (per-phase training settings, layered over ``train``), and ``output``. See ``configs/*.yaml``.
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any, Dict, Iterable, Optional

import yaml

from .convert import DEFAULT_BIAS_STRENGTH

__all__ = ["DEFAULTS", "load_config", "apply_overrides", "train_config", "save_config"]

DEFAULTS: Dict[str, Any] = {
    "name": "run",
    "output": None,  # run directory; default runs/<name>
    "data": {
        "dataset": "fashion_mnist",
        "data_dir": None,
        "img_size": 28,
        "train_subset": None,
        "val_subset": None,
        "augment": "light",
        "resize": "pad",
        "num_workers": 0,
    },
    "model": {
        "name": "cmhsa5_conv_tiny",  # timm name of the model trained first (a CMHSA conv model in the pipeline)
        "kwargs": {},
    },
    "convert": {
        "bias_strength": DEFAULT_BIAS_STRENGTH,
        "null_key": True,
        "qk_std": 0.0,  # > 0 starts W_Q, W_K small and random so content attention can be learned in phase 2
        # attention form of phase 2: 'paper' (the paper's layer), 'factorized' (same function, less compute) or
        # 'local' (the paper's heads over the kernel's window of offsets, runs at any image size)
        "form": "paper",
        "qk_dim": None,  # Q/K head size of the factorized form (None: token width // heads)
        "kwargs": {},  # training-only settings of the attention model, e.g. drop_path_rate
    },
    "train": {},
    "phase1": {},
    "phase2": {},
}


def _merge(base: Dict[str, Any], update: Dict[str, Any], where: str = "") -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, f"{where}{key}.")
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_config(path: Optional[str | Path], overrides: Iterable[str] = ()) -> Dict[str, Any]:
    """Defaults <- the YAML file (if any) <- ``key.sub=value`` overrides (values parsed as YAML)."""
    config = copy.deepcopy(DEFAULTS)
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"config file {path} does not exist; presets are in configs/ (e.g. "
                                    f"configs/fmnist_tiny.yaml)")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path} must hold a YAML mapping at the top level")
        config = _merge(config, loaded)
    return apply_overrides(config, overrides)


def apply_overrides(config: Dict[str, Any], overrides: Iterable[str]) -> Dict[str, Any]:
    """Apply ``section.key=value`` strings, e.g. ``phase1.epochs=3`` or ``data.train_subset=0.1``."""
    config = copy.deepcopy(config)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value (e.g. phase1.epochs=3)")
        dotted, raw = item.split("=", 1)
        keys = dotted.strip().split(".")
        node = config
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {key!r} is not a section")
        node[keys[-1]] = yaml.safe_load(raw)
    return config


def train_config(config: Dict[str, Any], phase: str, num_classes: int):
    """The engine's TrainConfig for ``phase`` ('phase1' or 'phase2'): ``train`` layered with the phase's section."""
    from .engine import TrainConfig

    settings = {**config.get("train", {}), **config.get(phase, {}), "num_classes": num_classes}
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"unknown training settings {unknown} in train/{phase}; known: {sorted(known)}")
    if "opt_betas" in settings:
        settings["opt_betas"] = tuple(settings["opt_betas"])
    return TrainConfig(**settings)


def save_config(config: Dict[str, Any], path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config, sort_keys=False))
