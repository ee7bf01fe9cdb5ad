"""Remaining convolution: how much of the Theorem 1 convolution a CMHSA attention layer still is.

Attention mass on each head's conversion offset, positional vs content logits, and the relative error of the best
projection of the layer back onto a KxK convolution; for one model or over a pipeline run's phase-2 checkpoints.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from ..attention import RelPosAttention  # noqa: E402
from ..checkpoint import MODEL_FILE, STATE_FILE, read_checkpoint_info  # noqa: E402
from ..config import load_config  # noqa: E402
from ..convert import DEFAULT_BIAS_STRENGTH, ConvGeometry, conv_blocks, same_padding_geometry  # noqa: E402
from ..models import CMHSA, convert_model  # noqa: E402
from ..pipeline import convert_settings, load_model  # noqa: E402
from ..rundir import RunDir  # noqa: E402
from ._common import Data, _image_batches, _run_capturing, _save  # noqa: E402
from ._data import _materialise, _model_in_chans, _val_loader  # noqa: E402

__all__ = ["offset_attention", "conv_projection", "remaining_convolution", "remaining_convolution_over_checkpoints",
           "plot_remaining_convolution"]


def _cmhsa_attention(model: nn.Module) -> CMHSA:
    if not isinstance(model, CMHSA) or model.config["mixer"] != "attn":
        kind = (f"a CMHSA {model.config['mixer']}-phase model" if isinstance(model, CMHSA)
                else type(model).__name__)
        raise ValueError(f"remaining_convolution needs a CMHSA attention-phase model (RelPosMHSA or "
                         f"FactorizedRelPosMHSA mixers), got {kind}; convert a phase-1 model first with "
                         f"cmhsa.convert_model")
    if model.config.get("form", "paper") == "local":
        raise ValueError("remaining_convolution reads the global attention's bias table; this model's attention is "
                         "form='local'; convert with form='paper' or 'factorized'")
    return model


def _geometry(model: CMHSA) -> ConvGeometry:
    # CMHSA's conv mixers are stride-1, dilation-1, zero-'same'-padded kernel_size convs on the pixel map
    return same_padding_geometry(model.config["kernel_size"], model.patch_embed.patch_size)


def _geometry_offsets(geometry: ConvGeometry, grid: Tuple[int, int]) -> torch.Tensor:
    """Offsets (n, 2) the conversion gives heads 0..n-1 (conv_to_mhsa keeps those inside the grid, in order)."""
    offsets = geometry.offsets()
    inside = (offsets[:, 0].abs() < grid[0]) & (offsets[:, 1].abs() < grid[1])
    return offsets[inside]


def _decode_offset(index: torch.Tensor, grid: Tuple[int, int], circular: bool = False) -> torch.Tensor:
    gh, gw = grid
    if circular:  # a gh*gw table of offsets modulo the grid: report the one nearest to 0
        return torch.stack([(index // gw + gh // 2) % gh - gh // 2, (index % gw + gw // 2) % gw - gw // 2], dim=-1)
    return torch.stack([index // (2 * gw - 1) - (gh - 1), index % (2 * gw - 1) - (gw - 1)], dim=-1)


def _head_offsets(layer: RelPosAttention, offsets: Any, geometry: ConvGeometry, i: int) -> List[Optional[Tuple[int, int]]]:
    """Per head its reference offset (dy, dx), or None for heads that own none (inert padding heads)."""
    H = layer.num_heads
    if isinstance(offsets, str):
        if offsets == "geometry":
            ref = _geometry_offsets(geometry, layer.grid_size)[:H]
        elif offsets == "argmax":
            ref = _decode_offset(layer.rel_pos_bias.detach().argmax(dim=1).cpu(), layer.grid_size,
                                 layer.circular)
        else:
            raise ValueError(f"offsets must be 'geometry', 'argmax', an (H, 2) tensor or a list of them per layer, "
                             f"got {offsets!r}")
    else:
        ref = offsets[i] if isinstance(offsets, (list, tuple)) else offsets
        ref = torch.as_tensor(ref).reshape(-1, 2)
    heads: List[Optional[Tuple[int, int]]] = [tuple(int(v) for v in ref[h]) if h < len(ref) else None
                                              for h in range(H)]
    return heads


def offset_attention(layer: RelPosAttention, attn: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention summed per head and relative offset: for ``attn`` (B, H, N, N[+1]) (null column ignored)
    returns ``sums`` (H, n_table) and ``counts`` (n_table,) of (image, query) pairs whose key at that offset
    exists, indexed like ``layer.rel_pos_bias``. ``sums / counts`` is a head's mean attention on an offset."""
    N = layer.rel_pos_index.shape[0]
    attn = attn[..., :N].double().cpu()
    B, H = attn.shape[:2]
    n_table = layer.rel_pos_bias.shape[1]
    index = layer.rel_pos_index.flatten().cpu()
    sums = torch.zeros(H, n_table, dtype=torch.float64).index_add_(1, index, attn.sum(0).reshape(H, N * N))
    counts = torch.bincount(index, minlength=n_table).double() * B
    return sums, counts


def _conv_index_map(geometry: ConvGeometry, in_chans: int, out_chans: int,
                    grid: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Offsets (n, 2) the kernel reaches inside the grid and, per block entry (n, D, D_out), the flat index of the
    kernel weight it holds (-1: none). Every entry of ``T_d(W)`` is one weight or 0 (a tap is unique given the
    offset and the input/output pixels), so ``T`` is a 0/1 matrix with disjoint column supports."""
    K = geometry.kernel_size
    numel = out_chans * in_chans * K[0] * K[1]
    # kernel holding its own (flat index + 1): conv_blocks then writes each entry's source index (exact below 2^53)
    probe = torch.arange(1, numel + 1, dtype=torch.float64).reshape(out_chans, in_chans, *K)
    offsets, blocks = conv_blocks(probe, geometry)
    inside = (offsets[:, 0].abs() < grid[0]) & (offsets[:, 1].abs() < grid[1])
    return offsets[inside], blocks[inside].round().long() - 1


@torch.no_grad()
def conv_projection(layer: RelPosAttention, mean_attention: torch.Tensor, geometry: ConvGeometry,
                    in_chans: int, out_chans: Optional[int] = None) -> Tuple[torch.Tensor, float]:
    """Best KxK convolution for an attention layer, and its relative error.

    Treating head h's attention on offset d as its mean ``abar_h(d)`` (``mean_attention`` (H, n_table), indexed
    like ``rel_pos_bias``), the layer maps neighbour ``X_{q+d}`` to ``y_q`` through
    ``M_d = sum_h abar_h(d) W_V^h W_O^h`` (D x D_out). The kernel ``W`` minimising ``sum_d ||M_d - T_d(W)||_F^2``
    over *all* grid offsets (``T_d = 0`` where the kernel does not reach, see :func:`cmhsa.convert.conv_blocks`)
    is solved in closed form: each ``T_d`` entry is one kernel weight, so the least-squares weight is the mean of
    the ``M`` entries it occupies. Biases (value bias, ``b_O``) are affine and left out.

    Returns ``(kernel (out_chans, in_chans, Kh, Kw) float64, ||M - T(W*)|| / ||M||)``.
    """
    out_chans = out_chans or in_chans
    D = layer.dim
    P, Q = geometry.patch_size, geometry.out_patch_size
    if D != P[0] * P[1] * in_chans or layer.out_dim != Q[0] * Q[1] * out_chans:
        raise ValueError(f"layer maps {D} -> {layer.out_dim} features, but a conv {in_chans}->{out_chans} channels on "
                         f"{P} patches maps {P[0] * P[1] * in_chans} -> {Q[0] * Q[1] * out_chans}; pass the layer's "
                         f"pixel channels and patch geometry")
    m_heads = layer.head_maps()[0].detach().double().cpu()  # M_h = W_V^h W_O^h, (H, D, D_out)
    abar = mean_attention.double().cpu()
    offsets, index = _conv_index_map(geometry, in_chans, out_chans, layer.grid_size)
    cols = layer.offset_index(offsets)
    m_reach = torch.einsum("hn,hde->nde", abar[:, cols], m_heads)  # M_d on the offsets the kernel reaches

    numel = out_chans * in_chans * geometry.kernel_size[0] * geometry.kernel_size[1]
    mapped = index >= 0
    sums = torch.zeros(numel, dtype=torch.float64).index_add_(0, index[mapped], m_reach[mapped])
    counts = torch.bincount(index[mapped], minlength=numel).double()
    kernel = sums / counts.clamp_min(1)  # taps that land on no patch of this grid stay 0
    residual = m_reach.clone()
    residual[mapped] -= kernel[index[mapped]]
    err2 = residual.pow(2).sum()
    # offsets outside the kernel's reach are all residual; ||M_d||^2 = abar_d' G abar_d with G = <M_h, M_g>_F,
    # so far offsets cost no (n_table, D, D_out) tensor
    gram = torch.einsum("hde,gde->hg", m_heads, m_heads)
    far = torch.ones(abar.shape[1], dtype=torch.bool)
    far[cols] = False
    far2 = torch.einsum("hm,hg,gm->", abar[:, far], gram, abar[:, far]).clamp_min(0)
    total2 = m_reach.pow(2).sum() + far2
    rel = math.sqrt(float((err2 + far2) / total2)) if total2 > 0 else float("nan")
    return kernel.reshape(out_chans, in_chans, *geometry.kernel_size), rel


@torch.no_grad()
def remaining_convolution(model: nn.Module, data: Data, max_batches: Optional[int] = None,
                          offsets: Any = "geometry") -> Dict[str, Any]:
    """How much of a convolution each attention layer of a CMHSA attention model still is.

    Per layer and head, over the images of ``data``:

    - ``offset_mass``: mean attention on the head's conversion offset d_h, averaged over images and over the
      queries whose neighbour q + d_h exists (at the border the construction sends the weight to the null key).
      ``offsets='geometry'`` (default) takes d_h from the construction (head h owns the h-th offset of
      ``same_padding_geometry(kernel_size, patch_size).offsets()`` inside the grid, as ``conv_to_mhsa`` assigns
      them; heads beyond get None), ``'argmax'`` the offset of the head's largest ``rel_pos_bias`` now, or pass
      (H, 2) offsets (one tensor, or a list per layer).
    - ``content_logit_std`` / ``position_logit_std``: spread over the real keys of each query's content logits
      ``q.k * scale`` and of its positional logits ``B_h[k - q]`` (std over keys, since softmax ignores a per-query
      shift), averaged over queries and images; ``positional_share = pos / (pos + content)`` (1 at conversion with
      W_Q = W_K = 0, just below 1 with ``qk_std > 0``). ``content_logit_absmax`` is max |q.k * scale| (exactly 0
      at conversion with W_Q = W_K = 0).
    - ``null_mass``: mean weight on the null key.
    - per layer ``conv_projection_error``: relative error of the best KxK convolution (:func:`conv_projection`)
      given the heads' mean attention per offset; ``kernels`` holds those convolutions (C, C, K, K).

    Returns ``{'layers': [per-layer dicts], 'offset_mass', 'positional_share', 'conv_projection_error' (means over
    layers and owning heads), 'kernels': [Tensor], 'kernel_size', 'images'}``.
    """
    model = _cmhsa_attention(model)
    geometry = _geometry(model)
    channels = model.patch_embed.pixel_dim
    layers: List[RelPosAttention] = [b.mixer for b in model.blocks]
    acc = [dict(sums=None, counts=None, content=0.0, absmax=None, null=0.0, queries=0) for _ in layers]
    images_seen = 0
    for images in _image_batches(data, max_batches):
        images_seen += images.shape[0]
        _, captured = _run_capturing(model, images, layers)
        for layer, a, (args, kwargs) in zip(layers, acc, captured):
            x = args[0] if args else kwargs["x"]
            B, N, _ = x.shape
            probs = layer.attention_probs(x)
            s, c = offset_attention(layer, probs)
            a["sums"] = s if a["sums"] is None else a["sums"] + s
            a["counts"] = c if a["counts"] is None else a["counts"] + c
            if layer.null_key:
                a["null"] = a["null"] + probs[..., N].double().sum(dim=(0, 2)).cpu()
            q, k = layer.queries_keys(x)
            content = ((q @ k.transpose(-2, -1)) * layer.scale).double()
            a["content"] = a["content"] + content.std(dim=-1, unbiased=False).sum(dim=(0, 2)).cpu()
            absmax = content.abs().amax(dim=(0, 2, 3)).cpu()
            a["absmax"] = absmax if a["absmax"] is None else torch.maximum(a["absmax"], absmax)
            a["queries"] += B * N

    records, kernels = [], []
    for i, (layer, a) in enumerate(zip(layers, acc)):
        H, N = layer.num_heads, layer.rel_pos_index.shape[0]
        abar = a["sums"] / a["counts"].clamp_min(1)
        heads = _head_offsets(layer, offsets, geometry, i)
        offset_mass = [abar[h, layer.offset_index(torch.tensor(d))].item() if d is not None else None
                       for h, d in enumerate(heads)]
        position = layer.position_bias()[..., :N].detach().double().cpu()
        pos_std = position.std(dim=-1, unbiased=False).mean(dim=-1)  # data-independent
        content_std = a["content"] / a["queries"]
        share = pos_std / (pos_std + content_std)
        kernel, err = conv_projection(layer, abar, geometry, channels)
        kernels.append(kernel)
        null = a["null"] / a["queries"] if layer.null_key else torch.zeros(H, dtype=torch.float64)
        records.append({
            "offsets": [list(d) if d is not None else None for d in heads],
            "offset_mass": offset_mass,
            "positional_share": share.tolist(),
            "content_logit_std": content_std.tolist(),
            "position_logit_std": pos_std.tolist(),
            "content_logit_absmax": a["absmax"].tolist(),
            "null_mass": null.tolist(),
            "conv_projection_error": err,
        })

    def mean_of(values):
        values = [v for v in values if v is not None and math.isfinite(v)]
        return sum(values) / len(values) if values else float("nan")

    return {
        "layers": records,
        "offset_mass": mean_of([v for r in records for v in r["offset_mass"]]),
        "positional_share": mean_of([v for r in records
                                     for v, d in zip(r["positional_share"], r["offsets"]) if d is not None]),
        "conv_projection_error": mean_of([r["conv_projection_error"] for r in records]),
        "kernels": kernels,
        "kernel_size": list(geometry.kernel_size),
        "images": images_seen,
    }


def remaining_convolution_over_checkpoints(run_dir: Union[str, Path], data: Optional[Data] = None,
                                           max_batches: Optional[int] = 4, batch_size: int = 64,
                                           offsets: Any = "geometry") -> List[Dict[str, Any]]:
    """:func:`remaining_convolution` of every checkpoint of a pipeline run, in phase-2 epochs.

    Epoch 0 is ``phase1/last`` converted with the run's conversion settings (``config.yaml``'s ``convert`` section as
    the pipeline uses it, else ``bias_strength`` / ``null_key`` from ``phase2/model.json``; a ``qk_std > 0`` start is
    redrawn with seed 0, not the run's own draw); a phase-2 checkpoint saved after 0-based epoch e is epoch e + 1. Every checkpoint directory in ``phase2/`` is used (``last/``, ``best/``, and
    any others holding ``model.safetensors`` and ``state.pt``); checkpoints of the same epoch are one record.
    ``data`` defaults to the first ``max_batches`` validation batches of the run's own dataset.

    Returns records ``{'epoch', 'checkpoints', 'val_top1', 'offset_mass', 'positional_share',
    'conv_projection_error', 'layers'}`` sorted by epoch.
    """
    run_dir = Path(run_dir)
    run = RunDir(run_dir)
    phase2 = run.phase("phase2")
    found: Dict[int, Dict[str, Any]] = {}
    spec2 = phase2.read_spec() if phase2.spec_path.exists() else None

    last1 = run.phase("phase1").last
    if (last1 / MODEL_FILE).is_file():
        if run.config_path.exists():
            # the pipeline's own conversion settings (cmhsa.pipeline._convert), qk_std and kwargs included
            kw = convert_settings(load_config(run.config_path))
        elif spec2 is not None:
            kw = {k: spec2["kwargs"][k] for k in ("bias_strength", "null_key", "form", "qk_dim")
                  if k in spec2["kwargs"]}
        else:
            kw = dict(bias_strength=DEFAULT_BIAS_STRENGTH, null_key=True)
        found[0] = dict(dirs=[last1], metrics=None, load=lambda kw=kw: _converted(last1, kw),
                        names=["phase1/last (converted)"])
    if phase2.root.is_dir():
        for d in sorted(p for p in phase2.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if not ((d / MODEL_FILE).is_file() and (d / STATE_FILE).is_file()):
                continue
            info = read_checkpoint_info(d)
            epoch = info["epoch"] + 1
            entry = found.setdefault(epoch, dict(dirs=[], names=[], metrics=None,
                                                 load=lambda d=d: load_model(d)[0]))
            entry["dirs"].append(d)
            entry["names"].append(f"phase2/{d.name}")
            entry["metrics"] = entry["metrics"] or info["extra"].get("metrics")
    if not found:
        raise FileNotFoundError(f"no checkpoints in {run_dir}: expected phase1/last/ and/or phase2/<checkpoint>/ "
                                f"(a pipeline run directory, e.g. runs/<name>)")

    if data is None:
        config_path = run.config_path if run.config_path.exists() else None
        sample = found[min(found)]["load"]()
        loader, _ = _val_loader(config_path, _model_in_chans(sample), batch_size)
        data = _materialise(loader, max_batches)
        max_batches = None
    elif not isinstance(data, torch.Tensor):
        data = _materialise(data, max_batches)
        max_batches = None

    records = []
    for epoch in sorted(found):
        entry = found[epoch]
        model = entry["load"]().float()
        result = remaining_convolution(model, data, max_batches, offsets=offsets)
        result.pop("kernels")
        metrics = entry["metrics"] or {}
        records.append({"epoch": epoch, "checkpoints": entry["names"], "val_top1": metrics.get("val_top1"),
                        **result})
    return records


def _converted(ckpt: Path, kw: Dict[str, Any]) -> CMHSA:
    conv = load_model(ckpt)[0].float().eval()
    # qk_std > 0 draws random W_Q, W_K: seed them, without touching the caller's RNG
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return convert_model(conv, **kw)


def plot_remaining_convolution(records: List[Dict[str, Any]], path: Union[str, Path],
                               title: Optional[str] = None) -> Path:
    """Offset mass, positional share and conv projection error per layer against phase-2 epoch, from
    :func:`remaining_convolution_over_checkpoints`."""
    epochs = [r["epoch"] for r in records]
    n_layers = len(records[0]["layers"]) if records else 0
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))

    def layer_mean(values):
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else float("nan")

    for i in range(n_layers):
        kw = dict(marker="o", ms=3, color=f"C{i % 10}", label=f"layer {i}")
        axes[0].plot(epochs, [layer_mean(r["layers"][i]["offset_mass"]) for r in records], **kw)
        axes[1].plot(epochs, [layer_mean(r["layers"][i]["positional_share"]) for r in records], **kw)
        axes[2].plot(epochs, [max(r["layers"][i]["conv_projection_error"], 1e-16) for r in records], **kw)
    axes[0].set(xlabel="phase-2 epoch", ylabel="attention on conversion offset", title="offset mass", ylim=(0, 1.05))
    axes[1].set(xlabel="phase-2 epoch", ylabel="pos / (pos + content)", title="positional share", ylim=(0, 1.05))
    axes[2].set(xlabel="phase-2 epoch", ylabel="||M - T(W*)|| / ||M||", title="conv projection error", yscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return _save(fig, path)
