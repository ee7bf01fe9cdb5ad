"""Converting between the paper's attention form and the factorized form: exact both ways where the math allows."""
import pytest
import torch

from cmhsa import CMHSA, FactorizedRelPosMHSA, RelPosMHSA, convert_form, convert_model


def _randomized(layer):
    """Every weight random (value biases and null-key biases included), so the test sees the whole function."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    return layer


@pytest.mark.parametrize("circular", [False, True])
@pytest.mark.parametrize("null_key", [True, False])
@pytest.mark.parametrize("qk_dim", [None, 9])
def test_paper_to_factorized_is_exact(null_key, qk_dim, circular):
    paper = _randomized(RelPosMHSA(12, 3, 5, (3, 4), out_dim=7, null_key=null_key, circular=circular).double())
    x = torch.randn(2, 12, 12, dtype=torch.float64)
    fact = convert_form(paper, "factorized", qk_dim=qk_dim)
    assert isinstance(fact, FactorizedRelPosMHSA) and fact.qk_dim == (qk_dim or 5) and fact.circular == circular
    torch.testing.assert_close(fact(x), paper(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(fact.attention_probs(x), paper.attention_probs(x), rtol=0, atol=1e-12)
    back = convert_form(fact, "paper")
    assert isinstance(back, RelPosMHSA) and back.head_dim == max(7, fact.qk_dim)
    torch.testing.assert_close(back(x), paper(x), rtol=0, atol=1e-12)


def test_value_bias_is_carried_per_head_because_null_key_rows_sum_below_one():
    """out = sum_h A_h (X M_h + c_h) + b: folding the value bias into the output bias (b + sum_h c_h) is wrong by
    exactly sum_h null_mass_h c_h, since a head's weight on the null key multiplies a zero value."""
    paper = _randomized(RelPosMHSA(12, 3, 5, (3, 4), out_dim=7, null_key=True).double())
    with torch.no_grad():  # soft attention, so every row puts some weight on the null key
        paper.qkv.weight[:2 * 3 * 5].mul_(0.1)
        paper.rel_pos_bias.mul_(0.1)
        paper.null_bias.fill_(1.0)
    x = torch.randn(2, 12, 12, dtype=torch.float64)
    fact = convert_form(paper, "factorized")
    _, c, _ = fact.head_maps()
    null_mass = paper.attention_probs(x)[..., -1]  # (B, H, N)
    assert null_mass.min() > 1e-3  # the rows over the real keys sum to less than 1
    folded = convert_form(paper, "factorized")
    with torch.no_grad():
        folded.bias.add_(c.sum(0))
        folded.value_bias.zero_()
    expected_gap = torch.einsum("bhn,he->bne", null_mass, c)
    torch.testing.assert_close(folded(x) - fact(x), expected_gap, rtol=0, atol=1e-12)
    assert expected_gap.abs().max() > 1e-2


def test_factorized_to_paper_needs_a_wide_enough_head():
    fact = _randomized(FactorizedRelPosMHSA(12, 3, (3, 4), out_dim=7, qk_dim=4).double())
    x = torch.randn(2, 12, 12, dtype=torch.float64)
    wide = convert_form(fact, "paper", head_dim=10)
    torch.testing.assert_close(wide(x), fact(x), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="head_dim >= out_dim=7"):
        convert_form(fact, "paper", head_dim=6)
    paper = RelPosMHSA(12, 3, 5, (3, 4))
    with pytest.raises(ValueError, match="qk_dim >= 5"):
        convert_form(paper, "factorized", qk_dim=4)
    with pytest.raises(ValueError, match="form must be one of"):
        convert_form(paper, "fast")


def test_model_conversion_keeps_the_logits_and_rebuilds_from_its_config():
    torch.manual_seed(0)
    conv = CMHSA(img_size=12, patch_size=4, in_chans=1, num_classes=5, embed="pixel", pixel_dim=2, depth=2,
                 kernel_size=3, mlp_ratio=2.0).double().eval()
    paper = convert_model(conv, bias_strength=6.0, qk_std=0.1)  # soft attention: every key matters
    _randomized(paper.blocks[1].mixer)
    x = torch.randn(3, 1, 12, 12, dtype=torch.float64)
    fact = convert_form(paper, "factorized")
    assert fact.config["form"] == "factorized" and fact.config["qk_dim"] == paper.head_dim
    torch.testing.assert_close(fact(x), paper(x), rtol=0, atol=1e-10)
    rebuilt = CMHSA(**fact.config).double().eval()
    rebuilt.load_state_dict(fact.state_dict())
    torch.testing.assert_close(rebuilt(x), paper(x), rtol=0, atol=1e-10)
    back = convert_form(fact, "paper")
    assert back.config["form"] == "paper" and back.config["qk_dim"] is None
    torch.testing.assert_close(back(x), paper(x), rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="convert_model"):
        convert_form(conv, "factorized")


def test_the_local_form_is_neither_source_nor_target():
    # its bias table is a window of offsets, not the grid: it is built from a convolution, not from another form
    conv = CMHSA(img_size=12, patch_size=4, in_chans=1, num_classes=5, embed="pixel", pixel_dim=2, depth=1,
                 kernel_size=3, mlp_ratio=2.0)
    with pytest.raises(ValueError, match="form='local'"):
        convert_form(convert_model(conv), "local")
    with pytest.raises(ValueError, match="local form"):
        convert_form(convert_model(conv, form="local"), "factorized")
