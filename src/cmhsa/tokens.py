"""Images <-> patch tokens, and the relative offsets between patches.

A token is its patch's pixels flattened in ``(p1 p2 c)`` order (the ViT paper's layout), and patches are
enumerated row-major over the grid. So an image ``(B, C, H, W)`` with patch size ``P`` becomes
``(B, N, P*P*C)`` with ``N = (H/P) * (W/P)``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from einops import rearrange

IntOrPair = Union[int, Sequence[int]]

__all__ = ["to_pair", "image_to_tokens", "tokens_to_image", "grid_offsets"]


def to_pair(value: IntOrPair, name: str = "value", minimum: Optional[int] = None) -> Tuple[int, int]:
    """``3 -> (3, 3)``; ``(3, 5) -> (3, 5)``. Rejects anything else, and values below ``minimum``, with a message
    naming ``name``."""
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    if is_int(value):
        pair = value, value
    elif isinstance(value, Sequence) and len(value) == 2 and all(is_int(v) for v in value):
        pair = int(value[0]), int(value[1])
    else:
        pair = None
    if pair is None or (minimum is not None and min(pair) < minimum):
        allowed = f" with each >= {minimum}" if minimum is not None else ""
        raise ValueError(f"{name} must be an int or a pair of ints{allowed}, got {value!r}")
    return pair


def _check_divisible(size: Tuple[int, int], patch: Tuple[int, int], what: str) -> None:
    if size[0] % patch[0] or size[1] % patch[1]:
        raise ValueError(
            f"{what} {size[0]}x{size[1]} is not divisible by patch size {patch[0]}x{patch[1]}; "
            f"resize or pad the image to a multiple of the patch size"
        )


def image_to_tokens(x: torch.Tensor, patch_size: IntOrPair) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, P*P*C), tokens row-major over the (H/P, W/P) grid."""
    if x.ndim != 4:
        raise ValueError(f"expected an image batch (B, C, H, W), got shape {tuple(x.shape)}")
    ph, pw = to_pair(patch_size, "patch_size", minimum=1)
    _check_divisible((x.shape[2], x.shape[3]), (ph, pw), "image size")
    return rearrange(x, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=ph, p2=pw)


def tokens_to_image(t: torch.Tensor, patch_size: IntOrPair, grid_size: IntOrPair) -> torch.Tensor:
    """(B, N, P*P*C) -> (B, C, H, W); the inverse of :func:`image_to_tokens`."""
    ph, pw = to_pair(patch_size, "patch_size", minimum=1)
    gh, gw = to_pair(grid_size, "grid_size", minimum=1)
    if t.ndim != 3 or t.shape[1] != gh * gw or t.shape[2] % (ph * pw):
        raise ValueError(
            f"expected tokens (B, {gh * gw}, {ph}*{pw}*C) for a {gh}x{gw} grid of {ph}x{pw} patches, "
            f"got shape {tuple(t.shape)}"
        )
    return rearrange(t, "b (h w) (p1 p2 c) -> b c (h p1) (w p2)", h=gh, w=gw, p1=ph, p2=pw)


def grid_offsets(grid_size: IntOrPair, device=None) -> torch.Tensor:
    """Relative offsets ``pos(k) - pos(q)`` between every query and key patch: (N, N, 2) as (dy, dx)."""
    gh, gw = to_pair(grid_size, "grid_size", minimum=1)
    ys, xs = torch.meshgrid(
        torch.arange(gh, device=device), torch.arange(gw, device=device), indexing="ij"
    )
    pos = torch.stack([ys.flatten(), xs.flatten()], dim=-1)  # (N, 2)
    return pos[None, :, :] - pos[:, None, :]
