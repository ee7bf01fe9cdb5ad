"""Attention maps of every attention layer, and the mean attention distance per head.

Works on CMHSA attention models (:class:`~cmhsa.attention.RelPosMHSA` or ``FactorizedRelPosMHSA`` mixers),
timm ``VisionTransformer``
(``timm.layers.Attention``) and timm ``ConVit`` (``GPSA`` and ``MHSA`` blocks).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from timm.layers import Attention as TimmAttention  # noqa: E402
from timm.models.convit import GPSA as ConvitGPSA  # noqa: E402
from timm.models.convit import MHSA as ConvitMHSA  # noqa: E402

from ..attention import RelPosAttention  # noqa: E402
from ..models import CMHSA  # noqa: E402
from ..tokens import grid_offsets  # noqa: E402
from ._common import Data, _grid, _image_batches, _patch_size, _run_capturing, _save  # noqa: E402

__all__ = ["AttentionMap", "attention_layers", "attention_details", "attention_maps", "attention_distance",
           "plot_attention_distance"]


_ATTENTION_TYPES = (RelPosAttention, TimmAttention, ConvitGPSA, ConvitMHSA)
_SUPPORTED = ("cmhsa RelPosMHSA / FactorizedRelPosMHSA (CMHSA attention phase), timm.layers.Attention "
              "(VisionTransformer), "
              "timm ConViT GPSA and MHSA")


def _distances(grid: Tuple[int, int]) -> torch.Tensor:
    """(N, N) Euclidean distance between query and key patch centres, in patches."""
    return grid_offsets(grid).double().norm(dim=-1)


@dataclass
class AttentionMap:
    """One attention layer's weights for one batch.

    ``attn`` (B, H, N, N) between the N patch tokens. ``null_mass`` (B, H, N): weight on a RelPosMHSA null key
    (its column is dropped, rows are *not* renormalised, so ``attn.sum(-1) + null_mass == 1``), else None.
    ``prefix_mass`` (B, H, N): weight the patch queries put on class/register tokens before those were dropped
    and the rows renormalised (so ``attn.sum(-1) == 1``), None for layers without prefix tokens.
    """
    name: str
    attn: torch.Tensor
    null_mass: Optional[torch.Tensor]
    prefix_mass: Optional[torch.Tensor]
    grid_size: Tuple[int, int]


def attention_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``(name, module)`` of every supported attention layer of ``model``, in forward order."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, _ATTENTION_TYPES)]
    if not layers:
        hint = ""
        if isinstance(model, CMHSA) and model.config["mixer"] == "conv":
            hint = " It is a CMHSA convolution-phase model: convert it first with cmhsa.convert_model."
        raise ValueError(f"{type(model).__name__} has no attention layer this tool can read; supported: "
                         f"{_SUPPORTED}.{hint}")
    return layers


def _softmax_qk(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    return ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1)


def _layer_probs(module: nn.Module, args: tuple, kwargs: dict) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Attention probabilities (B, H, N, N) of one layer for its captured input, and the null-key mass or None."""
    x = args[0] if args else kwargs["x"]
    if isinstance(module, RelPosAttention):
        probs = module.attention_probs(x)
        if module.null_key:
            return probs[..., :-1], probs[..., -1]  # null key is last
        return probs, None
    if isinstance(module, ConvitGPSA):
        return module.get_attention(x), None  # its own gated mix of content and positional softmaxes
    B, N, C = x.shape
    if isinstance(module, TimmAttention):
        if kwargs.get("attn_mask") is not None or kwargs.get("is_causal"):
            raise ValueError("the attention layer was called with attn_mask/is_causal, which attention_maps "
                             "does not reproduce; analyse the model without masks")
        q, k, _ = module.qkv(x).reshape(B, N, 3, module.num_heads, module.head_dim).permute(2, 0, 3, 1, 4)
        return _softmax_qk(module.q_norm(q), module.k_norm(k), module.scale), None
    if isinstance(module, ConvitMHSA):
        q, k, _ = module.qkv(x).reshape(B, N, 3, module.num_heads, C // module.num_heads).permute(2, 0, 3, 1, 4)
        return _softmax_qk(q, k, module.scale), None
    raise ValueError(f"unsupported attention layer {type(module).__name__}; supported: {_SUPPORTED}")


@torch.no_grad()
def attention_details(model: nn.Module, images: torch.Tensor, keep_prefix: bool = False) -> List[AttentionMap]:
    """Attention weights of every attention layer for ``images`` (B, C, H, W), one :class:`AttentionMap` each.

    Each layer's input is captured during an ordinary forward pass (eval mode), so it is the real input: the
    normed residual stream of that block. The probabilities are then recomputed from it:

    - CMHSA ``RelPosMHSA`` / ``FactorizedRelPosMHSA``: ``attention_probs``; the null-key column is removed and
      reported as ``null_mass``
      (rows not renormalised: weight on the null key is attention to "nothing", i.e. zero padding).
    - timm ``Attention`` / ConViT ``MHSA``: ``softmax(q k^T * scale)`` from the layer's fused qkv (and q/k norms).
    - ConViT ``GPSA``: its own ``get_attention(x)``.

    Class/register tokens (the tokens in front of the N patches, e.g. timm ViT's class token, ConViT's class token
    after its GPSA blocks) are removed from queries and keys and each patch query's row is renormalised over the
    patches, so maps are patch-to-patch; the removed weight is ``prefix_mass``. With ``keep_prefix=True`` the
    layer's full (B, H, N_all, N_all) probabilities are returned untouched instead.
    """
    return list(_iter_attention(model, images, keep_prefix))


@torch.no_grad()
def _iter_attention(model: nn.Module, images: torch.Tensor, keep_prefix: bool = False) -> Iterator[AttentionMap]:
    # one forward pass captures every layer's input; maps are then made one layer at a time, so callers that
    # reduce them (attention_distance) never hold all layers' (B, H, N, N) tensors at once
    layers = attention_layers(model)
    _, captured = _run_capturing(model, images, [m for _, m in layers])
    model_grid = None
    for (name, module), (args, kwargs) in zip(layers, captured):
        probs, null = _layer_probs(module, args, kwargs)
        if isinstance(module, RelPosAttention):
            grid = module.grid_size
        else:
            model_grid = model_grid or _grid(model)
            grid = model_grid
        n_patches = grid[0] * grid[1]
        prefix = probs.shape[-1] - n_patches
        if prefix < 0:
            raise ValueError(f"layer {name} sees {probs.shape[-1]} tokens, fewer than the {n_patches} patches of "
                             f"the {grid[0]}x{grid[1]} grid; dynamic image sizes are not supported")
        prefix_mass = None
        if prefix and not keep_prefix:
            probs = probs[..., prefix:, :]
            patch_mass = probs[..., prefix:].sum(-1, keepdim=True)
            prefix_mass = 1.0 - patch_mass.squeeze(-1)
            # renormalise over patches: a query's distribution among the patches it attends to
            probs = probs[..., prefix:] / patch_mass.clamp_min(torch.finfo(probs.dtype).tiny)
        yield AttentionMap(name, probs, null, prefix_mass, grid)


def attention_maps(model: nn.Module, images: torch.Tensor, keep_prefix: bool = False) -> List[torch.Tensor]:
    """Patch-to-patch attention (B, H, N, N) of every attention layer; see :func:`attention_details` for how the
    null key (column dropped, rows not renormalised) and class tokens (dropped, rows renormalised) are handled."""
    return [m.attn for m in attention_details(model, images, keep_prefix=keep_prefix)]


@torch.no_grad()
def attention_distance(model: nn.Module, data: Data, max_batches: Optional[int] = None,
                       null_key: str = "exclude") -> Dict[str, Any]:
    """Mean attention distance per layer and head (Raghu et al. 2021; ConViT's nonlocality).

    For query patch q and key patch k, ``dist(q, k)`` is the Euclidean distance between the patch centres in
    patches (multiply by the patch size for pixels). A head's distance is ``sum a(q, k) dist(q, k) / sum a(q, k)``
    summed over images, queries and keys of the patch-to-patch maps of :func:`attention_details` (class tokens
    removed, rows renormalised), i.e. the per-query mean distance averaged over queries and images.

    The null key of a CMHSA layer has no position. ``null_key='exclude'`` (default) leaves its weight out of both
    sums: each query's mean distance is weighted by the weight it puts on real patches, so a converted head scores
    exactly ``|offset|``, and border queries whose neighbour is missing (all weight on the null key) drop out.
    ``null_key='zero'`` counts null-key weight at distance 0 and weighs all queries equally (a converted head then
    scores ``|offset|`` times the share of queries whose neighbour exists).

    Returns ``{'layers': [[distance per head] per layer], 'mean': [per layer], 'null_mass': [[...]],
    'prefix_mass': [[...]], 'names', 'unit': 'patches', 'patch_size', 'images', 'null_key'}``.
    """
    if null_key not in ("exclude", "zero"):
        raise ValueError(f"null_key must be 'exclude' or 'zero', got {null_key!r}")
    # per layer, (H,) float64 each: sum a*dist, sum a, query count, null-key weight, class-token weight
    sums: List[torch.Tensor] = []
    mass: List[torch.Tensor] = []
    queries: List[torch.Tensor] = []
    null: List[torch.Tensor] = []
    prefix: List[torch.Tensor] = []
    names: List[str] = []
    images_seen = 0
    dist_cache: Dict[Tuple[int, int], torch.Tensor] = {}
    for images in _image_batches(data, max_batches):
        images_seen += images.shape[0]
        for i, m in enumerate(_iter_attention(model, images)):
            if i == len(sums):  # first batch
                names.append(m.name)
                for acc in (sums, mass, queries, null, prefix):
                    acc.append(torch.zeros(m.attn.shape[1], dtype=torch.float64))
            if m.grid_size not in dist_cache:
                dist_cache[m.grid_size] = _distances(m.grid_size)
            a = m.attn.double().cpu()
            sums[i] += torch.einsum("bhqk,qk->h", a, dist_cache[m.grid_size])
            mass[i] += a.sum(dim=(0, 2, 3))
            queries[i] += a.shape[0] * a.shape[2]
            if m.null_mass is not None:
                null[i] += m.null_mass.double().cpu().sum(dim=(0, 2))
            if m.prefix_mass is not None:
                prefix[i] += m.prefix_mass.double().cpu().sum(dim=(0, 2))
    denominators = mass if null_key == "exclude" else queries
    layers = [s / d for s, d in zip(sums, denominators)]
    return {
        "layers": [h.tolist() for h in layers],
        "mean": [h.mean().item() for h in layers],
        "null_mass": [(n / q).tolist() for n, q in zip(null, queries)],
        "prefix_mass": [(p / q).tolist() for p, q in zip(prefix, queries)],
        "names": names,
        "unit": "patches",
        "patch_size": list(_patch_size(model)) if hasattr(model, "patch_embed") else None,
        "images": images_seen,
        "null_key": null_key,
    }


def plot_attention_distance(result: Dict[str, Any], path: Union[str, Path], title: Optional[str] = None) -> Path:
    """Per-head attention distance (dots) and the layer mean (line) against layer, from :func:`attention_distance`."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, heads in enumerate(result["layers"]):
        ax.scatter([i] * len(heads), heads, s=14, alpha=0.7, color="C0")
    ax.plot(range(len(result["mean"])), result["mean"], "-o", color="C1", ms=4, label="mean over heads")
    ax.set_ylim(bottom=0)
    ax.set(xlabel="layer", ylabel=f"mean attention distance ({result.get('unit', 'patches')})",
           title=title or "attention distance")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
