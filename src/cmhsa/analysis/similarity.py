"""Representation similarity: block outputs and linear CKA with the unbiased HSIC estimator accumulated over
minibatches (Nguyen, Raghu & Kornblith 2021)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from ._common import Data, _grid, _image_batches, _run_capturing, _save  # noqa: E402

__all__ = ["layer_features", "hsic_unbiased", "cka", "cka_matrix", "plot_cka"]


def _blocks(model: nn.Module) -> List[nn.Module]:
    """The layers whose outputs are compared: a transformer's ``blocks``, else the stages a timm CNN's
    ``feature_info`` names (the maps its feature pyramid taps; also those of an attention twin of it)."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, (nn.Sequential, nn.ModuleList)):
        return list(blocks)
    info = getattr(model, "feature_info", None)
    if info:
        return [model.get_submodule(f["module"]) for f in info if f.get("module")]
    raise ValueError(f"{type(model).__name__} has neither .blocks (Sequential/ModuleList) nor timm's feature_info; "
                     f"pass layers=[modules] whose outputs are the features to compare")


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


def plot_cka(matrix: torch.Tensor, path: Union[str, Path], labels: Tuple[str, str] = ("model A", "model B"),
             title: Optional[str] = None) -> Path:
    """Heatmap of a (La, Lb) CKA matrix: rows (y axis) are layers of ``labels[0]``, columns of ``labels[1]``."""
    m = torch.as_tensor(matrix).double()
    fig, ax = plt.subplots(figsize=(5, 4.2))
    im = ax.imshow(m.numpy(), origin="lower", vmin=0.0, vmax=1.0, cmap="magma", aspect="auto")
    fig.colorbar(im, ax=ax, label="linear CKA")
    ax.set(xlabel=f"{labels[1]} layer", ylabel=f"{labels[0]} layer", title=title or "CKA")
    return _save(fig, path)
