"""CMHSA: a ViT whose token mixer is a convolution (phase 1) or, after exact conversion, a RelPosMHSA (phase 2).

Paper §4: pre-LN blocks, no class token, global average pooling -> norm -> linear head. A token is a patch of a
pixel map (``D = P*P*c``), so the convolution mixer acts on the pixel map the tokens form and converts to MHSA by
Theorem 1. ``embed='identity'`` is the paper (``c = C_in``, patch projection initialised to, and in phase 1 fixed
at, the identity); ``embed='pixel'`` lifts each pixel ``C_in -> pixel_dim`` with a 1x1 conv before patchify, so small
images get width without upsampling. ``anchor='aps'`` starts the patch grid at an adaptively chosen polyphase
offset and ``padding_mode='circular'`` makes the mixers circular: together the model is invariant to circular shifts.
"""
from __future__ import annotations

import difflib
import inspect
from dataclasses import replace
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn
from timm.layers import DropPath, Mlp, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from .anchor import PolyphaseAnchor
from .attention import FactorizedRelPosMHSA, RelPosMHSA
from .convert import DEFAULT_BIAS_STRENGTH, FORMS, conv_to_mhsa, local_window, required_heads, same_padding_geometry
from .local_attention import LocalRelPosMHSA
from .tied import TiedRelPosMHSA
from .tokens import image_to_tokens, to_pair, tokens_to_image

__all__ = ["CMHSA", "ConvMixer", "PatchEmbed", "Block", "convert_model", "transfer_error", "with_img_size",
           "continued_parameter", "scale_position_biases_", "FORM_TAGS", "MODEL_CONFIGS", "SEPARATE_QK_FORMS"]

# the attention forms whose queries and keys have their own head size, qk_dim (the others use head_dim)
SEPARATE_QK_FORMS = ("factorized", "tied")


class PatchEmbed(nn.Module):
    """Image (B, C_in, H, W) -> tokens (B, N, P*P*c), optionally after a per-pixel lift C_in -> c, then a linear
    projection initialised to the identity (frozen when ``fix_proj``). ``anchor='aps'`` first rolls each image to
    its adaptive polyphase anchor (:class:`cmhsa.anchor.PolyphaseAnchor`)."""

    def __init__(self, img_size, patch_size, in_chans: int, embed: str = "identity", pixel_dim: Optional[int] = None,
                 fix_proj: bool = True, anchor: Optional[str] = None):
        super().__init__()
        if embed not in ("identity", "pixel"):
            raise ValueError(f"embed must be 'identity' or 'pixel', got {embed!r}")
        if anchor not in (None, "aps"):
            raise ValueError(f"anchor must be None (fixed patch grid) or 'aps' (adaptive polyphase anchoring), "
                             f"got {anchor!r}")
        self.img_size = to_pair(img_size, "img_size")
        self.patch_size = to_pair(patch_size, "patch_size")
        for a in (0, 1):
            if self.img_size[a] % self.patch_size[a]:
                fits = [self.img_size[a] // self.patch_size[a] * self.patch_size[a],
                        (self.img_size[a] // self.patch_size[a] + 1) * self.patch_size[a]]
                raise ValueError(f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}: use an "
                                 f"img_size that is a multiple of it (e.g. {' or '.join(map(str, filter(None, fits)))}; "
                                 f"data.img_size resizes or pads the images to it) or another patch_size")
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.anchor = PolyphaseAnchor(self.patch_size) if anchor == "aps" else nn.Identity()
        if embed == "pixel":
            if not pixel_dim:
                raise ValueError("embed='pixel' needs pixel_dim (channels per pixel after the 1x1 lift)")
            self.lift = nn.Conv2d(in_chans, pixel_dim, 1)
            self.pixel_dim = pixel_dim
        else:
            self.lift = nn.Identity()
            self.pixel_dim = in_chans
        self.embed_dim = self.patch_size[0] * self.patch_size[1] * self.pixel_dim
        self.proj = nn.Linear(self.embed_dim, self.embed_dim)
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(self.embed_dim))
            self.proj.bias.zero_()
        self.proj.requires_grad_(not fix_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, N, D)"""
        if x.shape[-2:] != self.img_size:
            raise ValueError(f"input is {tuple(x.shape[-2:])} but the model was built for img_size {self.img_size}")
        return self.proj(image_to_tokens(self.lift(self.anchor(x)), self.patch_size))


class ConvMixer(nn.Module):
    """Tokens (B, N, P*P*c) -> the pixel map (B, c, H, W) they form -> 'same'-padded KxK conv -> tokens.
    ``padding_mode`` is the conv's: 'zeros' or 'circular'."""

    def __init__(self, pixel_dim: int, kernel_size: int, patch_size, grid_size, padding_mode: str = "zeros"):
        super().__init__()
        self.patch_size = to_pair(patch_size, "patch_size")
        self.grid_size = to_pair(grid_size, "grid_size")
        self.conv = nn.Conv2d(pixel_dim, pixel_dim, kernel_size, padding="same", padding_mode=padding_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, N, D)"""
        x = tokens_to_image(x, self.patch_size, self.grid_size)
        return image_to_tokens(self.conv(x), self.patch_size)


class Block(nn.Module):
    """Pre-LN block: ``x + mixer(LN(x))``, then ``x + FFN(LN(x))``, with stochastic depth."""

    def __init__(self, dim: int, mixer: nn.Module, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.mixer = mixer
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.mixer(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class CMHSA(nn.Module):
    """The CMHSA model of paper §4, in its convolution phase (``mixer='conv'``) or attention phase (``'attn'``).

    Input (B, in_chans, img_size, img_size) -> logits (B, num_classes). ``num_heads=None`` uses the heads the
    construction needs for ``kernel_size`` (9 when ``kernel_size <= 2*patch_size + 1``). The attention phase's
    ``form`` is ``'paper'`` (global :class:`RelPosMHSA`, head size ``head_dim``, default the token width ``D`` as in
    the paper), ``'factorized'`` (global :class:`FactorizedRelPosMHSA`, one value map per head, Q/K head size
    ``qk_dim``), ``'tied'`` (global :class:`~cmhsa.tied.TiedRelPosMHSA`: the factorized layer whose value maps are
    one ``kernel_size`` conv kernel's blocks, so training keeps the filters a convolution) or ``'local'``
    (:class:`LocalRelPosMHSA` with the paper's heads over the window of patch offsets the ``kernel_size`` conv
    reaches: no parameter depends on the grid, see :func:`with_img_size`).
    ``padding_mode='circular'`` pads the conv mixers circularly and makes the attention's relative offsets wrap
    around the grid (what the conversion of a circular conv gives), in every form; ``anchor='aps'`` anchors the
    patch grid adaptively (:class:`PatchEmbed`). ``attn_init='conv_pattern'`` starts an attention model's position
    biases where the conversion of a ``kernel_size`` conv puts them (``bias_strength`` on each head's offset, the
    null key at half of it) with every weight random: the attention structure of a converted CNN without its
    filters, a control for what phase 1 contributes.
    """

    def __init__(
            self,
            img_size=224,
            patch_size=16,
            in_chans: int = 3,
            num_classes: int = 100,
            embed: str = "identity",
            pixel_dim: Optional[int] = None,
            depth: int = 6,
            mixer: str = "conv",
            kernel_size: int = 5,
            num_heads: Optional[int] = None,
            head_dim: Optional[int] = None,
            mlp_ratio: float = 4.0,
            drop_rate: float = 0.0,
            proj_drop_rate: float = 0.0,
            attn_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            bias_strength: float = DEFAULT_BIAS_STRENGTH,
            null_key: bool = True,
            fix_embed: Optional[bool] = None,
            form: str = "paper",
            qk_dim: Optional[int] = None,
            anchor: Optional[str] = None,
            padding_mode: str = "zeros",
            attn_init: str = "random",
            **kwargs,
    ):
        super().__init__()
        if kwargs:
            known = [n for n in inspect.signature(CMHSA.__init__).parameters if n not in ("self", "kwargs")]
            hints = {k: difflib.get_close_matches(k, known, n=1) for k in sorted(kwargs)}
            hint = "; ".join(f"{k!r}: did you mean {m[0]!r}?" for k, m in hints.items() if m)
            raise TypeError(f"CMHSA got unexpected arguments {sorted(kwargs)}" + (f" ({hint})" if hint else ""))
        if mixer not in ("conv", "attn"):
            raise ValueError(f"mixer must be 'conv' (phase 1) or 'attn' (phase 2), got {mixer!r}")
        if form not in FORMS:
            raise ValueError(f"form must be one of {sorted(FORMS)}, got {form!r}")
        if form not in SEPARATE_QK_FORMS and qk_dim is not None:
            raise ValueError(f"qk_dim={qk_dim} applies to form {' and '.join(map(repr, SEPARATE_QK_FORMS))} "
                             f"only; the {form} form's Q/K size is head_dim")
        if form in SEPARATE_QK_FORMS and head_dim is not None:
            raise ValueError(f"head_dim={head_dim} applies to form='paper' and 'local'; the {form} form's Q/K "
                             f"size is qk_dim")
        if padding_mode not in ("zeros", "circular"):
            raise ValueError(f"padding_mode must be 'zeros' or 'circular' (the padding the conv mixers use and the "
                             f"attention mixers reproduce), got {padding_mode!r}")
        if attn_init not in ("random", "conv_pattern") or (attn_init == "conv_pattern" and mixer != "attn"):
            raise ValueError(f"attn_init must be 'random', or 'conv_pattern' for an attention model (mixer='attn'), "
                             f"got {attn_init!r} with mixer={mixer!r}")
        # the paper fixes the patch projection to the identity in the convolution phase only
        fix_embed = (mixer == "conv") if fix_embed is None else fix_embed
        self.config: Dict[str, Any] = dict(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes, embed=embed,
            pixel_dim=pixel_dim, depth=depth, mixer=mixer, kernel_size=kernel_size, num_heads=num_heads,
            head_dim=head_dim, mlp_ratio=mlp_ratio, drop_rate=drop_rate, proj_drop_rate=proj_drop_rate,
            attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate, bias_strength=bias_strength,
            null_key=null_key, fix_embed=fix_embed, form=form, qk_dim=qk_dim, anchor=anchor,
            padding_mode=padding_mode, attn_init=attn_init,
        )
        self.num_classes = num_classes
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed, pixel_dim, fix_proj=fix_embed,
                                      anchor=anchor)
        dim = self.num_features = self.embed_dim = self.patch_embed.embed_dim
        grid, patch = self.patch_embed.grid_size, self.patch_embed.patch_size
        self.num_heads = num_heads or required_heads(kernel_size, patch)
        self.head_dim = head_dim or dim

        def make_mixer() -> nn.Module:
            if mixer == "conv":
                return ConvMixer(self.patch_embed.pixel_dim, kernel_size, patch, grid, padding_mode)
            circular = padding_mode == "circular"
            if form == "tied":
                geometry = replace(same_padding_geometry(kernel_size, patch), circular=circular)
                return TiedRelPosMHSA(self.patch_embed.pixel_dim, self.patch_embed.pixel_dim, geometry, grid,
                                      self.num_heads, qk_dim=qk_dim, null_key=null_key, attn_drop=attn_drop_rate,
                                      proj_drop=proj_drop_rate)
            if form == "factorized":
                return FactorizedRelPosMHSA(dim, self.num_heads, grid, qk_dim=qk_dim, null_key=null_key,
                                            circular=circular, attn_drop=attn_drop_rate, proj_drop=proj_drop_rate)
            if form == "local":
                window = local_window(same_padding_geometry(kernel_size, patch).offsets())
                return LocalRelPosMHSA(dim, self.num_heads, self.head_dim, window, grid, null_key=null_key,
                                       circular=circular, attn_drop=attn_drop_rate, proj_drop=proj_drop_rate)
            return RelPosMHSA(dim, self.num_heads, self.head_dim, grid, null_key=null_key,
                              circular=circular, attn_drop=attn_drop_rate, proj_drop=proj_drop_rate)

        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # stochastic depth rule
        self.blocks = nn.Sequential(*[
            Block(dim, make_mixer(), mlp_ratio, drop_path=dpr[i], proj_drop=proj_drop_rate) for i in range(depth)
        ])
        self.fc_norm = nn.LayerNorm(dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)
        if attn_init == "conv_pattern":
            self._init_conv_pattern()

    def _init_weights(self, m: nn.Module) -> None:
        # timm's ViT init for linear layers; the identity patch projection is left as it is
        if isinstance(m, nn.Linear) and m is not self.patch_embed.proj:
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.no_grad()
    def _init_conv_pattern(self) -> None:
        # the biases conv_to_mhsa gives any conv of this geometry: they depend on its offsets, not on its weights
        c = self.config
        conv = nn.Conv2d(self.patch_embed.pixel_dim, self.patch_embed.pixel_dim, c["kernel_size"], padding="same",
                         padding_mode=c["padding_mode"])
        pattern = conv_to_mhsa(conv, self.patch_embed.patch_size, self.patch_embed.grid_size, c["bias_strength"],
                               c["null_key"], num_heads=self.num_heads, form=c["form"], qk_dim=c["qk_dim"])
        for block in self.blocks:
            block.mixer.rel_pos_bias.copy_(pattern.rel_pos_bias)
            if c["null_key"]:
                block.mixer.null_bias.copy_(pattern.null_bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {n for n, _ in self.named_parameters() if n.endswith(("rel_pos_bias", "null_bias"))}

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.config["num_classes"] = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> tokens (B, N, D)"""
        return self.blocks(self.patch_embed(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """tokens (B, N, D) -> logits (B, num_classes), pooled features if ``pre_logits``"""
        x = self.head_drop(self.fc_norm(x.mean(dim=1)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@torch.no_grad()
def convert_model(conv_model: CMHSA, bias_strength: float = DEFAULT_BIAS_STRENGTH, null_key: bool = True,
                  fix_embed: bool = False, qk_std: float = 0.0, form: str = "paper", qk_dim: Optional[int] = None,
                  **overrides) -> CMHSA:
    """Phase 1 -> phase 2: a CMHSA attention model computing what ``conv_model`` computes.

    Every weight outside the token mixers is copied; each conv mixer becomes an attention layer of ``form``
    (``'paper'``, ``'factorized'`` or ``'tied'`` with Q/K head size ``qk_dim``, or ``'local'``) by
    :func:`conv_to_mhsa`. The model's ``anchor`` and ``padding_mode`` carry over (a circular conv becomes circular
    attention), so they cannot be overridden. ``overrides`` change training-only settings of the new model (e.g. ``drop_path_rate``); the patch
    projection is trainable in phase 2 unless ``fix_embed``. ``qk_std`` starts W_Q, W_K small and random rather than
    at the stationary point 0 (see :func:`conv_to_mhsa`).
    """
    if not isinstance(conv_model, CMHSA) or conv_model.config["mixer"] != "conv":
        raise ValueError("convert_model needs a CMHSA model in its convolution phase (mixer='conv')")
    forbidden = {"img_size", "patch_size", "in_chans", "embed", "pixel_dim", "depth", "kernel_size", "mlp_ratio",
                 "num_classes", "head_dim", "mixer", "form", "qk_dim", "anchor", "padding_mode",
                 "attn_init"} & set(overrides)
    if forbidden:
        raise ValueError(f"cannot change {sorted(forbidden)} when converting: they fix the function being copied")
    config = dict(conv_model.config, mixer="attn", bias_strength=bias_strength, null_key=null_key,
                  fix_embed=fix_embed, form=form, qk_dim=qk_dim, **overrides)
    if form in SEPARATE_QK_FORMS:
        config["head_dim"] = None
    with torch.device("meta"):
        attn_model = CMHSA(**config)
    attn_model = attn_model.to_empty(device=_device_of(conv_model)).to(_dtype_of(conv_model))
    state = {k: v for k, v in conv_model.state_dict().items() if ".mixer." not in k}
    missing, unexpected = attn_model.load_state_dict(state, strict=False)
    assert not unexpected and all(".mixer." in k for k in missing), (missing, unexpected)
    patch, grid = attn_model.patch_embed.patch_size, attn_model.patch_embed.grid_size
    for conv_block, attn_block in zip(conv_model.blocks, attn_model.blocks):
        attn_block.mixer = conv_to_mhsa(conv_block.mixer.conv, patch, grid, bias_strength=bias_strength,
                                        null_key=null_key, num_heads=attn_model.num_heads, qk_std=qk_std,
                                        form=form, qk_dim=qk_dim)
        attn_block.mixer.attn_drop = config["attn_drop_rate"]
        attn_block.mixer.proj_drop.p = config["proj_drop_rate"]
    attn_model.patch_embed.proj.requires_grad_(not fix_embed)
    attn_model.train(conv_model.training)
    return attn_model


# a tied mixer's parameters that are its conv's, under a new name (every other kept parameter keeps its name)
_TIED_FROM_CONV = {".mixer.value.kernel": ".mixer.conv.weight", ".mixer.value.kernel_bias": ".mixer.conv.bias"}


def continued_parameter(name: str) -> str:
    """The name, in the convolution model, of the parameter that parameter ``name`` of its converted model
    continues: the same name outside the mixers, and the conv's weight and bias for a tied mixer's kernel and bias.
    (Other mixer parameters continue nothing: the names do not match.)"""
    for new, old in _TIED_FROM_CONV.items():
        if name.endswith(new):
            return name[:-len(new)] + old
    return name


@torch.no_grad()
def scale_position_biases_(model: nn.Module, factor: float) -> int:
    """Multiply every attention layer's relative position biases and null-key bias by ``factor`` in place: a model
    converted with bias strength beta becomes the one converted with ``factor * beta`` (the Q/K logits untouched).
    Returns how many layers it scaled."""
    layers = [m for m in model.modules() if isinstance(getattr(m, "rel_pos_bias", None), nn.Parameter)]
    for layer in layers:
        layer.rel_pos_bias.mul_(factor)
        if layer.null_bias is not None:
            layer.null_bias.mul_(factor)
    return len(layers)


@torch.no_grad()
def with_img_size(model: CMHSA, img_size) -> CMHSA:
    """The same model, weights shared by value, built for another ``img_size`` (same patch size).

    Possible when no parameter depends on the patch grid: the convolution phase and the ``form='local'`` attention.
    The global attention's bias table has one entry per grid offset, so it raises ``ValueError``.
    """
    if model.config["mixer"] == "attn" and model.config.get("form", "paper") != "local":
        raise ValueError(f"the global attention (form={model.config['form']!r}) has a bias table sized by the patch "
                         f"grid, so it runs at its img_size only; convert with form='local' to run at other sizes")
    with torch.device("meta"):
        twin = CMHSA(**dict(model.config, img_size=img_size))
    twin = twin.to_empty(device=_device_of(model)).to(_dtype_of(model))
    twin.load_state_dict(model.state_dict())
    for mine, theirs in zip(twin.parameters(), model.parameters()):
        mine.requires_grad_(theirs.requires_grad)
    return twin.train(model.training)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _dtype_of(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


@torch.no_grad()
def transfer_error(conv_model: CMHSA, attn_model: CMHSA, x: torch.Tensor) -> Dict[str, Any]:
    """How far the converted model is from the original on input ``x``: per-layer max |error| of the mixer outputs
    (each fed the conv model's own mixer input) and max |error| of the logits, absolute and relative."""
    conv_model.eval()
    attn_model.eval()
    inputs: List[torch.Tensor] = []
    hooks = [b.mixer.register_forward_hook(lambda m, a, out: inputs.append((a[0], out)))
             for b in conv_model.blocks]
    try:
        ref_logits = conv_model(x)
    finally:
        for h in hooks:
            h.remove()
    layers = [(attn_block.mixer(a) - out).abs().max().item()
              for attn_block, (a, out) in zip(attn_model.blocks, inputs)]
    logits = attn_model(x)
    err = (logits - ref_logits).abs().max().item()
    return {"layer_errors": layers, "logits_error": err,
            "logits_relative_error": err / max(ref_logits.abs().max().item(), 1e-30)}


# --- timm registration ---------------------------------------------------------------------------------------------

def _cfg(**kwargs) -> Dict[str, Any]:
    return {"num_classes": 100, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 1.0,
            "interpolation": "bicubic", "mean": (0.5071, 0.4865, 0.4409), "std": (0.2673, 0.2564, 0.2762),
            "first_conv": "patch_embed.proj", "classifier": "head", **kwargs}


# name -> model arguments; "paper" sizes follow §4 (224 px, P = 16, D = 768, 6 layers, 9 heads of 768, FFN 3072),
# "tiny" sizes are for 28-32 px grey or colour images on a CPU
MODEL_CONFIGS: Dict[str, Dict[str, Any]] = {}
# the attention phase's name tag per form ("conv" is phase 1)
FORM_TAGS: Dict[str, str] = {"paper": "attn", "factorized": "fattn", "local": "lattn"}
_PHASES = {"conv": dict(mixer="conv"), **{tag: dict(mixer="attn", form=form) for form, tag in FORM_TAGS.items()}}
for _k in (3, 5):
    for _kind, _mixer in _PHASES.items():
        MODEL_CONFIGS[f"cmhsa{_k}_{_kind}_224"] = dict(
            img_size=224, patch_size=16, in_chans=3, num_classes=100, embed="identity", depth=6, **_mixer,
            kernel_size=_k, num_heads=9, mlp_ratio=4.0)
        MODEL_CONFIGS[f"cmhsa{_k}_{_kind}_tiny"] = dict(
            img_size=28, patch_size=4, in_chans=1, num_classes=10, embed="pixel", pixel_dim=8, depth=6,
            **_mixer, kernel_size=_k, num_heads=9, mlp_ratio=2.0)


def _create(name: str, pretrained: bool = False, **kwargs) -> CMHSA:
    if pretrained:
        raise ValueError(f"{name}: no pretrained weights are published; train one with `cmhsa pipeline`")
    return build_model_with_cfg(CMHSA, name, pretrained, **{**MODEL_CONFIGS[name], **kwargs})


default_cfgs = generate_default_cfgs({
    name: _cfg(num_classes=cfg["num_classes"], input_size=(cfg["in_chans"], cfg["img_size"], cfg["img_size"]),
               **({} if cfg["img_size"] == 224 else {"mean": (0.2860,), "std": (0.3530,)}))
    for name, cfg in MODEL_CONFIGS.items()
})


def _register(name: str) -> None:
    def fn(pretrained: bool = False, **kwargs) -> CMHSA:
        return _create(name, pretrained, **kwargs)
    fn.__name__ = name
    fn.__qualname__ = name
    fn.__doc__ = f"CMHSA '{name}': {MODEL_CONFIGS[name]}"
    fn.__module__ = __name__
    register_model(fn)


for _name in MODEL_CONFIGS:
    _register(_name)
