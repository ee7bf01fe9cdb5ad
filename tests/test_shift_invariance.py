import itertools

import pytest
import timm
import torch

import cmhsa  # noqa: F401  (registers the models with timm)
from cmhsa.analysis import shift_consistency
from cmhsa.anchor import PolyphaseAnchor, choose_phase, polyphase_scores
from cmhsa.attention import FactorizedRelPosMHSA, RelPosMHSA
from cmhsa.local_attention import LocalRelPosMHSA
from cmhsa.models import CMHSA, convert_model, transfer_error

P = 4
# every sub-patch phase, whole-patch shifts, and shifts larger than the image
SHIFTS = list(itertools.product(range(P), range(P))) + [(5, 13), (27, 2), (-9, 30), (41, -3)]


def _phase(x):
    p = choose_phase(x, P)
    return torch.stack([p // P, p % P], dim=-1)


def test_anchor_phase_moves_with_the_shift():
    torch.manual_seed(0)
    x = torch.randn(6, 2, 12, 16)
    base = _phase(x)
    for dy, dx in SHIFTS:
        shifted = _phase(torch.roll(x, (dy, dx), dims=(-2, -1)))
        assert torch.equal(shifted, (base + torch.tensor([dy, dx])) % P), (dy, dx)


def test_anchored_images_differ_by_whole_patches_only():
    torch.manual_seed(1)
    x = torch.randn(3, 1, 8, 12)
    anchor = PolyphaseAnchor(P)
    ref = anchor(x)
    phase = _phase(x)
    for dy, dx in SHIFTS:
        out = anchor(torch.roll(x, (dy, dx), dims=(-2, -1)))
        for b in range(3):
            # the anchored shifted image is the anchored image rolled by a multiple of P, bit for bit
            (py, px), (qy, qx) = phase[b].tolist(), ((phase[b] + torch.tensor([dy, dx])) % P).tolist()
            ky, kx = dy + py - qy, dx + px - qx
            assert torch.equal(out[b], torch.roll(ref[b], (ky, kx), dims=(-2, -1))), (dy, dx, b)


def test_scores_are_bit_identical_for_permuted_components():
    # float32 sums in a different order usually differ in the last bits; sorted float64 sums do not
    torch.manual_seed(2)
    x = torch.rand(1, 1, 64, 64) * 1e3
    shifted = torch.roll(x, (8, 20), dims=(-2, -1))  # whole-patch shift: every component is permuted
    assert torch.equal(polyphase_scores(x, P), polyphase_scores(shifted, P))


def test_exact_norm_tie_is_broken_by_the_values_and_still_moves_with_the_shift():
    # phases (0, 0) and (0, 1) both have squared norm 25: {4, 3, 0, 0} against {5, 0, 0, 0}; the larger top value wins
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 0, 0], x[0, 0, 2, 2] = 4.0, 3.0  # phase (0, 0)
    x[0, 0, 0, 1] = 5.0                      # phase (0, 1)
    x[0, 0, 1, 0] = 1.0                      # phase (1, 0), smaller
    scores = polyphase_scores(x, 2)[0]
    assert scores[0] == scores[1] == scores.max()
    assert choose_phase(x, 2).item() == 1
    for dy, dx in itertools.product(range(4), range(4)):
        p = choose_phase(torch.roll(x, (dy, dx), dims=(-2, -1)), 2).item()
        assert (p // 2, p % 2) == (dy % 2, (1 + dx) % 2), (dy, dx)


def _shift_invariance_error(model, x):
    model.eval()
    with torch.no_grad():
        ref = model(x)
        return max((model(torch.roll(x, s, dims=(-2, -1))) - ref).abs().max().item() for s in SHIFTS), ref


def _models(dtype):
    torch.manual_seed(0)
    conv = timm.create_model("cmhsa5_conv_tiny", anchor="aps", padding_mode="circular", depth=2).to(dtype)
    for p in conv.parameters():  # random weights everywhere, not only the init's
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.2)
    # content attention on top of the converted positional heads, in every form
    converted = {f"converted_{form}": convert_model(conv, qk_std=0.3, form=form, **kw)
                 for form, kw in [("paper", {}), ("factorized", dict(qk_dim=8)), ("local", {})]}
    fresh = timm.create_model("cmhsa5_attn_tiny", anchor="aps", padding_mode="circular", depth=2).to(dtype)
    for n, p in fresh.named_parameters():
        torch.nn.init.normal_(p, std=1.0 if "rel_pos_bias" in n else 0.2)
    return {"conv": conv, **converted, "attn_random": fresh}


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_anchored_circular_model_is_invariant_to_every_circular_shift(dtype, tol):
    x = torch.randn(6, 1, 28, 28, generator=torch.Generator().manual_seed(3)).to(dtype)
    for name, model in _models(dtype).items():
        err, ref = _shift_invariance_error(model, x)
        assert err <= tol * ref.abs().max().item(), (name, err)
        consistency = shift_consistency(model, x, shifts=range(1, P + 1), mode="circular",
                                        directions=((1, 1), (0, 1), (1, -1)))
        assert all(v == 1.0 for v in consistency.values()), (name, consistency)


@pytest.mark.parametrize("kwargs", [dict(padding_mode="circular"), dict(anchor="aps")])
def test_anchor_and_circular_padding_are_both_needed(kwargs):
    torch.manual_seed(0)
    model = timm.create_model("cmhsa5_conv_tiny", depth=2, **kwargs).double()
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(4, 1, 28, 28, dtype=torch.float64)
    err, ref = _shift_invariance_error(model, x)
    assert err > 1e-3 * ref.abs().max().item()


@pytest.mark.parametrize("form,kw,layer", [("paper", {}, RelPosMHSA), ("local", {}, LocalRelPosMHSA),
                                           ("factorized", dict(qk_dim=8), FactorizedRelPosMHSA)])
def test_convert_model_carries_anchor_and_circular_padding(form, kw, layer):
    conv = timm.create_model("cmhsa5_conv_tiny", anchor="aps", padding_mode="circular").double()
    attn = convert_model(conv, form=form, **kw)
    assert attn.config["anchor"] == "aps" and attn.config["padding_mode"] == "circular"
    assert attn.config["form"] == form and attn.config["qk_dim"] == kw.get("qk_dim")
    assert isinstance(attn.patch_embed.anchor, PolyphaseAnchor)
    assert all(isinstance(b.mixer, layer) and b.mixer.circular for b in attn.blocks)
    # the config rebuilds the same model (what checkpoints rely on): strict loading checks every shape
    twin = CMHSA(**attn.config).double()
    twin.load_state_dict(attn.state_dict())
    x = torch.randn(4, 1, 28, 28, dtype=torch.float64)
    torch.testing.assert_close(twin.eval()(x), attn.eval()(x), rtol=0, atol=1e-12)
    assert transfer_error(conv, attn, x)["logits_relative_error"] <= 1e-9
    with pytest.raises(ValueError, match="cannot change"):
        convert_model(conv, padding_mode="zeros")


def test_bad_anchor_and_padding_arguments():
    with pytest.raises(ValueError, match="anchor must be"):
        timm.create_model("cmhsa5_conv_tiny", anchor="random")
    with pytest.raises(ValueError, match="padding_mode must be"):
        timm.create_model("cmhsa5_conv_tiny", padding_mode="reflect")


def test_shift_experiment_runs_table1_cells_at_its_own_budget():
    """benchmarks/shift_experiment.py takes model and recipe from table1.yaml's cells, not from its own copies."""
    import argparse
    import importlib.util
    from pathlib import Path

    from cmhsa.experiments import cell_configs, load_experiment

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("shift_experiment", root / "benchmarks" / "shift_experiment.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.TABLE1 = str(root / script.TABLE1)
    args = argparse.Namespace(runs="runs/x", train_subset=500, val_subset=300, phase1_epochs=3, phase2_epochs=2,
                              batch_size=32)
    table1 = {c["cell"]: c["config"] for c in cell_configs(load_experiment(script.TABLE1), "full", [2])}

    deit = script.config_for(args, "deit_base", seed=2)
    assert deit.model == table1["deit_base"].model and deit.phase1.lr == table1["deit_base"].phase1.lr
    assert deit.phase1.epochs == 5 and deit.train.seed == 2  # both phases' epochs, in one model

    aps = script.config_for(args, "aps_circular", seed=2)
    cmhsa5 = table1["cmhsa5"]
    assert aps.model.name == cmhsa5.model.name
    assert aps.model.kwargs == {**cmhsa5.model.kwargs, "anchor": "aps", "padding_mode": "circular"}
    assert (aps.phase1.lr, aps.phase2.lr, aps.train.mixup) == (cmhsa5.phase1.lr, cmhsa5.phase2.lr, cmhsa5.train.mixup)
    assert (aps.phase1.epochs, aps.phase2.epochs, aps.data.train_subset, aps.data.val_subset, aps.train.batch_size) \
        == (3, 2, 500, 300, 32)
    assert aps.convert.form == "factorized" and aps.output == "runs/x/aps_circular-s2"
