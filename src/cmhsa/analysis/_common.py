"""Helpers shared by the analysis instruments: eval mode, image batches, patch grid and patch size, forward-hook
capture of layer inputs/outputs, and saving figures."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

Data = Union[torch.Tensor, Iterable]  # an image batch (B, C, H, W), or a loader of (images, labels) batches


@contextmanager
def _eval_mode(model: nn.Module):
    # dropout / drop-path off, so recomputed attention is the one the forward pass used
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _first_param(model: nn.Module) -> torch.Tensor:
    for p in model.parameters():
        if p.is_floating_point():
            return p
    raise ValueError(f"{type(model).__name__} has no floating-point parameters to take a device/dtype from")


def _to_model(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    p = _first_param(model)
    return images.to(device=p.device, dtype=p.dtype)


def _image_batches(data: Data, max_batches: Optional[int] = None,
                   with_labels: bool = False) -> Iterator[Any]:
    """Image batches (B, C, H, W) from a tensor (one batch) or a loader of ``(images, labels)`` batches."""
    if isinstance(data, torch.Tensor):
        batches: Iterable = [(data, None)]
    else:
        batches = data
    got = 0
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        if isinstance(batch, (list, tuple)):
            images, labels = batch[0], (batch[1] if len(batch) > 1 else None)
        else:
            images, labels = batch, None
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            raise ValueError(f"expected image batches (B, C, H, W) or (images, labels) pairs, got "
                             f"{type(images).__name__} {tuple(getattr(images, 'shape', ()))}")
        got += 1
        yield (images, labels) if with_labels else images
    if not got:
        raise ValueError("the data yielded no batches; pass an image tensor or a non-empty loader "
                         "(and max_batches >= 1)")


def _grid(model: nn.Module) -> Tuple[int, int]:
    """Patch grid (gh, gw) of a model with a ``patch_embed`` (timm and CMHSA patch embeddings have ``grid_size``)."""
    pe = getattr(model, "patch_embed", None)
    grid = getattr(pe, "grid_size", None)
    if grid is None:
        raise ValueError(f"{type(model).__name__} has no patch_embed.grid_size, so the patch grid is unknown; "
                         f"analysis needs a timm ViT/ConViT or a CMHSA model")
    return int(grid[0]), int(grid[1])


def _patch_size(model: nn.Module) -> Tuple[int, int]:
    pe = getattr(model, "patch_embed", None)
    ps = getattr(pe, "patch_size", None)
    if ps is None:
        raise ValueError(f"{type(model).__name__} has no patch_embed.patch_size; pass shifts= explicitly")
    return (int(ps), int(ps)) if isinstance(ps, int) else (int(ps[0]), int(ps[1]))


def _run_capturing(model: nn.Module, images: torch.Tensor, modules: Sequence[nn.Module],
                   outputs: bool = False) -> Tuple[torch.Tensor, List[Any]]:
    """Run ``model(images)`` and return (model output, per module: its (args, kwargs) or its output)."""
    captured: List[Any] = [None] * len(modules)

    def make_hook(i):
        if outputs:
            return lambda mod, args, out: captured.__setitem__(i, out)
        return lambda mod, args, kwargs: captured.__setitem__(i, (args, kwargs))

    handles = [m.register_forward_hook(make_hook(i)) if outputs
               else m.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, m in enumerate(modules)]
    try:
        with torch.no_grad(), _eval_mode(model):
            out = model(_to_model(model, images))
    finally:
        for h in handles:
            h.remove()
    missing = [i for i, c in enumerate(captured) if c is None]
    if missing:
        raise ValueError(f"modules {missing} were not called in the forward pass; pass modules the model uses")
    return out, captured


def _save(fig, path: Union[str, Path]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
