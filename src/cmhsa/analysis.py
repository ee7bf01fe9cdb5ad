"""Instruments for attention models: attention distance, CKA, remaining convolution, shift consistency.

Works on CMHSA attention models (:class:`~cmhsa.attention.RelPosMHSA` mixers), timm ``VisionTransformer``
(``timm.layers.Attention``) and timm ``ConVit`` (``GPSA`` and ``MHSA`` blocks).

- :func:`attention_maps` / :func:`attention_details`: attention probabilities recomputed from each attention
  layer's real input (captured with forward pre-hooks during an ordinary forward pass).
- :func:`attention_distance`: attention-weighted mean distance between query and key patches (Raghu et al.
  2021, the "nonlocality" of d'Ascoli et al. 2021).
- :func:`layer_features`, :func:`cka`, :func:`cka_matrix`: linear CKA with the unbiased HSIC estimator accumulated
  over minibatches (Nguyen, Raghu & Kornblith 2021).
- :func:`remaining_convolution`: how much of the Theorem 1 convolution a CMHSA attention layer still is: attention
  mass on each head's conversion offset, positional vs content logits, and the relative error of the best
  projection of the layer back onto a KxK convolution. :func:`remaining_convolution_over_checkpoints` tracks these
  through a run's phase 2.
- :func:`shift_consistency`: fraction of images whose predicted class survives a shift of the input.
- :func:`analyze` / ``cmhsa analyze``: all of the above for a checkpoint or run, into ``analysis.json`` + PNGs.
"""
from __future__ import annotations

import argparse
import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from timm.layers import Attention as TimmAttention  # noqa: E402
from timm.models.convit import GPSA as ConvitGPSA  # noqa: E402
from timm.models.convit import MHSA as ConvitMHSA  # noqa: E402

from .attention import RelPosMHSA  # noqa: E402
from .checkpoint import read_checkpoint_info  # noqa: E402
from .config import load_config  # noqa: E402
from .convert import DEFAULT_BIAS_STRENGTH, ConvGeometry, conv_blocks, same_padding_geometry  # noqa: E402
from .data import create_datasets, create_loader  # noqa: E402
from .models import CMHSA, convert_model  # noqa: E402
from .pipeline import load_model, run_config_path  # noqa: E402
from .tokens import grid_offsets  # noqa: E402

__all__ = [
    "AttentionMap", "attention_layers", "attention_details", "attention_maps", "attention_distance",
    "layer_features", "hsic_unbiased", "cka", "cka_matrix",
    "offset_attention", "conv_projection", "remaining_convolution", "remaining_convolution_over_checkpoints",
    "shift_images", "shift_consistency",
    "plot_attention_distance", "plot_cka", "plot_remaining_convolution", "plot_shift_consistency",
    "analyze", "add_analyze_parser", "cmd_analyze",
]

_ATTENTION_TYPES = (RelPosMHSA, TimmAttention, ConvitGPSA, ConvitMHSA)
_SUPPORTED = ("cmhsa RelPosMHSA (CMHSA attention phase), timm.layers.Attention (VisionTransformer), "
              "timm ConViT GPSA and MHSA")

Data = Union[torch.Tensor, Iterable]  # an image batch (B, C, H, W), or a loader of (images, labels) batches


# ------------------------------------------------------------------------------------------------ helpers


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


def _distances(grid: Tuple[int, int]) -> torch.Tensor:
    """(N, N) Euclidean distance between query and key patch centres, in patches."""
    return grid_offsets(grid).double().norm(dim=-1)


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


def _jsonable(obj: Any) -> Any:
    """Tensors -> lists, non-finite floats -> None (strict JSON), tuples -> lists, keys -> str."""
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.tolist())
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


# ------------------------------------------------------------------------------------------------ attention


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
    if isinstance(module, RelPosMHSA):
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

    - CMHSA ``RelPosMHSA``: ``attention_probs``; the null-key column is removed and reported as ``null_mass``
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
        if isinstance(module, RelPosMHSA):
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


# ------------------------------------------------------------------------------------------------ CKA


def _blocks(model: nn.Module) -> List[nn.Module]:
    blocks = getattr(model, "blocks", None)
    if blocks is None or not isinstance(blocks, (nn.Sequential, nn.ModuleList)):
        raise ValueError(f"{type(model).__name__} has no .blocks (Sequential/ModuleList); pass layers=[modules] "
                         f"whose outputs are the features to compare")
    return list(blocks)


@torch.no_grad()
def layer_features(model: nn.Module, images: torch.Tensor, layers: Optional[Sequence[nn.Module]] = None,
                   keep_prefix: bool = False) -> List[torch.Tensor]:
    """Output of every block (``model.blocks``, or ``layers``) for ``images``: a list of (B, N, D) tensors.

    Class/register tokens in front of the patch tokens are dropped unless ``keep_prefix``, so that every layer of
    every model describes the same N patches (ConViT only has a class token after its GPSA blocks).
    """
    modules = list(layers) if layers is not None else _blocks(model)
    _, outs = _run_capturing(model, images, modules, outputs=True)
    n_patches = None
    feats = []
    for out in outs:
        if isinstance(out, (tuple, list)):
            out = out[0]
        if out.ndim == 3 and not keep_prefix:
            if n_patches is None:
                gh, gw = _grid(model) if hasattr(model, "patch_embed") else (1, out.shape[1])
                n_patches = gh * gw
            if out.shape[1] > n_patches:
                out = out[:, out.shape[1] - n_patches:]
        feats.append(out)
    return feats


def _flat(features: torch.Tensor, tokens: str) -> torch.Tensor:
    if tokens == "flatten":
        return features.reshape(features.shape[0], -1)
    if tokens == "mean":
        return features.reshape(features.shape[0], features.shape[1], -1).mean(1) if features.ndim > 2 else features
    raise ValueError(f"tokens must be 'flatten' or 'mean', got {tokens!r}")


def _gram(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return x @ x.T


def hsic_unbiased(K: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC estimator (Song et al. 2012) between stacks of Gram matrices.

    ``K`` (a, n, n), ``L`` (b, n, n) -> (a, b); (n, n) inputs give a scalar. Needs n >= 4.
    ``HSIC_1 = [tr(K~ L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3))``, K~ = K with zero diagonal.
    """
    squeeze = K.ndim == 2 and L.ndim == 2
    K, L = (K[None] if K.ndim == 2 else K).double(), (L[None] if L.ndim == 2 else L).double()
    n = K.shape[-1]
    if n < 4:
        raise ValueError(f"the unbiased HSIC needs at least 4 examples per batch, got {n}; use larger batches")
    eye = torch.eye(n, dtype=torch.bool, device=K.device)
    K, L = K.masked_fill(eye, 0), L.masked_fill(eye, 0)
    rk, rl = K.sum(-1), L.sum(-1)  # (a, n), (b, n): K~ 1
    trace = torch.einsum("aij,bij->ab", K, L)  # Gram matrices are symmetric: tr(K L) = sum K * L
    total = rk.sum(-1)[:, None] * rl.sum(-1)[None, :] / ((n - 1) * (n - 2))
    cross = rk @ rl.T * (2.0 / (n - 2))
    h = (trace + total - cross) / (n * (n - 3))
    return h[0, 0] if squeeze else h


def cka(x: Union[torch.Tensor, Sequence[torch.Tensor]], y: Union[torch.Tensor, Sequence[torch.Tensor]]) -> float:
    """Linear minibatch CKA between features ``x`` (n, d1) and ``y`` (n, d2) of the same n examples.

    Lists of minibatches (matching sizes, each >= 4 examples) accumulate the unbiased HSIC over batches:
    ``CKA = sum_i HSIC(K_i, L_i) / sqrt(sum_i HSIC(K_i, K_i) * sum_i HSIC(L_i, L_i))`` (Nguyen et al. 2021).
    Features of more than two dims are flattened per example.
    """
    xs = [x] if isinstance(x, torch.Tensor) else list(x)
    ys = [y] if isinstance(y, torch.Tensor) else list(y)
    if len(xs) != len(ys):
        raise ValueError(f"x has {len(xs)} minibatches and y {len(ys)}; pass the same batches of examples")
    xy = xx = yy = 0.0
    for a, b in zip(xs, ys):
        if a.shape[0] != b.shape[0]:
            raise ValueError(f"minibatch sizes differ ({a.shape[0]} vs {b.shape[0]}); CKA compares the same examples")
        K, L = _gram(a.reshape(a.shape[0], -1)), _gram(b.reshape(b.shape[0], -1))
        xy, xx, yy = xy + hsic_unbiased(K, L), xx + hsic_unbiased(K, K), yy + hsic_unbiased(L, L)
    return float(xy / torch.sqrt(torch.as_tensor(xx * yy)))


@torch.no_grad()
def cka_matrix(model_a: nn.Module, model_b: Optional[nn.Module], data: Data, max_batches: Optional[int] = None,
               tokens: str = "flatten", layers_a: Optional[Sequence[nn.Module]] = None,
               layers_b: Optional[Sequence[nn.Module]] = None) -> torch.Tensor:
    """Linear CKA between every block output of ``model_a`` and of ``model_b`` -> (La, Lb), float64.

    ``model_b=None`` compares ``model_a`` with itself (one forward pass per batch). Both models see the same
    images. Each layer's patch tokens (class tokens dropped, see :func:`layer_features`) are flattened to one
    (N*D) vector per image (``tokens='flatten'``, default: keeps spatial layout, so it also measures where
    information sits), or averaged over tokens to (D,) (``tokens='mean'``). The unbiased HSIC is accumulated over
    minibatches (batches of fewer than 4 images are skipped), so the estimate does not depend on batch size.
    """
    same = model_b is None
    xy = xx = yy = None
    for images in _image_batches(data, max_batches):
        if images.shape[0] < 4:
            continue
        K = torch.stack([_gram(_flat(f, tokens)) for f in layer_features(model_a, images, layers_a)])
        L = K if same else torch.stack([_gram(_flat(f, tokens))
                                        for f in layer_features(model_b, images, layers_b)])
        h_kl = hsic_unbiased(K, L)
        h_kk = h_kl if same else hsic_unbiased(K, K)
        h_ll = h_kl if same else hsic_unbiased(L, L)
        if xy is None:
            xy, xx, yy = h_kl.clone(), h_kk.diagonal().clone(), h_ll.diagonal().clone()
        else:
            xy += h_kl
            xx += h_kk.diagonal()
            yy += h_ll.diagonal()
    if xy is None:
        raise ValueError("no batch had at least 4 images; the unbiased HSIC needs batch_size >= 4")
    return (xy / torch.sqrt(xx[:, None] * yy[None, :])).cpu()


# ------------------------------------------------------------------------------------------------ remaining conv


def _cmhsa_attention(model: nn.Module) -> CMHSA:
    if not isinstance(model, CMHSA) or model.config["mixer"] != "attn":
        kind = (f"a CMHSA {model.config['mixer']}-phase model" if isinstance(model, CMHSA)
                else type(model).__name__)
        raise ValueError(f"remaining_convolution needs a CMHSA attention-phase model (RelPosMHSA mixers), got "
                         f"{kind}; convert a phase-1 model first with cmhsa.convert_model")
    return model


def _geometry(model: CMHSA) -> ConvGeometry:
    # CMHSA's conv mixers are stride-1, dilation-1, zero-'same'-padded kernel_size convs on the pixel map
    return same_padding_geometry(model.config["kernel_size"], model.patch_embed.patch_size)


def _geometry_offsets(geometry: ConvGeometry, grid: Tuple[int, int]) -> torch.Tensor:
    """Offsets (n, 2) the conversion gives heads 0..n-1 (conv_to_mhsa keeps those inside the grid, in order)."""
    offsets = geometry.offsets()
    inside = (offsets[:, 0].abs() < grid[0]) & (offsets[:, 1].abs() < grid[1])
    return offsets[inside]


def _decode_offset(index: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    gh, gw = grid
    return torch.stack([index // (2 * gw - 1) - (gh - 1), index % (2 * gw - 1) - (gw - 1)], dim=-1)


def _head_offsets(layer: RelPosMHSA, offsets: Any, geometry: ConvGeometry, i: int) -> List[Optional[Tuple[int, int]]]:
    """Per head its reference offset (dy, dx), or None for heads that own none (inert padding heads)."""
    H = layer.num_heads
    if isinstance(offsets, str):
        if offsets == "geometry":
            ref = _geometry_offsets(geometry, layer.grid_size)[:H]
        elif offsets == "argmax":
            ref = _decode_offset(layer.rel_pos_bias.detach().argmax(dim=1).cpu(), layer.grid_size)
        else:
            raise ValueError(f"offsets must be 'geometry', 'argmax', an (H, 2) tensor or a list of them per layer, "
                             f"got {offsets!r}")
    else:
        ref = offsets[i] if isinstance(offsets, (list, tuple)) else offsets
        ref = torch.as_tensor(ref).reshape(-1, 2)
    heads: List[Optional[Tuple[int, int]]] = [tuple(int(v) for v in ref[h]) if h < len(ref) else None
                                              for h in range(H)]
    return heads


def offset_attention(layer: RelPosMHSA, attn: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention summed per head and relative offset: for ``attn`` (B, H, N, N[+1]) (null column ignored)
    returns ``sums`` (H, n_table) and ``counts`` (n_table,) of (image, query) pairs whose key at that offset
    exists, indexed like ``layer.rel_pos_bias``. ``sums / counts`` is a head's mean attention on an offset."""
    N = layer.rel_pos_index.shape[0]
    attn = attn[..., :N].double().cpu()
    B, H = attn.shape[:2]
    n_table = layer.rel_pos_bias.shape[1]
    index = layer.rel_pos_index.flatten().cpu()
    sums = torch.zeros(H, n_table, dtype=torch.float64).index_add_(1, index, attn.sum(0).reshape(H, N * N))
    counts = torch.bincount(index, minlength=n_table).double() * B
    return sums, counts


def _conv_index_map(geometry: ConvGeometry, in_chans: int, out_chans: int,
                    grid: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Offsets (n, 2) the kernel reaches inside the grid and, per block entry (n, D, D_out), the flat index of the
    kernel weight it holds (-1: none). Every entry of ``T_d(W)`` is one weight or 0 (a tap is unique given the
    offset and the input/output pixels), so ``T`` is a 0/1 matrix with disjoint column supports."""
    K = geometry.kernel_size
    numel = out_chans * in_chans * K[0] * K[1]
    # kernel holding its own (flat index + 1): conv_blocks then writes each entry's source index (exact below 2^53)
    probe = torch.arange(1, numel + 1, dtype=torch.float64).reshape(out_chans, in_chans, *K)
    offsets, blocks = conv_blocks(probe, geometry)
    inside = (offsets[:, 0].abs() < grid[0]) & (offsets[:, 1].abs() < grid[1])
    return offsets[inside], blocks[inside].round().long() - 1


@torch.no_grad()
def conv_projection(layer: RelPosMHSA, mean_attention: torch.Tensor, geometry: ConvGeometry,
                    in_chans: int, out_chans: Optional[int] = None) -> Tuple[torch.Tensor, float]:
    """Best KxK convolution for an attention layer, and its relative error.

    Treating head h's attention on offset d as its mean ``abar_h(d)`` (``mean_attention`` (H, n_table), indexed
    like ``rel_pos_bias``), the layer maps neighbour ``X_{q+d}`` to ``y_q`` through
    ``M_d = sum_h abar_h(d) W_V^h W_O^h`` (D x D_out). The kernel ``W`` minimising ``sum_d ||M_d - T_d(W)||_F^2``
    over *all* grid offsets (``T_d = 0`` where the kernel does not reach, see :func:`cmhsa.convert.conv_blocks`)
    is solved in closed form: each ``T_d`` entry is one kernel weight, so the least-squares weight is the mean of
    the ``M`` entries it occupies. Biases (value bias, ``b_O``) are affine and left out.

    Returns ``(kernel (out_chans, in_chans, Kh, Kw) float64, ||M - T(W*)|| / ||M||)``.
    """
    out_chans = out_chans or in_chans
    H, hd, D = layer.num_heads, layer.head_dim, layer.dim
    P, Q = geometry.patch_size, geometry.out_patch_size
    if D != P[0] * P[1] * in_chans or layer.out_dim != Q[0] * Q[1] * out_chans:
        raise ValueError(f"layer maps {D} -> {layer.out_dim} features, but a conv {in_chans}->{out_chans} channels on "
                         f"{P} patches maps {P[0] * P[1] * in_chans} -> {Q[0] * Q[1] * out_chans}; pass the layer's "
                         f"pixel channels and patch geometry")
    w_v = layer.qkv.weight.detach()[2 * H * hd:].double().cpu().reshape(H, hd, D)  # v_h = x @ w_v[h].T
    w_o = layer.proj.weight.detach().double().cpu().T.reshape(H, hd, layer.out_dim)  # y = sum_h v_h @ w_o[h]
    m_heads = torch.einsum("hkd,hke->hde", w_v, w_o)  # M_h = W_V^h W_O^h, (H, D, D_out)
    abar = mean_attention.double().cpu()
    offsets, index = _conv_index_map(geometry, in_chans, out_chans, layer.grid_size)
    cols = layer.offset_index(offsets)
    m_reach = torch.einsum("hn,hde->nde", abar[:, cols], m_heads)  # M_d on the offsets the kernel reaches

    numel = out_chans * in_chans * geometry.kernel_size[0] * geometry.kernel_size[1]
    mapped = index >= 0
    sums = torch.zeros(numel, dtype=torch.float64).index_add_(0, index[mapped], m_reach[mapped])
    counts = torch.bincount(index[mapped], minlength=numel).double()
    kernel = sums / counts.clamp_min(1)  # taps that land on no patch of this grid stay 0
    residual = m_reach.clone()
    residual[mapped] -= kernel[index[mapped]]
    err2 = residual.pow(2).sum()
    # offsets outside the kernel's reach are all residual; ||M_d||^2 = abar_d' G abar_d with G = <M_h, M_g>_F,
    # so far offsets cost no (n_table, D, D_out) tensor
    gram = torch.einsum("hde,gde->hg", m_heads, m_heads)
    far = torch.ones(abar.shape[1], dtype=torch.bool)
    far[cols] = False
    far2 = torch.einsum("hm,hg,gm->", abar[:, far], gram, abar[:, far]).clamp_min(0)
    total2 = m_reach.pow(2).sum() + far2
    rel = math.sqrt(float((err2 + far2) / total2)) if total2 > 0 else float("nan")
    return kernel.reshape(out_chans, in_chans, *geometry.kernel_size), rel


@torch.no_grad()
def remaining_convolution(model: nn.Module, data: Data, max_batches: Optional[int] = None,
                          offsets: Any = "geometry") -> Dict[str, Any]:
    """How much of a convolution each attention layer of a CMHSA attention model still is.

    Per layer and head, over the images of ``data``:

    - ``offset_mass``: mean attention on the head's conversion offset d_h, averaged over images and over the
      queries whose neighbour q + d_h exists (at the border the construction sends the weight to the null key).
      ``offsets='geometry'`` (default) takes d_h from the construction (head h owns the h-th offset of
      ``same_padding_geometry(kernel_size, patch_size).offsets()`` inside the grid, as ``conv_to_mhsa`` assigns
      them; heads beyond get None), ``'argmax'`` the offset of the head's largest ``rel_pos_bias`` now, or pass
      (H, 2) offsets (one tensor, or a list per layer).
    - ``content_logit_std`` / ``position_logit_std``: spread over the real keys of each query's content logits
      ``q.k * scale`` and of its positional logits ``B_h[k - q]`` (std over keys, since softmax ignores a per-query
      shift), averaged over queries and images; ``positional_share = pos / (pos + content)`` (1 at conversion with
      W_Q = W_K = 0, just below 1 with ``qk_std > 0``). ``content_logit_absmax`` is max |q.k * scale| (exactly 0
      at conversion with W_Q = W_K = 0).
    - ``null_mass``: mean weight on the null key.
    - per layer ``conv_projection_error``: relative error of the best KxK convolution (:func:`conv_projection`)
      given the heads' mean attention per offset; ``kernels`` holds those convolutions (C, C, K, K).

    Returns ``{'layers': [per-layer dicts], 'offset_mass', 'positional_share', 'conv_projection_error' (means over
    layers and owning heads), 'kernels': [Tensor], 'kernel_size', 'images'}``.
    """
    model = _cmhsa_attention(model)
    geometry = _geometry(model)
    channels = model.patch_embed.pixel_dim
    layers: List[RelPosMHSA] = [b.mixer for b in model.blocks]
    acc = [dict(sums=None, counts=None, content=0.0, absmax=None, null=0.0, queries=0) for _ in layers]
    images_seen = 0
    for images in _image_batches(data, max_batches):
        images_seen += images.shape[0]
        _, captured = _run_capturing(model, images, layers)
        for layer, a, (args, kwargs) in zip(layers, acc, captured):
            x = args[0] if args else kwargs["x"]
            B, N, _ = x.shape
            H, hd = layer.num_heads, layer.head_dim
            probs = layer.attention_probs(x)
            s, c = offset_attention(layer, probs)
            a["sums"] = s if a["sums"] is None else a["sums"] + s
            a["counts"] = c if a["counts"] is None else a["counts"] + c
            if layer.null_key:
                a["null"] = a["null"] + probs[..., N].double().sum(dim=(0, 2)).cpu()
            q, k = layer.qkv(x).reshape(B, N, 3, H, hd).permute(2, 0, 3, 1, 4)[:2]
            content = ((q @ k.transpose(-2, -1)) * layer.scale).double()
            a["content"] = a["content"] + content.std(dim=-1, unbiased=False).sum(dim=(0, 2)).cpu()
            absmax = content.abs().amax(dim=(0, 2, 3)).cpu()
            a["absmax"] = absmax if a["absmax"] is None else torch.maximum(a["absmax"], absmax)
            a["queries"] += B * N

    records, kernels = [], []
    for i, (layer, a) in enumerate(zip(layers, acc)):
        H, N = layer.num_heads, layer.rel_pos_index.shape[0]
        abar = a["sums"] / a["counts"].clamp_min(1)
        heads = _head_offsets(layer, offsets, geometry, i)
        offset_mass = [abar[h, layer.offset_index(torch.tensor(d))].item() if d is not None else None
                       for h, d in enumerate(heads)]
        position = layer.position_bias()[..., :N].detach().double().cpu()
        pos_std = position.std(dim=-1, unbiased=False).mean(dim=-1)  # data-independent
        content_std = a["content"] / a["queries"]
        share = pos_std / (pos_std + content_std)
        kernel, err = conv_projection(layer, abar, geometry, channels)
        kernels.append(kernel)
        null = a["null"] / a["queries"] if layer.null_key else torch.zeros(H, dtype=torch.float64)
        records.append({
            "offsets": [list(d) if d is not None else None for d in heads],
            "offset_mass": offset_mass,
            "positional_share": share.tolist(),
            "content_logit_std": content_std.tolist(),
            "position_logit_std": pos_std.tolist(),
            "content_logit_absmax": a["absmax"].tolist(),
            "null_mass": null.tolist(),
            "conv_projection_error": err,
        })

    def mean_of(values):
        values = [v for v in values if v is not None and math.isfinite(v)]
        return sum(values) / len(values) if values else float("nan")

    return {
        "layers": records,
        "offset_mass": mean_of([v for r in records for v in r["offset_mass"]]),
        "positional_share": mean_of([v for r in records
                                     for v, d in zip(r["positional_share"], r["offsets"]) if d is not None]),
        "conv_projection_error": mean_of([r["conv_projection_error"] for r in records]),
        "kernels": kernels,
        "kernel_size": list(geometry.kernel_size),
        "images": images_seen,
    }


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
    """Validation loader (no augmentation, in order) of a run's data config with overrides."""

    overrides = []
    for value, key in ((dataset, "data.dataset"), (data_dir, "data.data_dir"), (img_size, "data.img_size")):
        if value is not None:
            overrides.append(f"{key}={json.dumps(value) if not isinstance(value, str) else value}")
    config = load_config(config_path, overrides)
    d = config["data"]
    _, val, _ = create_datasets(d["dataset"], img_size=d["img_size"], in_chans=in_chans, data_dir=d.get("data_dir"),
                                augment="none", resize=d.get("resize", "pad"))
    return create_loader(val, batch_size, training=False), d


def _materialise(loader: Iterable, max_batches: Optional[int]) -> List[Tuple[torch.Tensor, Any]]:
    # every analysis then sees the same images, and the dataset transform runs once
    return list(_image_batches(loader, max_batches, with_labels=True))


def remaining_convolution_over_checkpoints(run_dir: Union[str, Path], data: Optional[Data] = None,
                                           max_batches: Optional[int] = 4, batch_size: int = 64,
                                           offsets: Any = "geometry") -> List[Dict[str, Any]]:
    """:func:`remaining_convolution` of every checkpoint of a pipeline run, in phase-2 epochs.

    Epoch 0 is ``phase1/last`` converted with the run's conversion settings (``config.yaml``'s ``convert`` section as
    the pipeline uses it, else ``bias_strength`` / ``null_key`` from ``phase2/model.json``; a ``qk_std > 0`` start is
    redrawn with seed 0, not the run's own draw); a phase-2 checkpoint saved after 0-based epoch e is epoch e + 1. Every checkpoint directory in ``phase2/`` is used (``last/``, ``best/``, and
    any others holding ``model.safetensors`` and ``state.pt``); checkpoints of the same epoch are one record.
    ``data`` defaults to the first ``max_batches`` validation batches of the run's own dataset.

    Returns records ``{'epoch', 'checkpoints', 'val_top1', 'offset_mass', 'positional_share',
    'conv_projection_error', 'layers'}`` sorted by epoch.
    """

    run_dir = Path(run_dir)
    phase1, phase2 = run_dir / "phase1", run_dir / "phase2"
    found: Dict[int, Dict[str, Any]] = {}
    spec2 = json.loads((phase2 / "model.json").read_text()) if (phase2 / "model.json").exists() else None

    if (phase1 / "last" / "model.safetensors").is_file():
        if (run_dir / "config.yaml").exists():
                    # the pipeline's own conversion settings (cmhsa.pipeline._convert), qk_std and kwargs included
            c = load_config(run_dir / "config.yaml")["convert"]
            kw = dict(bias_strength=c["bias_strength"], null_key=c["null_key"], qk_std=c.get("qk_std", 0.0),
                      **c.get("kwargs", {}))
        elif spec2 is not None:
            kw = {k: spec2["kwargs"][k] for k in ("bias_strength", "null_key") if k in spec2["kwargs"]}
        else:
            kw = dict(bias_strength=DEFAULT_BIAS_STRENGTH, null_key=True)
        found[0] = dict(dirs=[phase1 / "last"], metrics=None, load=lambda kw=kw: _converted(phase1 / "last", kw),
                        names=["phase1/last (converted)"])
    if phase2.is_dir():
        for d in sorted(p for p in phase2.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if not ((d / "model.safetensors").is_file() and (d / "state.pt").is_file()):
                continue
            info = read_checkpoint_info(d)
            epoch = info["epoch"] + 1
            entry = found.setdefault(epoch, dict(dirs=[], names=[], metrics=None,
                                                 load=lambda d=d: load_model(d)[0]))
            entry["dirs"].append(d)
            entry["names"].append(f"phase2/{d.name}")
            entry["metrics"] = entry["metrics"] or info["extra"].get("metrics")
    if not found:
        raise FileNotFoundError(f"no checkpoints in {run_dir}: expected phase1/last/ and/or phase2/<checkpoint>/ "
                                f"(a pipeline run directory, e.g. runs/<name>)")

    if data is None:
        config_path = run_dir / "config.yaml" if (run_dir / "config.yaml").exists() else None
        sample = found[min(found)]["load"]()
        loader, _ = _val_loader(config_path, _model_in_chans(sample), batch_size)
        data = _materialise(loader, max_batches)
        max_batches = None
    elif not isinstance(data, torch.Tensor):
        data = _materialise(data, max_batches)
        max_batches = None

    records = []
    for epoch in sorted(found):
        entry = found[epoch]
        model = entry["load"]().float()
        result = remaining_convolution(model, data, max_batches, offsets=offsets)
        result.pop("kernels")
        metrics = entry["metrics"] or {}
        records.append({"epoch": epoch, "checkpoints": entry["names"], "val_top1": metrics.get("val_top1"),
                        **result})
    return records


def _converted(ckpt: Path, kw: Dict[str, Any]) -> CMHSA:

    conv = load_model(ckpt)[0].float().eval()
    # qk_std > 0 draws random W_Q, W_K: seed them, without touching the caller's RNG
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return convert_model(conv, **kw)


# ------------------------------------------------------------------------------------------------ shifts


def shift_images(images: torch.Tensor, dy: int, dx: int, mode: str = "circular", fill: float = 0.0) -> torch.Tensor:
    """Shift (B, C, H, W) images by (dy, dx) pixels (positive: down / right).

    ``mode='circular'`` wraps around (``torch.roll``); ``'zero'`` fills the vacated pixels with ``fill`` (0 is the
    dataset mean after normalisation).
    """
    if mode == "circular":
        return torch.roll(images, shifts=(dy, dx), dims=(-2, -1))
    if mode != "zero":
        raise ValueError(f"mode must be 'circular' or 'zero', got {mode!r}")
    H, W = images.shape[-2:]
    out = torch.full_like(images, fill)
    if abs(dy) >= H or abs(dx) >= W:
        return out
    out[..., max(dy, 0):H + min(dy, 0), max(dx, 0):W + min(dx, 0)] = \
        images[..., max(-dy, 0):H - max(dy, 0), max(-dx, 0):W - max(dx, 0)]
    return out


@torch.no_grad()
def shift_consistency(model: nn.Module, data: Data, shifts: Optional[Iterable[int]] = None, mode: str = "circular",
                      max_batches: Optional[int] = None,
                      directions: Sequence[Tuple[int, int]] = ((1, 1),),
                      fill: float = 0.0) -> Dict[int, float]:
    """Fraction of images whose predicted class is unchanged when the input is shifted, per shift size.

    Shift s moves the image by ``(s * dy, s * dx)`` pixels for every ``(dy, dx)`` in ``directions`` (default: the
    diagonal, s pixels down and right, one forward pass per shift; add ``(0, 1), (1, 0)`` for the axes); the
    fraction is over images and directions. ``shifts`` defaults to ``1..P`` for
    patch size P (a shift of P moves whole patches). Works for any classifier returning (B, classes) logits.
    """
    if shifts is None:
        shifts = range(1, _patch_size(model)[0] + 1)
    shifts = [int(s) for s in shifts]
    same = {s: 0 for s in shifts}
    total = 0
    with _eval_mode(model):
        for images in _image_batches(data, max_batches):
            images = _to_model(model, images)
            base = model(images).argmax(-1)
            total += images.shape[0] * len(directions)
            for s in shifts:
                for dy, dx in directions:
                    pred = model(shift_images(images, s * dy, s * dx, mode, fill)).argmax(-1)
                    same[s] += int((pred == base).sum())
    return {s: same[s] / total for s in shifts}


# ------------------------------------------------------------------------------------------------ plots


def _save(fig, path: Union[str, Path]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


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


def plot_cka(matrix: torch.Tensor, path: Union[str, Path], labels: Tuple[str, str] = ("model A", "model B"),
             title: Optional[str] = None) -> Path:
    """Heatmap of a (La, Lb) CKA matrix: rows (y axis) are layers of ``labels[0]``, columns of ``labels[1]``."""
    m = torch.as_tensor(matrix).double()
    fig, ax = plt.subplots(figsize=(5, 4.2))
    im = ax.imshow(m.numpy(), origin="lower", vmin=0.0, vmax=1.0, cmap="magma", aspect="auto")
    fig.colorbar(im, ax=ax, label="linear CKA")
    ax.set(xlabel=f"{labels[1]} layer", ylabel=f"{labels[0]} layer", title=title or "CKA")
    return _save(fig, path)


def plot_remaining_convolution(records: List[Dict[str, Any]], path: Union[str, Path],
                               title: Optional[str] = None) -> Path:
    """Offset mass, positional share and conv projection error per layer against phase-2 epoch, from
    :func:`remaining_convolution_over_checkpoints`."""
    epochs = [r["epoch"] for r in records]
    n_layers = len(records[0]["layers"]) if records else 0
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))

    def layer_mean(values):
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else float("nan")

    for i in range(n_layers):
        kw = dict(marker="o", ms=3, color=f"C{i % 10}", label=f"layer {i}")
        axes[0].plot(epochs, [layer_mean(r["layers"][i]["offset_mass"]) for r in records], **kw)
        axes[1].plot(epochs, [layer_mean(r["layers"][i]["positional_share"]) for r in records], **kw)
        axes[2].plot(epochs, [max(r["layers"][i]["conv_projection_error"], 1e-16) for r in records], **kw)
    axes[0].set(xlabel="phase-2 epoch", ylabel="attention on conversion offset", title="offset mass", ylim=(0, 1.05))
    axes[1].set(xlabel="phase-2 epoch", ylabel="pos / (pos + content)", title="positional share", ylim=(0, 1.05))
    axes[2].set(xlabel="phase-2 epoch", ylabel="||M - T(W*)|| / ||M||", title="conv projection error", yscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


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


# ------------------------------------------------------------------------------------------------ analyze


def _load(source: Union[str, Path, nn.Module], which: str) -> Tuple[nn.Module, Dict[str, Any]]:
    """A model and what is known about where it came from."""
    if isinstance(source, nn.Module):
        return source, {"name": type(source).__name__, "path": None, "checkpoint": None, "run_dir": None,
                        "config": None}

    path = Path(source)
    model, spec, ckpt = load_model(path, which=which)
    run_dir = path if (path / "config.yaml").exists() else None
    if run_dir is None:
        config = run_config_path(ckpt)
        run_dir = config.parent if config is not None and ((config.parent / "phase1").is_dir()
                                                           or (config.parent / "phase2").is_dir()) else None
    return model.float(), {"name": spec["name"], "path": str(path), "checkpoint": str(ckpt),
                           "run_dir": str(run_dir) if run_dir else None, "config": run_config_path(ckpt)}


def _accuracy(model: nn.Module, batches: List[Tuple[torch.Tensor, Any]]) -> Optional[float]:
    correct = total = 0
    with torch.no_grad(), _eval_mode(model):
        for images, labels in batches:
            if labels is None:
                return None
            pred = model(_to_model(model, images)).argmax(-1).cpu()
            correct += int((pred == torch.as_tensor(labels)).sum())
            total += len(pred)
    return 100.0 * correct / max(total, 1)


def analyze(source: Union[str, Path, nn.Module], compare: Union[str, Path, nn.Module, None] = None, *,
            dataset: Optional[str] = None, data_dir: Optional[str] = None, img_size: Any = None,
            max_batches: int = 4, batch_size: int = 64, which: str = "last",
            out_dir: Union[str, Path, None] = None, loader: Optional[Iterable] = None,
            shifts: Optional[Iterable[int]] = None, checkpoints: bool = True) -> Dict[str, Any]:
    """Every analysis of this module for one model (and a second one to compare), into ``analysis.json`` + PNGs.

    ``source`` / ``compare``: a run, phase or checkpoint directory (loaded with :func:`cmhsa.pipeline.load_model`,
    ``which`` picks last/best) or a model. The images are the first ``max_batches`` validation batches of the
    dataset: ``loader`` if given, else the run's own ``config.yaml`` data section with ``dataset`` / ``data_dir`` /
    ``img_size`` overriding it (``img_size`` defaults to the model's input size); a model without a run needs
    ``dataset=`` or ``loader=``.

    Writes into ``out_dir`` (default ``<run>/analysis`` for a run dir, ``<phase>/analysis-<last|best>`` for a phase
    or checkpoint dir; required for a model): ``analysis.json`` and
    ``attention_distance.png`` (attention models), ``cka_self.png``, ``cka_compare.png`` (with ``compare``),
    ``shift_consistency.png`` (circular and zero-filled shifts), ``remaining_convolution.png`` (a CMHSA run with
    ``checkpoints``: phase-2 epochs). Returns the JSON content as a dict, plus ``'files'``.
    """
    model, info = _load(source, which)
    if out_dir is None:
        if info["checkpoint"] is None:
            raise ValueError("analyze(model) needs out_dir=... to write analysis.json and the plots")
        ckpt, path = Path(info["checkpoint"]), Path(info["path"])
        if (path / "config.yaml").exists():
            out_dir = path / "analysis"
        elif (ckpt / "model.json").exists():  # weights beside model.json (`cmhsa convert` output)
            out_dir = ckpt / "analysis"
        else:
            # beside, never inside, the checkpoint: save_checkpoint refuses to replace a dir with foreign files
            out_dir = ckpt.parent / f"analysis-{ckpt.name}"
    out_dir = Path(out_dir)

    if loader is None:
        if info["config"] is None and dataset is None and info["checkpoint"] is None:
            raise ValueError("no dataset for the analysis: pass dataset='fashion_mnist' (or another) or loader=...")
        loader, data_cfg = _val_loader(info["config"], _model_in_chans(model), batch_size, dataset, data_dir,
                                       img_size if img_size is not None else _model_img_size(model))
        data_desc = {"dataset": data_cfg["dataset"], "img_size": data_cfg["img_size"], "split": "val"}
    else:
        data_desc = {"dataset": "loader"}
    batches = _materialise(loader, max_batches)
    images = sum(b[0].shape[0] for b in batches)
    result: Dict[str, Any] = {"model": {k: info[k] for k in ("name", "path", "checkpoint", "run_dir")},
                              "data": {**data_desc, "images": images, "batches": len(batches)},
                              "top1": _accuracy(model, batches)}
    files: List[Path] = []
    title = info["name"]

    try:
        attention_layers(model)
        has_attention = True
    except ValueError:
        has_attention = False
    if has_attention:
        dist = attention_distance(model, batches)
        result["attention_distance"] = dist
        files.append(plot_attention_distance(dist, out_dir / "attention_distance.png", title=f"{title}: attention "
                                                                                            f"distance"))
    if isinstance(model, CMHSA) and model.config["mixer"] == "attn":
        rc = remaining_convolution(model, batches)
        rc.pop("kernels")
        result["remaining_convolution"] = rc
    if checkpoints and info["run_dir"] and (Path(info["run_dir"]) / "phase1").is_dir():
        records = remaining_convolution_over_checkpoints(info["run_dir"], batches)
        result["remaining_convolution_over_checkpoints"] = records
        files.append(plot_remaining_convolution(records, out_dir / "remaining_convolution.png", title=title))

    self_cka = cka_matrix(model, None, batches)
    result["cka_self"] = self_cka
    files.append(plot_cka(self_cka, out_dir / "cka_self.png", labels=(title, title), title="CKA within the model"))
    if compare is not None:
        other, other_info = _load(compare, which)
        cross = cka_matrix(model, other, batches)
        result["compare"] = {"model": {k: other_info[k] for k in ("name", "path", "checkpoint")},
                             "top1": _accuracy(other, batches), "cka": cross}
        files.append(plot_cka(cross, out_dir / "cka_compare.png", labels=(title, other_info["name"]),
                              title="CKA between models"))

    shift = {mode: shift_consistency(model, batches, shifts=shifts, mode=mode) for mode in ("circular", "zero")}
    result["shift_consistency"] = shift
    files.append(plot_shift_consistency(shift, out_dir / "shift_consistency.png", title=f"{title}: shift consistency"))

    result = _jsonable(result)
    result["files"] = [str(p) for p in [out_dir / "analysis.json", *files]]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "analysis.json").write_text(json.dumps(result, indent=2, allow_nan=False))
    return result


def cmd_analyze(args: argparse.Namespace) -> int:
    """The ``cmhsa analyze`` command."""
    result = analyze(args.checkpoint, args.compare, dataset=args.dataset, data_dir=args.data_dir,
                     img_size=args.img_size, max_batches=args.max_batches, batch_size=args.batch_size,
                     which=args.which, out_dir=args.out, checkpoints=not args.no_checkpoints)
    lines = [f"{result['model']['name']} on {result['data']['images']} {result['data']['dataset']} images"
             + (f": top-1 {result['top1']:.2f}" if result.get("top1") is not None else "")]
    if "attention_distance" in result:
        lines.append("attention distance per layer (patches): "
                     + ", ".join(f"{d:.2f}" for d in result["attention_distance"]["mean"]))
    if "remaining_convolution" in result:
        rc = result["remaining_convolution"]
        lines.append(f"remaining convolution: offset mass {rc['offset_mass']:.3f}, positional share "
                     f"{rc['positional_share']:.3f}, conv projection error {rc['conv_projection_error']:.3e}")
    for mode, curve in result["shift_consistency"].items():
        lines.append(f"shift consistency ({mode}): " + ", ".join(f"{s}px {v:.3f}" for s, v in curve.items()))
    lines.append(f"written: {', '.join(result['files'])}")
    print("\n".join(lines))
    return 0


def add_analyze_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``cmhsa analyze`` on an ``add_subparsers()`` object; its ``func`` is :func:`cmd_analyze`."""
    p = subparsers.add_parser(
        "analyze", help="attention distance, CKA, remaining convolution and shift consistency of a model",
        description="Analyse a run, phase or checkpoint directory on validation images: attention distance per "
                    "head, CKA between layers (and with --compare), how much of the converted convolution each "
                    "CMHSA attention layer keeps (over the run's phase-2 checkpoints), and shift consistency. "
                    "Writes analysis.json and PNGs into --out (default <run>/analysis).")
    p.add_argument("checkpoint", type=Path, help="run dir, phase dir (runs/x/phase2) or checkpoint dir")
    p.add_argument("--compare", type=Path, default=None, help="a second run/phase/checkpoint dir for CKA")
    p.add_argument("--which", choices=["last", "best"], default="last", help="checkpoint in a phase dir")
    p.add_argument("--dataset", default=None, help="dataset name (default: the run's own)")
    p.add_argument("--data-dir", default=None, help="dataset location (default: the run's own)")
    p.add_argument("--img-size", type=int, default=None, help="image size (default: the model's)")
    p.add_argument("--max-batches", type=int, default=4, help="validation batches to analyse (default: 4)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default: 64)")
    p.add_argument("--out", type=Path, default=None,
                   help="output directory (default: <run>/analysis, or <phase>/analysis-<which>)")
    p.add_argument("--no-checkpoints", action="store_true",
                   help="skip the remaining-convolution tracking over the run's checkpoints")
    p.set_defaults(func=cmd_analyze)
    return p
