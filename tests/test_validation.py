"""Every public argument of convert, bounds, tokens and RelPosMHSA rejects bad values with a ValueError that names
the argument (and says what is allowed)."""
import math

import pytest
import torch
import torch.nn as nn

from cmhsa import RelPosMHSA, best_fit_error, conv_to_mhsa, head_lower_bound, required_heads, verify
from cmhsa.bounds import best_fit_errors, block_singular_values
from cmhsa.convert import ConvGeometry, conv_blocks, conv_geometry, same_padding_geometry
from cmhsa.tokens import grid_offsets, image_to_tokens, to_pair, tokens_to_image


def conv(**kw):
    return nn.Conv2d(2, 2, 3, padding=1, **kw)


def conv_with(**attrs):
    """A conv whose attributes were changed after construction (nn.Conv2d checks some only in forward)."""
    c = conv()
    for k, v in attrs.items():
        setattr(c, k, v)
    return c


@pytest.mark.parametrize("kwargs,name,allowed", [
    (dict(grid_size=0), "grid_size", ">= 1"),
    (dict(grid_size=-2), "grid_size", ">= 1"),
    (dict(grid_size=(3, 0)), "grid_size", ">= 1"),
    (dict(grid_size=2.0), "grid_size", "int"),
    (dict(grid_size=True), "grid_size", "int"),
    (dict(patch_size=0), "patch_size", ">= 1"),
    (dict(patch_size=(4, -4)), "patch_size", ">= 1"),
    (dict(bias_strength=-1.0), "bias_strength", ">= 0"),
    (dict(bias_strength=math.nan), "bias_strength", "finite"),
    (dict(bias_strength=math.inf), "bias_strength", "finite"),
    (dict(bias_strength="60"), "bias_strength", "finite number"),
    (dict(null_key="false"), "null_key", "True or False"),
    (dict(num_heads=0), "num_heads", ">= 1"),
    (dict(num_heads=9.0), "num_heads", "int"),
    (dict(qk_std=-0.1), "qk_std", ">= 0"),
    (dict(qk_std=math.nan), "qk_std", "finite"),
])
def test_conv_to_mhsa_rejects(kwargs, name, allowed):
    args = dict(conv=conv(), patch_size=4, grid_size=3) | kwargs
    with pytest.raises(ValueError, match=name) as e:
        conv_to_mhsa(**args)
    assert allowed in str(e.value)


@pytest.mark.parametrize("build,name", [
    (lambda: conv_with(dilation=(0, 0)), "conv.dilation"),
    (lambda: conv_with(dilation=(1, -1)), "conv.dilation"),
    (lambda: conv_with(stride=(0, 0)), "conv.stride"),
    (lambda: conv_with(stride=(-1, -1)), "conv.stride"),
    (lambda: nn.Conv2d(2, 2, 0), "conv.kernel_size"),
    (lambda: nn.Conv2d(0, 2, 3, padding=1), "conv.in_channels"),
    (lambda: nn.Conv2d(2, 0, 3, padding=1), "conv.out_channels"),
])
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_conv_settings_torch_accepts_but_cannot_run_are_rejected(build, name):
    module = build()
    with pytest.raises(ValueError, match=name):
        conv_geometry(module, 4)
    with pytest.raises(ValueError, match=name):
        conv_to_mhsa(module, 4, 3)


@pytest.mark.parametrize("kwargs,name", [
    (dict(image_size=0), "image_size"),
    (dict(image_size=(12, -12)), "image_size"),
    (dict(image_size=30), "image_size"),           # not divisible by the patch size
    (dict(patch_size=0), "patch_size"),
    (dict(dtype=torch.int64), "dtype"),
    (dict(dtype="float64"), "dtype"),
    (dict(batch_size=0), "batch_size"),
    (dict(seed=1.5), "seed"),
    (dict(bias_strength=math.nan), "bias_strength"),
    (dict(null_key=None), "null_key"),
])
def test_verify_rejects(kwargs, name):
    with pytest.raises(ValueError, match=name):
        verify(**(dict(conv=conv(), patch_size=4, image_size=12) | kwargs))


@pytest.mark.parametrize("kwargs,name", [
    (dict(kernel_size=0), "kernel_size"),
    (dict(kernel_size=(3, -1)), "kernel_size"),
    (dict(patch_size=0), "patch_size"),
    (dict(dilation=0), "dilation"),
    (dict(stride=0), "stride"),
    (dict(stride=3), "stride"),                     # does not divide the patch size
    (dict(kernel_size=3.0), "kernel_size"),
])
def test_geometry_functions_reject(kwargs, name):
    args = dict(kernel_size=3, patch_size=4) | kwargs
    for fn in (same_padding_geometry, required_heads):
        with pytest.raises(ValueError, match=name):
            fn(**args)


@pytest.mark.parametrize("kwargs,name", [
    (dict(kernel_size=0), "kernel_size"),
    (dict(patch_size=(4, 0)), "patch_size"),
    (dict(dilation=-1), "dilation"),
    (dict(stride=0), "stride"),
    (dict(stride=3), "stride"),
    (dict(pad_before=-1), "pad_before"),
])
def test_conv_geometry_dataclass_rejects(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ConvGeometry(**(dict(kernel_size=3, patch_size=4) | kwargs))


def test_conv_geometry_dataclass_normalises_ints_to_pairs():
    g = ConvGeometry(kernel_size=3, patch_size=4, pad_before=1)
    assert g.kernel_size == (3, 3) and g.patch_size == (4, 4) and g.pad_before == (1, 1)


@pytest.mark.parametrize("weight,groups,name", [
    (torch.randn(2, 2, 3), 1, "conv kernel"),
    (torch.randn(2, 2, 5, 5), 1, "conv kernel"),       # not the geometry's 3x3
    (torch.randn(2, 2, 3, 3), 0, "groups"),
    (torch.randn(3, 1, 3, 3), 2, "groups"),            # 2 groups do not divide C_out = 3
])
def test_conv_blocks_rejects(weight, groups, name):
    with pytest.raises(ValueError, match=name):
        conv_blocks(weight, same_padding_geometry(3, 4), groups)


@pytest.mark.parametrize("kwargs,name", [
    (dict(weight=torch.randn(2, 2, 3)), "conv kernel"),
    (dict(patch_size=0), "patch_size"),
    (dict(dilation=0), "dilation"),
    (dict(stride=-1), "stride"),
    (dict(groups=0), "groups"),
    (dict(groups=3), "groups"),
])
def test_bounds_reject(kwargs, name):
    args = dict(weight=torch.randn(2, 2, 3, 3), patch_size=4) | kwargs
    for fn in (block_singular_values, head_lower_bound, best_fit_errors):
        with pytest.raises(ValueError, match=name):
            fn(**args)
    with pytest.raises(ValueError, match=name):
        best_fit_error(num_heads=1, **args)


@pytest.mark.parametrize("rtol", [-1e-7, 1.0, math.nan])
def test_head_lower_bound_rejects_rtol(rtol):
    with pytest.raises(ValueError, match="rtol must be a finite number >= 0 and < 1"):
        head_lower_bound(torch.randn(2, 2, 3, 3), 4, rtol=rtol)


@pytest.mark.parametrize("num_heads", [-1, 1.5, True])
def test_best_fit_error_rejects_num_heads(num_heads):
    with pytest.raises(ValueError, match="num_heads must be an int >= 0"):
        best_fit_error(torch.randn(2, 2, 3, 3), 4, num_heads)


@pytest.mark.parametrize("call,name", [
    (lambda: image_to_tokens(torch.randn(1, 2, 8, 8), 0), "patch_size"),
    (lambda: image_to_tokens(torch.randn(1, 2, 8, 8), -4), "patch_size"),
    (lambda: tokens_to_image(torch.randn(1, 4, 32), 0, 2), "patch_size"),
    (lambda: tokens_to_image(torch.randn(1, 4, 32), 4, 0), "grid_size"),
    (lambda: tokens_to_image(torch.randn(1, 4, 32), 4, (2, -2)), "grid_size"),
    (lambda: grid_offsets(0), "grid_size"),
    (lambda: grid_offsets((2, -1)), "grid_size"),
    (lambda: to_pair((1, 2, 3), "size"), "size"),
    (lambda: to_pair(0, "size", minimum=1), "size"),
])
def test_token_functions_reject(call, name):
    with pytest.raises(ValueError, match=name):
        call()


@pytest.mark.parametrize("kwargs,name", [
    (dict(dim=0), "dim"),
    (dict(dim=8.0), "dim"),
    (dict(num_heads=0), "num_heads"),
    (dict(num_heads=-1), "num_heads"),
    (dict(head_dim=0), "head_dim"),
    (dict(grid_size=0), "grid_size"),
    (dict(grid_size=(2, -3)), "grid_size"),
    (dict(out_dim=0), "out_dim"),                   # used to mean "out_dim = dim" silently
    (dict(out_dim=-8), "out_dim"),
    (dict(null_key=1), "null_key"),
    (dict(qkv_bias="yes"), "qkv_bias"),
    (dict(attn_drop=1.0), "attn_drop"),
    (dict(attn_drop=-0.1), "attn_drop"),
    (dict(proj_drop=math.nan), "proj_drop"),
])
def test_relpos_mhsa_rejects(kwargs, name):
    with pytest.raises(ValueError, match=name):
        RelPosMHSA(**(dict(dim=8, num_heads=2, head_dim=4, grid_size=2) | kwargs))


def test_good_edge_values_are_accepted():
    # the smallest allowed values still build and run: beta = 0 is uniform attention, not an error
    assert conv_to_mhsa(conv(), 4, 1, bias_strength=0.0, num_heads=9).num_heads == 9
    m = RelPosMHSA(dim=8, num_heads=1, head_dim=1, grid_size=(1, 2), out_dim=3, attn_drop=0.0)
    assert m(torch.randn(1, 2, 8)).shape == (1, 2, 3)
    assert head_lower_bound(torch.randn(2, 2, 3, 3), 4, rtol=0.0) == 9


@pytest.mark.parametrize("kwargs,name", [
    (dict(bias_strength=math.nan), "bias_strength"),
    (dict(bias_strength=-60.0), "bias_strength"),
    (dict(null_key="no"), "null_key"),
    (dict(qk_std=-1.0), "qk_std"),
])
def test_convert_model_passes_the_checks_on(kwargs, name):
    from cmhsa import CMHSA, convert_model

    model = CMHSA(img_size=8, patch_size=4, in_chans=1, embed="pixel", pixel_dim=2, depth=1, num_classes=3)
    with pytest.raises(ValueError, match=name):
        convert_model(model, **kwargs)
