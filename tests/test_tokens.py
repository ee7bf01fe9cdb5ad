import pytest
import torch

from cmhsa import image_to_tokens, tokens_to_image
from cmhsa.tokens import grid_offsets


def test_token_layout_is_vit_flattening():
    # token n = patch (n // gw, n % gw); inside it, pixel (p1, p2) channel c sits at (p1 * P + p2) * C + c
    B, C, H, W, P = 2, 3, 8, 12, 4
    x = torch.randn(B, C, H, W)
    t = image_to_tokens(x, P)
    assert t.shape == (B, (H // P) * (W // P), P * P * C)
    gw = W // P
    for n, p1, p2, c in [(0, 0, 0, 0), (4, 1, 3, 2), (5, 3, 0, 1)]:
        gy, gx = divmod(n, gw)
        assert t[1, n, (p1 * P + p2) * C + c] == x[1, c, gy * P + p1, gx * P + p2]


@pytest.mark.parametrize("shape,patch", [((1, 3, 224, 224), 16), ((2, 1, 28, 20), 4), ((1, 2, 6, 9), (2, 3)),
                                         ((1, 5, 7, 7), 1)])
def test_round_trip(shape, patch):
    x = torch.randn(shape)
    ph, pw = (patch, patch) if isinstance(patch, int) else patch
    grid = (shape[2] // ph, shape[3] // pw)
    assert torch.equal(tokens_to_image(image_to_tokens(x, patch), patch, grid), x)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="not divisible by patch size"):
        image_to_tokens(torch.randn(1, 3, 30, 32), 4)
    with pytest.raises(ValueError, match="expected an image batch"):
        image_to_tokens(torch.randn(3, 32, 32), 4)
    with pytest.raises(ValueError, match="grid"):
        tokens_to_image(torch.randn(1, 15, 48), 4, (4, 4))
    with pytest.raises(ValueError, match="patch_size"):
        image_to_tokens(torch.randn(1, 3, 32, 32), (4, 4, 4))


def test_grid_offsets_are_key_minus_query():
    off = grid_offsets((2, 3))
    # query 0 is (0, 0); key 5 is (1, 2)
    assert off[0, 5].tolist() == [1, 2]
    assert off[5, 0].tolist() == [-1, -2]
    assert torch.all(off.diagonal(dim1=0, dim2=1) == 0)
