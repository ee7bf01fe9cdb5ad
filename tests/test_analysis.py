"""Analysis tools against known answers: a freshly converted CMHSA *is* its convolution, CKA's invariances,
shift-equivariant toys, hand-computed attention distances, and analyze() on a tiny hand-made run directory."""
import argparse
import itertools
import json
import math

import pytest
import timm
import torch
import torch.nn as nn
from timm.models.convit import ConVit

from cmhsa.analysis import (add_analyze_parser, analyze, attention_details, attention_distance, attention_maps,
                            cka, cka_matrix, conv_projection, hsic_unbiased, layer_features, remaining_convolution,
                            remaining_convolution_over_checkpoints, shift_consistency, shift_images)
from cmhsa.attention import RelPosMHSA
from cmhsa.checkpoint import save_checkpoint
from cmhsa.config import load_config, save_config
from cmhsa.convert import conv_blocks, same_padding_geometry
from cmhsa.models import CMHSA, convert_model
from cmhsa.provenance import git_state

TINY = dict(img_size=12, patch_size=4, in_chans=1, num_classes=5, embed="pixel", pixel_dim=2, depth=2, mixer="conv",
            kernel_size=3, mlp_ratio=2.0)
# the construction's head order: offsets of a 3x3 kernel on 4x4 patches, row-major
OFFSETS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    conv = CMHSA(**TINY).eval()
    return conv, convert_model(conv, bias_strength=60).eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(6, 1, 12, 12, generator=torch.Generator().manual_seed(1))


def _vit():
    torch.manual_seed(0)
    # vit_tiny at 28 px, 4 blocks instead of 12 to keep the test file fast
    return timm.create_model("vit_tiny_patch16_224", img_size=28, patch_size=4, in_chans=1, num_classes=10,
                             depth=4).eval()


def _convit():
    torch.manual_seed(0)
    return ConVit(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=16, depth=4, num_heads=4).eval()


# ------------------------------------------------------------------------------------------ remaining convolution


def test_converted_model_is_exactly_its_convolution(pair, images):
    conv, attn = pair
    rc = remaining_convolution(attn, images)
    assert len(rc["layers"]) == 2
    for layer, kernel, block in zip(rc["layers"], rc["kernels"], conv.blocks):
        assert layer["offsets"] == [list(d) for d in OFFSETS]
        assert min(layer["offset_mass"]) > 1 - 1e-6
        assert max(layer["content_logit_absmax"]) == 0.0  # W_Q = W_K = 0: content logits are exactly 0
        assert layer["positional_share"] == [1.0] * 9
        assert layer["conv_projection_error"] < 1e-6
        torch.testing.assert_close(kernel, block.mixer.conv.weight.double(), atol=1e-6, rtol=0)
        # border queries whose neighbour is missing send their weight to the null key: 3 of 9 queries per
        # edge offset, 5 of 9 per corner offset, none for the centre head
        expected_null = [(9 - (3 - abs(dy)) * (3 - abs(dx))) / 9 for dy, dx in OFFSETS]
        assert layer["null_mass"] == pytest.approx(expected_null, abs=1e-6)
    assert rc["offset_mass"] == pytest.approx(1.0, abs=1e-6)
    # the bias table's argmax names the same offsets as the construction
    by_argmax = remaining_convolution(attn, images, offsets="argmax")
    assert by_argmax["layers"][0]["offsets"] == rc["layers"][0]["offsets"]


def test_factorized_model_reads_as_the_same_convolution(pair, images):
    conv, attn = pair
    fact = convert_model(conv, bias_strength=60, form="factorized").eval()
    rc, ref = remaining_convolution(fact, images), remaining_convolution(attn, images)
    for layer, ref_layer, kernel, block in zip(rc["layers"], ref["layers"], rc["kernels"], conv.blocks):
        assert layer["offsets"] == ref_layer["offsets"] and max(layer["content_logit_absmax"]) == 0.0
        assert layer["null_mass"] == pytest.approx(ref_layer["null_mass"], abs=1e-9)
        assert layer["conv_projection_error"] < 1e-6
        torch.testing.assert_close(kernel, block.mixer.conv.weight.double(), atol=1e-6, rtol=0)
    for d, ref_d in zip(attention_details(fact, images), attention_details(attn, images)):
        torch.testing.assert_close(d.attn, ref_d.attn, atol=1e-6, rtol=0)
        torch.testing.assert_close(d.null_mass, ref_d.null_mass, atol=1e-6, rtol=0)


def test_remaining_convolution_sees_departures_from_the_convolution(pair, images):
    _, attn = pair
    moved = convert_model(CMHSA(**TINY), bias_strength=60).eval()
    moved.load_state_dict(attn.state_dict())
    layer = moved.blocks[0].mixer
    with torch.no_grad():
        layer.rel_pos_bias.mul_(0.05)  # soft positional attention: mass spreads over neighbours
        H, D = layer.num_heads, layer.dim
        layer.qkv.weight[:2 * H * D].normal_(0, 0.3)  # content logits appear
    rc = remaining_convolution(moved, images)
    first, second = rc["layers"]
    assert max(first["offset_mass"]) < 0.9
    assert 0 < max(first["positional_share"]) < 1 and max(first["content_logit_absmax"]) > 0
    assert first["conv_projection_error"] > 0.1
    assert second["conv_projection_error"] < 1e-6  # the untouched layer is still the convolution


def test_conv_projection_is_the_least_squares_solution():
    # a random layer and random mean attention: the closed form must equal lstsq over a basis of kernels
    torch.manual_seed(0)
    P, C, K, grid = 2, 2, 3, (3, 3)
    layer = RelPosMHSA(P * P * C, num_heads=3, head_dim=4, grid_size=grid).double()
    geometry = same_padding_geometry(K, P)
    n_table = layer.rel_pos_bias.shape[1]
    abar = torch.rand(3, n_table, dtype=torch.float64)
    kernel, rel = conv_projection(layer, abar, geometry, C)

    H, hd = 3, 4
    w = layer.qkv.weight.detach()
    m_heads = torch.stack([w[2 * H * hd + h * hd:2 * H * hd + (h + 1) * hd].T
                           @ layer.proj.weight.detach()[:, h * hd:(h + 1) * hd].T for h in range(H)])
    target = torch.einsum("ht,hij->tij", abar, m_heads).reshape(-1)
    columns = []
    for j in range(C * C * K * K):
        basis = torch.zeros(C * C * K * K, dtype=torch.float64)
        basis[j] = 1
        offsets, blocks = conv_blocks(basis.reshape(C, C, K, K), geometry)
        full = torch.zeros(n_table, *blocks.shape[1:], dtype=torch.float64)
        full[layer.offset_index(offsets)] = blocks
        columns.append(full.reshape(-1))
    A = torch.stack(columns, dim=1)
    solution = torch.linalg.lstsq(A, target[:, None]).solution[:, 0]
    torch.testing.assert_close(kernel.reshape(-1), solution, atol=1e-10, rtol=0)
    expected = ((A @ solution - target).norm() / target.norm()).item()
    assert rel == pytest.approx(expected, rel=1e-9)


def test_remaining_convolution_rejects_other_models(pair, images):
    conv, _ = pair
    with pytest.raises(ValueError, match="convert_model"):
        remaining_convolution(conv, images)


# ------------------------------------------------------------------------------------------ attention maps


def _rebuild_output(module, x, attn):
    """The layer's output from attention weights over all its keys (null key has value 0)."""
    B, N, C = x.shape
    if isinstance(module, RelPosMHSA):
        v = module.qkv(x).reshape(B, N, 3, module.num_heads, module.head_dim)[:, :, 2].transpose(1, 2)
    else:
        hd = C // module.num_heads
        v = module.qkv(x).reshape(B, N, 3, module.num_heads, hd)[:, :, 2].transpose(1, 2)
    return module.proj((attn @ v).transpose(1, 2).reshape(B, N, -1))


def _captured_io(model, module, images):
    seen = {}
    handle = module.register_forward_hook(lambda m, args, out: seen.update(x=args[0], out=out))
    with torch.no_grad():
        model(images)
    handle.remove()
    return seen["x"], seen["out"]


def test_cmhsa_attention_maps_drop_the_null_key_without_renormalising(pair, images):
    _, attn = pair
    details = attention_details(attn, images)
    assert len(details) == 2
    for d, block in zip(details, attn.blocks):
        assert d.attn.shape == (6, 9, 9, 9) and d.null_mass.shape == (6, 9, 9) and d.prefix_mass is None
        torch.testing.assert_close(d.attn.sum(-1) + d.null_mass, torch.ones(6, 9, 9))
        # the null key's value is zero, so the real-key weights alone reproduce the layer's output
        x, out = _captured_io(attn, block.mixer, images)
        with torch.no_grad():
            torch.testing.assert_close(_rebuild_output(block.mixer, x, d.attn), out, atol=1e-5, rtol=1e-5)


def test_attention_maps_timm_vit():
    vit, x = _vit(), torch.randn(2, 1, 28, 28)
    details = attention_details(vit, x)
    assert len(details) == 4
    for d in details:
        assert d.attn.shape == (2, 3, 49, 49) and d.null_mass is None
        torch.testing.assert_close(d.attn.sum(-1), torch.ones(2, 3, 49))
        assert d.prefix_mass.shape == (2, 3, 49) and 0 <= d.prefix_mass.min() and d.prefix_mass.max() <= 1
    # with the class token kept, the recomputed weights are the ones the forward pass used
    full = attention_maps(vit, x, keep_prefix=True)
    assert full[0].shape == (2, 3, 50, 50)
    for i in (0, 3):
        module = vit.blocks[i].attn
        inp, out = _captured_io(vit, module, x)
        with torch.no_grad():
            torch.testing.assert_close(_rebuild_output(module, inp, full[i]), out, atol=1e-5, rtol=1e-4)


def test_attention_maps_timm_convit():
    model, x = _convit(), torch.randn(2, 1, 28, 28)
    maps = attention_details(model, x)
    assert [m.attn.shape for m in maps] == [(2, 4, 49, 49)] * 4
    assert [m.prefix_mass is None for m in maps] == [True, True, True, False]  # class token after the GPSA blocks
    for m in maps:
        torch.testing.assert_close(m.attn.sum(-1), torch.ones(2, 4, 49))
    gpsa = model.blocks[0].attn
    inp, _ = _captured_io(model, gpsa, x)
    with torch.no_grad():
        torch.testing.assert_close(maps[0].attn, gpsa.get_attention(inp))
    mhsa = model.blocks[3].attn
    inp, out = _captured_io(model, mhsa, x)
    with torch.no_grad():
        full = attention_maps(model, x, keep_prefix=True)[3]
        torch.testing.assert_close(_rebuild_output(mhsa, inp, full), out, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="convert_model"):
        attention_maps(CMHSA(**TINY), torch.randn(1, 1, 12, 12))


# ------------------------------------------------------------------------------------------ attention distance


def test_attention_distance_of_converted_model_is_the_offset_length(pair, images):
    _, attn = pair
    lengths = [math.hypot(dy, dx) for dy, dx in OFFSETS]
    result = attention_distance(attn, images)
    assert result["unit"] == "patches" and result["images"] == 6
    for heads in result["layers"]:
        assert heads == pytest.approx(lengths, abs=1e-6)
    assert result["mean"][0] == pytest.approx((4 + 4 * math.sqrt(2)) / 9, abs=1e-6)
    # null weight at distance 0: each head scaled by the share of queries whose neighbour exists
    zero = attention_distance(attn, [(images[:3], None), (images[3:], None)], null_key="zero")
    inside = [(3 - abs(dy)) * (3 - abs(dx)) / 9 for dy, dx in OFFSETS]
    assert zero["layers"][1] == pytest.approx([l * f for l, f in zip(lengths, inside)], abs=1e-6)


def test_attention_distance_of_uniform_attention_on_a_vit():
    vit = _vit()
    with torch.no_grad():
        for block in vit.blocks:  # q = k = 0: uniform attention over the 50 tokens
            block.attn.qkv.weight[:2 * 192].zero_()
            block.attn.qkv.bias[:2 * 192].zero_()
    result = attention_distance(vit, torch.randn(2, 1, 28, 28))
    # uniform over the 49 patches once the class token is dropped: mean distance between two cells of a 7x7 grid
    cells = list(itertools.product(range(7), range(7)))
    by_hand = sum(math.dist(a, b) for a in cells for b in cells) / 49 ** 2
    assert result["layers"] == [pytest.approx([by_hand] * 3, rel=1e-5)] * 4
    assert result["prefix_mass"][0] == pytest.approx([1 / 50] * 3, rel=1e-5)


# ------------------------------------------------------------------------------------------ CKA


def test_hsic_unbiased_is_the_u_statistic():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(6, 4, generator=g, dtype=torch.float64)
    K, L = x @ x.T, y @ y.T
    n = 6
    total = 0.0
    for i, j, q, r in itertools.permutations(range(n), 4):  # Song et al. 2012, eq. 5 before simplification
        total += K[i, j] * L[i, j] + K[i, j] * L[q, r] - 2 * K[i, j] * L[i, q]
    expected = total / (n * (n - 1) * (n - 2) * (n - 3))
    assert hsic_unbiased(K, L).item() == pytest.approx(expected.item(), rel=1e-10)


def test_cka_known_answers():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 20, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=torch.float64))
    assert cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert cka(x, x @ q) == pytest.approx(1.0, abs=1e-12)  # orthogonal transform
    assert cka(x, 3.7 * x) == pytest.approx(1.0, abs=1e-12)  # isotropic scaling
    assert cka(x, x * torch.linspace(0.1, 3, 20, dtype=torch.float64)) < 0.99  # not invariant to anisotropic scaling
    batches = list(x.split(16))
    assert cka(batches, [3 * b @ q for b in batches]) == pytest.approx(1.0, abs=1e-12)
    independent = [cka(torch.randn(128, 32, generator=g), torch.randn(128, 32, generator=g)) for _ in range(5)]
    assert max(abs(v) for v in independent) < 0.06


def test_cka_matrix_within_and_between_models(pair, images):
    conv, attn = pair
    loader = [(images[:4], None), (images, None)]
    self_cka = cka_matrix(attn, None, loader)
    assert self_cka.shape == (2, 2)
    torch.testing.assert_close(self_cka, self_cka.T)
    torch.testing.assert_close(self_cka.diagonal(), torch.ones(2, dtype=torch.float64))
    # the converted model computes what the conv model computes, block by block
    cross = cka_matrix(conv, attn, loader)
    torch.testing.assert_close(cross.diagonal(), torch.ones(2, dtype=torch.float64), atol=1e-5, rtol=0)
    # different architectures and widths: (4 ViT blocks) x (4 ConViT blocks) on the same images
    vit = _vit()
    feats = layer_features(vit, torch.randn(5, 1, 28, 28))
    assert len(feats) == 4 and feats[0].shape == (5, 49, 192)  # class token dropped
    mean_pool = cka_matrix(vit, _convit(), torch.randn(8, 1, 28, 28), tokens="mean")
    assert mean_pool.shape == (4, 4) and torch.isfinite(mean_pool).all()


# ------------------------------------------------------------------------------------------ shift consistency


class CircularToy(nn.Module):
    """conv with circular padding + global average pool: exactly invariant to circular shifts."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1, padding_mode="circular")
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean(dim=(-2, -1)))


def test_shift_images():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    torch.testing.assert_close(shift_images(x, 1, 2), torch.roll(x, (1, 2), dims=(-2, -1)))
    z = shift_images(x, 1, -1, mode="zero")
    assert z[0, 0, 0].tolist() == [0, 0, 0, 0] and z[0, 0, :, 3].tolist() == [0, 0, 0, 0]
    torch.testing.assert_close(z[0, 0, 1:, :3], x[0, 0, :3, 1:])


def test_shift_consistency_toys():
    torch.manual_seed(0)
    x = torch.randn(48, 1, 12, 12, dtype=torch.float64)
    toy = CircularToy().double()
    assert shift_consistency(toy, x, shifts=range(1, 5)) == {1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0}
    positional = nn.Sequential(nn.Flatten(), nn.Linear(144, 5)).double()
    result = shift_consistency(positional, [(x[:24], None), (x[24:], None)], shifts=[1, 2], mode="zero")
    assert set(result) == {1, 2} and max(result.values()) < 1


def test_shift_consistency_defaults_to_patch_size_shifts(pair, images):
    _, attn = pair
    result = shift_consistency(attn, images)
    assert sorted(result) == [1, 2, 3, 4] and all(0 <= v <= 1 for v in result.values())


# ------------------------------------------------------------------------------------------ analyze


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A pipeline-shaped run on sklearn digits (8x8 padded to 12): phase1/last, phase2/{best,last}, config.yaml
    (converting with qk_std = 0.02, so epoch 0 has small random W_Q, W_K)."""
    run = tmp_path_factory.mktemp("run")
    save_config(load_config(None, ["name=tiny", "data.dataset=digits", "data.img_size=12", "convert.qk_std=0.02"]), run / "config.yaml")
    kwargs = dict(TINY, num_classes=10)
    conv10 = CMHSA(**kwargs).eval()
    (run / "phase1").mkdir()
    (run / "phase1/model.json").write_text(json.dumps({"name": "cmhsa3_conv_tiny", "kwargs": kwargs}))
    save_checkpoint(run / "phase1/last", conv10, epoch=2, extra={"phase": "phase1"})
    attn10 = convert_model(conv10, bias_strength=60).eval()
    (run / "phase2").mkdir()
    (run / "phase2/model.json").write_text(json.dumps({"name": "cmhsa3_attn_tiny", "kwargs": attn10.config}))
    for epoch, name, factor in ((0, "best", 0.1), (1, "last", 0.5)):  # "training" softens the positional attention
        with torch.no_grad():
            for block in attn10.blocks:
                block.mixer.rel_pos_bias.mul_(factor)
        save_checkpoint(run / "phase2" / name, attn10, epoch=epoch,
                        extra={"phase": "phase2", "metrics": {"val_top1": 10.0 + epoch}})
    return run


def test_remaining_convolution_over_checkpoints(run_dir):
    images = torch.randn(8, 1, 12, 12)
    records = remaining_convolution_over_checkpoints(run_dir, images)
    assert [r["epoch"] for r in records] == [0, 1, 2]
    assert records[0]["checkpoints"] == ["phase1/last (converted)"]
    assert records[0]["conv_projection_error"] < 1e-6 and records[0]["offset_mass"] > 1 - 1e-6
    # the run converts with qk_std = 0.02: small content logits, still exact
    assert 0.99 < records[0]["positional_share"] < 1
    assert max(records[0]["layers"][0]["content_logit_absmax"]) > 0
    assert records[2]["val_top1"] == 11.0
    masses = [r["offset_mass"] for r in records]
    assert masses[0] > masses[1] > masses[2]


def test_analyze_run_directory(run_dir, tmp_path):
    result = analyze(run_dir, compare=run_dir / "phase1", max_batches=1, batch_size=16, out_dir=tmp_path / "out")
    stored = json.loads((tmp_path / "out/analysis.json").read_text())
    assert stored["data"] == {"dataset": "digits", "img_size": 12, "split": "val", "images": 16, "batches": 1}
    assert stored["model"]["name"] == "cmhsa3_attn_tiny"
    assert len(stored["attention_distance"]["layers"]) == 2
    assert [r["epoch"] for r in stored["remaining_convolution_over_checkpoints"]] == [0, 1, 2]
    assert stored["remaining_convolution"]["offset_mass"] == pytest.approx(
        stored["remaining_convolution_over_checkpoints"][-1]["offset_mass"])
    assert len(stored["cka_self"]) == 2 and len(stored["compare"]["cka"][0]) == 2
    assert set(stored["shift_consistency"]) == {"circular", "zero"}
    for name in ("attention_distance", "cka_self", "cka_compare", "shift_consistency", "remaining_convolution"):
        assert (tmp_path / f"out/{name}.png").read_bytes()[:4] == b"\x89PNG", name
    assert result["files"][0].endswith("analysis.json")
    assert stored["git"] == git_state() and stored["git"]["commit"]


def test_analyze_command_and_model_input(run_dir, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="cmhsa")
    add_analyze_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["analyze", str(run_dir / "phase2"), "--which", "best", "--max-batches", "1",
                              "--batch-size", "8", "--no-checkpoints"])
    assert args.func(args) == 0
    assert "attention distance" in capsys.readouterr().out
    stored = json.loads((run_dir / "phase2/analysis-best/analysis.json").read_text())  # beside, never inside, best/
    assert stored["model"]["checkpoint"].endswith("best") and "remaining_convolution_over_checkpoints" not in stored
    assert not (run_dir / "phase2/best/analysis").exists()
    # a plain timm model: needs out_dir and data
    with pytest.raises(ValueError, match="out_dir"):
        analyze(_vit())
    loader = [(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,)))]
    out = analyze(_convit(), loader=loader, out_dir=tmp_path / "convit", shifts=[4])
    assert len(out["attention_distance"]["layers"]) == 4 and "remaining_convolution" not in out
    assert list(out["shift_consistency"]["circular"]) == ["4"]


def test_zero_fill_uses_the_given_per_channel_value():
    from cmhsa.analysis import shift_images

    x = torch.arange(2 * 3 * 3, dtype=torch.float32).view(1, 2, 3, 3)
    out = shift_images(x, 1, 0, mode="zero", fill=[-1.0, -2.0])
    assert torch.all(out[0, 0, 0] == -1.0) and torch.all(out[0, 1, 0] == -2.0)
    assert torch.equal(out[..., 1:, :], x[..., :2, :])
