"""Instruments for attention models: attention distance, CKA, remaining convolution, shift consistency.

Works on CMHSA attention models (:class:`~cmhsa.attention.RelPosMHSA` mixers), timm ``VisionTransformer``
(``timm.layers.Attention``) and timm ``ConVit`` (``GPSA`` and ``MHSA`` blocks).

- :func:`attention_maps` / :func:`attention_details`: attention probabilities recomputed from each attention
  layer's real input (captured with forward pre-hooks during an ordinary forward pass).
- :func:`attention_distance`: attention-weighted mean distance between query and key patches (Raghu et al.
  2021, the "nonlocality" of d'Ascoli et al. 2021).
- :func:`layer_features`, :func:`cka`, :func:`cka_matrix`: linear CKA with the unbiased HSIC estimator accumulated
  over minibatches (Nguyen, Raghu & Kornblith 2021).
- :func:`remaining_convolution`: how much of the Theorem 1 convolution a CMHSA attention layer still is: attention
  mass on each head's conversion offset, positional vs content logits, and the relative error of the best
  projection of the layer back onto a KxK convolution. :func:`remaining_convolution_over_checkpoints` tracks these
  through a run's phase 2.
- :func:`shift_consistency`: fraction of images whose predicted class survives a shift of the input.
- :func:`analyze` / ``cmhsa analyze``: all of the above for a checkpoint or run, into ``analysis.json`` + PNGs.
"""
from .attention import (AttentionMap, attention_details, attention_distance, attention_layers, attention_maps,
                        plot_attention_distance)
from .driver import add_analyze_parser, analyze, cmd_analyze
from .remaining import (conv_projection, offset_attention, plot_remaining_convolution, remaining_convolution,
                        remaining_convolution_over_checkpoints)
from .shift import plot_shift_consistency, shift_consistency, shift_images
from .similarity import cka, cka_matrix, hsic_unbiased, layer_features, plot_cka

__all__ = [
    "AttentionMap", "attention_layers", "attention_details", "attention_maps", "attention_distance",
    "layer_features", "hsic_unbiased", "cka", "cka_matrix",
    "offset_attention", "conv_projection", "remaining_convolution", "remaining_convolution_over_checkpoints",
    "shift_images", "shift_consistency",
    "plot_attention_distance", "plot_cka", "plot_remaining_convolution", "plot_shift_consistency",
    "analyze", "add_analyze_parser", "cmd_analyze",
]
