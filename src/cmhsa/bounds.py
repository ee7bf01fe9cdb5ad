"""Lower bounds on heads (paper Theorems 5 and 6) as numbers for a given kernel.

A positional MHSA computes ``y_q = sum_h sum_d a_h(d) X_{q+d} M_h`` with ``M_h = W_V^h W_O^h``, so matching the
convolution's blocks ``T_d`` (see :func:`cmhsa.convert.conv_blocks`) needs ``T_d = sum_h a_h(d) M_h`` for every
offset ``d``: the ``vec(T_d)`` must lie in the span of ``H`` matrices. The rank of the stacked ``vec(T_d)`` is
therefore the least number of heads for this kernel, and Eckart-Young gives the best any ``H`` heads can do.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F

from .checks import check_int, check_real
from .convert import conv_blocks, same_padding_geometry
from .tokens import IntOrPair

__all__ = ["block_singular_values", "head_lower_bound", "best_fit_error", "best_fit_errors"]


def block_singular_values(weight: torch.Tensor, patch_size: IntOrPair, dilation: IntOrPair = 1,
                          stride: IntOrPair = 1, groups: int = 1) -> torch.Tensor:
    """Singular values (descending, float64, one per offset) of the matrix whose rows are ``vec(T_d)``."""
    if weight.ndim != 4:
        raise ValueError(f"expected a conv kernel (C_out, C_in/groups, Kh, Kw), got shape {tuple(weight.shape)}")
    geometry = same_padding_geometry(tuple(weight.shape[2:]), patch_size, dilation, stride)
    _, blocks = conv_blocks(weight.detach().to(torch.float64), geometry, groups)
    # an SVD of the (offsets x D*D_out) matrix itself: its Gram matrix would square the condition number
    sv = torch.linalg.svdvals(blocks.flatten(1))
    return F.pad(sv, (0, len(blocks) - len(sv)))  # one value per offset, even when D*D_out is smaller


def head_lower_bound(weight: torch.Tensor, patch_size: IntOrPair, dilation: IntOrPair = 1,
                     stride: IntOrPair = 1, groups: int = 1, rtol: float = 1e-7) -> int:
    """Least number of positional heads that can express this kernel on patches (numerical rank).

    Generic kernels give ``(2r+1)^2`` (9 when the kernel fits the patch neighbourhood) on patch input and
    ``K^2`` on pixel input (``patch_size=1``) when ``C_in * C_out >= K^2``; a 1x1 kernel gives 1.
    """
    check_real(rtol, "rtol", minimum=0, below=1)
    sv = block_singular_values(weight, patch_size, dilation, stride, groups)
    if sv.numel() == 0 or sv[0] == 0:
        return 0
    return int((sv > rtol * sv[0]).sum())


def best_fit_errors(weight: torch.Tensor, patch_size: IntOrPair, dilation: IntOrPair = 1,
                    stride: IntOrPair = 1, groups: int = 1) -> List[float]:
    """Relative residual ``||T - T_H||_F / ||T||_F`` of the best ``H``-head fit, for ``H = 0 .. offsets``."""
    sv = block_singular_values(weight, patch_size, dilation, stride, groups)
    energy = sv.square()
    total = energy.sum()
    if total == 0:
        return [0.0] * (len(sv) + 1)
    tail = energy.flip(0).cumsum(0).flip(0)  # tail[h] = sum_{i >= h} sigma_i^2
    return [(tail[h] / total).sqrt().item() for h in range(len(sv))] + [0.0]


def best_fit_error(weight: torch.Tensor, patch_size: IntOrPair, num_heads: int, dilation: IntOrPair = 1,
                   stride: IntOrPair = 1, groups: int = 1) -> float:
    """Relative residual of the best fit of the kernel's blocks by ``num_heads`` positional heads (Eckart-Young)."""
    check_int(num_heads, "num_heads", minimum=0)
    errors = best_fit_errors(weight, patch_size, dilation, stride, groups)
    return errors[min(num_heads, len(errors) - 1)]
