"""Multi-head self-attention with a learnable relative position bias per head, and an optional null key.

Two forms of the same function class. :class:`RelPosMHSA` is the paper's layer: per head ``A_h X W_V^h``, heads
concatenated, then ``W_O``. :class:`FactorizedRelPosMHSA` keeps only what the function depends on, the per-head
value map ``M_h = W_V^h W_O^h`` (``dim x out_dim``): ``out = sum_h A_h (X M_h + c_h) + b``, computed as one GEMM
``X -> [X M_1 .. X M_H]`` and one batched product that mixes and sums the heads at once. Its queries and keys have
their own, smaller head size ``qk_dim``. Both attend globally over a fixed grid; the third form, attention over the
window of each query, is :class:`cmhsa.local_attention.LocalRelPosMHSA`.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from .checks import check_bool, check_int, check_real
from .tokens import IntOrPair, grid_offsets, to_pair

__all__ = ["RelPosAttention", "RelPosMHSA", "FactorizedRelPosMHSA", "default_qk_dim", "init_paper_heads"]


def default_qk_dim(dim: int, num_heads: int) -> int:
    """Q/K head size of the factorized form: ``dim // num_heads``, so all heads' queries together are as wide as
    a token, as in a ViT. The construction starts them at 0, so content attention is learned, never copied."""
    return max(dim // num_heads, 1)


def check_layer_args(dim: int, num_heads: int, out_dim: Optional[int], qkv_bias: bool, attn_drop: float,
                     proj_drop: float) -> None:
    """The constructor arguments every attention form shares: a ``ValueError`` naming any that is out of range."""
    check_int(dim, "dim")
    check_int(num_heads, "num_heads")
    if out_dim is not None:
        check_int(out_dim, "out_dim")
    check_bool(qkv_bias, "qkv_bias")
    check_real(attn_drop, "attn_drop", minimum=0, below=1)
    check_real(proj_drop, "proj_drop", minimum=0, below=1)


def init_paper_heads(layer: nn.Module, dim: int, num_heads: int, head_dim: int, out_dim: Optional[int],
                     qkv_bias: bool, attn_drop: float, proj_drop: float) -> None:
    """Give ``layer`` the paper's heads: ``qkv`` (``dim -> 3 * num_heads * head_dim``), ``proj``
    (``num_heads * head_dim -> out_dim``) and their sizes; shared by the global and the local paper-form layers, so
    Theorem 1's weights fit both."""
    check_layer_args(dim, num_heads, out_dim, qkv_bias, attn_drop, proj_drop)
    layer.dim = dim
    layer.num_heads = num_heads
    layer.head_dim = layer.qk_dim = check_int(head_dim, "head_dim")
    layer.out_dim = out_dim or dim
    layer.scale = head_dim ** -0.5
    layer.qkv = nn.Linear(dim, 3 * num_heads * head_dim, bias=qkv_bias)
    layer.attn_drop = attn_drop
    layer.proj = nn.Linear(num_heads * head_dim, layer.out_dim)
    layer.proj_drop = nn.Dropout(proj_drop)


class RelPosAttention(nn.Module):
    """What both forms share: the grid, the relative position bias table, the null key and the attention weights.

    The bias table holds one learnable scalar per head and per offset of the grid, ``(2*gh-1) * (2*gw-1)``
    offsets, as timm's ``RelPosBias``. With ``circular=True`` offsets are taken modulo the grid (a torus, as circular
    padding sees the image), so the table has ``gh * gw`` columns and ``pos(k) - pos(q)`` wraps.
    With ``null_key=True`` every head also sees one extra key whose key and value vectors are zero and whose logit
    is a learnable per-head scalar: a head can put its weight "nowhere", which is what zero padding needs at the
    image border.

    Subclasses create their projections, call :meth:`_init_position_bias`, and define :meth:`queries_keys`
    (``(B, H, N, qk_dim)`` each) and :meth:`head_maps` (the per-head value maps).
    """

    dim: int
    num_heads: int
    qk_dim: int
    out_dim: int
    scale: float

    def _init_position_bias(self, grid_size: IntOrPair, null_key: bool, circular: bool) -> None:
        self.grid_size = to_pair(grid_size, "grid_size", minimum=1)
        self.circular = check_bool(circular, "circular")
        check_bool(null_key, "null_key")
        gh, gw = self.grid_size
        table = gh * gw if circular else (2 * gh - 1) * (2 * gw - 1)
        self.rel_pos_bias = nn.Parameter(torch.zeros(self.num_heads, table))
        self.register_buffer("rel_pos_index", torch.empty(gh * gw, gh * gw, dtype=torch.long), persistent=False)
        self.reset_rel_pos_index()
        self.null_bias = nn.Parameter(torch.zeros(self.num_heads)) if null_key else None
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
        """Column of the bias table for offsets ``(..., 2)`` given as (dy, dx), each within the grid (any integers
        when ``circular``: they are taken modulo the grid)."""
        gh, gw = self.grid_size
        if self.circular:
            return offsets[..., 0].remainder(gh) * gw + offsets[..., 1].remainder(gw)
        return (offsets[..., 0] + gh - 1) * (2 * gw - 1) + (offsets[..., 1] + gw - 1)

    def position_bias(self) -> torch.Tensor:
        """Additive logits ``(num_heads, N, N)``, or ``(num_heads, N, N + 1)`` with the null key last."""
        bias = self.rel_pos_bias[:, self.rel_pos_index]
        if self.null_bias is not None:
            null = self.null_bias[:, None, None].expand(-1, bias.shape[1], 1)
            bias = torch.cat([bias, null], dim=-1)
        return bias

    def _check_tokens(self, x: torch.Tensor) -> None:
        N = x.shape[1]
        if N != self.grid_size[0] * self.grid_size[1]:
            raise ValueError(
                f"got {N} tokens but this layer was built for a {self.grid_size[0]}x{self.grid_size[1]} grid "
                f"({self.grid_size[0] * self.grid_size[1]} tokens); build it with the input's grid_size"
            )

    def _use_fused(self, x: torch.Tensor) -> bool:
        # None: SDPA on accelerators, the explicit path on CPU, where SDPA with a float (trainable) mask is 2-4x
        # slower; True / False force one (as timm's `fused_attn`)
        return self.fused_attn if self.fused_attn is not None else x.device.type != "cpu"

    def queries_keys(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def head_maps(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(M (H, dim, out_dim), c (H, out_dim), b (out_dim,))``: ``out = sum_h A_h (X M_h + c_h) + b``, where the
        null key's value is 0 (so ``c_h`` is weighted by the mass on real keys)."""
        raise NotImplementedError

    @torch.no_grad()
    def attention_probs(self, x: torch.Tensor) -> torch.Tensor:
        """Attention weights ``(B, num_heads, N, N[+1])`` for input ``(B, N, dim)``; the null key is last."""
        q, k = self.queries_keys(x)
        if self.null_bias is not None:
            k = F.pad(k, (0, 0, 0, 1))  # the null key's key vector is 0
        logits = (q @ k.transpose(-2, -1)) * self.scale + self.position_bias().to(q.dtype)
        return logits.softmax(dim=-1)


class RelPosMHSA(RelPosAttention):
    """MHSA on a grid of tokens, logits ``q.k / sqrt(head_dim) + B_h[pos(k) - pos(q)]`` (paper eq. 4).

    Position bias, ``circular`` and the null key as in :class:`RelPosAttention`. Heads are full-size (``head_dim``
    need not be ``dim / num_heads``), as in the paper's construction.

    Input ``(B, N, dim)`` with ``N = gh * gw``, output ``(B, N, out_dim)``.
    """

    form = "paper"

    def __init__(
            self,
            dim: int,
            num_heads: int,
            head_dim: int,
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
        self.fused_attn: Optional[bool] = None
        self._init_position_bias(grid_size, null_key, circular)

    def _qkv(self, x: torch.Tensor):
        self._check_tokens(x)
        B, N, _ = x.shape
        return self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def queries_keys(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Queries and keys ``(B, num_heads, N, head_dim)`` each, without the null key."""
        q, k, _ = self._qkv(x)
        return q, k

    def head_maps(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        H, d = self.num_heads, self.head_dim
        w_v = self.qkv.weight[2 * H * d:].reshape(H, d, self.dim)  # v_h = x @ w_v[h].T
        w_o = self.proj.weight.T.reshape(H, d, self.out_dim)  # y = sum_h v_h @ w_o[h]
        m = torch.einsum("hkd,hke->hde", w_v, w_o)
        b_v = self.qkv.bias[2 * H * d:].reshape(H, 1, d) if self.qkv.bias is not None else w_o.new_zeros(H, 1, d)
        return m, (b_v @ w_o).squeeze(1), self.proj.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, dim) -> (B, N, out_dim)"""
        B, N, _ = x.shape
        q, k, v = self._qkv(x)
        if self.null_bias is not None:
            # the null key: key and value vectors are zero, only its bias sets its weight
            k = F.pad(k, (0, 0, 0, 1))
            v = F.pad(v, (0, 0, 0, 1))
        bias = self.position_bias().to(q.dtype)
        dropout = self.attn_drop if self.training else 0.0
        if not self._use_fused(x):
            attn = torch.baddbmm(bias.repeat(B, 1, 1), q.flatten(0, 1), k.flatten(0, 1).transpose(1, 2),
                                 alpha=self.scale).softmax(dim=-1)
            attn = F.dropout(attn, dropout, training=self.training)
            x = (attn @ v.flatten(0, 1)).view(B, self.num_heads, N, self.head_dim)
        else:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
        x = x.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
                f"grid_size={self.grid_size}, out_dim={self.out_dim}, null_key={self.null_key}, "
                f"circular={self.circular}")


class FactorizedRelPosMHSA(RelPosAttention):
    """The paper's layer with each head's ``W_V^h W_O^h`` kept as one matrix ``M_h``: the same function class.

    ``out = sum_h A_h (X M_h + c_h) + b`` with ``A_h`` the attention of :class:`RelPosMHSA` (relative position bias,
    ``circular`` offsets, optional null key whose value is 0), queries and keys of head size ``qk_dim``. ``value``
    computes ``[X M_1, .., X M_H]`` in one GEMM (``dim -> num_heads * out_dim``; a free ``nn.Linear`` unless a module
    with the same ``weight`` layout is passed, as the tied form does); one batched product
    ``(B, N, N*H) @ (B, N*H, out_dim)`` then mixes and sums the heads. The value bias ``c_h`` (``value_bias``) adds
    ``sum_h m_h(q) c_h``, with ``m_h(q)`` the weight of query ``q`` on the real keys (below 1 with a null key). The
    paper's per-head ``head_dim``-wide values and the ``W_O`` GEMM are gone: per token the mixer costs
    ``H*dim*out_dim + 2*H*qk_dim*dim`` multiply-adds for the projections instead of
    ``3*H*head_dim*dim + H*head_dim*out_dim``.

    Input ``(B, N, dim)`` with ``N = gh * gw``, output ``(B, N, out_dim)``.
    """

    form = "factorized"

    def __init__(
            self,
            dim: int,
            num_heads: int,
            grid_size: IntOrPair,
            out_dim: Optional[int] = None,
            qk_dim: Optional[int] = None,
            null_key: bool = True,
            circular: bool = False,
            qkv_bias: bool = True,
            attn_drop: float = 0.0,
            proj_drop: float = 0.0,
            value: Optional[nn.Module] = None,
    ):
        super().__init__()
        check_layer_args(dim, num_heads, out_dim, qkv_bias, attn_drop, proj_drop)
        qk_dim = default_qk_dim(dim, num_heads) if qk_dim is None else check_int(qk_dim, "qk_dim")
        self.dim = dim
        self.num_heads = num_heads
        self.qk_dim = qk_dim
        self.out_dim = out_dim or dim
        self.scale = qk_dim ** -0.5

        self.qk = nn.Linear(dim, 2 * num_heads * qk_dim, bias=qkv_bias)
        # [X M_1 .. X M_H]; a subclass may pass a module that builds the M_h from fewer parameters
        self.value = nn.Linear(dim, num_heads * self.out_dim, bias=False) if value is None else value
        # c_h, applied as (weight on real keys) x c_h: cheaper than a (B*N, H*out_dim) bias and its gradient
        self.value_bias = nn.Parameter(torch.zeros(num_heads, self.out_dim)) if qkv_bias else None
        self.bias = nn.Parameter(torch.zeros(self.out_dim))
        self.attn_drop = attn_drop
        self.fused_attn: Optional[bool] = None
        self.proj_drop = nn.Dropout(proj_drop)
        self._init_position_bias(grid_size, null_key, circular)

    def queries_keys(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Queries and keys ``(B, num_heads, N, qk_dim)`` each, without the null key."""
        self._check_tokens(x)
        B, N, _ = x.shape
        q, k = self.qk(x).reshape(B, N, 2, self.num_heads, self.qk_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return q, k

    def head_maps(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        H, D, E = self.num_heads, self.dim, self.out_dim
        m = self.value.weight.reshape(H, E, D).transpose(1, 2)
        return m, self.value_bias if self.value_bias is not None else m.new_zeros(H, E), self.output_bias()

    def output_bias(self) -> torch.Tensor:
        """``b`` (out_dim,)"""
        return self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, dim) -> (B, N, out_dim)"""
        B, N, _ = x.shape
        H, E = self.num_heads, self.out_dim
        q, k = self.queries_keys(x)
        v = self.value(x)  # (B, N, H*E): token-major, head-minor, without c_h
        if self.null_bias is not None:
            k = F.pad(k, (0, 0, 0, 1))  # the null key: key 0, only its bias sets its weight; its value is 0
        bias = self.position_bias().to(q.dtype)
        dropout = self.attn_drop if self.training else 0.0
        if not self._use_fused(x):
            attn = torch.baddbmm(bias.repeat(B, 1, 1), q.flatten(0, 1), k.flatten(0, 1).transpose(1, 2),
                                 alpha=self.scale).softmax(dim=-1)
            attn = F.dropout(attn, dropout, training=self.training)
            # drop the null key's column (its value is 0) and lay A out as (B, q, (k h)) to match v's (k h) rows:
            # one product mixes the tokens and sums the heads
            attn = attn.view(B, H, N, -1)[..., :N]
            x = attn.permute(0, 2, 3, 1).reshape(B, N, N * H) @ v.view(B, N * H, E)
            if self.value_bias is not None:
                x = x + attn.sum(-1).transpose(1, 2) @ self.value_bias.to(x.dtype)
        else:
            v = v.view(B, N, H, E).transpose(1, 2)
            if self.value_bias is not None:
                v = v + self.value_bias[:, None].to(v.dtype)
            if self.null_bias is not None:
                v = F.pad(v, (0, 0, 0, 1))
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout).sum(1)
        return self.proj_drop(x + self.output_bias().to(x.dtype))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, qk_dim={self.qk_dim}, "
                f"grid_size={self.grid_size}, out_dim={self.out_dim}, null_key={self.null_key}, "
                f"circular={self.circular}")
