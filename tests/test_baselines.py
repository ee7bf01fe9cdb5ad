"""Mimetic initialisation of a timm ViT: the products it promises, not just that it runs."""
import timm
import torch

import cmhsa  # noqa: F401  (registers vit_mimetic)
from cmhsa.baselines import mimetic_init_

VIT = dict(img_size=8, patch_size=2, in_chans=1, num_classes=3, embed_dim=64, depth=2, num_heads=4)


def test_mimetic_products_are_near_identity_and_minus_identity():
    torch.manual_seed(0)
    vit = timm.create_model("vit_mimetic", **VIT)
    dim, heads, head_dim = 64, 4, 16
    for block in vit.blocks:
        w = block.attn.qkv.weight
        wq, wk, wv = w[:dim], w[dim:2 * dim], w[2 * dim:]
        for h in range(heads):
            rows = slice(h * head_dim, (h + 1) * head_dim)
            qk = wq[rows].T @ wk[rows]  # (D, D), rank head_dim
            # rank-16 approximation of 0.7 Z + 0.7 I: the diagonal dominates (mean 0.7 * 16/64 from the kept
            # spectrum plus Z's share), off-diagonals stay small
            assert torch.linalg.matrix_rank(qk) == head_dim
            assert qk.diagonal().mean() > 3 * qk.fill_diagonal_(0).abs().mean()
        vo = wv.T @ block.attn.proj.weight.T  # full rank: exactly 0.4 Z - 0.4 I up to float error
        z = (vo + 0.4 * torch.eye(dim)) / 0.4
        assert abs(z.diagonal().mean()) < 0.1 and 0.7 < z.std() * dim ** 0.5 < 1.3
        assert torch.count_nonzero(block.attn.qkv.bias) == 0


def test_mimetic_differs_from_default_init_and_follows_the_seed():
    torch.manual_seed(1)
    a = timm.create_model("vit_mimetic", **VIT)
    torch.manual_seed(1)
    b = timm.create_model("vit_mimetic", **VIT)
    torch.manual_seed(1)
    plain = timm.create_model("vit_base_patch16_224", **VIT)
    assert torch.equal(a.blocks[0].attn.qkv.weight, b.blocks[0].attn.qkv.weight)
    assert not torch.allclose(a.blocks[0].attn.qkv.weight, plain.blocks[0].attn.qkv.weight)
    assert a(torch.randn(2, 1, 8, 8)).shape == (2, 3)


def test_mimetic_builds_without_timm_warning(caplog):
    """timm warns at every build of a model registered without a default config; users see it in every run's log."""
    with caplog.at_level("WARNING", logger="timm"):
        timm.create_model("vit_mimetic", **VIT)
    assert not [r for r in caplog.records if r.levelname == "WARNING"], caplog.text


def test_mimetic_rejects_non_square_attention():
    vit = timm.create_model("vit_base_patch16_224", **{**VIT, "embed_dim": 64})
    vit.blocks[0].attn.proj = torch.nn.Linear(32, 64)
    try:
        mimetic_init_(vit)
    except ValueError as e:
        assert "square attention" in str(e)
    else:
        raise AssertionError("expected a ValueError")
