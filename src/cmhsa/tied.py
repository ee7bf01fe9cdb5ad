"""The tied form: the factorized attention layer whose value maps stay one convolution's.

Converting a conv to :class:`~cmhsa.attention.FactorizedRelPosMHSA` writes each head's block ``T_{d_h}`` into a free
``dim x out_dim`` matrix. Training then unties the kernel: every copy of a tap (one per pixel of the patch and per
head) moves on its own. For the tiny CMHSA-5 models that is 9 x 128 x 128 = 147k value weights per layer where the
conv had 8 x 8 x 5 x 5 = 1,600, and the weight sharing across pixels inside a patch is gone. The tied layer keeps
the kernel and its bias as its parameters and rebuilds the blocks from them at every call, so phase 2 trains the
same filters the conv trained, and what it adds is only where each head looks (queries, keys, position biases).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import FactorizedRelPosMHSA
from .checks import check_int
from .convert import ConvGeometry, grid_blocks
from .tokens import IntOrPair, to_pair

__all__ = ["ConvTiedValues", "TiedRelPosMHSA"]


class ConvTiedValues(nn.Module):
    """``X -> [X T_{d_1}(W) .. X T_{d_H}(W)]``: the value GEMM of the factorized layer, its weight built from one kernel.

    ``kernel`` is ``(out_chans, in_chans / groups, Kh, Kw)`` and ``kernel_bias`` ``(out_chans,)``, as ``nn.Conv2d``'s
    weight and bias; head ``h`` applies the block of offset ``h`` of :func:`~cmhsa.convert.grid_blocks` (heads past
    the offsets apply 0). ``weight`` is laid out as ``nn.Linear.weight`` of ``FactorizedRelPosMHSA.value``:
    ``(num_heads * out_dim, dim)``; :meth:`output_bias` is the kernel bias at every output pixel, ``(out_dim,)``.

    Input ``(B, N, Ph*Pw*in_chans)``, output ``(B, N, num_heads * Qh*Qw*out_chans)``.
    """

    def __init__(self, in_chans: int, out_chans: int, geometry: ConvGeometry, grid_size: IntOrPair, num_heads: int,
                 groups: int = 1):
        super().__init__()
        self.geometry = geometry
        self.grid_size = to_pair(grid_size, "grid_size", minimum=1)
        self.num_heads = check_int(num_heads, "num_heads")
        self.groups = check_int(groups, "groups")
        if in_chans % groups or out_chans % groups:
            raise ValueError(f"groups={groups} must divide in_chans={in_chans} and out_chans={out_chans}")
        self.kernel = nn.Parameter(torch.empty(out_chans, in_chans // groups, *geometry.kernel_size))
        used = len(grid_blocks(torch.zeros(self.kernel.shape, device="cpu"), geometry, self.grid_size, groups)[0])
        if num_heads < used:
            raise ValueError(f"this kernel reads {used} patch offsets on a {self.grid_size[0]}x{self.grid_size[1]} "
                             f"grid, one head each, got num_heads={num_heads}; use num_heads >= {used}")
        self.kernel_bias = nn.Parameter(torch.zeros(out_chans))
        nn.init.kaiming_uniform_(self.kernel, a=math.sqrt(5))  # nn.Conv2d's init (its bias starts at 0 here)

    @property
    def weight(self) -> torch.Tensor:
        _, blocks = grid_blocks(self.kernel, self.geometry, self.grid_size, self.groups)  # (used, dim, out_dim)
        blocks = torch.cat([blocks, blocks.new_zeros(self.num_heads - len(blocks), *blocks.shape[1:])])
        return blocks.transpose(1, 2).reshape(-1, blocks.shape[1])

    def output_bias(self) -> torch.Tensor:
        q = self.geometry.out_patch_size
        return self.kernel_bias.repeat(q[0] * q[1])  # tokens lay out output pixels (qy, qx) major, channels minor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))

    def extra_repr(self) -> str:
        return f"kernel={tuple(self.kernel.shape)}, groups={self.groups}, num_heads={self.num_heads}"


class TiedRelPosMHSA(FactorizedRelPosMHSA):
    """:class:`FactorizedRelPosMHSA` with ``M_h = T_{d_h}(W)`` for one kernel ``W`` shared by all heads
    (:class:`ConvTiedValues`): the conversion of a conv whose filters stay a convolution in training.

    Only the geometry of the kernel (``ConvGeometry``: size, dilation, stride, padding, circular) and the grid fix the
    layer; with ``qk_std``-small queries and keys and position bias ``beta`` on each head's offset (as
    :func:`~cmhsa.convert.conv_to_mhsa` sets them) it computes the conv to ``~exp(-beta/2)``. The output bias ``b`` is
    the conv's bias at every output pixel, and there is no per-head value bias ``c_h``: both would be a bias per pixel
    that a convolution does not have. So the layer's parameters are the conv's and the attention's, nothing more.

    Input ``(B, N, Ph*Pw*in_chans)`` with ``N = gh * gw``, output ``(B, N, Qh*Qw*out_chans)``.
    """

    form = "tied"

    def __init__(
            self,
            in_chans: int,
            out_chans: int,
            geometry: ConvGeometry,
            grid_size: IntOrPair,
            num_heads: int,
            groups: int = 1,
            qk_dim: Optional[int] = None,
            null_key: bool = True,
            attn_drop: float = 0.0,
            proj_drop: float = 0.0,
    ):
        (ph, pw), (qh, qw) = geometry.patch_size, geometry.out_patch_size
        value = ConvTiedValues(check_int(in_chans, "in_chans"), check_int(out_chans, "out_chans"), geometry,
                               grid_size, num_heads, groups)
        super().__init__(ph * pw * in_chans, num_heads, grid_size, out_dim=qh * qw * out_chans, qk_dim=qk_dim,
                         null_key=null_key, circular=geometry.circular, attn_drop=attn_drop, proj_drop=proj_drop,
                         value=value)
        self.value_bias = None
        self.bias = None

    def output_bias(self) -> torch.Tensor:
        return self.value.output_bias()
