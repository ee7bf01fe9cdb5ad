"""Theorem 1 as code: any zero-padded ``nn.Conv2d`` -> an exactly equivalent :class:`RelPosMHSA` on patch tokens.

The convolution maps the patches around query patch ``q`` to its output patch as ``y_q = sum_d X_{q+d} T_d``,
one ``(P*P*C_in, Q*Q*C_out)`` block ``T_d`` per patch offset ``d`` (``Q = P / stride``). The MHSA gives each
needed offset a head that attends only to ``q + d`` (relative bias ``beta`` there, ``W_Q = W_K = 0``), and makes
the head's value map ``T_d``: in the paper's form it copies the patch (``W_V = I``) and applies ``T_d`` in its slice
of ``W_O``; in the factorized form ``M_h = T_d`` directly; the tied form keeps the kernel and rebuilds
``M_h = T_d`` from it at every call (:mod:`cmhsa.tied`); the local form is the paper's, restricted to the window
of offsets the kernel reaches. A null key (docs/design.md §1.3) makes border patches whose neighbour is missing read zeros, which is
exactly zero padding. Circular padding needs no null key: offsets are taken modulo the grid, so every offset has a
key (:func:`wrap_offsets`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn

from .attention import FactorizedRelPosMHSA, RelPosAttention, RelPosMHSA
from .local_attention import LocalRelPosMHSA
from .checks import check_bool, check_int, check_real
from .tokens import IntOrPair, to_pair

__all__ = [
    "ConvGeometry", "conv_geometry", "same_padding_geometry", "conv_blocks", "required_heads", "conv_to_mhsa",
    "DEFAULT_BIAS_STRENGTH", "FORMS", "check_form", "wrap_offsets", "grid_blocks", "local_window",
]

# exp(-60 / 2) ~ 1e-13: the float64 construction is exact to ~1e-11 on a 14x14 grid (docs/design.md §1.3)
DEFAULT_BIAS_STRENGTH = 60.0


@dataclass(frozen=True)
class ConvGeometry:
    """Per-axis (y, x) geometry of a convolution applied to a patch grid."""
    kernel_size: Tuple[int, int]
    patch_size: Tuple[int, int]
    dilation: Tuple[int, int] = (1, 1)
    stride: Tuple[int, int] = (1, 1)
    pad_before: Tuple[int, int] = (0, 0)
    circular: bool = False   # padding_mode='circular': offsets wrap around the grid

    def __post_init__(self):
        # ints become pairs; the index arithmetic below assumes positive sizes and a stride dividing the patch
        for name, minimum in (("kernel_size", 1), ("patch_size", 1), ("dilation", 1), ("stride", 1),
                              ("pad_before", 0)):
            object.__setattr__(self, name, to_pair(getattr(self, name), name, minimum=minimum))
        P, s = self.patch_size, self.stride
        if P[0] % s[0] or P[1] % s[1]:
            raise ValueError(
                f"stride {s} does not divide patch size {P}: each output token must hold a whole "
                f"(P/stride)x(P/stride) block of output pixels; use a stride that divides the patch size"
            )

    @property
    def out_patch_size(self) -> Tuple[int, int]:
        return self.patch_size[0] // self.stride[0], self.patch_size[1] // self.stride[1]

    def axis_taps(self, axis: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Which kernel tap links which input and output pixel, per patch offset, along one axis.

        Returns ``offsets`` (n,) and a 0/1 tensor ``taps`` (n, P, Q, K): ``taps[i, u_in, u_out, a] = 1`` when
        pixel ``u_in`` of the patch at offset ``offsets[i]`` is the input of tap ``a`` for output pixel ``u_out``.
        Only offsets that some tap reaches are returned (a dilated kernel can skip patches).
        """
        K, P, Q = self.kernel_size[axis], self.patch_size[axis], self.out_patch_size[axis]
        s, dil, pad = self.stride[axis], self.dilation[axis], self.pad_before[axis]
        # input position, relative to the query patch's first pixel, read by tap a for output pixel u_out
        # index arithmetic on the CPU, whatever device context the caller is in (e.g. meta during conversion)
        arange = lambda n: torch.arange(n, device="cpu")  # noqa: E731
        pos = s * arange(Q)[:, None] + dil * arange(K)[None, :] - pad  # (Q, K)
        patch_offset = torch.div(pos, P, rounding_mode="floor")
        offsets, which = torch.unique(patch_offset, return_inverse=True)
        taps = torch.zeros(len(offsets), P, Q, K, device="cpu")
        u_out, a = torch.meshgrid(arange(Q), arange(K), indexing="ij")
        taps[which, pos - P * patch_offset, u_out, a] = 1.0
        return offsets, taps

    def offsets(self) -> torch.Tensor:
        """All patch offsets (n, 2) as (dy, dx) that the convolution reads, row-major."""
        oy, ox = self.axis_taps(0)[0], self.axis_taps(1)[0]
        return torch.cartesian_prod(oy, ox).reshape(-1, 2)


def _same_pad_before(kernel: int, dilation: int) -> int:
    # PyTorch's padding='same' puts the smaller half first when the total is odd (even kernels)
    return dilation * (kernel - 1) // 2


def conv_geometry(conv: nn.Conv2d, patch_size: IntOrPair) -> ConvGeometry:
    """Check that ``conv`` can be expressed on patches of ``patch_size`` and return its geometry.

    Raises ``ValueError`` naming the unsupported setting and what is supported.
    """
    if not isinstance(conv, nn.Conv2d):
        raise ValueError(f"expected an nn.Conv2d, got {type(conv).__name__}")
    P = to_pair(patch_size, "patch_size", minimum=1)
    # nn.Conv2d accepts these at construction and fails only in forward
    check_int(conv.in_channels, "conv.in_channels")
    check_int(conv.out_channels, "conv.out_channels")
    K = to_pair(tuple(conv.kernel_size), "conv.kernel_size", minimum=1)
    dil = to_pair(tuple(conv.dilation), "conv.dilation", minimum=1)
    stride = to_pair(tuple(conv.stride), "conv.stride", minimum=1)
    if conv.padding_mode not in ("zeros", "circular"):
        raise ValueError(
            f"padding_mode={conv.padding_mode!r} is not supported: the construction reproduces zero and circular "
            f"padding only (padding_mode='zeros' or 'circular', with padding='same' or the equivalent integer padding)"
        )
    if conv.padding == "same":
        pad_before = tuple(_same_pad_before(K[a], dil[a]) for a in (0, 1))
    elif conv.padding == "valid" or isinstance(conv.padding, str):
        if K == (1, 1):
            pad_before = (0, 0)
        else:
            raise ValueError(
                f"padding={conv.padding!r} shrinks the image, so the output is not a token grid of the same shape; "
                f"supported: padding='same' or integer padding dilation*(kernel_size-1)//2 (zero padding)"
            )
    else:
        pad_before = tuple(conv.padding)
        for a in (0, 1):
            reach = dil[a] * (K[a] - 1)
            # output size equals input_size / stride exactly when reach + 1 - stride <= 2 * pad <= reach
            if not reach + 1 - stride[a] <= 2 * pad_before[a] <= reach:
                if reach % 2 and stride[a] == 1:
                    fix = ("this axis needs asymmetric padding, which only padding='same' gives (PyTorch allows it "
                           "for stride 1 only)")
                else:
                    fix = f"use padding={tuple(dil[b] * (K[b] - 1) // 2 for b in (0, 1))} or padding='same'"
                raise ValueError(
                    f"padding={conv.padding} with kernel_size={K}, dilation={dil}, stride={stride} does not keep "
                    f"the output at input_size/stride, so outputs do not form patches; {fix}"
                )
    return ConvGeometry(kernel_size=K, patch_size=P, dilation=dil, stride=stride, pad_before=pad_before,
                        circular=conv.padding_mode == "circular")


def _dense_weight(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """Grouped kernel (C_out, C_in/groups, Kh, Kw) -> the equivalent dense block-diagonal (C_out, C_in, Kh, Kw)."""
    if groups == 1:
        return weight
    c_out, c_in_group = weight.shape[:2]
    out_per_group = c_out // groups
    dense = weight.new_zeros(c_out, c_in_group * groups, *weight.shape[2:])
    rows = torch.arange(c_out, device=weight.device)[:, None]
    cols = (rows // out_per_group) * c_in_group + torch.arange(c_in_group, device=weight.device)[None, :]
    dense[rows, cols] = weight
    return dense


def conv_blocks(weight: torch.Tensor, geometry: ConvGeometry, groups: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """The per-offset blocks ``T_d`` of a kernel.

    Args:
        weight: (C_out, C_in/groups, Kh, Kw).
    Returns:
        offsets (n, 2) as (dy, dx), and blocks (n, Ph*Pw*C_in, Qh*Qw*C_out) in token layout, so that
        ``y_q = sum_i X_{q + offsets[i]} @ blocks[i]``.
    """
    if weight.ndim != 4 or tuple(weight.shape[2:]) != geometry.kernel_size:
        raise ValueError(f"expected a conv kernel (C_out, C_in/groups, {geometry.kernel_size[0]}, "
                         f"{geometry.kernel_size[1]}) for this geometry, got shape {tuple(weight.shape)}")
    if check_int(groups, "groups") > 1 and weight.shape[0] % groups:
        raise ValueError(f"groups={groups} must divide the kernel's C_out={weight.shape[0]}")
    w = _dense_weight(weight, groups)
    (oy, ty), (ox, tx) = geometry.axis_taps(0), geometry.axis_taps(1)
    ty, tx = ty.to(w), tx.to(w)
    # rows (p, q, c) and columns (u, v, o) are the (p1 p2 c) token layouts of input and output patches
    # two contractions: one three-way einsum picks a far slower order
    blocks = torch.einsum("ypua,ocae->ypuoce", ty, w)
    blocks = torch.einsum("ypuoce,xqve->yxpqcuvo", blocks, tx)
    n = len(oy) * len(ox)
    blocks = blocks.reshape(n, -1, geometry.out_patch_size[0] * geometry.out_patch_size[1] * w.shape[0])
    return torch.cartesian_prod(oy, ox).reshape(-1, 2), blocks


def wrap_offsets(offsets: torch.Tensor, blocks: torch.Tensor,
                 grid_size: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Circular padding: patch ``q + d`` is patch ``(q + d) mod grid``. Offsets that alias onto the same key (a grid
    smaller than the kernel's reach) have their blocks summed, so each key is read by one head.

    Returns the first offset of each alias class, in order of appearance, and their summed blocks.
    """
    classes: Dict[Tuple[int, int], int] = {}  # wrapped offset -> its head
    which, first = [], []
    for i, key in enumerate(map(tuple, offsets.remainder(torch.tensor(grid_size, device=offsets.device)).tolist())):
        if key not in classes:
            classes[key] = len(classes)
            first.append(i)
        which.append(classes[key])
    index = torch.tensor(which, device=blocks.device)
    summed = blocks.new_zeros(len(first), *blocks.shape[1:]).index_add_(0, index, blocks)
    return offsets[first], summed


def grid_blocks(weight: torch.Tensor, geometry: ConvGeometry, grid_size: Tuple[int, int],
                groups: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """The offsets and blocks of :func:`conv_blocks` that a ``grid_size`` grid needs, one head each: offsets that
    reach no patch of the grid are dropped (they read only zero padding), and with circular padding offsets wrap
    (:func:`wrap_offsets`). Head ``h`` of a converted global layer reads offset ``h``."""
    offsets, blocks = conv_blocks(weight, geometry, groups)
    if geometry.circular:
        return wrap_offsets(offsets, blocks, grid_size)
    inside = (offsets[:, 0].abs() < grid_size[0]) & (offsets[:, 1].abs() < grid_size[1])
    return offsets[inside], blocks[inside]


def local_window(offsets: torch.Tensor) -> Tuple[int, int]:
    """The smallest odd window, centred on the query, that holds every offset in ``offsets`` (n, 2)."""
    reach = offsets.abs().amax(dim=0) if len(offsets) else torch.zeros(2, dtype=torch.long)
    return 2 * int(reach[0]) + 1, 2 * int(reach[1]) + 1


def same_padding_geometry(kernel_size: IntOrPair, patch_size: IntOrPair, dilation: IntOrPair = 1,
                          stride: IntOrPair = 1) -> ConvGeometry:
    """Geometry of a kernel with zero 'same' padding (PyTorch's split; for stride > 1 the padding that keeps
    the output at input_size / stride)."""
    K = to_pair(kernel_size, "kernel_size", minimum=1)
    dil = to_pair(dilation, "dilation", minimum=1)
    pad = tuple(_same_pad_before(K[a], dil[a]) for a in (0, 1))
    return ConvGeometry(kernel_size=K, patch_size=patch_size, dilation=dil, stride=stride, pad_before=pad)


def required_heads(kernel_size: IntOrPair, patch_size: IntOrPair, dilation: IntOrPair = 1,
                   stride: IntOrPair = 1) -> int:
    """Heads the construction uses for a zero-'same'-padded kernel: one per patch offset the kernel reaches.

    ``(2r+1)^2`` with ``r = ceil(dilation*(K-1) / (2P))`` for odd square kernels (9 when the kernel fits,
    ``K^2`` on pixel input, ``P = 1``); even, rectangular and dilated kernels are counted exactly.
    """
    return len(same_padding_geometry(kernel_size, patch_size, dilation, stride).offsets())


def _empty_layer(cls, like: torch.Tensor, *args, **kwargs) -> nn.Module:
    """``cls(*args, **kwargs)`` on the device and dtype of ``like``, weights uninitialised: the builders set every
    one, so skip the random init of the ~(4 * heads * dim^2) parameters."""
    with torch.device("meta"):
        layer = cls(*args, **kwargs)
    layer = layer.to_empty(device=like.device).to(like.dtype)
    if isinstance(layer, RelPosAttention):
        layer.reset_rel_pos_index()
    return layer


def _no_qk_dim(qk_dim: Optional[int], form: str) -> None:
    if qk_dim is not None:
        raise ValueError(f"qk_dim={qk_dim} applies to form='factorized' and 'tied' only: the {form} form has one "
                         f"head size, the token width; leave qk_dim unset (None) for form={form!r}")


def _set_paper_weights(mhsa: nn.Module, blocks: torch.Tensor, out_bias: torch.Tensor, qk_std: float) -> nn.Module:
    """Theorem 1's weights in a layer with the paper's ``qkv`` / ``proj`` layout: ``W_Q = W_K = 0`` (or small, see
    ``qk_std``) so attention is positional, ``W_V^h = I``, ``T_d`` in head h's slice of ``W_O``."""
    heads, used, (dim, out_dim) = mhsa.num_heads, len(blocks), blocks.shape[1:]
    mhsa.qkv.weight.zero_()
    mhsa.qkv.bias.zero_()
    if qk_std > 0:
        mhsa.qkv.weight[:2 * heads * dim].normal_(0.0, qk_std)
    mhsa.qkv.weight[2 * heads * dim:] = torch.eye(dim).repeat(heads, 1)
    # W_O: head h applies T_{d_h}; inert padding heads get zero blocks
    proj = blocks.new_zeros(heads, dim, out_dim)
    proj[:used] = blocks
    mhsa.proj.weight.copy_(proj.reshape(heads * dim, out_dim).T)
    mhsa.proj.bias.copy_(out_bias)
    return mhsa


def _paper_layer(blocks: torch.Tensor, out_bias: torch.Tensor, heads: int, grid: Tuple[int, int],
                 offsets: torch.Tensor, null_key: bool, circular: bool, qk_dim: Optional[int],
                 qk_std: float) -> RelPosMHSA:
    """The paper's layer: full-width heads, ``W_V^h = I``, ``T_d`` in head h's slice of ``W_O``."""
    _no_qk_dim(qk_dim, "paper")
    dim, out_dim = blocks.shape[1:]
    mhsa = _empty_layer(RelPosMHSA, blocks, dim, heads, dim, grid, out_dim=out_dim, null_key=null_key,
                        circular=circular)
    return _set_paper_weights(mhsa, blocks, out_bias, qk_std)


def _local_layer(blocks: torch.Tensor, out_bias: torch.Tensor, heads: int, grid: Tuple[int, int],
                 offsets: torch.Tensor, null_key: bool, circular: bool, qk_dim: Optional[int],
                 qk_std: float) -> LocalRelPosMHSA:
    """The paper's layer on the smallest window that holds ``offsets``: the same weights on any grid."""
    _no_qk_dim(qk_dim, "local")
    dim, out_dim = blocks.shape[1:]
    mhsa = _empty_layer(LocalRelPosMHSA, blocks, dim, heads, dim, local_window(offsets), grid, out_dim=out_dim,
                        null_key=null_key, circular=circular)
    return _set_paper_weights(mhsa, blocks, out_bias, qk_std)


def _factorized_layer(blocks: torch.Tensor, out_bias: torch.Tensor, heads: int, grid: Tuple[int, int],
                      offsets: torch.Tensor, null_key: bool, circular: bool, qk_dim: Optional[int],
                      qk_std: float) -> FactorizedRelPosMHSA:
    """The factorized layer: ``M_h = T_{d_h}``, queries and keys of size ``qk_dim``."""
    used, dim, out_dim = blocks.shape
    mhsa = _empty_layer(FactorizedRelPosMHSA, blocks, dim, heads, grid, out_dim=out_dim, qk_dim=qk_dim,
                        null_key=null_key, circular=circular)
    _init_queries_keys(mhsa, qk_std)
    m = blocks.new_zeros(heads, dim, out_dim)
    m[:used] = blocks
    mhsa.value.weight.copy_(m.transpose(1, 2).reshape(heads * out_dim, dim))
    mhsa.value_bias.zero_()
    mhsa.bias.copy_(out_bias)
    return mhsa


def _init_queries_keys(mhsa: FactorizedRelPosMHSA, qk_std: float) -> None:
    """``W_Q = W_K = 0``, or ``N(0, qk_std^2)`` (see :func:`conv_to_mhsa`), and zero Q/K biases."""
    mhsa.qk.weight.zero_()
    mhsa.qk.bias.zero_()
    if qk_std > 0:
        mhsa.qk.weight.normal_(0.0, qk_std)


def _tied_layer(conv: nn.Conv2d, geometry: ConvGeometry, heads: int, grid: Tuple[int, int], null_key: bool,
                qk_dim: Optional[int], qk_std: float) -> nn.Module:
    """The tied layer: the factorized layer whose value maps are rebuilt from ``conv``'s kernel at every call."""
    from .tied import TiedRelPosMHSA  # imported here: the tied layer builds its blocks with this module
    mhsa = _empty_layer(TiedRelPosMHSA, conv.weight, conv.in_channels, conv.out_channels, geometry, grid, heads,
                        groups=conv.groups, qk_dim=qk_dim, null_key=null_key)
    _init_queries_keys(mhsa, qk_std)
    mhsa.value.kernel.copy_(conv.weight)
    mhsa.value.kernel_bias.copy_(conv.bias if conv.bias is not None else conv.weight.new_zeros(conv.out_channels))
    return mhsa


# form -> builder(blocks (used, D, D_out), output bias (D_out,), heads, grid, offsets (used, 2), null_key, circular,
# qk_dim, qk_std): a layer whose value path computes the blocks; conv_to_mhsa then sets the position biases, the same
# in every form. The tied form keeps the kernel and its bias instead of the blocks, so its builder takes (conv,
# geometry, heads, grid, null_key, qk_dim, qk_std).
FORMS: Dict[str, Callable[..., nn.Module]] = {"paper": _paper_layer, "factorized": _factorized_layer,
                                              "local": _local_layer, "tied": _tied_layer}


def check_form(form: str) -> None:
    if form not in FORMS:
        raise ValueError(f"form must be one of {sorted(FORMS)} (global: 'paper', 'factorized', 'tied'; windowed: "
                         f"'local'), got {form!r}")


def conv_to_mhsa(
        conv: nn.Conv2d,
        patch_size: IntOrPair,
        grid_size: IntOrPair,
        bias_strength: float = DEFAULT_BIAS_STRENGTH,
        null_key: bool = True,
        num_heads: Optional[int] = None,
        qk_std: float = 0.0,
        form: str = "paper",
        qk_dim: Optional[int] = None,
) -> nn.Module:
    """Build an attention layer computing ``conv`` on tokens of ``patch_size`` patches over ``grid_size``.

    Input tokens are ``image_to_tokens(x, P)``; output tokens are ``image_to_tokens(conv(x), P // stride)``.
    One head per patch offset the kernel reaches (offsets outside the grid never hold a pixel and get no head; with
    ``padding_mode='circular'`` offsets wrap modulo the grid, aliased ones share a head, and no null key is needed);
    ``num_heads`` pads with inert heads to a fixed count. ``bias_strength`` (beta) sets the error, ~N*exp(-beta/2)
    with the null key: large is exact, small leaves the softmax trainable. The module has conv's dtype and device.

    ``form='paper'`` builds the paper's global :class:`RelPosMHSA` (head size = token width, ``W_V = I``);
    ``form='factorized'`` a :class:`FactorizedRelPosMHSA` with ``M_h = T_d`` and Q/K head size ``qk_dim``
    (default :func:`~cmhsa.attention.default_qk_dim`); ``form='tied'`` a :class:`~cmhsa.tied.TiedRelPosMHSA`, the
    factorized layer holding ``conv``'s kernel and bias instead of the blocks (training keeps the filters a
    convolution's); ``form='local'`` a :class:`LocalRelPosMHSA` whose window holds
    exactly the offsets the kernel reaches (one head each, on any grid: missing neighbours go to the null key, or
    wrap for circular padding), so the same layer computes the convolution at every image size. All are exact to the
    same ~exp(-beta/2), with zero or circular padding.

    ``qk_std > 0`` draws ``W_Q, W_K ~ N(0, qk_std^2)`` instead of zeros. ``W_Q = W_K = 0`` is a stationary point: the
    gradient of each is proportional to the other, so content attention could never be learned from it. Small
    random values perturb the logits by far less than ``beta / 2``, so the conversion stays exact to ~exp(-beta/2).
    """
    check_form(form)
    geometry = conv_geometry(conv, patch_size)
    gh, gw = to_pair(grid_size, "grid_size", minimum=1)
    check_real(bias_strength, "bias_strength", minimum=0)
    check_bool(null_key, "null_key")
    check_real(qk_std, "qk_std", minimum=0)
    if num_heads is not None:
        check_int(num_heads, "num_heads")
    # the local form keeps a head for every offset the kernel reaches: the grid, any size, decides at run time
    offsets, blocks = (conv_blocks(conv.weight.detach(), geometry, conv.groups) if form == "local" else
                       grid_blocks(conv.weight.detach(), geometry, (gh, gw), conv.groups))
    used = len(offsets)
    # a kernel that reads no patch inside the grid (tiny grid, large dilation) outputs its bias: one inert head
    heads = num_heads if num_heads is not None else max(used, 1)
    if heads < used:
        raise ValueError(
            f"this convolution needs {used} heads on {geometry.patch_size} patches (one per patch offset it reads), "
            f"got num_heads={num_heads}; fewer heads cannot be exact (see cmhsa.head_lower_bound / best_fit_error)"
        )
    q_pixels = geometry.out_patch_size[0] * geometry.out_patch_size[1]
    out_bias = conv.bias.detach().repeat(q_pixels) if conv.bias is not None else blocks.new_zeros(blocks.shape[2])
    with torch.no_grad():
        if form == "tied":  # the one form that keeps the kernel, not its blocks
            mhsa = FORMS[form](conv, geometry, heads, (gh, gw), null_key, qk_dim, qk_std)
        else:
            mhsa = FORMS[form](blocks, out_bias, heads, (gh, gw), offsets, null_key, geometry.circular, qk_dim,
                               qk_std)
        # head h: logit beta on its offset, 0 elsewhere; the null key at beta/2 wins only where the offset is missing
        mhsa.rel_pos_bias.zero_()
        mhsa.rel_pos_bias[torch.arange(used), mhsa.offset_index(offsets)] = bias_strength
        if null_key:
            mhsa.null_bias.fill_(bias_strength / 2)
    return mhsa
