import json

import pytest
import timm
import torch
import torch.nn as nn
from timm.layers import StdConv2d, create_conv2d

from cmhsa import ConvAsAttention, convert_network
from cmhsa.cli import main
from cmhsa.network import conv_attention_mass, format_table
from cmhsa.pipeline import create_model, load_model


def relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "convnext_atto", "mobilenetv3_small_100",
                                  "efficientnet_b0", "tf_mobilenetv3_small_100"])  # tf_: Conv2dSame, stride 2
def test_timm_network_twin_is_exact(name):
    """Every Conv2d of the network becomes attention; logits agree to 1e-8 in float64. In bf16 the twin is as
    close to the float64 logits as the bf16 CNN itself: within 1.5x its error and 5e-2 relative."""
    torch.manual_seed(0)
    cnn = timm.create_model(name, pretrained=False).double().eval()
    twin, table = convert_network(cnn, img_size=32, verify=False)
    n_convs = sum(isinstance(m, nn.Conv2d) for m in cnn.modules())
    assert len(table) == n_convs and all(r["converted"] for r in table), [r for r in table if not r["converted"]]
    assert not any(type(m) is nn.Conv2d for m in twin.modules())
    assert sum(isinstance(m, ConvAsAttention) for m in twin.modules()) == n_convs
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        ref = cnn(x)
        assert relative_error(twin(x), ref) < 1e-8
        cnn_bf16 = relative_error(cnn.bfloat16()(x.bfloat16()).double(), ref)
        twin_bf16 = relative_error(twin.bfloat16()(x.bfloat16()).double(), ref)
    assert twin_bf16 <= 1.5 * cnn_bf16 + 1e-3 and twin_bf16 < 5e-2


class SmallNet(nn.Module):
    """Dilated, grouped, depthwise-stride-2, 1x1 and bias-free convolutions."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dilated = nn.Conv2d(8, 8, 3, padding=2, dilation=2, bias=False)
        self.grouped = nn.Conv2d(8, 12, 5, padding="same", groups=4)
        self.dw_down = nn.Conv2d(12, 12, 3, stride=2, padding=1, groups=12)
        self.pw = nn.Conv2d(12, 6, 1, bias=False)
        self.big_dw = nn.Conv2d(6, 6, 7, padding=3, groups=6)

    def forward(self, x):
        for m in (self.stem, self.dilated, self.grouped, self.dw_down, self.pw, self.big_dw):
            x = torch.relu(m(x))
        return x


@pytest.mark.parametrize("patch_size", ["auto", 2, {"stem": 1, "dw_*": 4, "big_dw": 3}])
def test_small_net_exact_for_every_patch_choice(patch_size):
    torch.manual_seed(0)
    net = SmallNet().double()
    twin, table = convert_network(net, patch_size=patch_size, img_size=24)
    assert all(r["converted"] for r in table) and all(r["error"] < 1e-10 for r in table)
    x = torch.randn(3, 3, 24, 24, dtype=torch.float64)
    with torch.no_grad():
        assert relative_error(twin(x), net(x)) < 1e-10
    if isinstance(patch_size, dict):
        chosen = {r["name"]: r["P"] for r in table}
        assert (chosen["stem"], chosen["dw_down"], chosen["big_dw"]) == (1, 4, 3)


@pytest.mark.parametrize("form", ["factorized", "local"])
def test_small_net_exact_in_the_other_forms(form):
    torch.manual_seed(0)
    net = SmallNet().double()
    twin, table = convert_network(net, patch_size=2, img_size=24, form=form)
    assert all(r["converted"] for r in table) and all(r["error"] < 1e-10 for r in table)
    x = torch.randn(3, 3, 24, 24, dtype=torch.float64)
    with torch.no_grad():
        assert relative_error(twin(x), net(x)) < 1e-10


def test_circular_padding_converts_exactly():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, padding_mode="circular"), nn.ReLU(),
                        nn.Conv2d(4, 3, 5, padding=2, padding_mode="circular")).double()
    twin, table = convert_network(net, patch_size=2, img_size=12)
    assert all(r["converted"] for r in table)
    x = torch.randn(2, 2, 12, 12, dtype=torch.float64)
    with torch.no_grad():
        assert relative_error(twin(x), net(x)) < 1e-10


def test_unknown_form_is_an_error():
    with pytest.raises(ValueError, match="form must be one of"):
        convert_network(SmallNet(), img_size=24, form="fast")


def test_auto_picks_the_cheaper_patch_size():
    """7x7 depthwise on 12x12: P = 1 gives 49 heads (Corollary 3), P = 3 gives 9; auto takes the fewer FLOPs."""
    conv = nn.Sequential(nn.Conv2d(16, 16, 7, padding=3, groups=16))
    rows = {P: convert_network(conv, patch_size=P, img_size=12, verify=False)[1][0] for P in (1, 3)}
    assert rows[1]["heads"] == 49 and rows[3]["heads"] == 9
    auto = convert_network(conv, img_size=12, verify=False)[1][0]
    assert auto["P"] == min(rows, key=lambda P: rows[P]["flops"])
    assert auto["flops"] == min(r["flops"] for r in rows.values())


class Unsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.reflect = nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect")
        self.down = nn.Conv2d(2, 2, 3, stride=2, padding=1)
        self.after = nn.Conv2d(2, 2, 3, padding=1)
        self.std = StdConv2d(2, 2, 3, padding=1)
        self.unused = nn.Conv2d(2, 2, 1)

    def forward(self, x):
        return self.std(self.after(self.down(self.reflect(x))))


@pytest.mark.parametrize("patch_size, name, reason", [
    (3, "down", "stride 2 does not divide P = 3"),
    (2, "after", "feature map 7x7 not divisible by P = 2"),
    ("auto", "reflect", "padding_mode reflect"),
    ("auto", "std", "StdConv2d is an nn.Conv2d subclass with its own forward"),
    ("auto", "unused", "not run by the forward pass"),
])
def test_unsupported_layers_are_skipped_with_their_reason_or_raise_when_strict(patch_size, name, reason):
    torch.manual_seed(0)
    net = Unsupported().double()
    twin, table = convert_network(net, patch_size=patch_size, img_size=14)
    row = next(r for r in table if r["name"] == name)
    assert not row["converted"] and reason in row["reason"]
    assert type(getattr(twin, name)) is type(getattr(net, name))  # left as the convolution it was
    assert reason in format_table(table)
    x = torch.randn(2, 2, 14, 14, dtype=torch.float64)
    with torch.no_grad():
        assert relative_error(twin(x), net(x)) < 1e-10
    with pytest.raises(ValueError, match=reason):
        convert_network(net, patch_size=patch_size, layers=name, img_size=14, strict=True)


def test_conv2d_same_dynamic_padding():
    """timm's Conv2dSame pads by the input size, more after than before when the total is odd (3x3, stride 2 on an
    even map): converted exactly through an equivalent static padding; dilation 3 > stride 2 is skipped."""
    torch.manual_seed(0)
    net = nn.Sequential(create_conv2d(3, 4, 4, padding="same"), create_conv2d(4, 4, 4, stride=2, padding="same"),
                        create_conv2d(4, 4, 3, stride=2, padding="same"),
                        create_conv2d(4, 4, 5, stride=2, padding="same", groups=4),
                        create_conv2d(4, 4, 3, stride=2, dilation=3, padding="same")).double()
    assert all(type(m).__name__ == "Conv2dSame" for m in net[1:])
    twin, table = convert_network(net, img_size=32)
    assert [r["converted"] for r in table] == [True, True, True, True, False]
    assert all(r["error"] < 1e-10 for r in table[:4])
    assert "pads 2 before and 3 after on a 4x4 map" in table[4]["reason"]
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert relative_error(twin(x), net(x)) < 1e-10


def test_wrong_input_size_and_bad_arguments_raise():
    net = SmallNet().double()
    twin, _ = convert_network(net, img_size=24, verify=False)
    with pytest.raises(ValueError, match="converted for 24x24 feature maps, got 32x32"):
        twin(torch.zeros(1, 3, 32, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match="matches no Conv2d"):
        convert_network(net, layers="layer4.*", img_size=24)
    with pytest.raises(ValueError, match="exactly one of img_size"):
        convert_network(net)
    with pytest.raises(ValueError, match="form"):
        convert_network(net, form="nonsense", img_size=24)
    with pytest.raises(ValueError, match="img_size must be an int or a pair of ints with each >= 1, got 0"):
        convert_network(net, img_size=0)


def test_an_input_the_model_cannot_take_is_named(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"SmallNet cannot run on a sample input of shape \(1, 5, 24, 24\): .*channels"):
        convert_network(SmallNet().double(), sample_input=torch.zeros(1, 5, 24, 24, dtype=torch.float64))
    code = main(["convert-net", "--model", "resnet18", "--img-size", "0", "--out", str(tmp_path / "x")])
    assert code == 2 and "img_size must be an int or a pair of ints with each >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_layer_selection_and_sample_input():
    torch.manual_seed(0)
    net = SmallNet().double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    twin, table = convert_network(net, layers=["dw_*", "big_dw"], sample_input=x)
    assert [r["name"] for r in table] == ["dw_down", "big_dw"]
    assert isinstance(twin.dw_down, ConvAsAttention) and type(twin.stem) is nn.Conv2d
    assert type(net.dw_down) is nn.Conv2d  # the input model is untouched
    with torch.no_grad():
        assert relative_error(twin(x), net(x)) < 1e-10


def test_attention_twin_rebuilds_the_structure():
    """The timm name `attention_twin` rebuilds a twin whose state dict loads strictly, with the same function."""
    torch.manual_seed(0)
    cnn = timm.create_model("resnet18", in_chans=1, num_classes=5).eval()
    twin, table = convert_network(cnn, layers="layer3.*", img_size=32, verify=False)
    rebuilt = timm.create_model("attention_twin", cnn="resnet18", cnn_kwargs={"in_chans": 1}, num_classes=5,
                                img_size=32, patch_size={r["name"]: r["P"] for r in table},
                                layers=[r["name"] for r in table]).eval()
    rebuilt.load_state_dict(twin.state_dict())
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert relative_error(rebuilt(x), cnn(x)) < 1e-5
    with pytest.raises(ValueError, match="disagrees"):
        timm.create_model("attention_twin", cnn="resnet18", cnn_kwargs={"in_chans": 3}, in_chans=1, img_size=32)


def test_cli_convert_net_then_eval(tmp_path, capsys):
    out = tmp_path / "twin"
    kwargs = '{"in_chans": 1, "num_classes": 10}'
    code = main(["convert-net", "--model", "resnet18", "--model-kwargs", kwargs, "--layers", "layer4.*",
                 "--patch-size", "auto", "--img-size", "32", "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0
    assert "| layer4.0.conv1 | 3x3 | 2x2 |" in text and "5 of 5 selected convolutions converted" in text
    error = float(text.split("float64 logits error on random input: ")[1].split()[0])
    assert error < 1e-8
    report = json.loads((out / "convert.json").read_text())
    assert report["logits_error_float64"] == pytest.approx(error, rel=1e-2) and len(report["layers"]) == 5

    # the checkpoint rebuilds into the twin of the same (seed 0) CNN
    twin, spec, _ = load_model(out)
    cnn = create_model({"name": "resnet18", "kwargs": json.loads(kwargs)}, seed=0).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert relative_error(twin.eval()(x), cnn(x)) < 1e-5
    assert sum(isinstance(m, ConvAsAttention) for m in twin.modules()) == 5

    # scored at the 32 px the twin was built for, not the default data.img_size (28)
    code = main(["eval", str(out), "--dataset", "digits", "--device", "cpu"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["model"] == "attention_twin" and result["images"] > 0


def test_cli_convert_net_takes_a_trained_cnn_from_its_run(tmp_path, capsys):
    """A CNN trained by `cmhsa train` converts from its checkpoint directory alone (model.json names the model and
    its kwargs), and its twin scores what the CNN scored; mismatched weights are a clear error."""
    run, out = tmp_path / "run", tmp_path / "twin"
    assert main(["train", "--output", str(run), "--set", "data.dataset=digits", "data.img_size=16",
                 "model.name=resnet10t", "phase1.epochs=1", "phase1.max_steps_per_epoch=3", "train.batch_size=16",
                 "phase1.warmup_epochs=0", "train.device=cpu", "train.precision=fp32"]) == 0
    assert main(["convert-net", "--checkpoint", str(run / "train" / "best"), "--img-size", "16",
                 "--out", str(out)]) == 0
    assert json.loads((out / "model.json").read_text())["kwargs"]["cnn_kwargs"] == {"num_classes": 10, "in_chans": 1}
    capsys.readouterr()
    assert main(["eval", str(run), "--which", "best", "--device", "cpu"]) == 0
    cnn_result = json.loads(capsys.readouterr().out)
    assert main(["eval", str(out), "--dataset", "digits", "--device", "cpu"]) == 0
    twin_result = json.loads(capsys.readouterr().out)
    # the same predictions up to float32 rounding: at most one image whose top two logits tie that closely
    assert twin_result["images"] == cnn_result["images"]
    assert abs(twin_result["top1"] - cnn_result["top1"]) <= 100 / cnn_result["images"] + 1e-6

    assert main(["convert-net", "--model", "resnet18", "--checkpoint", str(run), "--img-size", "16",
                 "--out", str(tmp_path / "x")]) == 2
    assert "holds a resnet10t" in capsys.readouterr().err
    assert main(["convert-net", "--model", "resnet10t", "--checkpoint", str(run / "train" / "best" / "model.safetensors"),
                 "--img-size", "16", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "do not fit this ResNet: size mismatch for conv1.0.weight" in err and "in_chans and num_classes" in err
    assert main(["convert-net", "--img-size", "16", "--out", str(tmp_path / "x")]) == 2
    assert "--model is needed" in capsys.readouterr().err


def test_cli_convert_net_gives_a_fixed_grid_model_its_image_size(tmp_path, capsys):
    """A ViT's patch embedding is a convolution too; --img-size reaches the model, which fixes its grid to it."""
    out = tmp_path / "vit"
    kwargs = '{"depth": 1, "in_chans": 1, "num_classes": 10}'
    assert main(["convert-net", "--model", "vit_tiny_patch16_224", "--model-kwargs", kwargs, "--img-size", "32",
                 "--out", str(out)]) == 0
    assert float(capsys.readouterr().out.split("float64 logits error on random input: ")[1].split()[0]) < 1e-8
    twin, spec, _ = load_model(out)
    assert spec["kwargs"]["cnn_kwargs"]["img_size"] == 32
    vit = create_model({"name": "vit_tiny_patch16_224", "kwargs": {**json.loads(kwargs), "img_size": 32}},
                       seed=0).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert relative_error(twin.eval()(x), vit(x)) < 1e-5


def test_unknown_model_name_suggests_timm_names():
    with pytest.raises(ValueError, match="unknown model 'resnt18'; did you mean 'resnet18'"):
        create_model({"name": "resnt18", "kwargs": {}})


def test_cli_convert_net_strict_fails_with_reason(tmp_path, capsys):
    code = main(["convert-net", "--model", "resnet18", "--layers", "layer1.0.conv1", "--patch-size", "3",
                 "--img-size", "32", "--strict", "--out", str(tmp_path / "x")])
    assert code == 2 and "feature map 8x8 not divisible by P = 3" in capsys.readouterr().err


@pytest.mark.parametrize("form", ["paper", "factorized"])
def test_conv_attention_mass_is_one_at_conversion_and_drops_when_attention_moves(form):
    torch.manual_seed(0)
    net = SmallNet()
    twin, _ = convert_network(net, layers=["grouped", "big_dw"], img_size=12, verify=False, form=form)
    x = torch.randn(2, 3, 12, 12)
    mass = conv_attention_mass(twin, x)
    assert set(mass) == {"grouped", "big_dw"} and all(m > 1 - 1e-6 for m in mass.values())
    with torch.no_grad():
        twin.grouped.attn.rel_pos_bias.zero_()  # uniform positional attention: the convolution is gone
    assert conv_attention_mass(twin, x)["grouped"] < 0.5 and conv_attention_mass(twin, x)["big_dw"] > 1 - 1e-6


def test_cmhsa_train_fine_tunes_a_converted_checkpoint(tmp_path, capsys):
    """model.name=attention_twin with the convert-net kwargs and timm's checkpoint_path starts from the twin."""
    out = tmp_path / "twin"
    assert main(["convert-net", "--model", "resnet18", "--model-kwargs", '{"in_chans": 1, "num_classes": 10}',
                 "--layers", "layer4.1.*", "--img-size", "32", "--out", str(out)]) == 0
    kwargs = json.loads((out / "model.json").read_text())["kwargs"]
    kwargs["checkpoint_path"] = str(out / "model.safetensors")
    twin, _, _ = load_model(out)
    started = create_model({"name": "attention_twin", "kwargs": kwargs}, seed=123)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert relative_error(started.eval()(x), twin.eval()(x)) < 1e-6
    config = tmp_path / "finetune.yaml"
    config.write_text(json.dumps({"name": "ft", "output": str(tmp_path / "run"),
                                  "data": {"dataset": "digits", "img_size": 32},
                                  "model": {"name": "attention_twin", "kwargs": kwargs},
                                  "phase1": {"epochs": 1, "max_steps_per_epoch": 1, "batch_size": 8,
                                             "precision": "fp32", "device": "cpu"}}))
    capsys.readouterr()
    assert main(["train", "--config", str(config)]) == 0
    assert "attention_twin: val top-1" in capsys.readouterr().out
    trained, spec, _ = load_model(tmp_path / "run")
    assert spec["name"] == "attention_twin" and sum(isinstance(m, ConvAsAttention) for m in trained.modules()) == 2


def test_cmhsa_analyze_reads_an_attention_twin(tmp_path, capsys):
    """A twin of a timm CNN has no .blocks or patch grid: analyze compares its stages, shifts by powers of 2 up to
    its total stride (below the image size), and reports how much attention stays on the convolution's keys (all of it, unchanged)."""
    out = tmp_path / "twin"
    assert main(["convert-net", "--model", "resnet10t", "--model-kwargs", '{"in_chans": 1, "num_classes": 10}',
                 "--layers", "layer3.*", "--img-size", "16", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["analyze", str(out), "--dataset", "digits", "--img-size", "16", "--max-batches", "1"]) == 0
    result = json.loads((out / "analysis" / "analysis.json").read_text())
    assert set(result["conv_attention_mass"]) == {"layer3.0.conv1", "layer3.0.conv2", "layer3.0.downsample.1"}
    assert all(m > 1 - 1e-6 for m in result["conv_attention_mass"].values())
    assert len(result["cka_self"]) == 5  # stem + 4 stages of timm's feature_info
    # powers of 2 up to the total stride (32), but only below the 16 px image: a 16 px shift is no shift at all
    assert list(result["shift_consistency"]["circular"]) == ["1", "2", "4", "8"]
    assert "attention on the converted convolution's keys" in capsys.readouterr().out
