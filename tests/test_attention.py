import math

import pytest
import torch
import torch.nn.functional as F

from cmhsa import FactorizedRelPosMHSA, RelPosMHSA


def reference_mhsa(m: RelPosMHSA, x: torch.Tensor) -> torch.Tensor:
    """Eq. 4 written out head by head, without scaled_dot_product_attention."""
    B, N, _ = x.shape
    H, d = m.num_heads, m.head_dim
    q, k, v = m.qkv(x).split(H * d, dim=-1)
    bias = m.rel_pos_bias[:, m.rel_pos_index]
    outs = []
    for h in range(H):
        qh, kh, vh = (t[..., h * d:(h + 1) * d] for t in (q, k, v))
        logits = qh @ kh.transpose(1, 2) / math.sqrt(d) + bias[h]
        if m.null_key:
            logits = torch.cat([logits, m.null_bias[h].expand(B, N, 1)], dim=-1)
            vh = torch.cat([vh, torch.zeros(B, 1, d, dtype=x.dtype)], dim=1)
        outs.append(logits.softmax(-1) @ vh)
    return F.linear(torch.cat(outs, -1), m.proj.weight, m.proj.bias)


def reference_factorized(m: FactorizedRelPosMHSA, x: torch.Tensor) -> torch.Tensor:
    """``sum_h A_h (X M_h + c_h) + b`` written out head by head; the null key's value is 0."""
    B, N, _ = x.shape
    H, d, E = m.num_heads, m.qk_dim, m.out_dim
    q, k = m.qk(x).split(H * d, dim=-1)
    values = m.value(x)
    bias = m.rel_pos_bias[:, m.rel_pos_index]
    out = m.bias.expand(B, N, E)
    for h in range(H):
        logits = q[..., h * d:(h + 1) * d] @ k[..., h * d:(h + 1) * d].transpose(1, 2) / math.sqrt(d) + bias[h]
        vh = values[..., h * E:(h + 1) * E] + m.value_bias[h]
        if m.null_key:
            logits = torch.cat([logits, m.null_bias[h].expand(B, N, 1)], dim=-1)
            vh = torch.cat([vh, torch.zeros(B, 1, E, dtype=x.dtype)], dim=1)
        out = out + logits.softmax(-1) @ vh
    return out


def _layer(form: str, null_key: bool = True, grid=(3, 4), circular: bool = False):
    if form == "paper":
        return RelPosMHSA(12, 3, 5, grid, out_dim=7, null_key=null_key, circular=circular)
    return FactorizedRelPosMHSA(12, 3, grid, out_dim=7, qk_dim=5, null_key=null_key, circular=circular)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("null_key", [True, False])
def test_factorized_matches_written_out_attention(null_key, fused):
    """Both paths of the factorized layer compute sum_h A_h (X M_h + c_h) + b."""
    torch.manual_seed(0)
    m = _layer("factorized", null_key).double()
    m.fused_attn = fused
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
    x = torch.randn(2, 12, 12, dtype=torch.float64)
    torch.testing.assert_close(m(x), reference_factorized(m, x), rtol=0, atol=1e-12)
    probs = m.attention_probs(x)
    assert probs.shape == (2, 3, 12, 12 + null_key)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 3, 12, dtype=torch.float64))


@pytest.mark.parametrize("form", ["paper", "factorized"])
def test_head_maps_rebuild_the_output_from_the_attention(form):
    """out = sum_h A_h (X M_h + c_h) + b over the real keys, in both forms: what the analysis relies on."""
    torch.manual_seed(0)
    m = _layer(form).double()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
    x = torch.randn(2, 12, 12, dtype=torch.float64)
    attn = m.attention_probs(x)[..., :12]  # (B, H, N, N): the null key's value is 0
    maps, value_bias, out_bias = m.head_maps()
    values = torch.einsum("bnd,hde->bhne", x, maps) + value_bias[None, :, None]
    torch.testing.assert_close((attn @ values).sum(1) + out_bias, m(x), rtol=0, atol=1e-11)


def test_factorized_default_qk_dim_is_width_per_head():
    m = FactorizedRelPosMHSA(128, 9, (7, 7))
    assert m.qk_dim == 14 and m.qk.out_features == 2 * 9 * 14 and m.value.out_features == 9 * 128


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("null_key", [True, False])
def test_matches_written_out_attention(null_key, fused):
    """Both the SDPA path (used on accelerators) and the explicit path (CPU) compute eq. 4."""
    torch.manual_seed(0)
    m = RelPosMHSA(12, 3, 5, (3, 4), out_dim=7, null_key=null_key).double()
    m.fused_attn = fused
    with torch.no_grad():
        m.rel_pos_bias.normal_()
        if null_key:
            m.null_bias.normal_()
    x = torch.randn(2, 12, 12, dtype=torch.float64)
    torch.testing.assert_close(m(x), reference_mhsa(m, x), rtol=0, atol=1e-12)
    probs = m.attention_probs(x)
    assert probs.shape == (2, 3, 12, 12 + null_key)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 3, 12, dtype=torch.float64))


def test_bias_table_indexes_relative_offsets():
    m = RelPosMHSA(4, 1, 4, (3, 3), null_key=False)
    with torch.no_grad():
        m.rel_pos_bias.zero_()
        m.rel_pos_bias[0, m.offset_index(torch.tensor([1, -1]))] = 1.0
    bias = m.position_bias()[0]
    # query (0, 1) = token 1 sees key (1, 0) = token 3 at offset (1, -1)
    assert bias[1, 3] == 1.0
    assert bias.sum() == 4  # queries (0,1) (0,2) (1,1) (1,2) have a key there


@pytest.mark.parametrize("form", ["paper", "factorized"])
def test_every_parameter_gets_a_gradient(form):
    torch.manual_seed(0)
    m = _layer(form)
    m(torch.randn(4, 12, 12)).square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("form", ["paper", "factorized"])
def test_wrong_token_count_says_which_grid(form):
    m = _layer(form)
    with pytest.raises(ValueError, match="3x4 grid"):
        m(torch.randn(1, 5, 12))


@pytest.mark.parametrize("form", ["paper", "factorized"])
def test_bf16_autocast_runs_on_cpu(form):
    m = _layer(form)
    x = torch.randn(2, 12, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), m(x), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("form", ["paper", "factorized"])
def test_fused_and_explicit_paths_agree_in_gradients(form):
    torch.manual_seed(0)
    m = _layer(form).double()
    x = torch.randn(3, 12, 12, dtype=torch.float64)
    grads = []
    for fused in (True, False):
        m.zero_grad()
        m.fused_attn = fused
        m(x).square().sum().backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("grid", [(3, 4), (5, 5)])
@pytest.mark.parametrize("form", ["paper", "factorized"])
def test_circular_bias_wraps_and_commutes_with_rolling_the_grid(grid, form):
    torch.manual_seed(0)
    gh, gw = grid
    m = _layer(form, null_key=False, grid=grid, circular=True).double()
    assert m.rel_pos_bias.shape == (3, gh * gw)
    torch.nn.init.normal_(m.rel_pos_bias)
    # (pos(k) - pos(q)) mod grid: query (0, 0) and key (gh-1, 0) are one row apart, like offset (-1, 0)
    assert m.offset_index(torch.tensor([gh - 1, 0])) == m.offset_index(torch.tensor([-1, 0]))
    x = torch.randn(2, gh, gw, 12, dtype=torch.float64)
    rolled = torch.roll(x, (1, 2), dims=(1, 2))
    out, out_rolled = (m(t.flatten(1, 2)).view(2, gh, gw, -1) for t in (x, rolled))
    torch.testing.assert_close(out_rolled, torch.roll(out, (1, 2), dims=(1, 2)), rtol=0, atol=1e-12)
    plain = _layer(form, null_key=False, grid=grid).double()  # the non-wrapping table is not equivariant
    torch.nn.init.normal_(plain.rel_pos_bias)
    plain.load_state_dict({k: v for k, v in m.state_dict().items() if k != "rel_pos_bias"}, strict=False)
    p_out, p_rolled = (plain(t.flatten(1, 2)).view(2, gh, gw, -1) for t in (x, rolled))
    assert not torch.allclose(p_rolled, torch.roll(p_out, (1, 2), dims=(1, 2)), atol=1e-6)
