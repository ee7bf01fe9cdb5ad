"""Convert an attention layer, or a CMHSA attention model, between the paper's form and the factorized form.

Both forms compute ``out = sum_h A_h (X M_h + c_h) + b`` with the null key's value 0. In the paper's form
``M_h = W_V^h W_O^h``, ``c_h = b_V^h W_O^h`` and ``b = b_O``. The value bias must be carried as ``c_h``, per head:
with a null key the rows of ``A_h`` over the real keys sum to ``1 - null mass``, which differs per query, so
``sum_h A_h 1 c_h`` cannot be folded into ``b``.

- paper -> factorized is always exact: ``M_h``, ``c_h`` and ``b`` as above. Queries and keys are copied into
  ``qk_dim >= head_dim`` (zero-padded, queries scaled by ``sqrt(qk_dim / head_dim)`` so the logits do not change).
- factorized -> paper is exact with ``head_dim >= max(out_dim, qk_dim)``: ``W_V^h = [M_h, 0]``, ``b_V^h = [c_h, 0]``,
  ``W_O^h = [I; 0]``. With fewer columns a head cannot hold a general ``M_h`` (rank up to ``out_dim``) and its bias,
  so that case raises.
- a tied layer (:mod:`cmhsa.tied`, value maps built from one conv kernel) converts to either form, exactly: its
  value maps become free matrices (untied). Nothing converts to the tied form, whose value maps must be a kernel's
  blocks: build it from the convolution (``conv_to_mhsa`` / ``convert_model`` with ``form='tied'``).
"""
from __future__ import annotations

import copy
import math
from typing import Optional, Union

import torch

from .attention import FactorizedRelPosMHSA, RelPosAttention, RelPosMHSA
from .models import CMHSA

__all__ = ["convert_form"]

# the global forms, which compute the same function class; the local form's bias table is a window, not the grid
GLOBAL_FORMS = (RelPosMHSA.form, FactorizedRelPosMHSA.form)


def _pad_heads(w: torch.Tensor, heads: int, width: int, scale: float = 1.0) -> torch.Tensor:
    """(heads * d, ...) rows -> (heads * width, ...), each head's d rows first, then zeros; times ``scale``."""
    w = w.reshape(heads, -1, *w.shape[1:])
    out = w.new_zeros(heads, width, *w.shape[2:])
    out[:, :w.shape[1]] = w * scale
    return out.reshape(heads * width, *w.shape[2:])


def _queries_keys(layer: RelPosAttention):
    """``(W_Q, W_K, b_Q, b_K)`` of ``layer``, each (H * qk_dim, dim) / (H * qk_dim,), biases None if absent."""
    H, d = layer.num_heads, layer.qk_dim
    linear = layer.qkv if isinstance(layer, RelPosMHSA) else layer.qk
    w = linear.weight[:2 * H * d]
    b = linear.bias[:2 * H * d] if linear.bias is not None else None
    return w[:H * d], w[H * d:], (b[:H * d] if b is not None else None), (b[H * d:] if b is not None else None)


def _empty_like_layer(cls, layer: RelPosAttention, **kwargs) -> RelPosAttention:
    with torch.device("meta"):
        new = cls(layer.dim, layer.num_heads, grid_size=layer.grid_size, out_dim=layer.out_dim,
                  null_key=layer.null_key, circular=layer.circular, attn_drop=layer.attn_drop,
                  proj_drop=layer.proj_drop.p, **kwargs)
    ref = layer.rel_pos_bias
    new = new.to_empty(device=ref.device).to(ref.dtype)
    new.reset_rel_pos_index()
    new.rel_pos_bias.copy_(layer.rel_pos_bias)
    if layer.null_key:
        new.null_bias.copy_(layer.null_bias)
    new.fused_attn = layer.fused_attn
    new.train(layer.training)
    return new


def _to_factorized(layer: RelPosAttention, qk_dim: Optional[int]) -> FactorizedRelPosMHSA:
    """From the paper's layer, or from a tied one (its value maps untied)."""
    d = layer.qk_dim
    qk_dim = qk_dim or d
    if qk_dim < d:
        raise ValueError(f"qk_dim={qk_dim} is smaller than the layer's Q/K head size {d}: its queries and keys do "
                         f"not fit, so the conversion would not be exact; use qk_dim >= {d} (or None)")
    w_q, w_k, b_q, b_k = _queries_keys(layer)
    has_bias = b_q is not None
    new = _empty_like_layer(FactorizedRelPosMHSA, layer, qk_dim=qk_dim, qkv_bias=has_bias)
    H = layer.num_heads
    scale = math.sqrt(qk_dim / d)  # q.k / sqrt(qk_dim) must equal the old q.k / sqrt(d)
    new.qk.weight.copy_(torch.cat([_pad_heads(w_q, H, qk_dim, scale), _pad_heads(w_k, H, qk_dim)]))
    m, c, b = layer.head_maps()
    new.value.weight.copy_(m.transpose(1, 2).reshape(H * layer.out_dim, layer.dim))
    if has_bias:
        new.qk.bias.copy_(torch.cat([_pad_heads(b_q, H, qk_dim, scale), _pad_heads(b_k, H, qk_dim)]))
        new.value_bias.copy_(c)
    new.bias.copy_(b)
    return new


def _to_paper(layer: FactorizedRelPosMHSA, head_dim: Optional[int]) -> RelPosMHSA:
    E, H = layer.out_dim, layer.num_heads
    need = max(E, layer.qk_dim)
    head_dim = head_dim or need
    if head_dim < need:
        raise ValueError(
            f"head_dim={head_dim} cannot hold this factorized layer exactly: a paper head needs "
            f"head_dim >= out_dim={E} (W_V^h = M_h, W_O^h = I, so any value map and value bias fit) and "
            f">= qk_dim={layer.qk_dim}; use head_dim >= {need} (or None)")
    new = _empty_like_layer(RelPosMHSA, layer, head_dim=head_dim, qkv_bias=True)
    w_q, w_k, b_q, b_k = _queries_keys(layer)
    scale = math.sqrt(head_dim / layer.qk_dim)
    m, c, b = layer.head_maps()
    w_v = m.transpose(1, 2).reshape(H * E, layer.dim)
    new.qkv.weight.copy_(torch.cat([_pad_heads(w_q, H, head_dim, scale), _pad_heads(w_k, H, head_dim),
                                    _pad_heads(w_v, H, head_dim)]))
    zeros = w_q.new_zeros(H * layer.qk_dim)
    new.qkv.bias.copy_(torch.cat([_pad_heads(b_q if b_q is not None else zeros, H, head_dim, scale),
                                  _pad_heads(b_k if b_k is not None else zeros, H, head_dim),
                                  _pad_heads(c.reshape(-1), H, head_dim)]))
    eye = torch.eye(E, dtype=m.dtype, device=m.device).repeat(H, 1)  # W_O^h = [I; 0]
    new.proj.weight.copy_(_pad_heads(eye, H, head_dim).T)
    new.proj.bias.copy_(b)
    return new


def _convert_layer(layer: RelPosAttention, form: str, qk_dim: Optional[int], head_dim: Optional[int]):
    if layer.form == form:
        return copy.deepcopy(layer)
    if form == "factorized":
        return _to_factorized(layer, qk_dim)
    return _to_paper(layer, head_dim)


@torch.no_grad()
def convert_form(module: Union[RelPosAttention, CMHSA], form: str, qk_dim: Optional[int] = None,
                 head_dim: Optional[int] = None) -> Union[RelPosAttention, CMHSA]:
    """A copy of an attention layer or CMHSA attention model (paper, factorized or tied form) in ``form``
    (``'paper'`` or ``'factorized'``), computing the same function (to float rounding).

    Both forms keep the layer's grid, ``circular`` offsets and null key. ``qk_dim`` (to factorized, default the paper
    layer's ``head_dim``) and ``head_dim`` (to paper, default
    ``max(out_dim, qk_dim)``) are the new head sizes; sizes too small to be exact raise ``ValueError``. A model
    keeps every weight outside its mixers; its config records the new form, so checkpoints rebuild it.
    """
    if form not in GLOBAL_FORMS:
        raise ValueError(f"form must be one of {list(GLOBAL_FORMS)}, got {form!r}; the {form} form is built from a "
                         f"convolution: cmhsa.conv_to_mhsa / cmhsa.convert_model(..., form={form!r})")
    if isinstance(module, RelPosAttention):
        return _convert_layer(module, form, qk_dim, head_dim)
    if not isinstance(module, CMHSA) or module.config["mixer"] != "attn" or module.config.get("form") == "local":
        why = ("" if not isinstance(module, CMHSA) else
               " in its convolution phase: convert it with cmhsa.convert_model" if module.config["mixer"] == "conv"
               else " in the local form, whose bias table is a window, not the grid")
        raise ValueError(f"convert_form needs a RelPosMHSA / FactorizedRelPosMHSA layer or a CMHSA attention-phase "
                         f"model in a global form, got {type(module).__name__}{why}")
    model = copy.deepcopy(module)
    for block in model.blocks:
        block.mixer = _convert_layer(block.mixer, form, qk_dim, head_dim)
    layer = model.blocks[0].mixer
    if form == "factorized":
        model.config.update(form=form, qk_dim=layer.qk_dim, head_dim=None)
    else:
        model.config.update(form=form, qk_dim=None, head_dim=layer.head_dim)
        model.head_dim = layer.head_dim
    return model
