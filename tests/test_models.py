import pytest
import timm
import torch
import torch.nn as nn

import cmhsa  # noqa: F401  (registers the models with timm)
from cmhsa.attention import FactorizedRelPosMHSA, RelPosMHSA
from cmhsa.engine import cpu_bf16_support
from cmhsa.local_attention import LocalRelPosMHSA
from cmhsa.models import CMHSA, MODEL_CONFIGS, convert_model, scale_position_biases_, transfer_error
from cmhsa.tied import TiedRelPosMHSA


def tiny(mixer="conv", **kw):
    args = dict(img_size=12, patch_size=4, in_chans=1, num_classes=5, embed="pixel", pixel_dim=2, depth=2,
                mixer=mixer, kernel_size=3, mlp_ratio=2.0)
    return CMHSA(**{**args, **kw})


@pytest.mark.parametrize("form", ["paper", "factorized", "tied"])
@pytest.mark.parametrize("embed,kernel", [("pixel", 3), ("identity", 5), ("pixel", 13)])
def test_converted_model_has_the_same_logits_float64(embed, kernel, form):
    torch.manual_seed(0)
    conv = tiny(embed=embed, kernel_size=kernel, pixel_dim=2 if embed == "pixel" else None).double().eval()
    for p in conv.parameters():  # move every weight off its init so the test sees the whole function
        p.data.add_(0.1 * torch.randn_like(p))
    attn = convert_model(conv, form=form, qk_std=0.01)
    assert attn.config["form"] == form
    assert type(attn.blocks[0].mixer) is {"paper": RelPosMHSA, "factorized": FactorizedRelPosMHSA,
                                           "tied": TiedRelPosMHSA}[form]
    x = torch.randn(3, 1, 12, 12, dtype=torch.float64)
    report = transfer_error(conv, attn, x)
    assert report["logits_error"] <= 1e-8 and max(report["layer_errors"]) <= 1e-8
    assert attn.num_heads == (9 if kernel <= 9 else 25)
    torch.testing.assert_close(attn(x), conv(x), rtol=0, atol=1e-8)


@pytest.mark.parametrize("form", ["paper", "factorized", "tied"])
def test_converted_model_float32_tolerance(form):
    torch.manual_seed(1)
    conv = timm.create_model("cmhsa5_conv_tiny").eval()
    attn = convert_model(conv, form=form)
    report = transfer_error(conv, attn, torch.randn(4, 1, 28, 28))
    assert report["logits_relative_error"] <= 1e-5, report


@pytest.mark.parametrize("form", ["paper", "factorized", "tied", "local"])
def test_scaling_the_position_biases_is_converting_with_that_bias_strength(form):
    """What convert.anneal_bias_to does each annealing epoch: beta 12 scaled by 1/4 is the conversion at beta 3,
    null key included, every weight equal."""
    conv = tiny().double()
    annealed, direct = (convert_model(conv, bias_strength=beta, form=form) for beta in (12.0, 3.0))
    assert scale_position_biases_(annealed, 0.25) == 2  # both layers
    for (name, a), b in zip(annealed.state_dict().items(), direct.state_dict().values()):
        assert torch.equal(a, b), name


def test_paper_mode_conversion_is_not_exact_at_the_border():
    torch.manual_seed(0)
    conv = tiny().double().eval()
    exact = transfer_error(conv, convert_model(conv, null_key=True), torch.randn(2, 1, 12, 12, dtype=torch.float64))
    paper = transfer_error(conv, convert_model(conv, null_key=False), torch.randn(2, 1, 12, 12, dtype=torch.float64))
    assert paper["logits_error"] > 1e3 * exact["logits_error"]


def test_conversion_copies_everything_outside_the_mixers():
    conv = tiny()
    attn = convert_model(conv, drop_path_rate=0.1)
    conv_state, attn_state = conv.state_dict(), attn.state_dict()
    shared = [k for k in conv_state if ".mixer." not in k]
    assert shared and all(torch.equal(conv_state[k], attn_state[k]) for k in shared)
    assert attn.config["mixer"] == "attn" and attn.config["drop_path_rate"] == 0.1
    assert attn.patch_embed.proj.weight.requires_grad and not conv.patch_embed.proj.weight.requires_grad
    with pytest.raises(ValueError, match="cannot change"):
        convert_model(conv, kernel_size=5)
    with pytest.raises(ValueError, match="convolution phase"):
        convert_model(attn)


def test_all_trainable_parameters_get_gradients_in_both_phases():
    for mixer, form in (("conv", "paper"), ("attn", "paper"), ("attn", "factorized")):
        model = tiny(mixer, form=form)
        nn.functional.cross_entropy(model(torch.randn(4, 1, 12, 12)), torch.arange(4)).backward()
        for name, p in model.named_parameters():
            if p.requires_grad:
                assert p.grad is not None and p.grad.abs().sum() > 0, (mixer, name)


def test_identity_embedding_is_the_raw_patch():
    model = tiny(embed="identity", pixel_dim=None)
    x = torch.randn(2, 1, 12, 12)
    torch.testing.assert_close(model.patch_embed(x), cmhsa.image_to_tokens(x, 4))


@pytest.mark.parametrize("name", sorted(MODEL_CONFIGS))
def test_timm_names_build(name):
    if name.endswith("_224"):
        model = timm.create_model(name, num_classes=7, pretrained_cfg_overlay=dict(file=None))
        assert model.embed_dim == 768 and len(model.blocks) == 6 and model.num_heads == 9
        assert model.head_dim == 768 and model.blocks[0].mlp.fc1.out_features == 3072
        return
    model = timm.create_model(name, num_classes=7)
    if "_fattn_" in name:
        assert isinstance(model.blocks[0].mixer, FactorizedRelPosMHSA) and model.blocks[0].mixer.qk_dim == 128 // 9
    if "_lattn_" in name:
        assert isinstance(model.blocks[0].mixer, LocalRelPosMHSA) and model.blocks[0].mixer.window_size == (3, 3)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 7)
    assert model.pretrained_cfg["input_size"] == (1, 28, 28)


def test_paper_size_models_train_one_step():
    """One step at the paper's size, in bf16 where this CPU has native bf16 (without it bf16 GEMMs are emulated,
    ~1000x slower; bf16 autocast itself is tested on small models)."""
    torch.manual_seed(0)
    bf16 = cpu_bf16_support() != "none"
    for name in ("cmhsa5_conv_224", "cmhsa5_attn_224", "cmhsa5_fattn_224"):
        model = timm.create_model(name, num_classes=100)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        x, y = torch.randn(2, 3, 224, 224), torch.tensor([3, 7])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        before = model.head.weight.detach().clone()
        opt.step()
        assert torch.isfinite(loss) and not torch.equal(before, model.head.weight)


def test_bad_arguments():
    with pytest.raises(ValueError, match="mixer must be"):
        tiny(mixer="mlp")
    with pytest.raises(ValueError, match="form must be one of"):
        tiny(mixer="attn", form="fast")
    for form in ("paper", "local"):
        with pytest.raises(ValueError, match="applies to form 'factorized' and 'tied' only"):
            tiny(mixer="attn", form=form, qk_dim=8)
    for form in ("factorized", "tied"):
        with pytest.raises(ValueError, match="applies to form='paper'"):
            tiny(mixer="attn", form=form, head_dim=8)
    with pytest.raises(ValueError, match="pixel_dim"):
        tiny(pixel_dim=None)
    with pytest.raises(ValueError, match=r"not divisible by patch_size \(4, 4\): use an img_size that is a multiple "
                                         r"of it \(e.g. 12 or 16"):
        tiny(img_size=14)
    with pytest.raises(ValueError, match="img_size"):
        tiny()(torch.randn(1, 1, 16, 16))
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("cmhsa3_conv_tiny", pretrained=True)


@pytest.mark.parametrize("form", ["paper", "factorized", "local"])
def test_conv_pattern_init_has_the_conversions_attention_but_random_filters(form):
    """attn_init='conv_pattern': the position biases a converted conv gets (so each head attends to its offset as
    in the converted model), while the value path stays random (so the function is not the CNN's)."""
    kw = dict(img_size=16, patch_size=4, in_chans=1, num_classes=5, embed="pixel", pixel_dim=2, depth=2,
              kernel_size=5, mlp_ratio=2.0, bias_strength=12.0)
    torch.manual_seed(0)
    conv_model = CMHSA(mixer="conv", **kw).eval()
    converted = convert_model(conv_model, bias_strength=12.0, form=form)
    control = CMHSA(mixer="attn", form=form, attn_init="conv_pattern", **kw).eval()
    plain = CMHSA(mixer="attn", form=form, **kw).eval()
    x = torch.randn(3, 1, 16, 16)
    tokens = control.patch_embed(x)
    for mine, theirs, random in zip(control.blocks, converted.blocks, plain.blocks):
        torch.testing.assert_close(mine.mixer.rel_pos_bias, theirs.mixer.rel_pos_bias)
        if form != "local":  # the converted heads look only at their offsets; so do the control's
            a, b = mine.mixer.attention_probs(tokens), theirs.mixer.attention_probs(tokens)
            assert (a - b).abs().max() < 0.05 and (random.mixer.attention_probs(tokens) - b).abs().max() > 0.5
    with torch.no_grad():
        assert (control(x) - conv_model(x)).abs().max() > 1e-2
    with pytest.raises(ValueError, match="conv_pattern"):
        CMHSA(mixer="conv", attn_init="conv_pattern", **kw)
