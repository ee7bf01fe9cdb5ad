"""Local relative-position MHSA: each query attends to the window of patches around it, on a grid of any size."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from .attention import init_paper_heads
from .tokens import IntOrPair, to_pair

__all__ = ["LocalRelPosMHSA"]


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
        self.window_size = to_pair(window_size, "window_size")
        if min(self.window_size) < 1 or not all(w % 2 for w in self.window_size):
            raise ValueError(f"window_size must be odd (centred on the query), got {window_size!r}")
        self.grid_size = to_pair(grid_size, "grid_size")  # the default grid; forward takes any other
        self.circular = circular
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

    def _logits(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """(B, H, gh, gw, d) queries and keys -> (B, H, gh, gw, wh*ww[+1]) logits, missing keys at -inf."""
        gh, gw = q.shape[2:4]
        kp = self._pad(k)
        wh, ww = self.window_size
        logits = torch.stack([(q * kp[:, :, i:i + gh, j:j + gw]).sum(-1) for i in range(wh) for j in range(ww)], -1)
        logits = logits * self.scale + self.rel_pos_bias.to(q.dtype)[:, None, None, :]
        if not self.circular:
            logits = logits.masked_fill(self._missing((gh, gw), q.device), float("-inf"))
        if self.null_bias is not None:
            # the null key: key and value vectors are zero, only its bias sets its weight
            null = self.null_bias.to(q.dtype)[:, None, None, None].expand(*logits.shape[:-1], 1)
            logits = torch.cat([logits, null], dim=-1)
        return logits

    def _qkv(self, x: torch.Tensor, grid_size: Optional[IntOrPair]):
        B, N, _ = x.shape
        gh, gw = self.grid_size if grid_size is None else to_pair(grid_size, "grid_size")
        if N != gh * gw:
            raise ValueError(f"got {N} tokens for a {gh}x{gw} grid ({gh * gw} tokens); pass forward(x, grid_size) "
                             f"with the input's grid")
        qkv = self.qkv(x).reshape(B, gh, gw, 3, self.num_heads, self.head_dim)
        return qkv.permute(3, 0, 4, 1, 2, 5).unbind(0)  # 3 x (B, H, gh, gw, d)

    def forward(self, x: torch.Tensor, grid_size: Optional[IntOrPair] = None) -> torch.Tensor:
        """(B, N, dim) -> (B, N, out_dim)"""
        q, k, v = self._qkv(x, grid_size)
        B, H, gh, gw, d = q.shape
        attn = self._logits(q, k).softmax(dim=-1)
        attn = F.dropout(attn, self.attn_drop, training=self.training)
        vp = self._pad(v)
        wh, ww = self.window_size
        out = sum(attn[..., i * ww + j, None] * vp[:, :, i:i + gh, j:j + gw] for i in range(wh) for j in range(ww))
        out = out.permute(0, 2, 3, 1, 4).reshape(B, gh * gw, H * d)  # the null key's value is 0: no term
        return self.proj_drop(self.proj(out))

    @torch.no_grad()
    def attention_probs(self, x: torch.Tensor, grid_size: Optional[IntOrPair] = None) -> torch.Tensor:
        """Attention weights ``(B, num_heads, N, wh*ww[+1])`` over each query's window (null key last)."""
        q, k, _ = self._qkv(x, grid_size)
        return self._logits(q, k).softmax(dim=-1).flatten(2, 3)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
                f"window_size={self.window_size}, out_dim={self.out_dim}, null_key={self.null_key}, "
                f"circular={self.circular}")
