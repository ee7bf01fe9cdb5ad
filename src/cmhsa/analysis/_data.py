"""Validation images for the analyses: a run's validation loader, read once into a list of batches, and the model
input channels / size it needs."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn

from ..data import create_datasets, create_loader
from ..models import CMHSA
from ..pipeline import data_config
from ._common import _image_batches


def _model_in_chans(model: nn.Module) -> int:
    if isinstance(model, CMHSA):
        return model.config["in_chans"]
    for name in ("in_chans",):
        if isinstance(getattr(model, name, None), int):
            return getattr(model, name)
    proj = getattr(getattr(model, "patch_embed", None), "proj", None)
    if isinstance(proj, nn.Conv2d):
        return proj.in_channels
    raise ValueError(f"cannot tell the input channels of {type(model).__name__}; pass loader= yourself")


def _model_img_size(model: nn.Module) -> Optional[int]:
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is None:
        return None
    size = (size, size) if isinstance(size, int) else tuple(size)
    return size[0] if size[0] == size[1] else list(size)


def _val_loader(config_path: Optional[Path], in_chans: int, batch_size: int, dataset: Optional[str] = None,
                data_dir: Optional[str] = None, img_size: Any = None) -> Tuple[Any, Dict[str, Any]]:
    """Validation loader (no augmentation, in order) of a run's data config with overrides, and that data config
    with ``black``: the normalised value of a black pixel per channel."""
    d = data_config(config_path, dataset, data_dir).data
    size = d.img_size if img_size is None else img_size  # the model's own input size may be a (H, W) pair
    _, val, info = create_datasets(d.dataset, img_size=size, in_chans=in_chans, data_dir=d.data_dir,
                                   augment="none", resize=d.resize)
    # a black pixel after normalisation: what "zero-fill" means for these images
    black = [-m / s for m, s in zip(info.mean, info.std)]
    return create_loader(val, batch_size, training=False), {**dataclasses.asdict(d), "img_size": size,
                                                            "black": black}


def _materialise(loader: Iterable, max_batches: Optional[int]) -> List[Tuple[torch.Tensor, Any]]:
    # every analysis then sees the same images, and the dataset transform runs once
    return list(_image_batches(loader, max_batches, with_labels=True))
