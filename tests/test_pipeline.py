"""End to end: config -> phase 1 -> exact conversion -> phase 2 -> report, resume, eval/convert/train commands."""
import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cifar_fixture import make_cifar100
from cmhsa.cli import main
from cmhsa.config import apply_overrides, load_config
from cmhsa.forms import convert_form
from cmhsa.models import convert_model
from cmhsa import data as cmdata, pipeline
from cmhsa.engine import fit
from cmhsa.pipeline import build_loaders, create_model, load_model, model_spec, run_pipeline
from cmhsa.plots import read_metrics
from cmhsa.provenance import git_state
from cmhsa.rundir import RunDir

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

# a CMHSA on sklearn's 8x8 digits: 2 layers, 2x2 patches of 8 pixel channels (D = 32), 3x3 conv
TINY = [
    "data.dataset=digits", "data.img_size=8", "data.val_subset=null", "data.train_subset=null",
    "model.name=cmhsa3_conv_tiny", "model.kwargs={patch_size: 2, pixel_dim: 8, depth: 2, mlp_ratio: 2.0}", "data.augment=none",
    "train.batch_size=64", "train.precision=fp32", "train.lr=3.0e-3",
    "phase1.epochs=3", "phase2.epochs=1", "phase2.lr=1.0e-3",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    config = load_config(None, TINY + [f"output={out}", "name=tiny"])
    summary = run_pipeline(config, progress=False)
    return out, config, summary


def test_run_directory_holds_everything(run):
    out, _, summary = run
    for f in ("config.yaml", "convert.json", "summary.json", "summary.md", "curves.png",
              "phase1/metrics.jsonl", "phase1/model.json", "phase1/last/model.safetensors",
              "phase2/metrics.jsonl", "phase2/best/model.safetensors"):
        assert (out / f).exists(), f
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(read_metrics(out / "phase1/metrics.jsonl")) == 3 and len(read_metrics(out / "phase2/metrics.jsonl")) == 1
    assert "| 2: self-attention |" in (out / "summary.md").read_text()
    assert summary["phase2"]["params"] > summary["phase1"]["params"]
    # no subset: the summary counts the images trained on, the whole train split
    train_split = cmdata.create_datasets("digits", img_size=8, in_chans=1)[0]
    assert summary["train_images"] == len(train_split) > 1000
    assert f"Dataset: digits, {len(train_split)} training images; augmentation none." in \
        (out / "summary.md").read_text()


def test_conversion_is_exact_and_keeps_accuracy(run):
    out, _, _ = run
    t = json.loads((out / "convert.json").read_text())
    assert t["float64"]["logits_error"] <= 1e-8
    assert t["float32"]["logits_relative_error"] <= 1e-4
    assert t["git"] == git_state() == json.loads((out / "summary.json").read_text())["git"]
    n_val = 359  # digits' fixed 20% split
    assert abs(t["val_after_conversion"]["top1"] - t["val_before_conversion"]["val_top1"]) <= 100 / n_val + 1e-6


def test_training_learns_something(run):
    _, _, summary = run
    assert summary["phase1"]["val_top1"] > 30  # 10 classes: chance is 10%


def test_rerun_resumes_without_retraining_and_says_so(run, capsys):
    out, config, _ = run
    before = (out / "phase2/metrics.jsonl").read_text()
    capsys.readouterr()
    run_pipeline(config, progress=True)
    assert (out / "phase2/metrics.jsonl").read_text() == before
    assert "the run had already finished: nothing trained now" in capsys.readouterr().out


def test_eval_and_convert_commands(run, capsys, tmp_path):
    out, _, summary = run
    assert main(["eval", str(out / "phase2"), "--device", "cpu", "--precision", "fp32"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["top1"] == pytest.approx(summary["phase2"]["val_top1"], abs=1e-6)
    assert main(["convert", str(out / "phase1"), "--out", str(tmp_path / "conv")]) == 0
    capsys.readouterr()
    conv = json.loads((tmp_path / "conv/convert.json").read_text())
    assert conv["logits_error"] <= 1e-8 and conv["git"] == git_state()
    model, spec, _ = load_model(tmp_path / "conv")
    assert spec["class"] == "CMHSA" and spec["kwargs"] == model.config and model.config["mixer"] == "attn"
    # outside its run nothing says which data the model is for: eval and analyze ask instead of scoring it on the
    # default dataset; named, it scores as phase 1 did (the conversion is exact)
    for command in (["eval"], ["analyze", "--max-batches", "1"]):
        assert main([command[0], str(tmp_path / "conv"), *command[1:]]) == 2
        assert "not inside a run directory (no config.yaml)" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "conv"), "--dataset", "digits", "--set", "data.img_size=8", "--device", "cpu",
                 "--precision", "fp32"]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] == pytest.approx(summary["phase1"]["val_top1"], abs=0.3)
    # an attention-phase checkpoint has no convolution to convert: the error says which directory to pass
    assert main(["convert", str(out / "phase2"), "--out", str(tmp_path / "again")]) == 2
    assert "pass a phase-1 directory (runs/<name>/phase1)" in capsys.readouterr().err
    assert not (tmp_path / "again").exists()


def test_keep_conv_control_trains_the_conv_model_on_through_phase_2(tmp_path):
    """convert.keep_conv: phase 2 restarts the schedule on a copy of the conv model, so nothing is converted."""
    config = load_config(None, TINY + [f"output={tmp_path}", "name=kept", "phase1.epochs=1", "convert.keep_conv=true"])
    summary = run_pipeline(config, progress=False)
    t = json.loads((tmp_path / "convert.json").read_text())
    assert t["keep_conv"] and t["float64"]["logits_error"] == 0 == t["float32"]["logits_error"]
    assert t["val_after_conversion"]["top1"] == t["val_before_conversion"]["val_top1"]
    assert summary["phase2"]["params"] == summary["phase1"]["params"]
    phase1, _, _ = load_model(tmp_path / "phase1")
    phase2, spec, _ = load_model(tmp_path / "phase2")
    assert spec["kwargs"]["mixer"] == "conv"
    assert any(not torch.equal(a, b) for a, b in zip(phase1.state_dict().values(), phase2.state_dict().values()))
    text = (tmp_path / "summary.md").read_text()
    assert "No conversion (convert.keep_conv" in text and "| 2: convolution, kept |" in text


def test_annealing_scales_the_position_biases_to_their_target_over_phase_2s_first_epochs(tmp_path):
    """convert.anneal_bias_to: 12 -> 3 over half of 4 epochs is two halvings, at the start of epochs 0 and 1; a
    tiny lr keeps training from moving the biases, so what is left is the annealing."""
    config = load_config(None, TINY + [f"output={tmp_path}", "name=annealed", "phase1.epochs=1", "phase2.epochs=4",
                                       "phase2.lr=1.0e-7", "phase2.min_lr=0", "convert.bias_strength=12",
                                       "convert.anneal_bias_to=3", "convert.anneal_fraction=0.5"])
    epochs_seen = []
    annealer = pipeline.position_bias_annealer(config, 4)
    model = convert_model(create_model(model_spec(config)), bias_strength=12)
    for epoch in range(4):
        before = model.blocks[0].mixer.rel_pos_bias.detach().clone()
        annealer(epoch, model)
        epochs_seen.append(not torch.equal(before, model.blocks[0].mixer.rel_pos_bias))
    assert epochs_seen == [True, True, False, False]

    run_pipeline(config, progress=False)
    t = json.loads((tmp_path / "convert.json").read_text())
    assert (t["anneal_bias_to"], t["anneal_epochs"], t["bias_strength"]) == (3, 2, 12)  # scored right after: at 12
    attn, _, _ = load_model(tmp_path / "phase2")
    for block in attn.blocks:
        torch.testing.assert_close(block.mixer.rel_pos_bias.amax(1), torch.full((9,), 3.0), atol=1e-4, rtol=0)
        torch.testing.assert_close(block.mixer.null_bias, torch.full((9,), 1.5), atol=1e-4, rtol=0)
    assert "annealed the position biases from bias strength 12 to 3 over its first 2 of 4 epochs" in \
        (tmp_path / "summary.md").read_text()


def test_continue_schedule_with_keep_conv_is_the_conv_models_run_bit_for_bit(tmp_path):
    """convert.continue_schedule: phase 2 continues phase 1's lr schedule, data order and optimizer state, so with
    keep_conv the two phases are one uninterrupted training run of the conv model (dropout, mixup and augmentation
    included)."""
    both = [o for o in TINY if not o.startswith("phase2.lr")] + [
        "model.kwargs={patch_size: 2, pixel_dim: 8, depth: 2, mlp_ratio: 2.0, drop_path_rate: 0.1}",
        "data.augment=light", "train.mixup=0.2", "phase1.epochs=2", "phase1.warmup_epochs=1", "phase2.epochs=2",
        "train.max_steps_per_epoch=4"]
    config = load_config(None, both + [f"output={tmp_path / 'two'}", "convert.keep_conv=true",
                                       "convert.continue_schedule=true"])
    run_pipeline(config, progress=False)
    cfg = dataclasses.replace(config.phase_config("phase1", 10), epochs=4, schedule_epochs=None)
    spec = model_spec(config)
    model = create_model(spec, seed=cfg.seed)
    train_loader, val_loader, _ = build_loaders(config, cfg.batch_size, spec["kwargs"]["in_chans"])
    fit(model, train_loader, val_loader, cfg, tmp_path / "one", progress=False)
    phase2, _, _ = load_model(tmp_path / "two" / "phase2")
    one, two = model.state_dict(), phase2.state_dict()
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    whole = read_metrics(tmp_path / "one" / "metrics.jsonl")
    halves = [read_metrics(tmp_path / "two" / p / "metrics.jsonl") for p in ("phase1", "phase2")]
    assert [m["lr"] for m in whole] == [m["lr"] for h in halves for m in h]
    assert [m["epoch"] for m in halves[1]] == [0, 1]  # each phase counts its own epochs
    assert "Phase 2 continued phase 1's run" in (tmp_path / "two" / "summary.md").read_text()


@pytest.mark.parametrize("form", ["factorized", "tied"])
def test_continue_schedule_carries_the_optimizer_state_of_the_parameters_the_conversion_keeps(tmp_path, form):
    config = load_config(None, [o for o in TINY if not o.startswith("phase2.lr")] + [
        f"output={tmp_path}", "phase1.epochs=1", "convert.continue_schedule=true", f"convert.form={form}",
        "train.max_steps_per_epoch=4"])
    carried = {}
    original = pipeline.transfer_optimizer_state

    def spy(source, source_optimizer, target, target_optimizer, source_name):
        names = original(source, source_optimizer, target, target_optimizer, source_name)
        target_params = dict(target.named_parameters())
        carried.update(source=dict(source.named_parameters()), optimizer=source_optimizer, names=names,
                       target=target_params, source_name=source_name,
                       states={n: copy.deepcopy(target_optimizer.state[target_params[n]]) for n in names})
        return names

    pipeline.transfer_optimizer_state = spy
    try:
        run_pipeline(config, progress=False)
    finally:
        pipeline.transfer_optimizer_state = original
    source = carried["source"]
    outside = {n for n, p in carried["target"].items()  # phase 1 keeps the per-pixel lift fixed: no state
               if n in source and source[n].shape == p.shape and source[n].requires_grad}
    # the conv mixer became attention: only a tied mixer continues its conv's kernel and bias
    mixer = {f"blocks.{i}.mixer.value.{p}" for i in range(2) for p in ("kernel", "kernel_bias")} if form == "tied" else set()
    assert set(carried["names"]) == outside | mixer and "head.weight" in outside
    assert len(carried["names"]) < len(carried["target"])  # Q/K and the position biases start fresh
    for name in ("head.weight", *sorted(mixer)):
        before = carried["optimizer"].state[source[carried["source_name"](name)]]
        # phase 2 starts from phase 1's moments and their step count (AdamW's bias correction goes on from there)
        assert before["step"] > 0 and before.keys() == carried["states"][name].keys()
        assert all(torch.equal(before[k], carried["states"][name][k]) for k in before)


@pytest.fixture(scope="module", params=["factorized", "tied"])
def factorized_run(tmp_path_factory, request):
    out = tmp_path_factory.mktemp("frun")
    config = load_config(None, TINY + [f"output={out}", "name=ftiny", "phase1.epochs=1",
                                       f"convert.form={request.param}", "convert.qk_dim=4", "convert.qk_std=0.02"])
    return out, config, run_pipeline(config, progress=False)


def test_factorized_pipeline_converts_exactly_and_evaluates_from_its_checkpoint(factorized_run, run, capsys):
    out, config, summary = factorized_run
    t = json.loads((out / "convert.json").read_text())
    assert t["form"] == config.convert.form and t["float64"]["logits_error"] <= 1e-8
    assert t["float32"]["logits_relative_error"] <= 1e-4
    model, spec, _ = load_model(out / "phase2")
    assert spec["kwargs"]["form"] == config.convert.form and model.blocks[0].mixer.qk_dim == 4
    assert summary["phase2"]["params"] < 0.6 * run[2]["phase2"]["params"]  # vs the paper form of the same model
    assert main(["eval", str(out / "phase2"), "--device", "cpu", "--precision", "fp32"]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] == pytest.approx(summary["phase2"]["val_top1"], abs=1e-6)
    before = (out / "phase2/metrics.jsonl").read_text()
    run_pipeline(config, progress=False)  # resumes: nothing retrained
    assert (out / "phase2/metrics.jsonl").read_text() == before


def test_trained_checkpoint_converts_between_forms_exactly(run):
    out, config, _ = run
    paper, _, _ = load_model(out / "phase2")
    paper = paper.double().eval()
    _, val_loader, _ = build_loaders(config, 64, 1)
    images = next(iter(val_loader))[0].double()
    ref = paper(images)
    fact = convert_form(paper, "factorized")
    torch.testing.assert_close(fact(images), ref, rtol=0, atol=1e-9 * ref.abs().max().item())
    back = convert_form(fact, "paper")
    torch.testing.assert_close(back(images), ref, rtol=0, atol=1e-9 * ref.abs().max().item())
    # float32: the same checkpoint as trained
    paper32, fact32 = paper.float(), fact.float()
    assert (fact32(images.float()) - paper32(images.float())).abs().max() <= 1e-4 * ref.abs().max()


def test_train_command_for_a_timm_baseline(tmp_path, capsys):
    args = ["train", "--output", str(tmp_path), "--set", *TINY[:4], "model.name=vit_tiny_patch16_224",
            "model.kwargs={patch_size: 2, embed_dim: 32, depth: 1, num_heads: 2}", "phase1.epochs=1",
            "train.precision=fp32", "phase1.max_steps_per_epoch=2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "val top-1" in out and "already finished" not in out
    # first it says what it trains on what: 1438 digits in batches of 128, capped at 2 steps an epoch
    assert "[phase1] vit_tiny_patch16_224 (0.01M parameters) on digits: 1438 training images, 359 validation; 1 " \
        "epoch of 2 steps (batch 128); augmentation light: random crop, no flip (a mirrored image may change its " \
        "label)" in out
    assert (tmp_path / "train/last/model.safetensors").exists()
    assert main(args) == 0  # again: resumes a finished run, and says that nothing was trained
    assert "(already finished: nothing trained now; --no-resume starts over)" in capsys.readouterr().out


def test_config_overrides_and_errors(tmp_path):
    c = apply_overrides(load_config(CONFIGS / "fmnist_tiny.yaml"), ["phase1.epochs=3", "data.train_subset=0.5"])
    assert c.phase1.epochs == 3 and c.data.train_subset == 0.5
    assert c.phase_config("phase1", 10).epochs == 3 and c.phase_config("phase2", 10).warmup_epochs == 0
    with pytest.raises(ValueError, match="section.key=value"):
        apply_overrides(c, ["phase1.epochs"])
    with pytest.raises(FileNotFoundError, match="configs/"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(FileNotFoundError, match="model.json"):
        load_model(tmp_path)


def test_pipeline_rejects_non_cmhsa_models(tmp_path):
    config = load_config(None, TINY + [f"output={tmp_path}", "model.name=vit_tiny_patch16_224",
                                       "model.kwargs={patch_size: 2}"])
    with pytest.raises(ValueError, match="CMHSA convolution model"):
        run_pipeline(config, progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("kernel", [3, 5])
def test_paper_cifar100_config_runs_one_step(tmp_path, kernel):
    """The paper-scale preset, end to end on a CIFAR-100 fixture in the official format: one step per phase."""
    make_cifar100(tmp_path / "cifar", n_train=4, n_test=2)
    config = load_config(CONFIGS / f"cifar100_cmhsa{kernel}_paper.yaml", [
        f"output={tmp_path / 'run'}", f"data.data_dir={tmp_path / 'cifar'}", "data.num_workers=0",
        "train.batch_size=2", "phase1.epochs=1", "phase2.epochs=1", "train.max_steps_per_epoch=1",
        "train.mixup=0.0", "train.cutmix=0.0", "train.device=cpu", "train.warmup_epochs=0",
        # SGD's one momentum buffer instead of AdamW's two moments: the phase-2 checkpoint of 155M parameters
        # then takes 0.6 GB less disk (CI's is small); the optimizer is not what this test checks
        "train.opt=sgd",
    ])
    summary = run_pipeline(config, progress=False)
    assert summary["phase2"]["params"] > 100e6  # 9 heads of 768 on D = 768, 6 layers
    assert json.loads((tmp_path / "run/convert.json").read_text())["float32"]["logits_relative_error"] < 1e-3
    assert torch.isfinite(torch.tensor(summary["phase2"]["val_loss"]))


@pytest.mark.parametrize("preset", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_preset_is_valid(preset):
    config = load_config(CONFIGS / preset).in_epochs(5000)  # a budget in steps as epochs for 5,000 images
    for phase in ("phase1", "phase2"):
        cfg = config.phase_config(phase, 10)
        assert cfg.epochs >= 1 and cfg.lr > 0
    assert config.model.name.startswith("cmhsa") and "_conv_" in config.model.name


def test_convert_net_points_a_pipeline_run_to_cmhsa_convert(run, tmp_path, capsys):
    out, _, _ = run  # its last phase is the attention model, built from its class rather than a timm name
    assert main(["convert-net", "--checkpoint", str(out), "--img-size", "8", "--out", str(tmp_path / "x")]) == 2
    assert "holds a CMHSA(attn), not a timm CNN; a pipeline run's convolution phase converts with `cmhsa convert " \
        in capsys.readouterr().err


def test_a_budget_in_steps_trains_the_epochs_it_comes_to_and_the_run_keeps_them(tmp_path, capsys):
    """phase1.steps / phase2.steps of one continued run: as many epochs as hold the steps for this data (the run's
    total rounded once); config.yaml keeps those epochs, so the same command resumes it."""
    images = cmdata.train_image_count("digits")
    per_epoch = images // 64
    steps = [o for o in TINY if not o.startswith(("phase1.epochs", "phase2.epochs", "phase2.lr"))] + [
        f"output={tmp_path}", "name=steps", "convert.continue_schedule=true", f"phase1.steps={per_epoch + 1}",
        f"phase2.steps={per_epoch - 2}"]
    summary = run_pipeline(load_config(None, steps), progress=False)
    # phase 1: ceil((per_epoch + 1) / per_epoch) = 2 epochs, which already hold the run's 2 * per_epoch - 1 steps;
    # phase 2 still gets one epoch
    assert (summary["phase1"]["epochs"], summary["phase2"]["epochs"]) == (2, 1)
    saved = RunDir(tmp_path).saved_config()
    assert (saved.phase1.epochs, saved.phase1.steps, saved.phase2.epochs) == (2, None, 1)
    assert run_pipeline(load_config(None, steps), progress=False)["phase2"]["val_top1"] == summary["phase2"]["val_top1"]
    pipeline.with_epochs(load_config(None, steps), progress=True)
    assert f"budget in steps: {images} training images make it phase1 2, phase2 1 epochs" in capsys.readouterr().out


def test_the_mid_run_preset_is_one_run_converted_softly_at_phase_1s_end():
    config = load_config(CONFIGS / "fmnist_tiny_midrun.yaml").in_epochs(5000)
    first, second = config.phase_config("phase1"), config.phase_config("phase2")
    assert config.convert.continue_schedule and config.convert.bias_strength < 60  # soft: the attention can move
    assert first.schedule_epochs == second.schedule_epochs == first.epochs + second.epochs
    assert second.first_epoch == first.epochs and second.lr == first.lr  # phase 1's schedule, continued


def test_resume_refuses_a_changed_config_and_changes_nothing(run, capsys):
    """The run directory holds another run's results: resuming it with other data/convert settings must refuse,
    name what differs and the ways out, and leave config.yaml, summary.md and the weights as they are."""
    out, _, _ = run
    files = ("config.yaml", "summary.md", "summary.json", "convert.json", "phase2/last/model.safetensors",
             "phase2/metrics.jsonl")
    before = {f: (out / f).read_bytes() for f in files}
    code = main(["pipeline", "--output", str(out), "--set", *TINY, "name=tiny", "convert.bias_strength=10",
                 "data.train_subset=300"])
    err = capsys.readouterr().err
    assert code == 2
    assert "convert.bias_strength: 60.0 -> 10.0" in err and "data.train_subset: None -> 300" in err
    assert "--no-resume" in err and "--output" in err
    assert {f: (out / f).read_bytes() for f in files} == before


def test_a_run_that_failed_before_its_first_epoch_does_not_block_the_corrected_one(tmp_path, capsys):
    """A typo caught at data setup leaves config.yaml behind; the corrected command takes the directory over."""
    args = ["train", "--output", str(tmp_path), "--set", *TINY[:4], "model.name=cmhsa3_conv_tiny",
            "model.kwargs={patch_size: 2, pixel_dim: 2, depth: 1}", "train.batch_size=16", "phase1.epochs=1",
            "phase1.max_steps_per_epoch=2"]
    assert main([*args, "data.train_subset=5"]) == 2
    err = capsys.readouterr().err
    assert "data.train_subset of digits: subset size 5 is out of range" in err and "data.train_subset=null" in err
    assert (tmp_path / "config.yaml").exists() and not RunDir(tmp_path).trained_anything()
    assert main([*args, "data.train_subset=50"]) == 0
    assert RunDir(tmp_path).saved_config().data.train_subset == 50
    assert main([*args, "data.train_subset=60"]) == 2  # now it holds a trained run: refused, as before
    assert "cannot resume" in capsys.readouterr().err


def _image_folder(root, classes, size=28):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in classes:
            (root / split / cls).mkdir(parents=True)
            for j in range(2):
                pixels = rng.integers(0, 256, (size, size), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{j}.png")
    return root


@pytest.mark.parametrize("classes,ok", [(10, True), (3, False)])
def test_eval_on_another_dataset(tmp_path, capsys, classes, ok):
    """`cmhsa eval --dataset` drops the run's data_dir (it holds the run's data) and refuses data whose classes
    the model does not predict."""
    folder = _image_folder(tmp_path / "folder", [f"c{i}" for i in range(classes)])
    out = tmp_path / "run"
    assert main(["train", "--output", str(out), "--set", "data.dataset=imagefolder", f"data.data_dir={folder}",
                 "data.train_subset=null", "data.val_subset=null", "model.name=cmhsa3_conv_tiny",
                 "model.kwargs={depth: 1, pixel_dim: 1}", "train.batch_size=4", "phase1.epochs=1",
                 "phase1.max_steps_per_epoch=1", "train.precision=fp32"]) == 0
    capsys.readouterr()
    code = main(["eval", str(out), "--dataset", "fashion_mnist", "--set", "data.val_subset=64"])
    captured = capsys.readouterr()
    if ok:
        assert code == 0 and json.loads(captured.out)["dataset"] == "fashion_mnist"
    else:
        assert code == 2 and "the model predicts 3 classes, fashion_mnist has 10" in captured.err


def test_data_hflip_reaches_the_training_transform():
    for setting, expected in (("null", False), ("true", True)):  # digits: no flip unless asked
        config = load_config(None, TINY + [f"data.hflip={setting}"])
        assert build_loaders(config, 8, 1)[0].dataset.transform.hflip is expected
