import math

import pytest
import timm
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_convert import conv_cases

import cmhsa  # noqa: F401  (registers the models with timm)
from cmhsa import image_to_tokens, verify
from cmhsa.convert import conv_to_mhsa
from cmhsa.local_attention import LocalRelPosMHSA
from cmhsa.models import convert_model, transfer_error, with_img_size


def reference_local(m: LocalRelPosMHSA, x: torch.Tensor, grid) -> torch.Tensor:
    """The local attention written out: one logit per (query, window offset), keys found by index arithmetic."""
    B, N, _ = x.shape
    gh, gw = grid
    H, d = m.num_heads, m.head_dim
    (ry, rx), (wh, ww) = m.radius, m.window_size
    q, k, v = (t.reshape(B, N, H, d) for t in m.qkv(x).split(H * d, dim=-1))
    out = torch.zeros(B, N, H, d, dtype=x.dtype)
    for qi in range(N):
        y, xq = divmod(qi, gw)
        logits, values = [], []
        for i in range(wh):
            for j in range(ww):
                ky, kx = y + i - ry, xq + j - rx
                if m.circular:
                    ky, kx = ky % gh, kx % gw
                elif not (0 <= ky < gh and 0 <= kx < gw):
                    continue  # a missing neighbour has no logit at all
                kj = ky * gw + kx
                logits.append((q[:, qi] * k[:, kj]).sum(-1) / math.sqrt(d) + m.rel_pos_bias[:, i * ww + j])
                values.append(v[:, kj])
        if m.null_key:
            logits.append(m.null_bias.expand(B, H))
            values.append(torch.zeros(B, H, d, dtype=x.dtype))
        attn = torch.stack(logits, -1).softmax(-1)  # (B, H, n)
        out[:, qi] = torch.einsum("bhn,nbhd->bhd", attn, torch.stack(values))
    return m.proj(out.reshape(B, N, H * d))


@pytest.mark.parametrize("circular", [False, True])
@pytest.mark.parametrize("null_key", [False, True])
@pytest.mark.parametrize("window,grid", [(3, (4, 5)), ((5, 3), (3, 4)), (7, (2, 3))])
def test_matches_written_out_local_attention(circular, null_key, window, grid):
    # the (7, (2, 3)) case: a window wider than the grid, so circular offsets alias onto the same key
    torch.manual_seed(0)
    m = LocalRelPosMHSA(6, 2, 4, window, (1, 1), null_key=null_key, circular=circular).double()
    for p in m.parameters():
        nn.init.normal_(p)
    x = torch.randn(2, grid[0] * grid[1], 6, dtype=torch.float64, requires_grad=True)
    out, ref = m(x, grid), reference_local(m, x, grid)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    # the hand-written backward against autograd through the written-out reference
    g = torch.randn_like(out)
    params = [x, *m.parameters()]
    for mine, theirs in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-10)


@pytest.mark.parametrize("circular", [False, True])
def test_backward_passes_gradcheck_with_attention_dropout(circular):
    torch.manual_seed(0)
    m = LocalRelPosMHSA(4, 2, 3, 3, (3, 4), circular=circular, attn_drop=0.3).double().train()
    x = torch.randn(2, 12, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(2, 9, dtype=torch.float64, requires_grad=True)
    null = torch.randn(2, dtype=torch.float64, requires_grad=True)

    def f(x, bias, null):
        torch.manual_seed(1)  # the same dropout mask at every evaluation
        return torch.func.functional_call(m, {"rel_pos_bias": bias, "null_bias": null}, (x,))

    assert not torch.equal(f(x, bias, null), m.eval()(x))  # dropout is on
    m.train()
    assert torch.autograd.gradcheck(f, (x, bias, null))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=conv_cases(), seed=st.integers(0, 2 ** 16))
def test_local_form_float64_exact_everywhere(case, seed):
    conv, P, image = case
    torch.manual_seed(seed)
    nn.init.normal_(conv.weight)
    report = verify(conv, P, image, dtype=torch.float64, form="local")
    # a kernel that reads only outside a tiny grid outputs exactly 0: there the ~exp(-beta/2) leak is compared with
    # the input's scale (randn) instead
    assert report.max_error <= 1e-9 * max(report.output_scale, 1.0), report


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(case=conv_cases(padding_mode="circular"), seed=st.integers(0, 2 ** 16))
def test_local_form_circular_float64_exact_everywhere(case, seed):
    conv, P, image = case
    torch.manual_seed(seed)
    nn.init.normal_(conv.weight)
    report = verify(conv, P, image, dtype=torch.float64, form="local", null_key=False)
    assert report.relative_error <= 1e-9, report


@settings(max_examples=20, deadline=None)
@given(case=conv_cases())
def test_local_form_float32_within_tolerance(case):
    conv, P, image = case
    report = verify(conv, P, image, dtype=torch.float32, form="local")
    assert report.max_error <= 1e-4 * max(report.output_scale, 1.0), report


def test_one_converted_layer_computes_the_conv_at_every_grid():
    conv = nn.Conv2d(3, 2, 5, padding="same").double()
    layer = conv_to_mhsa(conv, 4, (7, 7), form="local")
    assert layer.window_size == (3, 3) and layer.num_heads == 9 and layer.rel_pos_bias.shape == (9, 9)
    for grid in [(1, 1), (2, 5), (7, 7), (14, 14)]:
        x = torch.randn(2, 3, 4 * grid[0], 4 * grid[1], dtype=torch.float64)
        torch.testing.assert_close(layer(image_to_tokens(x, 4), grid), image_to_tokens(conv(x), 4),
                                   rtol=0, atol=1e-10)


def _conv_model(**kwargs):
    torch.manual_seed(0)
    model = timm.create_model("cmhsa5_conv_tiny", depth=2, **kwargs).double()
    for p in model.parameters():
        if p.requires_grad:
            nn.init.normal_(p, std=0.2)
    return model.eval()


@pytest.mark.parametrize("padding_mode", ["zeros", "circular"])
def test_local_twin_at_56px_equals_the_conv_model_at_56px(padding_mode):
    conv28 = _conv_model(padding_mode=padding_mode)
    local28 = convert_model(conv28, form="local", qk_std=0.02).eval()
    x28 = torch.randn(3, 1, 28, 28, dtype=torch.float64)
    assert transfer_error(conv28, local28, x28)["logits_relative_error"] <= 1e-9
    local56, conv56 = with_img_size(local28, 56), with_img_size(conv28, 56)
    assert local56.patch_embed.grid_size == (14, 14)
    x56 = torch.randn(3, 1, 56, 56, dtype=torch.float64)
    err = transfer_error(conv56, local56, x56)
    assert err["logits_relative_error"] <= 1e-9, err
    with torch.no_grad():  # the same weights: the 56 px twin is what converting the 56 px conv model gives
        torch.testing.assert_close(local56(x56), convert_model(conv56, form="local", qk_std=0.0)(x56),
                                   rtol=0, atol=1e-6)


def test_global_attention_cannot_change_size_and_says_why():
    attn = convert_model(_conv_model())
    with pytest.raises(ValueError, match="form='local'"):
        with_img_size(attn, 56)


def test_local_model_trains_and_every_parameter_gets_a_gradient():
    model = timm.create_model("cmhsa5_lattn_tiny", depth=2)
    assert all(isinstance(b.mixer, LocalRelPosMHSA) for b in model.blocks)
    model(torch.randn(2, 1, 28, 28)).square().sum().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bad_window_and_form_arguments():
    with pytest.raises(ValueError, match="window_size must be odd"):
        LocalRelPosMHSA(4, 1, 4, 4, (3, 3))
    with pytest.raises(ValueError, match="beyond the"):
        LocalRelPosMHSA(4, 1, 4, 3, (3, 3)).offset_index(torch.tensor([2, 0]))
    with pytest.raises(ValueError, match="form must be"):
        conv_to_mhsa(nn.Conv2d(1, 1, 3, padding=1), 4, (2, 2), form="windowed")
    with pytest.raises(ValueError, match="grid"):
        LocalRelPosMHSA(4, 1, 4, 3, (3, 3))(torch.randn(1, 10, 4))
