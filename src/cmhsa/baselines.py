"""Baselines for the converged protocol that timm does not ship: a ViT with mimetic initialisation.

Mimetic initialisation (Trockman & Kolter, "Mimetic Initialization of Self-Attention Layers", 2023) starts a ViT's
attention where trained ViTs end up: per head ``W_Q^h W_K^h^T ~ a1 Z + b1 I`` (a query attends to tokens like itself)
and per layer ``W_V W_O ~ a2 Z - b2 I``, with ``Z ~ N(0, 1/D)`` and ``a1 = b1 = 0.7``, ``a2 = b2 = 0.4`` (their
ViT values). Each product is split into its two factors by an SVD. It is the attention-side answer to "start the
transformer with structure" that CMHSA gives by converting a CNN, so the protocol compares them.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer

__all__ = ["mimetic_init_", "vit_mimetic"]


def _split(product: torch.Tensor, rank: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``product`` (D, D) ~ ``left @ right`` with ``left`` (D, rank), ``right`` (rank, D): the best rank-``rank``
    factors, singular values shared evenly."""
    u, s, vh = torch.linalg.svd(product)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


@torch.no_grad()
def mimetic_init_(model: VisionTransformer, qk: Tuple[float, float] = (0.7, 0.7), vo: Tuple[float, float] = (0.4, 0.4),
                  generator: Optional[torch.Generator] = None) -> VisionTransformer:
    """Overwrite the Q, K, V and output projections of every block of a timm ``VisionTransformer`` in place.

    ``qk = (a1, b1)``: each head's ``W_Q^h W_K^h^T`` (D x D, rank head_dim) is the best rank-head_dim
    approximation of ``a1 Z + b1 I``. ``vo = (a2, b2)``: each layer's ``W_V W_O`` (D x D) is ``a2 Z - b2 I``.
    Biases of the projections are zeroed. Returns ``model``.
    """
    for block in model.blocks:
        attn = block.attn
        dim, heads, head_dim = attn.qkv.in_features, attn.num_heads, attn.head_dim
        if attn.qkv.out_features != 3 * heads * head_dim or attn.proj.in_features != dim:
            raise ValueError(f"mimetic_init_ needs square attention (qkv {dim} -> 3 x {heads} x {head_dim}, "
                             f"proj {attn.proj.in_features} -> {dim}); got {attn.qkv} / {attn.proj}")
        eye = torch.eye(dim)
        normal = lambda: torch.randn(dim, dim, generator=generator) / dim ** 0.5  # noqa: E731
        q_rows, k_rows = [], []
        for _ in range(heads):
            # q . k = x W_q^T W_k x'^T for nn.Linear weights W_q, W_k (head_dim, D): W_q^T W_k ~ a1 Z + b1 I
            left, right = _split(qk[0] * normal() + qk[1] * eye, head_dim)
            q_rows.append(left.T)
            k_rows.append(right)
        # out = (x W_v^T) W_o^T: W_v^T W_o^T ~ a2 Z - b2 I
        left, right = _split(vo[0] * normal() - vo[1] * eye, dim)
        weight = torch.cat([*q_rows, *k_rows, left.T]).to(attn.qkv.weight)
        attn.qkv.weight.copy_(weight)
        attn.proj.weight.copy_(right.T.to(attn.proj.weight))
        for linear in (attn.qkv, attn.proj):
            if linear.bias is not None:
                linear.bias.zero_()
    return model


# timm reads a model's default config from its module when it registers it; without one it warns at every build
default_cfgs = generate_default_cfgs({"vit_mimetic": {
    "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.9, "interpolation": "bicubic",
    "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "first_conv": "patch_embed.proj", "classifier": "head"}})


@register_model
def vit_mimetic(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """A timm ``VisionTransformer`` (any of its keyword arguments) with mimetic attention initialisation; the
    draw follows the global torch seed."""
    if pretrained:
        raise ValueError("vit_mimetic has no pretrained weights; it is an initialisation for training from scratch")
    return mimetic_init_(build_model_with_cfg(VisionTransformer, "vit_mimetic", pretrained, **kwargs))
