"""Multi-head self-attention with a learnable relative position bias per head, and an optional null key."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from .checks import check_bool, check_int, check_real
from .tokens import IntOrPair, grid_offsets, to_pair

__all__ = ["RelPosMHSA"]


class RelPosMHSA(nn.Module):
    """MHSA on a grid of tokens, logits ``q.k / sqrt(head_dim) + B_h[pos(k) - pos(q)]`` (paper eq. 4).

    The bias table holds one learnable scalar per head and per offset of the grid, ``(2*gh-1) * (2*gw-1)``
    offsets, as timm's ``RelPosBias``. With ``null_key=True`` every head also sees one extra key whose key and
    value vectors are zero and whose logit is a learnable per-head scalar: a head can put its weight "nowhere",
    which is what zero padding needs at the image border (see docs/design.md §1.2). Heads are full-size
    (``head_dim`` need not be ``dim / num_heads``), as in the paper's construction.

    Input ``(B, N, dim)`` with ``N = gh * gw``, output ``(B, N, out_dim)``.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            head_dim: int,
            grid_size: IntOrPair,
            out_dim: Optional[int] = None,
            null_key: bool = True,
            qkv_bias: bool = True,
            attn_drop: float = 0.0,
            proj_drop: float = 0.0,
    ):
        super().__init__()
        self.dim = check_int(dim, "dim")
        self.num_heads = check_int(num_heads, "num_heads")
        self.head_dim = check_int(head_dim, "head_dim")
        self.grid_size = to_pair(grid_size, "grid_size", minimum=1)
        self.out_dim = dim if out_dim is None else check_int(out_dim, "out_dim")
        check_bool(null_key, "null_key")
        check_bool(qkv_bias, "qkv_bias")
        check_real(attn_drop, "attn_drop", minimum=0, below=1)
        check_real(proj_drop, "proj_drop", minimum=0, below=1)
        self.scale = head_dim ** -0.5

        self.qkv = nn.Linear(dim, 3 * num_heads * head_dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        # None: SDPA on accelerators, the explicit path on CPU, where SDPA with a float (trainable) mask is 2-4x
        # slower; True / False force one (as timm's `fused_attn`)
        self.fused_attn: Optional[bool] = None
        self.proj = nn.Linear(num_heads * head_dim, self.out_dim)
        self.proj_drop = nn.Dropout(proj_drop)

        gh, gw = self.grid_size
        self.rel_pos_bias = nn.Parameter(torch.zeros(num_heads, (2 * gh - 1) * (2 * gw - 1)))
        self.register_buffer("rel_pos_index", torch.empty(gh * gw, gh * gw, dtype=torch.long), persistent=False)
        self.reset_rel_pos_index()
        self.null_bias = nn.Parameter(torch.zeros(num_heads)) if null_key else None
        trunc_normal_(self.rel_pos_bias, std=0.02)

    @property
    def null_key(self) -> bool:
        return self.null_bias is not None

    def reset_rel_pos_index(self) -> None:
        """Fill the (N, N) map from query/key pairs to bias-table columns (after ``to_empty`` too)."""
        offsets = grid_offsets(self.grid_size, device=self.rel_pos_index.device)
        with torch.no_grad():
            self.rel_pos_index.copy_(self.offset_index(offsets))

    def offset_index(self, offsets: torch.Tensor) -> torch.Tensor:
        """Column of the bias table for offsets ``(..., 2)`` given as (dy, dx), each within the grid."""
        gh, gw = self.grid_size
        return (offsets[..., 0] + gh - 1) * (2 * gw - 1) + (offsets[..., 1] + gw - 1)

    def position_bias(self) -> torch.Tensor:
        """Additive logits ``(num_heads, N, N)``, or ``(num_heads, N, N + 1)`` with the null key last."""
        bias = self.rel_pos_bias[:, self.rel_pos_index]
        if self.null_bias is not None:
            null = self.null_bias[:, None, None].expand(-1, bias.shape[1], 1)
            bias = torch.cat([bias, null], dim=-1)
        return bias

    def _qkv(self, x: torch.Tensor):
        B, N, _ = x.shape
        if N != self.grid_size[0] * self.grid_size[1]:
            raise ValueError(
                f"got {N} tokens but this layer was built for a {self.grid_size[0]}x{self.grid_size[1]} grid "
                f"({self.grid_size[0] * self.grid_size[1]} tokens); build it with the input's grid_size"
            )
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.null_bias is not None:
            # the null key: key and value vectors are zero, only its bias sets its weight
            k = F.pad(k, (0, 0, 0, 1))
            v = F.pad(v, (0, 0, 0, 1))
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, dim) -> (B, N, out_dim)"""
        B, N, _ = x.shape
        q, k, v = self._qkv(x)
        bias = self.position_bias().to(q.dtype)
        dropout = self.attn_drop if self.training else 0.0
        fused = self.fused_attn if self.fused_attn is not None else x.device.type != "cpu"
        if not fused:
            attn = torch.baddbmm(bias.repeat(B, 1, 1), q.flatten(0, 1), k.flatten(0, 1).transpose(1, 2),
                                 alpha=self.scale).softmax(dim=-1)
            attn = F.dropout(attn, dropout, training=self.training)
            x = (attn @ v.flatten(0, 1)).view(B, self.num_heads, N, self.head_dim)
        else:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
        x = x.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)
        return self.proj_drop(self.proj(x))

    @torch.no_grad()
    def attention_probs(self, x: torch.Tensor) -> torch.Tensor:
        """Attention weights ``(B, num_heads, N, N[+1])`` for input ``(B, N, dim)``; the null key is last."""
        q, k, _ = self._qkv(x)
        logits = (q @ k.transpose(-2, -1)) * self.scale + self.position_bias().to(q.dtype)
        return logits.softmax(dim=-1)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
                f"grid_size={self.grid_size}, out_dim={self.out_dim}, null_key={self.null_key}")
