"""The tied form: a converted layer whose value maps stay one conv kernel's, so phase 2 trains the conv's filters."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cmhsa import CMHSA, FactorizedRelPosMHSA, RelPosMHSA, convert_form, convert_model
from cmhsa.convert import conv_to_mhsa, same_padding_geometry
from cmhsa.tied import ConvTiedValues
from cmhsa.tokens import image_to_tokens, tokens_to_image


def tiny_conv_model(**kw):
    return CMHSA(img_size=12, patch_size=4, in_chans=1, num_classes=5, embed="pixel", pixel_dim=2, depth=2,
                 mixer="conv", kernel_size=5, mlp_ratio=2.0, **kw)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("padding_mode", ["zeros", "circular"])
def test_kernel_gets_the_convolutions_gradient(padding_mode, fused):
    """At the exact conversion (beta = 60, W_Q = W_K = 0) the tied layer is the conv as a function of its kernel
    too: the loss's gradient with respect to the kernel and the bias is the conv's, so phase 2 starts by training the
    same filters the same way. A free (factorized) value map would get one gradient per copy of each tap instead."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 5, padding="same", padding_mode=padding_mode).double()
    tied = conv_to_mhsa(conv, 4, (3, 3), bias_strength=60, form="tied")
    tied.fused_attn = fused
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    target = torch.randn(2, 4, 12, 12, dtype=torch.float64)
    F.mse_loss(conv(x), target).backward()
    F.mse_loss(tokens_to_image(tied(image_to_tokens(x, 4)), 4, (3, 3)), target).backward()
    torch.testing.assert_close(tied.value.kernel.grad, conv.weight.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(tied.value.kernel_bias.grad, conv.bias.grad, rtol=0, atol=1e-12)
    # and the layer has nothing else a convolution would not have: the conv's two tensors plus the attention's
    conv_names = {"value.kernel", "value.kernel_bias"}
    assert {n for n, _ in tied.named_parameters()} - conv_names == {"qk.weight", "qk.bias", "rel_pos_bias",
                                                                    "null_bias"}


def test_tied_model_holds_the_kernels_not_the_blocks():
    torch.manual_seed(0)
    conv = tiny_conv_model().double().eval()
    tied = convert_model(conv, form="tied", bias_strength=60)
    fact = convert_model(conv, form="factorized", bias_strength=60)
    count = lambda m: sum(p.numel() for p in m.blocks[0].mixer.parameters())  # noqa: E731
    # per layer the tied form holds the 2x2x5x5 kernel and its 2 biases; the factorized form 9 free 32x32 value maps,
    # 9 value biases of 32 and a per-pixel output bias of 32 (the Q/K and position biases are the same)
    assert count(fact) - count(tied) == (9 * 32 * 32 + 9 * 32 + 32) - (2 * 2 * 5 * 5 + 2)
    assert torch.equal(tied.blocks[1].mixer.value.kernel, conv.blocks[1].mixer.conv.weight)
    # a checkpoint rebuilds it from its config alone
    rebuilt = CMHSA(**tied.config).double().eval()
    rebuilt.load_state_dict(tied.state_dict())
    x = torch.randn(2, 1, 12, 12, dtype=torch.float64)
    torch.testing.assert_close(rebuilt(x), conv(x), rtol=0, atol=1e-9)


@pytest.mark.parametrize("form,cls", [("factorized", FactorizedRelPosMHSA), ("paper", RelPosMHSA)])
def test_tied_unties_exactly_and_nothing_ties(form, cls):
    torch.manual_seed(0)
    tied = convert_model(tiny_conv_model(padding_mode="circular").double(), form="tied", bias_strength=8,
                         qk_std=0.3).eval()
    with torch.no_grad():
        for p in tied.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, 1, 12, 12, dtype=torch.float64)
    untied = convert_form(tied, form)
    assert type(untied.blocks[0].mixer) is cls and untied.config["form"] == form
    torch.testing.assert_close(untied(x), tied(x), rtol=0, atol=1e-11)
    with pytest.raises(ValueError, match="form='tied'"):
        convert_form(untied, "tied")


def test_tied_model_from_scratch_and_its_errors(monkeypatch):
    torch.manual_seed(0)
    built, linear_init = [], nn.Linear.__init__

    def spy(self, in_features, out_features, *args, **kwargs):
        built.append(out_features)
        linear_init(self, in_features, out_features, *args, **kwargs)

    monkeypatch.setattr(nn.Linear, "__init__", spy)
    model = CMHSA(img_size=12, patch_size=4, in_chans=1, num_classes=5, embed="pixel", pixel_dim=2, depth=2,
                  mixer="attn", form="tied", kernel_size=5, qk_dim=3, mlp_ratio=2.0)
    assert model.blocks[0].mixer.qk_dim == 3 and model.blocks[0].mixer.value_bias is None
    # the tied layer never builds the free value map it replaces (9 heads x 32 wide here, far more at paper size)
    assert 9 * 32 not in built and 2 * 9 * 3 in built
    assert model(torch.randn(2, 1, 12, 12)).shape == (2, 5)
    with pytest.raises(ValueError, match="head_dim=8 applies to form='paper' and 'local'"):
        CMHSA(img_size=12, patch_size=4, in_chans=1, embed="pixel", pixel_dim=2, mixer="attn", form="tied",
              head_dim=8)
    with pytest.raises(ValueError, match="num_heads >= 9"):
        ConvTiedValues(2, 2, same_padding_geometry(5, 4), (3, 3), num_heads=4)
