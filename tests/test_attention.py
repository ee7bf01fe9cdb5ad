import math

import pytest
import torch
import torch.nn.functional as F

from cmhsa import RelPosMHSA


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


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    m = RelPosMHSA(8, 2, 6, (2, 3), out_dim=5)
    m(torch.randn(4, 6, 8)).square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_wrong_token_count_says_which_grid():
    m = RelPosMHSA(8, 2, 4, (2, 3))
    with pytest.raises(ValueError, match="2x3 grid"):
        m(torch.randn(1, 5, 8))


def test_bf16_autocast_runs_on_cpu():
    m = RelPosMHSA(16, 2, 8, (2, 2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(torch.randn(2, 4, 16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


def test_fused_and_explicit_paths_agree_in_gradients():
    torch.manual_seed(0)
    m = RelPosMHSA(8, 2, 4, (2, 3)).double()
    x = torch.randn(3, 6, 8, dtype=torch.float64)
    grads = []
    for fused in (True, False):
        m.zero_grad()
        m.fused_attn = fused
        m(x).square().sum().backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("grid", [(3, 4), (5, 5)])
def test_circular_bias_wraps_and_commutes_with_rolling_the_grid(grid):
    torch.manual_seed(0)
    gh, gw = grid
    m = RelPosMHSA(6, 3, 4, grid, circular=True, null_key=False).double()
    assert m.rel_pos_bias.shape == (3, gh * gw)
    torch.nn.init.normal_(m.rel_pos_bias)
    # (pos(k) - pos(q)) mod grid: query (0, 0) and key (gh-1, 0) are one row apart, like offset (-1, 0)
    assert m.offset_index(torch.tensor([gh - 1, 0])) == m.offset_index(torch.tensor([-1, 0]))
    x = torch.randn(2, gh, gw, 6, dtype=torch.float64)
    rolled = torch.roll(x, (1, 2), dims=(1, 2))
    out, out_rolled = (m(t.flatten(1, 2)).view(2, gh, gw, -1) for t in (x, rolled))
    torch.testing.assert_close(out_rolled, torch.roll(out, (1, 2), dims=(1, 2)), rtol=0, atol=1e-12)
    plain = RelPosMHSA(6, 3, 4, grid, null_key=False).double()  # the non-wrapping table is not equivariant
    torch.nn.init.normal_(plain.rel_pos_bias)
    plain.load_state_dict({k: v for k, v in m.state_dict().items() if k != "rel_pos_bias"}, strict=False)
    p_out, p_rolled = (plain(t.flatten(1, 2)).view(2, gh, gw, -1) for t in (x, rolled))
    assert not torch.allclose(p_rolled, torch.roll(p_out, (1, 2), dims=(1, 2)), atol=1e-6)
