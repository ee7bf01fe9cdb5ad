"""Shift consistency: the fraction of images whose predicted class survives a shift of the input."""
from __future__ import annotations

import collections
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from ._common import Data, _eval_mode, _image_batches, _patch_size, _save, _to_model  # noqa: E402

__all__ = ["shift_images", "shift_consistency", "plot_shift_consistency"]


def shift_images(images: torch.Tensor, dy: int, dx: int, mode: str = "circular",
                 fill: Union[float, Sequence[float]] = 0.0) -> torch.Tensor:
    """Shift (B, C, H, W) images by (dy, dx) pixels (positive: down / right).

    ``mode='circular'`` wraps around (``torch.roll``); ``'zero'`` fills the vacated pixels with ``fill``, one value
    or one per channel. On normalised images 0 is the dataset mean; a black pixel is ``-mean / std``.
    """
    if mode == "circular":
        return torch.roll(images, shifts=(dy, dx), dims=(-2, -1))
    if mode != "zero":
        raise ValueError(f"mode must be 'circular' or 'zero', got {mode!r}")
    H, W = images.shape[-2:]
    out = torch.zeros_like(images) + torch.as_tensor(fill, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    if abs(dy) >= H or abs(dx) >= W:
        return out
    out[..., max(dy, 0):H + min(dy, 0), max(dx, 0):W + min(dx, 0)] = \
        images[..., max(-dy, 0):H - max(dy, 0), max(-dx, 0):W - max(dx, 0)]
    return out


@torch.no_grad()
def _default_shifts(model: nn.Module, image_hw: Sequence[int]) -> List[int]:
    """1..P for a patch model, else the powers of 2 up to the total stride; only shifts smaller than the image (a
    shift by its size is no shift at all, circularly, and an empty image zero-filled)."""
    return [s for s in _natural_shifts(model) if s < min(image_hw)]


def _natural_shifts(model: nn.Module) -> List[int]:
    if hasattr(model, "patch_embed"):
        return list(range(1, _patch_size(model)[0] + 1))
    info = getattr(model, "feature_info", None)
    if not info:
        raise ValueError(f"{type(model).__name__} has neither patch_embed.patch_size nor timm's feature_info; pass "
                         f"shifts= explicitly")
    stride = max(f["reduction"] for f in info)  # a shift by the total stride moves whole output cells
    return [2 ** i for i in range(stride.bit_length()) if 2 ** i <= stride]


def shift_consistency(model: nn.Module, data: Data, shifts: Optional[Iterable[int]] = None, mode: str = "circular",
                      max_batches: Optional[int] = None,
                      directions: Sequence[Tuple[int, int]] = ((1, 1),),
                      fill: Union[float, Sequence[float]] = 0.0) -> Dict[int, float]:
    """Fraction of images whose predicted class is unchanged when the input is shifted, per shift size.

    Shift s moves the image by ``(s * dy, s * dx)`` pixels for every ``(dy, dx)`` in ``directions`` (default: the
    diagonal, s pixels down and right, one forward pass per shift; add ``(0, 1), (1, 0)`` for the axes); the
    fraction is over images and directions. ``shifts`` defaults to ``1..P`` for
    patch size P (a shift of P moves whole patches), and for a timm CNN to the powers of 2 up to its total stride,
    in both cases only those smaller than the image. Works for any classifier returning (B, classes) logits.
    """
    shifts = None if shifts is None else [int(s) for s in shifts]
    same: Dict[int, int] = collections.Counter()
    total = 0
    with _eval_mode(model):
        for images in _image_batches(data, max_batches):
            images = _to_model(model, images)
            if shifts is None:
                shifts = _default_shifts(model, images.shape[-2:])
            base = model(images).argmax(-1)
            total += images.shape[0] * len(directions)
            for s in shifts:
                for dy, dx in directions:
                    pred = model(shift_images(images, s * dy, s * dx, mode, fill)).argmax(-1)
                    same[s] += int((pred == base).sum())
    if not total:
        raise ValueError("shift_consistency got no images: data (or max_batches) is empty")
    return {s: same[s] / total for s in shifts}


def plot_shift_consistency(results: Dict[str, Dict[int, float]], path: Union[str, Path],
                           title: Optional[str] = None) -> Path:
    """Consistency against shift size, one line per mode (``{'circular': {s: frac}, 'zero': {...}}``)."""
    fig, ax = plt.subplots(figsize=(5, 3.8))
    for i, (mode, curve) in enumerate(results.items()):
        xs = sorted(int(s) for s in curve)
        ax.plot(xs, [curve[s] if s in curve else curve[str(s)] for s in xs], "-o", ms=4, color=f"C{i}", label=mode)
    ax.set(xlabel="shift (pixels)", ylabel="prediction unchanged (fraction)", title=title or "shift consistency",
           ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
