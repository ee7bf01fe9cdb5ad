"""Adaptive polyphase anchoring: where the patch grid starts, chosen so that it moves with the image.

A ViT cuts the image into patches at fixed positions, so a shift by less than a patch changes every token. Adaptive
polyphase sampling (APS) instead picks the grid phase from the image itself, by a rule that a shift of the image
moves along: with circular padding and global average pooling the whole model is then invariant to circular shifts.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .tokens import IntOrPair, to_pair

__all__ = ["PolyphaseAnchor", "polyphase_components", "polyphase_scores", "choose_phase", "roll_per_image"]


def polyphase_components(x: torch.Tensor, patch_size: IntOrPair) -> torch.Tensor:
    """(B, C, H, W) -> (B, Ph*Pw, C*H*W/(Ph*Pw)): component (i, j) = ``x[..., i::Ph, j::Pw]``, phases row-major."""
    ph, pw = to_pair(patch_size, "patch_size")
    B, C, H, W = x.shape
    if H % ph or W % pw:
        raise ValueError(f"image size {H}x{W} is not divisible by patch size {ph}x{pw}; polyphase anchoring needs "
                         f"whole patches")
    return x.reshape(B, C, H // ph, ph, W // pw, pw).permute(0, 3, 5, 1, 2, 4).reshape(B, ph * pw, -1)


def polyphase_scores(x: torch.Tensor, patch_size: IntOrPair) -> torch.Tensor:
    """Squared norm of every polyphase component: (B, C, H, W) -> (B, Ph*Pw), phases (i, j) row-major.

    Component (i, j) is ``x[..., i::Ph, j::Pw]``, the pixels that start every patch once the image is rolled by
    (-i, -j). Each norm is summed in float64 over the component's values in sorted order, so a circularly shifted
    image, whose components are permutations of the original's, gets bit-identical scores (no tolerance needed).
    """
    return polyphase_components(x, patch_size).double().sort(dim=-1).values.square().sum(-1)


def choose_phase(x: torch.Tensor, patch_size: IntOrPair) -> torch.Tensor:
    """The anchor phase of each image, (B,) indices into the row-major (Ph, Pw) phases.

    The phase of largest norm. Exact ties (e.g. symmetric images) are broken by comparing the components' values,
    sorted in decreasing order, lexicographically: a rule that also moves with the shift. Only components that are
    equal as multisets are left tied; those go to the first phase in row-major order.
    """
    scores = polyphase_scores(x, patch_size)
    best = scores == scores.amax(dim=-1, keepdim=True)
    if (best.sum(-1) > 1).any():
        ordered = polyphase_components(x, patch_size).sort(dim=-1, descending=True).values
        for col in range(ordered.shape[-1]):
            vals = ordered[..., col].masked_fill(~best, float("-inf"))
            best &= vals == vals.amax(dim=-1, keepdim=True)
    return best.to(torch.uint8).argmax(dim=-1)  # argmax returns the first maximum


def roll_per_image(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """``torch.roll(x[b], (-dy[b], -dx[b]))`` for every image: pixel (dy[b], dx[b]) moves to the origin."""
    B, C, H, W = x.shape
    rows = (torch.arange(H, device=x.device) + dy[:, None]) % H  # (B, H)
    cols = (torch.arange(W, device=x.device) + dx[:, None]) % W  # (B, W)
    x = x.gather(2, rows[:, None, :, None].expand(B, C, H, W))
    return x.gather(3, cols[:, None, None, :].expand(B, C, H, W))


class PolyphaseAnchor(nn.Module):
    """Roll each image (B, C, H, W) so that its largest-norm polyphase component starts every patch.

    Rolling the input by s moves the chosen phase by s mod P, so the anchored image moves by a multiple of P: a
    circular shift of whole tokens, which circular convolution, circular relative-position attention and average
    pooling do not see. The rule scores polyphase components, not the projected tokens: a patch projection that is
    orthogonal (the identity init of :class:`cmhsa.models.PatchEmbed`) gives every phase's tokens the same total
    norm, and the choice would be decided by rounding.
    """

    def __init__(self, patch_size: IntOrPair):
        super().__init__()
        self.patch_size = to_pair(patch_size, "patch_size")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W), H and W multiples of the patch size"""
        phase = choose_phase(x, self.patch_size)
        return roll_per_image(x, phase // self.patch_size[1], phase % self.patch_size[1])

    def extra_repr(self) -> str:
        return f"patch_size={self.patch_size}"
