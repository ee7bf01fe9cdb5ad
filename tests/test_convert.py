import math

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from cmhsa import conv_to_mhsa, image_to_tokens, required_heads, verify
from cmhsa.convert import conv_geometry


@st.composite
def conv_cases(draw):
    """A random supported convolution, patch size and image size."""
    P = (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    K = (draw(st.integers(1, 7)), draw(st.integers(1, 7)))
    dil = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride = tuple(draw(st.sampled_from([s for s in range(1, p + 1) if p % s == 0])) for p in P)
    groups = draw(st.sampled_from([1, 2, 3]))
    c_in = groups * draw(st.integers(1, 2))
    c_out = groups * draw(st.integers(1, 2))
    if stride == (1, 1) and draw(st.booleans()):
        padding = "same"
    else:
        # integer padding that keeps the output at input_size / stride (odd reach: either rounding works)
        padding = tuple(dil[a] * (K[a] - 1) // 2 for a in (0, 1))
        if stride == (1, 1) and any(dil[a] * (K[a] - 1) % 2 for a in (0, 1)):
            padding = "same"
        # an odd reach on a stride-1 axis needs asymmetric padding: only 'same' (all strides 1) gives it
        assume(padding == "same" or all(stride[a] > 1 or dil[a] * (K[a] - 1) % 2 == 0 for a in (0, 1)))
    conv = nn.Conv2d(c_in, c_out, K, stride=stride, padding=padding, dilation=dil, groups=groups,
                     bias=draw(st.booleans()))
    grid = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    return conv, P, (grid[0] * P[0], grid[1] * P[1])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=conv_cases(), seed=st.integers(0, 2 ** 16))
def test_float64_exact_everywhere(case, seed):
    conv, P, image = case
    torch.manual_seed(seed)
    nn.init.normal_(conv.weight)
    report = verify(conv, P, image, dtype=torch.float64, null_key=True)
    assert report.relative_error <= 1e-9, report


@settings(max_examples=25, deadline=None)
@given(case=conv_cases())
def test_float32_within_tolerance(case):
    conv, P, image = case
    report = verify(conv, P, image, dtype=torch.float32, null_key=True)
    assert report.relative_error <= 1e-4, report


@pytest.mark.parametrize("K,P,image", [(5, 16, 224), (3, 4, 32), (3, 1, 8), (7, 2, (12, 16))])
def test_paper_mode_is_exact_inside_and_wrong_at_the_border(K, P, image):
    conv = nn.Conv2d(3, 4, K, padding="same")
    paper = verify(conv, P, image, null_key=False)
    assert paper.interior_error <= 1e-9 * paper.output_scale
    assert paper.border_error >= 1e-2 * paper.output_scale  # the open border problem, measured
    fixed = verify(conv, P, image, null_key=True)
    assert fixed.border_error <= 1e-9 * fixed.output_scale


def test_error_falls_exponentially_with_bias_strength():
    torch.manual_seed(0)  # the first slope (beta 8 -> 12) is 0.39-0.47 across kernels: not left to test order
    conv = nn.Conv2d(2, 2, 3, padding="same")
    betas = [8.0, 12.0, 16.0, 20.0]
    with_null = [verify(conv, 4, 24, null_key=True, bias_strength=b).max_error for b in betas]
    without = [verify(conv, 4, 24, null_key=False, bias_strength=b).interior_error for b in betas]
    n = 36
    for b, e_null, e_paper in zip(betas, with_null, without):
        # null key: the leak to the null key or from a missing neighbour is ~ N exp(-beta/2)
        assert e_null <= 10 * n * math.exp(-b / 2)
        # paper mode, interior: the leak to the N - 1 other keys is ~ N exp(-beta)
        assert e_paper <= 10 * n * math.exp(-b)
    for i in range(len(betas) - 1):
        slope_null = math.log(with_null[i] / with_null[i + 1]) / (betas[i + 1] - betas[i])
        slope_paper = math.log(without[i] / without[i + 1]) / (betas[i + 1] - betas[i])
        assert 0.4 < slope_null < 0.6, with_null
        assert 0.85 < slope_paper < 1.15, without


@pytest.mark.parametrize("K,P,dil,heads", [(1, 4, 1, 1), (3, 4, 1, 9), (5, 16, 1, 9), (17, 8, 1, 9),
                                           (13, 4, 1, 25), (19, 4, 1, 49), (3, 1, 1, 9), (5, 1, 1, 25),
                                           (3, 4, 3, 9), (3, 16, 40, 25), (2, 4, 1, 4), ((1, 3), 4, 1, 3)])
def test_required_heads(K, P, dil, heads):
    assert required_heads(K, P, dilation=dil) == heads
    k = K if isinstance(K, tuple) else (K, K)
    conv = nn.Conv2d(1, 1, k, dilation=dil, padding="same")
    assert conv_to_mhsa(conv, P, (8, 8)).num_heads == heads


@pytest.mark.parametrize("K,P", [(k, p) for k in (1, 3, 5, 7, 9) for p in (1, 2, 3, 4, 8, 16)])
def test_required_heads_matches_paper_formula_for_odd_kernels(K, P):
    r = math.ceil((K - 1) / (2 * P))
    assert required_heads(K, P) == (2 * r + 1) ** 2


def test_stride_gives_smaller_output_tokens():
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1).double()
    mhsa = conv_to_mhsa(conv, 4, (3, 3))
    x = torch.randn(1, 3, 12, 12, dtype=torch.float64)
    y = mhsa(image_to_tokens(x, 4))
    assert y.shape == (1, 9, 2 * 2 * 5)
    torch.testing.assert_close(y, image_to_tokens(conv(x), 2), rtol=0, atol=1e-10)


def test_padding_heads_to_a_fixed_count_stays_exact():
    conv = nn.Conv2d(2, 3, 3, padding="same").double()
    mhsa = conv_to_mhsa(conv, 4, (3, 3), num_heads=12)
    assert mhsa.num_heads == 12
    x = torch.randn(2, 2, 12, 12, dtype=torch.float64)
    torch.testing.assert_close(mhsa(image_to_tokens(x, 4)), image_to_tokens(conv(x), 4), rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="needs 9 heads"):
        conv_to_mhsa(conv, 4, (3, 3), num_heads=8)


def test_construction_weights_are_the_theorem():
    conv = nn.Conv2d(2, 2, 3, padding="same").double()
    m = conv_to_mhsa(conv, 4, (3, 3), bias_strength=50.0)
    D = 4 * 4 * 2
    assert m.head_dim == D and m.num_heads == 9
    assert torch.all(m.qkv.weight[:2 * 9 * D] == 0) and torch.all(m.qkv.bias == 0)  # W_Q = W_K = 0
    assert torch.equal(m.qkv.weight[2 * 9 * D:].reshape(9, D, D), torch.eye(D, dtype=torch.float64).expand(9, D, D))
    assert torch.all((m.rel_pos_bias == 50.0).sum(1) == 1)  # one offset per head
    assert torch.all(m.null_bias == 25.0)
    # the 9 heads own 9 distinct offsets
    assert len(set(m.rel_pos_bias.argmax(1).tolist())) == 9


def test_conversion_leaves_the_conv_untouched_and_is_trainable():
    conv = nn.Conv2d(2, 2, 3, padding="same")
    before = conv.weight.clone()
    verify(conv, 4, 12)
    assert torch.equal(conv.weight, before) and conv.weight.dtype == torch.float32
    m = conv_to_mhsa(conv, 4, (3, 3), bias_strength=4.0)
    m(torch.randn(2, 9, 32)).square().sum().backward()
    assert m.rel_pos_bias.grad.abs().sum() > 0 and m.proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("conv,P,match", [
    (nn.Conv2d(2, 2, 3, padding="valid"), 4, "padding='valid'"),
    (nn.Conv2d(2, 2, 3, padding=0), 4, "does not keep the output"),
    (nn.Conv2d(2, 2, 3, padding=2), 4, "does not keep the output"),
    (nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), 4, "padding_mode='reflect'"),
    (nn.Conv2d(2, 2, 3, padding=1, padding_mode="circular"), 4, "zero padding"),
    (nn.Conv2d(2, 2, 3, stride=3, padding=1), 4, "does not divide patch size"),
    (nn.Conv2d(2, 2, (2, 3), stride=(1, 2), padding=(0, 1)), 4, "asymmetric padding"),
    (nn.Conv1d(2, 2, 3, padding=1), 4, "expected an nn.Conv2d"),
    (nn.Conv2d(2, 2, 3, padding=1), 0, "patch_size must be an int or a pair of ints with each >= 1"),
])
def test_unsupported_convolutions_raise(conv, P, match):
    with pytest.raises(ValueError, match=match):
        conv_geometry(conv, P)
    if isinstance(conv, nn.Conv2d) and P:
        with pytest.raises(ValueError, match=match):
            conv_to_mhsa(conv, P, (2, 2))


def test_verify_rejects_image_not_divisible():
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        verify(nn.Conv2d(1, 1, 3, padding=1), 4, 30)


def test_zero_qk_is_stationary_and_qk_std_breaks_it_while_staying_exact():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 2, 3, padding="same").double()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    D, H = 32, 9
    zero = conv_to_mhsa(conv, 4, (3, 3), bias_strength=2.0)
    zero(x).square().sum().backward()
    assert torch.all(zero.qkv.weight.grad[:2 * H * D] == 0)  # W_Q, W_K can never move from 0
    rand = conv_to_mhsa(conv, 4, (3, 3), bias_strength=2.0, qk_std=0.02)
    rand(x).square().sum().backward()
    assert rand.qkv.weight.grad[:2 * H * D].abs().sum() > 0
    exact = conv_to_mhsa(conv, 4, (3, 3), qk_std=0.02)  # default beta: still the convolution
    images = torch.randn(2, 2, 12, 12, dtype=torch.float64)
    torch.testing.assert_close(exact(image_to_tokens(images, 4)), image_to_tokens(conv(images), 4), rtol=0, atol=1e-9)
