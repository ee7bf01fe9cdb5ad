"""Local relative-position MHSA: each query attends to the window of patches around it, on a grid of any size."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch.autograd.function import once_differentiable

from .attention import init_paper_heads
from .checks import check_bool
from .tokens import IntOrPair, to_pair

__all__ = ["LocalRelPosMHSA"]


def _window_logits(q: torch.Tensor, kp: torch.Tensor, bias: torch.Tensor, null_bias: Optional[torch.Tensor],
                   missing: Optional[torch.Tensor], scale: float, offsets: List[Tuple[int, int]]) -> torch.Tensor:
    """Queries (B, H, gh, gw, d), padded keys -> logits (B, H, gh, gw, n_offsets[+1]), missing keys at -inf."""
    gh, gw = q.shape[2:4]
    logits = torch.stack([(q * kp[:, :, i:i + gh, j:j + gw]).sum(-1) for i, j in offsets], dim=-1)
    logits = logits * scale + bias[:, None, None, :]
    if missing is not None:
        logits = logits.masked_fill(missing, float("-inf"))
    if null_bias is not None:
        # the null key: key and value vectors are zero, only its bias sets its weight
        logits = torch.cat([logits, null_bias[:, None, None, None].expand(*logits.shape[:-1], 1)], dim=-1)
    return logits


class _WindowAttention(torch.autograd.Function):
    """Softmax over each query's window (and the null key) and the weighted sum of the values it reads.

    The backward is written out so that it accumulates into the padded key and value gradients in place: autograd's
    backward of a shifted view allocates a padded-size gradient per window offset, which made training slower
    than the global attention it replaces.
    """

    @staticmethod
    def forward(ctx, q, kp, vp, bias, null_bias, missing, scale, offsets, drop_p):
        gh, gw = q.shape[2:4]
        attn = _window_logits(q, kp, bias, null_bias, missing, scale, offsets).softmax(dim=-1)
        weights = attn[..., :len(offsets)]  # the null key's value is 0: it adds nothing
        keep = None
        if drop_p > 0:
            keep = torch.rand_like(weights) >= drop_p
            weights = weights * keep / (1 - drop_p)
        out = torch.zeros_like(q)
        for w, (i, j) in enumerate(offsets):
            out.addcmul_(weights[..., w, None], vp[:, :, i:i + gh, j:j + gw])
        ctx.save_for_backward(q, kp, vp, attn, keep)
        ctx.scale, ctx.offsets, ctx.drop_p, ctx.has_null = scale, offsets, drop_p, null_bias is not None
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g_out):
        q, kp, vp, attn, keep = ctx.saved_tensors
        offsets, n = ctx.offsets, len(ctx.offsets)
        gh, gw = q.shape[2:4]
        weights = attn[..., :n]
        if keep is not None:
            weights = weights * keep / (1 - ctx.drop_p)
        g_vp = torch.zeros_like(vp)
        g_weights = torch.empty_like(weights)
        for w, (i, j) in enumerate(offsets):
            g_weights[..., w] = (g_out * vp[:, :, i:i + gh, j:j + gw]).sum(-1)
            g_vp[:, :, i:i + gh, j:j + gw].addcmul_(weights[..., w, None], g_out)
        if keep is not None:
            g_weights = g_weights * keep / (1 - ctx.drop_p)
        # softmax backward; the null key's weight has zero gradient of its own but takes part in the sum
        dot = (attn[..., :n] * g_weights).sum(-1, keepdim=True)
        g_logits = attn[..., :n] * (g_weights - dot)  # missing keys have weight 0, so gradient 0
        g_null = (-attn[..., n:] * dot).sum((0, 2, 3, 4)) if ctx.has_null else None
        g_scaled = g_logits * ctx.scale
        g_q, g_kp = torch.zeros_like(q), torch.zeros_like(kp)
        for w, (i, j) in enumerate(offsets):
            g_q.addcmul_(g_scaled[..., w, None], kp[:, :, i:i + gh, j:j + gw])
            g_kp[:, :, i:i + gh, j:j + gw].addcmul_(g_scaled[..., w, None], q)
        return g_q, g_kp, g_vp, g_logits.sum((0, 2, 3)), g_null, None, None, None, None


class LocalRelPosMHSA(nn.Module):
    """MHSA restricted to a ``wh x ww`` window: logits ``q.k / sqrt(head_dim) + B_h[pos(k) - pos(q)]`` for the keys
    within ``(wh // 2, ww // 2)`` patches of the query.

    The bias table holds one scalar per head and window offset, whatever the grid, so the same weights run on any
    grid (``forward(x, grid_size)``). A neighbour outside the grid is missing, as in :class:`RelPosMHSA`: with
    ``null_key=True`` a head whose offset is missing puts its weight on a key and value of zeros, which is exactly
    zero padding; with ``circular=True`` neighbours wrap around the grid instead. The layout of ``qkv`` and ``proj``
    is :class:`RelPosMHSA`'s, so its Theorem 1 weights carry over unchanged.

    Keys and values are padded once and every window offset reads a shifted view of them, so the cost is
    ``O(N * wh * ww * head_dim)`` per head and nothing of size ``N^2`` (or an unfolded copy per offset) is held.

    Input ``(B, N, dim)`` with ``N = gh * gw``, output ``(B, N, out_dim)``.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            head_dim: int,
            window_size: IntOrPair,
            grid_size: IntOrPair,
            out_dim: Optional[int] = None,
            null_key: bool = True,
            circular: bool = False,
            qkv_bias: bool = True,
            attn_drop: float = 0.0,
            proj_drop: float = 0.0,
    ):
        super().__init__()
        init_paper_heads(self, dim, num_heads, head_dim, out_dim, qkv_bias, attn_drop, proj_drop)
        self.window_size = to_pair(window_size, "window_size", minimum=1)
        if not all(w % 2 for w in self.window_size):
            raise ValueError(f"window_size must be odd (centred on the query), got {window_size!r}")
        self.grid_size = to_pair(grid_size, "grid_size", minimum=1)  # the default grid; forward takes any other
        self.circular = check_bool(circular, "circular")
        check_bool(null_key, "null_key")
        self.rel_pos_bias = nn.Parameter(torch.zeros(num_heads, self.window_size[0] * self.window_size[1]))
        self.null_bias = nn.Parameter(torch.zeros(num_heads)) if null_key else None
        trunc_normal_(self.rel_pos_bias, std=0.02)

    @property
    def null_key(self) -> bool:
        return self.null_bias is not None

    @property
    def radius(self) -> Tuple[int, int]:
        return self.window_size[0] // 2, self.window_size[1] // 2

    def offset_index(self, offsets: torch.Tensor) -> torch.Tensor:
        """Column of the bias table for offsets ``(..., 2)`` given as (dy, dx), each within the window."""
        (ry, rx), ww = self.radius, self.window_size[1]
        if (offsets[..., 0].abs() > ry).any() or (offsets[..., 1].abs() > rx).any():
            raise ValueError(f"offsets {offsets.tolist()} reach beyond the {self.window_size} window")
        return (offsets[..., 0] + ry) * ww + (offsets[..., 1] + rx)

    def _pad(self, t: torch.Tensor) -> torch.Tensor:
        """(B, H, gh, gw, d) -> (B, H, gh + 2ry, gw + 2rx, d): zeros beyond the grid, or the grid wrapped around."""
        (ry, rx), (gh, gw) = self.radius, t.shape[2:4]
        if not self.circular:
            return F.pad(t, (0, 0, rx, rx, ry, ry))
        rows = torch.arange(-ry, gh + ry, device=t.device) % gh  # any radius, also beyond the grid
        cols = torch.arange(-rx, gw + rx, device=t.device) % gw
        return t.index_select(2, rows).index_select(3, cols)

    def _missing(self, grid: Tuple[int, int], device) -> torch.Tensor:
        """(gh, gw, wh*ww) bool: the window offsets of each query that fall outside the grid."""
        (ry, rx), (gh, gw) = self.radius, grid
        ys = torch.arange(gh, device=device)[:, None] + torch.arange(-ry, ry + 1, device=device)
        xs = torch.arange(gw, device=device)[:, None] + torch.arange(-rx, rx + 1, device=device)
        out_y, out_x = (ys < 0) | (ys >= gh), (xs < 0) | (xs >= gw)  # (gh, wh), (gw, ww)
        return (out_y[:, None, :, None] | out_x[None, :, None, :]).reshape(gh, gw, -1)

    def _window_args(self, q: torch.Tensor):
        """Bias, null bias (in q's dtype), missing-key mask and window offsets (row-major) for queries q."""
        wh, ww = self.window_size
        missing = None if self.circular else self._missing(q.shape[2:4], q.device)
        null = self.null_bias.to(q.dtype) if self.null_bias is not None else None
        return self.rel_pos_bias.to(q.dtype), null, missing, [(i, j) for i in range(wh) for j in range(ww)]

    def _qkv(self, x: torch.Tensor, grid_size: Optional[IntOrPair]):
        B, N, _ = x.shape
        gh, gw = self.grid_size if grid_size is None else to_pair(grid_size, "grid_size", minimum=1)
        if N != gh * gw:
            raise ValueError(f"got {N} tokens for a {gh}x{gw} grid ({gh * gw} tokens); pass forward(x, grid_size) "
                             f"with the input's grid")
        qkv = self.qkv(x).reshape(B, gh, gw, 3, self.num_heads, self.head_dim)
        return qkv.permute(3, 0, 4, 1, 2, 5).unbind(0)  # 3 x (B, H, gh, gw, d)

    def forward(self, x: torch.Tensor, grid_size: Optional[IntOrPair] = None) -> torch.Tensor:
        """(B, N, dim) -> (B, N, out_dim)"""
        q, k, v = self._qkv(x, grid_size)
        B, H, gh, gw, d = q.shape
        bias, null, missing, offsets = self._window_args(q)
        drop = self.attn_drop if self.training else 0.0
        out = _WindowAttention.apply(q, self._pad(k), self._pad(v), bias, null, missing, self.scale, offsets, drop)
        out = out.permute(0, 2, 3, 1, 4).reshape(B, gh * gw, H * d)
        return self.proj_drop(self.proj(out))

    @torch.no_grad()
    def attention_probs(self, x: torch.Tensor, grid_size: Optional[IntOrPair] = None) -> torch.Tensor:
        """Attention weights ``(B, num_heads, N, wh*ww[+1])`` over each query's window (null key last)."""
        q, k, _ = self._qkv(x, grid_size)
        bias, null, missing, offsets = self._window_args(q)
        return _window_logits(q, self._pad(k), bias, null, missing, self.scale, offsets).softmax(-1).flatten(2, 3)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
                f"window_size={self.window_size}, out_dim={self.out_dim}, null_key={self.null_key}, "
                f"circular={self.circular}")
