"""``cmhsa verify``: build the attention twin of a convolution and measure it against ``F.conv2d`` at every output
position, the border apart from the interior, with the least number of heads that could be exact."""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn as nn

from .bounds import head_lower_bound
from .checks import check_int
from .convert import DEFAULT_BIAS_STRENGTH, conv_geometry, conv_to_mhsa
from .tokens import IntOrPair, image_to_tokens, to_pair

__all__ = ["VerifyReport", "border_patch_mask", "verify"]


@dataclass
class VerifyReport:
    """Errors of the converted MHSA against ``F.conv2d`` on random input."""
    num_heads: int
    lower_bound: int
    grid_size: Tuple[int, int]
    dtype: str
    null_key: bool
    bias_strength: float
    output_scale: float      # max |conv(x)|
    max_error: float         # max |mhsa - conv| over every position
    interior_error: Optional[float]  # ... over patches whose every head offset is inside the grid (None: no such patch)
    border_error: Optional[float]    # ... over the other patches (None: no such patch, e.g. circular padding)
    build_seconds: float
    form: str = "paper"

    @property
    def relative_error(self) -> float:
        return self.max_error / max(self.output_scale, torch.finfo(torch.float64).tiny)

    def __str__(self) -> str:
        return "\n".join([
            f"form             {self.form}",
            f"heads used       {self.num_heads} (lower bound for this kernel: {self.lower_bound})",
            f"grid             {self.grid_size[0]}x{self.grid_size[1]} patches, {self.dtype}, "
            f"null key {'on' if self.null_key else 'off'}, bias strength {self.bias_strength:g}",
            f"max |error|      {self.max_error:.3e}  (relative to max |output| {self.output_scale:.3g}: "
            f"{self.relative_error:.3e})",
            f"  interior       {_patch_error(self.interior_error, 'no patch has all its offsets inside the grid')}",
            f"  border         {_patch_error(self.border_error, 'no border patches on this grid')}",
            f"build time       {self.build_seconds * 1e3:.1f} ms",
        ])


def _patch_error(error: Optional[float], why_none: str) -> str:
    return f"{error:.3e}" if error is not None else f"none ({why_none})"


def border_patch_mask(offsets: torch.Tensor, grid_size: Tuple[int, int]) -> torch.Tensor:
    """(gh, gw) bool: patches where some offset in ``offsets`` (n, 2) falls outside the grid."""
    gh, gw = grid_size
    ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    ky = ys[..., None] + offsets[:, 0]
    kx = xs[..., None] + offsets[:, 1]
    return ((ky < 0) | (ky >= gh) | (kx < 0) | (kx >= gw)).any(-1)


@torch.no_grad()
def verify(
        conv: nn.Conv2d,
        patch_size: IntOrPair,
        image_size: IntOrPair,
        dtype: torch.dtype = torch.float64,
        null_key: bool = True,
        bias_strength: float = DEFAULT_BIAS_STRENGTH,
        batch_size: int = 2,
        seed: int = 0,
        form: str = "paper",
        qk_dim: Optional[int] = None,
) -> VerifyReport:
    """Convert ``conv`` to the attention ``form`` and compare with ``F.conv2d`` on a random batch, at every output
    position."""
    P = to_pair(patch_size, "patch_size", minimum=1)
    H, W = to_pair(image_size, "image_size", minimum=1)
    if H % P[0] or W % P[1]:
        raise ValueError(f"image_size {H}x{W} is not divisible by patch_size {P[0]}x{P[1]}; use a multiple of the "
                         f"patch size")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype such as torch.float64, got {dtype!r}")
    check_int(batch_size, "batch_size")
    check_int(seed, "seed", minimum=-2 ** 63)
    grid = (H // P[0], W // P[1])
    conv = copy.deepcopy(conv).to(dtype)  # leave the caller's module untouched
    start = time.perf_counter()
    mhsa = conv_to_mhsa(conv, P, grid, bias_strength=bias_strength, null_key=null_key, form=form, qk_dim=qk_dim)
    build_seconds = time.perf_counter() - start

    x = torch.randn(batch_size, conv.in_channels, H, W, generator=torch.Generator().manual_seed(seed)).to(dtype)
    geometry = conv_geometry(conv, P)
    expected = image_to_tokens(conv(x), geometry.out_patch_size)
    error = (mhsa(image_to_tokens(x, P)) - expected).abs().amax(dim=(0, 2))  # (N,)
    # circular padding has no border: every offset wraps onto a patch
    border = torch.zeros(grid, dtype=torch.bool).flatten() if geometry.circular else \
        border_patch_mask(geometry.offsets(), grid).flatten()
    return VerifyReport(
        num_heads=mhsa.num_heads,
        lower_bound=head_lower_bound(conv.weight, P, dilation=conv.dilation, stride=conv.stride,
                                     groups=conv.groups),
        grid_size=grid,
        dtype=str(dtype).replace("torch.", ""),
        null_key=null_key,
        bias_strength=bias_strength,
        output_scale=expected.abs().max().item(),
        max_error=error.max().item(),
        interior_error=error[~border].max().item() if (~border).any() else None,
        border_error=error[border].max().item() if border.any() else None,
        build_seconds=build_seconds,
        form=form,
    )

