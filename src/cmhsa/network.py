"""Exact attention twins of whole CNNs: each expressible ``nn.Conv2d`` of a model -> an equivalent attention layer.

:func:`convert_network` walks any ``nn.Module`` (a timm ResNet, ConvNeXt, MobileNet, ...), runs a sample input
through it to learn each convolution's feature-map size, and replaces every selected convolution it can express
exactly by a :class:`ConvAsAttention`: the feature map becomes patch tokens, an attention layer built by
:func:`cmhsa.conv_to_mhsa` (Theorem 1) mixes them, and the tokens become a feature map again. What it cannot
express exactly it leaves as a convolution and says why, so a twin is never silently wrong.

``attention_twin`` (a timm model name) rebuilds a twin from its CNN's name and the conversion settings, so
``model.json`` specs written by ``cmhsa convert-net`` load with ``cmhsa eval`` / ``cmhsa train``.
"""
from __future__ import annotations

import copy
import fnmatch
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Conv2dSame
from timm.layers.padding import get_same_padding
from timm.models import register_model
from torch.utils.flop_counter import FlopCounterMode

from .convert import DEFAULT_BIAS_STRENGTH, check_form, conv_geometry, conv_to_mhsa
from .attention import RelPosAttention
from .tokens import IntOrPair, image_to_tokens, to_pair, tokens_to_image

__all__ = ["ConvAsAttention", "convert_network", "format_table", "conv_attention_mass", "attention_twin"]

PatchSize = Union[str, int, Dict[str, Union[str, int]]]


class ConvAsAttention(nn.Module):
    """An ``nn.Conv2d`` computed by an exactly equivalent attention layer on patch tokens.

    ``(B, C_in, H, W) -> image_to_tokens -> (B, N, P*P*C_in) -> attn -> (B, N, Q*Q*C_out) -> tokens_to_image
    -> (B, C_out, H/stride, W/stride)`` with ``Q = P / stride`` and ``N = (H/P) * (W/P)``. The attention's relative
    position table spans that grid, so the layer takes inputs of exactly ``in_size = (H, W)`` (any batch size).
    ``head_offsets`` (n, 2) are the patch offsets (dy, dx) heads 0..n-1 attend to, as the conversion set them.
    """

    def __init__(self, attn: nn.Module, in_size: Tuple[int, int], patch_size: int, stride: Tuple[int, int],
                 head_offsets: torch.Tensor):
        super().__init__()
        self.attn = attn
        self.in_size = tuple(in_size)
        self.patch_size = (patch_size, patch_size)
        self.out_patch_size = (patch_size // stride[0], patch_size // stride[1])
        self.grid_size = (in_size[0] // patch_size, in_size[1] // patch_size)
        self.register_buffer("head_offsets", head_offsets.clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C_out, H/stride, W/stride)"""
        if tuple(x.shape[-2:]) != self.in_size:
            raise ValueError(
                f"this attention layer was converted for {self.in_size[0]}x{self.in_size[1]} feature maps, got "
                f"{x.shape[-2]}x{x.shape[-1]}; convert the network at the input size you run it at "
                f"(convert_network(..., img_size=...))")
        tokens = self.attn(image_to_tokens(x, self.patch_size))
        return tokens_to_image(tokens, self.out_patch_size, self.grid_size)

    def extra_repr(self) -> str:
        return f"in_size={self.in_size}, patch_size={self.patch_size}, out_patch_size={self.out_patch_size}"


class _Skip(Exception):
    """A convolution that is left as it is, with the reason."""


def _selected(name: str, layers: Optional[Sequence[str]]) -> bool:
    return layers is None or any(fnmatch.fnmatchcase(name, pattern) for pattern in layers)


def _requested_patch(patch_size: PatchSize, name: str) -> Union[str, int]:
    """The patch size asked for layer ``name``: a dict maps names or fnmatch patterns (first match wins), else
    'auto'."""
    if not isinstance(patch_size, dict):
        return patch_size
    if name in patch_size:
        return patch_size[name]
    return next((p for pattern, p in patch_size.items() if fnmatch.fnmatchcase(name, pattern)), "auto")


def _input_sizes(model: nn.Module, sample: torch.Tensor) -> Dict[str, List[Tuple[int, int]]]:
    """Feature-map size (H, W) each Conv2d of ``model`` sees on ``sample``, once per call."""
    sizes: Dict[str, List[Tuple[int, int]]] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            record = lambda m, args, name=name: sizes.setdefault(name, []).append(tuple(args[0].shape[-2:]))  # noqa: E731
            hooks.append(module.register_forward_pre_hook(record))
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(sample)
    except RuntimeError as e:  # e.g. an input smaller than a kernel: say which input, not just the op that failed
        raise ValueError(f"{type(model).__name__} cannot run on a sample input of shape {tuple(sample.shape)}: "
                         f"{e}; pass an img_size (--img-size) and in_chans the model accepts") from None
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return sizes


def _static_conv(conv: nn.Conv2d, in_size: Tuple[int, int]) -> nn.Conv2d:
    """``conv`` as a plain zero-padded ``nn.Conv2d`` computing the same outputs on inputs of ``in_size``.

    timm's ``Conv2dSame`` pads ``total // 2`` before and the rest after, computed from the input size. At stride 1
    that is PyTorch's ``padding='same'``. At stride s > 1 (input divisible by s) ``total = reach + 1 - s``: when it is
    even, symmetric padding ``total // 2`` reads the same pixels; when odd, a zero tap in front of the kernel and one
    more pixel of padding do (output ``u`` still reads ``s*u - total // 2 + dilation*a``), if dilation <= s.
    """
    if type(conv) is nn.Conv2d:
        return conv
    if type(conv) is not Conv2dSame:
        raise _Skip(f"{type(conv).__name__} is an nn.Conv2d subclass with its own forward; only nn.Conv2d and "
                    f"timm's Conv2dSame are converted")
    if conv.stride == (1, 1):
        pad, front = "same", (0, 0)
    else:
        total = [get_same_padding(in_size[a], conv.kernel_size[a], conv.stride[a], conv.dilation[a]) for a in (0, 1)]
        reach = [conv.dilation[a] * (conv.kernel_size[a] - 1) for a in (0, 1)]
        front = tuple(int(reach[a] + 1 - conv.stride[a] > 2 * (total[a] // 2)) for a in (0, 1))
        for a in (0, 1):
            if front[a] and conv.dilation[a] > conv.stride[a]:
                raise _Skip(f"Conv2dSame pads {total[a] // 2} before and {total[a] - total[a] // 2} after on a "
                            f"{in_size[0]}x{in_size[1]} map, which no zero padding matches at dilation "
                            f"{conv.dilation[a]} > stride {conv.stride[a]}")
        pad = tuple(total[a] // 2 + front[a] * conv.dilation[a] for a in (0, 1))
    kernel = (conv.kernel_size[0] + front[0], conv.kernel_size[1] + front[1])
    with torch.device("meta"):
        static = nn.Conv2d(conv.in_channels, conv.out_channels, kernel, conv.stride, pad, conv.dilation,
                           conv.groups, bias=conv.bias is not None)
    # the zero taps go first: tap a of the original kernel is tap a + front of this one
    static.weight = nn.Parameter(F.pad(conv.weight.detach(), (front[1], 0, front[0], 0)), requires_grad=False)
    static.bias = conv.bias
    return static


def _meta_conv(conv: nn.Conv2d) -> nn.Conv2d:
    with torch.device("meta"):
        return nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                         conv.dilation, conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode)


def _build(conv: nn.Conv2d, in_size: Tuple[int, int], P: int, kw: Dict[str, Any]) -> nn.Module:
    """The attention layer for ``conv`` on ``P x P`` patches of an ``in_size`` map; a short reason if impossible."""
    stride = conv.stride
    if conv.padding_mode not in ("zeros", "circular"):
        raise _Skip(f"padding_mode {conv.padding_mode} (zeros and circular are exact)")
    if P % stride[0] or P % stride[1]:
        s = stride[0] if stride[0] == stride[1] else stride
        raise _Skip(f"stride {s} does not divide P = {P}")
    if in_size[0] % P or in_size[1] % P:
        raise _Skip(f"feature map {in_size[0]}x{in_size[1]} not divisible by P = {P}")
    try:
        conv_geometry(conv, P)
    except ValueError as e:
        raise _Skip(str(e)) from e
    return conv_to_mhsa(conv, P, (in_size[0] // P, in_size[1] // P), **kw)


def _cost(conv: nn.Conv2d, in_size: Tuple[int, int], P: int, kw: Dict[str, Any]) -> Tuple[int, int]:
    """(FLOPs on one image, parameters) of the attention layer for ``P``, built on the meta device (no memory)."""
    attn = _build(_meta_conv(conv), in_size, P, kw)
    tokens = torch.empty(1, (in_size[0] // P) * (in_size[1] // P), P * P * conv.in_channels, device="meta")
    with FlopCounterMode(display=False) as counter:
        attn(tokens)
    return counter.get_total_flops(), sum(p.numel() for p in attn.parameters())


def _auto_candidates(conv: nn.Conv2d) -> List[int]:
    """P = stride (pixel tokens, K^2 heads at stride 1, Corollary 3) and the least multiple of the stride that the
    kernel's half-reach fits in (9 heads)."""
    base = math.lcm(*conv.stride)
    half_reach = max(math.ceil(d * (k - 1) / 2) for k, d in zip(conv.kernel_size, conv.dilation))
    return sorted({base, base * max(1, math.ceil(half_reach / base))})


def _choose_patch(conv: nn.Conv2d, in_size: Tuple[int, int], requested: Union[str, int],
                  kw: Dict[str, Any]) -> Tuple[int, int, int]:
    """(P, FLOPs, params): the requested P, or for 'auto' the valid candidate with the fewest FLOPs."""
    if requested == "auto":
        costs, reasons = {}, []
        for P in _auto_candidates(conv):
            try:
                costs[P] = _cost(conv, in_size, P, kw)
            except _Skip as e:
                reasons.append(str(e))
        if not costs:
            raise _Skip("; ".join(reasons))
        P = min(costs, key=lambda p: costs[p])
        return (P, *costs[P])
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
        raise ValueError(f"patch_size must be 'auto', a positive int or a dict of them per layer, got {requested!r}")
    return (requested, *_cost(conv, in_size, requested, kw))


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _layer_errors(model: nn.Module, originals: Dict[str, nn.Conv2d], sample: torch.Tensor) -> Dict[str, float]:
    """Per converted layer, max |attention - conv| / max |conv| on the inputs the twin itself feeds it."""
    errors, hooks = {}, []

    def check(module, args, out, name):
        ref = originals[name](args[0])
        errors[name] = ((out - ref).abs().max() / ref.abs().max().clamp_min(torch.finfo(ref.dtype).tiny)).item()

    for name in originals:
        hooks.append(model.get_submodule(name).register_forward_hook(
            lambda m, a, o, name=name: check(m, a, o, name)))
    try:
        with torch.no_grad():
            model.eval()(sample)
    finally:
        for h in hooks:
            h.remove()
    return errors


def convert_network(
        model: nn.Module,
        patch_size: PatchSize = "auto",
        layers: Union[None, str, Sequence[str]] = None,
        form: str = "paper",
        bias_strength: float = DEFAULT_BIAS_STRENGTH,
        qk_std: float = 0.0,
        strict: bool = False,
        img_size: Optional[IntOrPair] = None,
        in_chans: Optional[int] = None,
        sample_input: Optional[torch.Tensor] = None,
        verify: bool = True,
) -> Tuple[nn.Module, List[Dict[str, Any]]]:
    """Replace each selected ``nn.Conv2d`` of ``model`` by an exactly equivalent :class:`ConvAsAttention`.

    Args:
        model: any module; it is copied, not changed. Its dtype and device are kept.
        patch_size: ``'auto'`` (per layer the cheaper in FLOPs of P = stride, pixel tokens with K^2 heads, and
            the least P the kernel fits in, 9 heads), an int, or a dict from layer names / fnmatch patterns to
            either (unmatched layers: 'auto').
        layers: fnmatch pattern(s) on module names (e.g. ``"layer4.*"``, ``"stages.3.*"``); None: every Conv2d.
        form: the attention layer :func:`cmhsa.conv_to_mhsa` builds: ``'paper'`` (Theorem 1's RelPosMHSA),
            ``'factorized'`` (the same function, one value map per head) or ``'local'`` (the kernel's window).
        bias_strength, qk_std: as in :func:`cmhsa.conv_to_mhsa` (qk_std > 0 lets fine-tuning learn content).
        strict: raise ValueError on the first selected convolution that cannot be converted, instead of skipping.
        img_size, in_chans: the input size (and channels; default the first Conv2d's) of a random sample input that
            gives every convolution's feature-map size; or pass ``sample_input`` (B, C, H, W) itself.
        verify: measure each converted layer against its convolution on the sample (the table's ``error``).

    Returns:
        ``(new_model, table)``; ``table`` has one dict per selected Conv2d: ``name, kernel, stride, dilation,
        groups, in_size, P, heads, converted, reason`` ('' when converted), and for converted layers
        ``params, flops`` (attention layer, one image), ``conv_params, conv_flops`` and ``error``.
    """
    if (img_size is None) == (sample_input is None):
        raise ValueError("pass exactly one of img_size (with in_chans) or sample_input, to learn the feature-map "
                         "size of every convolution")
    check_form(form)  # up front: conv_to_mhsa's own check would only turn every layer into a skip
    layers = [layers] if isinstance(layers, str) else layers
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and _selected(n, layers)}
    for pattern in layers or []:
        if not any(fnmatch.fnmatchcase(n, pattern) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)):
            names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
            raise ValueError(f"layers pattern {pattern!r} matches no Conv2d of {type(model).__name__}; its "
                             f"convolutions are named like {names[:3]} ... {names[-2:]}")
    kw = dict(bias_strength=bias_strength, qk_std=qk_std, form=form)
    if sample_input is None:
        H, W = to_pair(img_size, "img_size", minimum=1)
        chans = in_chans or next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels
        generator = torch.Generator().manual_seed(0)
        sample_input = torch.randn(1, chans, H, W, generator=generator)
    param = next(model.parameters(), None)
    sample_input = sample_input.to(param) if param is not None else sample_input
    sizes = _input_sizes(model, sample_input)

    model = copy.deepcopy(model)
    table, originals = [], {}
    for name in convs:
        conv = model.get_submodule(name)
        row = {"name": name, "kernel": tuple(conv.kernel_size), "stride": tuple(conv.stride),
               "dilation": tuple(conv.dilation), "groups": conv.groups, "in_size": None, "P": None, "heads": None,
               "converted": False, "reason": ""}
        try:
            seen = set(sizes.get(name, []))
            if not seen:
                raise _Skip("not run by the forward pass on the sample input")
            if len(seen) > 1:
                raise _Skip(f"called on several feature-map sizes {sorted(seen)}")
            in_size = row["in_size"] = seen.pop()
            static = _static_conv(conv, in_size)
            P, flops, params = _choose_patch(static, in_size, _requested_patch(patch_size, name), kw)
            attn = _build(static, in_size, P, kw)
        except _Skip as e:
            if strict:
                raise ValueError(f"cannot convert {name} ({type(conv).__name__} {row['kernel']}, stride "
                                 f"{row['stride']}): {e}; select other layers or pass strict=False") from None
            row["reason"] = str(e)
            table.append(row)
            continue
        geometry = conv_geometry(static, P)
        offsets = geometry.offsets()
        grid = (in_size[0] // P, in_size[1] // P)
        offsets = offsets[(offsets[:, 0].abs() < grid[0]) & (offsets[:, 1].abs() < grid[1])]
        _set_module(model, name, ConvAsAttention(attn, in_size, P, static.stride, offsets))
        originals[name] = conv
        out_pixels = (in_size[0] // conv.stride[0]) * (in_size[1] // conv.stride[1])
        row.update(P=P, heads=getattr(attn, "num_heads", None), converted=True, params=params, flops=flops,
                   conv_params=sum(p.numel() for p in conv.parameters()),
                   conv_flops=2 * conv.weight.numel() * out_pixels)
        table.append(row)
    if verify and originals:
        for name, error in _layer_errors(model, originals, sample_input).items():
            next(r for r in table if r["name"] == name)["error"] = error
    return model, table


def _conv_keys(layer: ConvAsAttention) -> torch.Tensor:
    """(n_heads_used, N): per head and query the key the convolution reads, the null key (index N) off the grid."""
    gh, gw = layer.grid_size
    ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    ky = ys.flatten()[None] + layer.head_offsets[:, :1].cpu()
    kx = xs.flatten()[None] + layer.head_offsets[:, 1:].cpu()
    inside = (ky >= 0) & (ky < gh) & (kx >= 0) & (kx < gw)
    return torch.where(inside, ky * gw + kx, gh * gw)


@torch.no_grad()
def conv_attention_mass(model: nn.Module, images: torch.Tensor) -> Dict[str, float]:
    """Per converted layer with a global attention form (paper or factorized, zero padding, null key), the mean
    attention weight each head puts on the key its convolution reads (the neighbour at its offset, or the null key
    where that falls off the grid), over images, queries and heads; 1 at conversion, lower as fine-tuning moves
    attention away from the convolution."""
    layers = {n: m for n, m in model.named_modules()
              if isinstance(m, ConvAsAttention) and isinstance(m.attn, RelPosAttention) and m.attn.null_key
              and not m.attn.circular}
    inputs: Dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: inputs.__setitem__(n, args[0]))
             for n, m in layers.items()]
    was_training = model.training
    try:
        model.eval()(images)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    mass = {}
    for name, layer in layers.items():
        probs = layer.attn.attention_probs(image_to_tokens(inputs[name], layer.patch_size))  # (B, H, N, N + 1)
        keys = _conv_keys(layer).to(probs.device)  # (h, N)
        h = keys.shape[0]
        picked = probs[:, :h].gather(-1, keys[None, :, :, None].expand(probs.shape[0], -1, -1, 1))
        mass[name] = picked.mean().item()
    return mass


def format_table(table: List[Dict[str, Any]]) -> str:
    """The per-layer table as markdown."""
    pair = lambda v: "x".join(map(str, v)) if v else ""  # noqa: E731
    lines = ["| layer | kernel | stride | dilation | groups | map | P | heads | converted | error or reason |",
             "| --- | --- | --- | --- | ---: | --- | ---: | ---: | --- | --- |"]
    for r in table:
        note = f"{r['error']:.1e}" if r.get("error") is not None else r["reason"]
        lines.append(f"| {r['name']} | {pair(r['kernel'])} | {pair(r['stride'])} | {pair(r['dilation'])} | "
                     f"{r['groups']} | {pair(r['in_size'])} | {r['P'] or ''} | {r['heads'] or ''} | "
                     f"{'yes' if r['converted'] else 'no'} | {note} |")
    done = sum(r["converted"] for r in table)
    lines.append(f"\n{done} of {len(table)} selected convolutions converted")
    return "\n".join(lines)


_TIMM_FACTORY_ARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


@register_model
def attention_twin(pretrained: bool = False, cnn: str = "", cnn_kwargs: Optional[Dict[str, Any]] = None,
                   img_size: IntOrPair = 224, patch_size: PatchSize = "auto",
                   layers: Union[None, str, Sequence[str]] = None, form: str = "paper",
                   bias_strength: float = DEFAULT_BIAS_STRENGTH, qk_std: float = 0.0,
                   num_classes: Optional[int] = None, in_chans: Optional[int] = None, **kwargs) -> nn.Module:
    """The attention twin of timm model ``cnn`` (random weights: load a checkpoint into it), converted at
    ``img_size`` with these :func:`convert_network` settings. ``cmhsa convert-net`` writes the exact settings
    (per-layer P, converted layer names), so the rebuilt structure matches its weights."""
    unknown = sorted(set(kwargs) - set(_TIMM_FACTORY_ARGS))
    if unknown:
        raise ValueError(f"attention_twin got unknown arguments {unknown}")
    if pretrained:
        raise ValueError("attention_twin has no pretrained weights; convert a trained CNN with `cmhsa convert-net`")
    if not cnn:
        raise ValueError("attention_twin needs cnn=<timm model name>, e.g. cnn='resnet18'")
    cnn_kwargs = dict(cnn_kwargs or {})
    for key, value in (("num_classes", num_classes), ("in_chans", in_chans)):
        if value is not None:
            if cnn_kwargs.get(key, value) != value:
                raise ValueError(f"{key}={value} disagrees with cnn_kwargs[{key!r}]={cnn_kwargs[key]}")
            cnn_kwargs[key] = value
    base = timm.create_model(cnn, **cnn_kwargs)
    twin, _ = convert_network(base, patch_size, layers, form=form, bias_strength=bias_strength, qk_std=qk_std,
                              strict=True, img_size=img_size, in_chans=cnn_kwargs.get("in_chans"), verify=False)
    return twin
