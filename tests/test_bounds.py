import pytest
import torch

from cmhsa import best_fit_error, head_lower_bound, required_heads
from cmhsa.bounds import best_fit_errors, block_singular_values
from cmhsa.convert import conv_blocks, same_padding_geometry


@pytest.mark.parametrize("K,P,c_in,c_out", [(3, 4, 1, 1), (3, 16, 3, 3), (5, 16, 3, 3), (5, 8, 2, 4), (7, 4, 1, 2)])
def test_random_kernels_on_patches_need_nine_heads(K, P, c_in, c_out):
    torch.manual_seed(K * P)
    w = torch.randn(c_out, c_in, K, K)
    assert head_lower_bound(w, P) == 9


@pytest.mark.parametrize("K,c_in,c_out", [(3, 3, 3), (3, 1, 9), (5, 5, 5), (3, 1, 1), (3, 2, 2), (5, 3, 4)])
def test_pixel_input_needs_k_squared_heads_when_channels_allow(K, c_in, c_out):
    torch.manual_seed(K)
    w = torch.randn(c_out, c_in, K, K)
    assert head_lower_bound(w, 1) == min(K * K, c_in * c_out)


def test_one_by_one_kernel_needs_one_head():
    assert head_lower_bound(torch.randn(4, 3, 1, 1), 4) == 1
    assert required_heads(1, 4) == 1


def test_structured_kernel_can_need_fewer_heads_than_the_construction():
    # a kernel that only reads the centre pixel's channels is a 1x1 conv padded to 3x3
    w = torch.zeros(2, 2, 3, 3)
    w[:, :, 1, 1] = torch.randn(2, 2)
    assert head_lower_bound(w, 4) == 1 < required_heads(3, 4)


@pytest.mark.parametrize("K,P", [(3, 4), (5, 16), (3, 1)])
def test_best_fit_error_positive_below_bound_and_zero_at_it(K, P):
    torch.manual_seed(1)
    w = torch.randn(3, 3, K, K)
    bound = head_lower_bound(w, P)
    errors = [best_fit_error(w, P, h) for h in range(bound + 1)]
    assert errors[0] == pytest.approx(1.0)
    assert all(e > 1e-3 for e in errors[:bound])
    assert errors[bound] <= 1e-10
    assert all(a >= b for a, b in zip(errors, errors[1:]))


def test_best_fit_beats_any_particular_choice_of_heads():
    # keeping the H largest blocks (one head each) is one H-head fit: Eckart-Young must do at least as well
    torch.manual_seed(2)
    w = torch.randn(2, 2, 3, 3)
    _, blocks = conv_blocks(w.double(), same_padding_geometry(3, 4))
    flat = blocks.flatten(1)
    norms = flat.norm(dim=1).sort(descending=True).values
    for h in range(1, 9):
        greedy = (norms[h:].square().sum() / norms.square().sum()).sqrt().item()
        assert best_fit_error(w, 4, h) <= greedy + 1e-12
    # and it agrees with a direct SVD of the stacked blocks
    sv = torch.linalg.svdvals(flat)
    torch.testing.assert_close(block_singular_values(w, 4), sv, rtol=1e-9, atol=1e-9)
    assert len(best_fit_errors(w, 4)) == 10


def test_bad_kernel_shape_raises():
    with pytest.raises(ValueError, match="expected a conv kernel"):
        head_lower_bound(torch.randn(3, 3, 3), 4)
    with pytest.raises(ValueError, match="num_heads must be an int >= 0"):
        best_fit_error(torch.randn(1, 1, 3, 3), 4, -1)
