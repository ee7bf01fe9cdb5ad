"""The typed run config: unknown keys, type coercion, ranges, presets, and old result records."""
import json
from pathlib import Path

import pytest
import yaml

from cmhsa.cli import main
from cmhsa.config import RunConfig, TrainConfig, apply_overrides, load_config
from cmhsa.experiments import cell_configs, find_finished, load_experiment, recorded_config, run_experiment
from cmhsa.models import convert_model

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"


@pytest.mark.parametrize("override, message", [
    ("phse2.lr=1.0e-3", "unknown config key 'phse2'; did you mean 'phase2'?"),
    ("data.datset=digits", "unknown config key 'data.datset'; did you mean 'data.dataset'?"),
    ("convert.bias_strenght=10", "unknown config key 'convert.bias_strenght'; did you mean 'convert.bias_strength'?"),
    ("phase1.epoch=3", "unknown config key 'phase1.epoch'; did you mean 'phase1.epochs'?"),
    ("train.num_classes=3", "unknown config key 'train.num_classes'"),  # set from the dataset, never by hand
])
def test_unknown_keys_are_errors_with_a_did_you_mean(override, message):
    with pytest.raises(ValueError) as e:
        load_config(CONFIGS / "fmnist_tiny.yaml", [override])
    assert message in str(e.value)


def test_a_shared_train_override_that_a_phase_sets_itself_is_an_error_naming_the_phase_keys():
    """fmnist_tiny.yaml sets phase1.lr and phase2.lr, so --set train.lr would reach neither phase: refused, not
    silently ignored; a train key no phase sets reaches both."""
    with pytest.raises(ValueError) as e:
        load_config(CONFIGS / "fmnist_tiny.yaml", ["train.lr=1e-2"])
    assert ("train.lr=0.01 does not reach phase1 or phase2: the config sets phase1.lr=0.002, phase2.lr=0.0005"
            in str(e.value)) and "Override phase1.lr=0.01 and phase2.lr=0.01 instead" in str(e.value)
    with pytest.raises(ValueError, match="does not reach phase2: the config sets phase2.epochs=4"):
        apply_overrides(load_config(None, ["phase2.epochs=4"]), ["train.epochs=7"])
    c = load_config(CONFIGS / "fmnist_tiny.yaml", ["train.mixup=0.3", "train.lr=1e-2", "phase1.lr=null",
                                                    "phase2.lr=1e-3"])  # overrides that set both say what they mean
    assert c.phase_config("phase1").mixup == c.phase_config("phase2").mixup == 0.3
    assert (c.phase_config("phase1").lr, c.phase_config("phase2").lr) == (1e-2, 1e-3)


def test_unknown_section_in_a_yaml_file_names_the_file(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump({"data": {"dataset": "digits"}, "phse2": {"epochs": 3}}))
    with pytest.raises(ValueError, match=r"typo.yaml: unknown config key 'phse2'; did you mean 'phase2'\?"):
        load_config(path)
    with pytest.raises(ValueError, match="data must be a section"):
        RunConfig.from_dict({"data": 3})


def test_values_are_coerced_to_the_field_type():
    c = load_config(None, ["phase1.lr=1e-3", "train.epochs='3'", "data.train_subset=300", "data.val_subset=0.5",
                           "convert.null_key=false", "train.opt_betas=[0.8, 0.9]", "data.img_size=12.0"])
    assert c.phase1.lr == 0.001 and isinstance(c.phase1.lr, float)  # YAML 1.1 reads 1e-3 as a string
    assert c.train.epochs == 3 and isinstance(c.train.epochs, int)
    assert c.data.train_subset == 300 and isinstance(c.data.train_subset, int)  # a count
    assert c.data.val_subset == 0.5  # a fraction
    assert c.convert.null_key is False and c.train.opt_betas == (0.8, 0.9) and c.data.img_size == 12
    assert c.phase_config("phase1").lr == 0.001 and c.phase_config("phase2").lr == c.train.lr
    # typed values from code need no parsing
    assert c.set({"phase2.epochs": 4, "output": Path("/tmp/x")}).output == "/tmp/x"


@pytest.mark.parametrize("override, message", [
    ("phase1.epochs=2.5", "phase1.epochs must be an integer or null, got 2.5"),
    ("phase1.epochs=abc", "phase1.epochs must be an integer or null, got 'abc'"),
    ("train.epochs=abc", "train.epochs must be an integer, got 'abc'"),
    ("train.lr=fast", "train.lr must be a number, got 'fast'"),
    ("convert.null_key=3", "convert.null_key must be true or false, got 3"),
    ("model.kwargs=3", "model.kwargs must be a mapping, got 3"),
    ("train.opt_betas=[0.9]", "train.opt_betas must be a list of 2 numbers"),
])
def test_values_that_do_not_fit_their_type_name_the_key(override, message):
    with pytest.raises(ValueError) as e:
        load_config(None, [override])
    assert message in str(e.value)


@pytest.mark.parametrize("override, message", [
    ("train.epochs=0", "train.epochs must be >= 1, got 0"),
    ("phase2.lr=0", "phase2.lr must be > 0, got 0.0"),
    ("data.train_subset=0", "data.train_subset must be an image count > 0 or a fraction in (0, 1]"),
    ("data.val_subset=1.5", "data.val_subset must be an image count > 0 or a fraction in (0, 1]"),
    ("convert.bias_strength=-1", "convert.bias_strength must be >= 0, got -1.0"),
    ("convert.bias_strength=.nan", "convert.bias_strength must be a finite number"),
    ("convert.bias_strength=.inf", "convert.bias_strength must be a finite number"),
    ("convert.qk_std=-0.1", "convert.qk_std must be >= 0"),
    ("convert.form=fancy", "convert.form must be one of 'paper', 'factorized', 'local', 'tied', got 'fancy'"),
    ("convert.qk_dim=0", "convert.qk_dim must be >= 1"),
    ("data.augment=heavy", "data.augment must be one of 'none', 'light', 'deit'"),
    ("train.precision=half", "train.precision must be one of"),
    ("train.device=tpu", "train.device must be 'auto', 'cpu', 'cuda' or 'cuda:N' (a torch device), got 'tpu'"),
    ("phase2.device=cuda:x", "phase2.device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    ("phase1.warmup_epochs=20", "phase1 (train layered with phase1): warmup_epochs must be in [0, epochs=20)"),
    ('phase2.lr_scale={"*.qk.*": -1}', "phase2 (train layered with phase2): lr_scale['*.qk.*'] must be a number >= 0"),
    ("train.lr_scale=3", "train.lr_scale must be a mapping, got 3"),
])
def test_ranges_are_checked(override, message):
    with pytest.raises(ValueError) as e:
        load_config(CONFIGS / "fmnist_tiny.yaml", [override])
    assert message in str(e.value)


@pytest.mark.parametrize("overrides, message", [
    (["convert.anneal_bias_to=0"], "convert.anneal_bias_to must be > 0, got 0.0"),
    (["convert.anneal_fraction=0.5"], "convert.anneal_fraction is how long convert.anneal_bias_to anneals, which is "
     "not set: set it (e.g. convert.anneal_bias_to=4) or drop convert.anneal_fraction"),
    (["convert.anneal_bias_to=4", "convert.anneal_fraction=0"], "convert.anneal_fraction must be in (0, 1], got 0.0"),
    (["convert.anneal_bias_to=4", "convert.keep_conv=true"],
     "convert.keep_conv keeps the convolution (no attention): drop convert.anneal_bias_to"),
    (["convert.anneal_bias_to=4", "convert.bias_strength=0"],
     "from convert.bias_strength, but that is 0: drop convert.anneal_bias_to"),
])
def test_annealing_settings_that_cannot_work_are_errors(overrides, message):
    with pytest.raises(ValueError) as e:
        load_config(CONFIGS / "fmnist_tiny.yaml", overrides)
    assert message in str(e.value)


def test_round_trip_and_phase_layering():
    c = load_config(CONFIGS / "cifar100_cmhsa5_paper.yaml")
    assert RunConfig.from_dict(yaml.safe_load(yaml.safe_dump(c.to_dict()))) == c
    assert c.phase_config("phase1").clip_grad is None  # train's explicit null (no clipping) reaches the phases
    assert c.phase_config("phase2").epochs == 200 and c.phase_config("phase2").warmup_epochs == 5
    assert c.to_dict()["phase1"] == {"epochs": 200, "lr": 1.25e-4}  # phase sections hold what they set
    scaled = c.set({"phase2.lr_scale": {"*.rel_pos_bias": 10}})
    assert scaled.phase_config("phase2").lr_scale == {"*.rel_pos_bias": 10} and scaled.phase_config("phase1").lr_scale == {}


def test_continue_schedule_makes_phase_2_the_rest_of_phase_1s_run():
    c = load_config(CONFIGS / "fmnist_tiny.yaml", ["convert.continue_schedule=true", "phase2.lr=null",
                                                   "phase2.warmup_epochs=null", "phase2.eval_every=2"])
    first, second = c.phase_config("phase1"), c.phase_config("phase2")
    assert (first.epochs, first.first_epoch, first.schedule_epochs) == (20, 0, 32)
    assert (second.epochs, second.first_epoch, second.schedule_epochs) == (12, 20, 32)
    assert (second.lr, second.warmup_epochs, second.eval_every) == (first.lr, 1, 2)  # phase 1's, but its own eval
    scaled = c.set({"phase2.lr_scale": {"*.mixer.*": 0.5}})  # multipliers on the same schedule, for its own params
    assert scaled.phase_config("phase2").lr_scale == {"*.mixer.*": 0.5} and scaled.phase_config("phase1").lr_scale == {}
    # phase 2 may be shorter than phase 1's warm-up, which counts within the whole schedule
    warm = ["phase1.epochs=2", "phase2.epochs=1", "phase1.warmup_epochs=1"]
    short = load_config(CONFIGS / "fmnist_tiny_midrun.yaml", warm).phase_config("phase2")
    assert (short.epochs, short.warmup_epochs, short.first_epoch, short.schedule_epochs) == (1, 1, 2, 3)
    with pytest.raises(ValueError, match="phase1 .*warmup_epochs must be in"):  # phase 1 must outlast it
        load_config(CONFIGS / "fmnist_tiny_midrun.yaml", [*warm[1:], "phase1.epochs=1"])
    with pytest.raises(ValueError, match=r"phase2.lr=0.0005 \(phase 1: 0.002\)\. Unset those phase2 keys"):
        load_config(CONFIGS / "fmnist_tiny.yaml", ["convert.continue_schedule=true", "phase2.warmup_epochs=null"])
    with pytest.raises(ValueError, match="unknown config key 'phase2.first_epoch'"):  # set by the run config only
        load_config(CONFIGS / "fmnist_tiny.yaml", ["phase2.first_epoch=3"])
    with pytest.raises(ValueError, match="run past the schedule's 4 epochs"):
        TrainConfig(epochs=3, first_epoch=2, schedule_epochs=4)


@pytest.mark.parametrize("grid", sorted(p.name for p in (CONFIGS / "experiments").glob("*.yaml")))
def test_every_grid_cell_is_a_valid_config(grid):
    spec = load_experiment(CONFIGS / "experiments" / grid)
    for budget in ("quick", "full"):
        for entry in cell_configs(spec, budget, spec["seeds"]):
            assert isinstance(entry["config"], RunConfig) and entry["config"].train.seed == entry["seed"]


def test_convert_section_reaches_convert_model():
    from cmhsa.pipeline import convert_settings, create_model, model_spec
    c = load_config(None, ["data.dataset=digits", "data.img_size=8", "model.name=cmhsa3_conv_tiny",
                           "model.kwargs={patch_size: 2, pixel_dim: 2, depth: 1}", "convert.bias_strength=30",
                           "convert.null_key=false", "convert.kwargs={drop_path_rate: 0.1}"])
    attn = convert_model(create_model(model_spec(c), seed=0), **convert_settings(c))
    assert (attn.config["bias_strength"], attn.config["null_key"], attn.config["drop_path_rate"]) == (30, False, 0.1)
    for form in ("factorized", "local", "tied"):
        attn = convert_model(create_model(model_spec(c), seed=0), **convert_settings(c.set({"convert.form": form})))
        assert attn.config["form"] == form


def test_cli_reports_config_errors_without_a_traceback(tmp_path, capsys):
    assert main(["pipeline", "--output", str(tmp_path), "--set", "data.datset=digits"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'data.dataset'" in err and "Traceback" not in err
    assert not (tmp_path / "config.yaml").exists()
    # an unquoted value with spaces reaches us split in two: the first half is not valid YAML
    assert main(["pipeline", "--output", str(tmp_path), "--set", "model.kwargs={depth:", "2}"]) == 2
    err = capsys.readouterr().err
    assert "override 'model.kwargs={depth:': the value is not valid YAML" in err and "quote" in err


def test_a_yaml_syntax_error_names_the_file_and_the_line(tmp_path):
    from cmhsa.experiments import load_experiment
    bad = tmp_path / "bad.yaml"
    bad.write_text("phase1:\n  epochs: 2\n  lr: [1e-3\n")
    for load in (load_config, load_experiment):
        with pytest.raises(ValueError, match=r"bad.yaml is not valid YAML at line 4, column 1: expected ','"):
            load(bad)
    bad.write_text("")
    with pytest.raises(ValueError, match="must hold a YAML mapping"):
        load_experiment(bad)


def test_yaml_mapping_without_a_space_after_the_colon_is_an_error():
    # YAML reads {depth:2} as the key "depth:2" with no value, and timm drops None arguments: silently ignored
    with pytest.raises(ValueError, match=r"model.kwargs has the key 'depth:2' with no value.*\{depth: 2\}"):
        load_config(None, ["model.kwargs={depth:2}"])
    assert load_config(None, ["model.kwargs={depth: 2}"]).model.kwargs == {"depth": 2}


@pytest.mark.parametrize("name,hint", [("cmhsa3_conv_tiny", "did you mean 'depth'?"), ("deit_tiny_patch16_224", "")])
def test_a_misspelt_model_argument_is_a_cli_error_naming_it(tmp_path, capsys, name, hint):
    assert main(["train", "--output", str(tmp_path), "--set", "data.dataset=digits", "data.img_size=8",
                 f"model.name={name}", "model.kwargs={depht: 2}"]) == 2
    err = capsys.readouterr().err
    assert f"model '{name}' rejects an argument of model.kwargs" in err and "'depht'" in err and hint in err
    assert "Traceback" not in err


# ------------------------------------------------------------------------- records written by older versions


def _old_style(config: RunConfig) -> dict:
    """A config as versions before RunConfig recorded it: sections as given, no convert.form / qk_dim."""
    values = config.to_dict()
    values["train"] = {k: v for k, v in values["train"].items() if k in ("batch_size", "precision", "seed")}
    for key in ("form", "qk_dim"):
        values["convert"].pop(key)
    return values


def _grid(tmp_path: Path) -> dict:
    spec = {"name": "old", "base": str(CONFIGS / "fmnist_tiny.yaml"), "seeds": [0],
            "common": ["data.dataset=digits", "data.img_size=8", "data.train_subset=null", "train.precision=fp32",
                       "phase1.epochs=1", "phase1.warmup_epochs=0", "convert.form=paper"],  # old records ran it
            "budgets": {"quick": [], "full": []},
            "cells": [{"name": "conv", "kind": "train", "overrides": ["model.name=cmhsa3_conv_tiny"]}]}
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(spec))
    return load_experiment(path)


def test_old_style_records_still_count_as_finished(tmp_path):
    spec = _grid(tmp_path)
    entry = cell_configs(spec, "full", [0], runs_root=tmp_path / "runs")[0]
    old = _old_style(entry["config"])
    assert old != entry["config"].to_dict() and recorded_config({"config": old}) == entry["config"]
    cells = tmp_path / "results" / "old" / "cells"
    cells.mkdir(parents=True)
    record = {"cell": "conv", "label": "conv", "kind": "train", "seed": 0, "config": old, "final": {}}
    (cells / "conv__seed0.json").write_text(json.dumps(record))
    assert find_finished(entry, tmp_path / "results") == cells / "conv__seed0.json"

    before = (cells / "conv__seed0.json").stat().st_mtime_ns
    run_experiment(spec, results_root=tmp_path / "results", runs_root=tmp_path / "runs", progress=False)
    assert (cells / "conv__seed0.json").stat().st_mtime_ns == before and not (tmp_path / "runs").exists()

    # an old record of another learning rate is another run
    other = dict(record, config={**old, "train": {**old["train"], "lr": 1.0}})
    assert recorded_config(other) != entry["config"]
    # an old record with convert.form: the key was ignored then, so it ran the paper form, whatever it says
    factorized = dict(record, config={**old, "convert": {**old["convert"], "form": "factorized"}})
    assert recorded_config(factorized) is None


def test_a_budget_in_steps_becomes_the_epochs_it_comes_to_for_the_data():
    """The main job's 780 + 468 steps (one continued run, batch 128) are its 20 + 12 epochs on 5,000 images, and as
    many steps on 1,000 (7 batches an epoch): the run's total is rounded once, so phase 2 takes the rest."""
    config = load_config(CONFIGS / "fmnist_tiny_midrun.yaml")
    assert config.budget_in_steps
    with pytest.raises(ValueError, match="budget in steps: RunConfig.in_epochs"):
        config.phase_config("phase1")
    at_5000 = config.in_epochs(5000)
    first, second = at_5000.phase_config("phase1"), at_5000.phase_config("phase2")
    assert (first.epochs, first.warmup_epochs, second.epochs, second.schedule_epochs) == (20, 1, 12, 32)
    assert not at_5000.budget_in_steps and at_5000.in_epochs(10) == at_5000  # nothing left to convert
    at_1000 = config.in_epochs(1000)
    first, second = at_1000.phase_config("phase1"), at_1000.phase_config("phase2")
    assert (first.epochs, first.warmup_epochs) == (112, 6)  # ceil(780 / 7), ceil(39 / 7)
    assert first.epochs + second.epochs == second.schedule_epochs == 179  # ceil(1248 / 7), not 112 + ceil(468 / 7)
    assert config.in_epochs(2000, world_size=2).phase_config("phase1").epochs == 112  # 1,000 images per process

    two_runs = load_config(CONFIGS / "fmnist_tiny.yaml", ["phase1.steps=100", "phase2.steps=50", "train.batch_size=64"])
    assert (two_runs.in_epochs(640).phase1.epochs, two_runs.in_epochs(640).phase2.epochs) == (10, 5)
    assert two_runs.in_epochs(700).phase1.epochs == 10  # a partial batch is dropped: still 10 batches an epoch
    with pytest.raises(ValueError, match="phase1: 50 training images make no optimizer step \\(batch of 64\\)"):
        two_runs.in_epochs(50)
    accumulated = two_runs.set({"train.grad_accum_steps": 2})  # a step takes 2 batches: 5 steps an epoch of 640
    assert (accumulated.in_epochs(640).phase1.epochs, accumulated.in_epochs(640).phase2.epochs) == (20, 10)
    with pytest.raises(ValueError, match="make no optimizer step \\(2 batches of 64\\); lower batch_size or "
                                         "grad_accum_steps"):
        accumulated.in_epochs(100)
    # a length on the command line replaces the file's, whichever unit either is in
    assert not load_config(CONFIGS / "fmnist_tiny_midrun.yaml", ["phase1.epochs=2", "phase1.warmup_epochs=0",
                                                                  "phase2.epochs=1"]).budget_in_steps
    assert load_config(CONFIGS / "fmnist_tiny.yaml", ["phase1.steps=30"]).phase1.epochs is None
    with pytest.raises(ValueError, match="phase1.epochs and phase1.steps are both set: keep one"):
        RunConfig.from_dict({"phase1": {"epochs": 3, "steps": 30}})
    with pytest.raises(ValueError, match="warmup_steps must be in \\[0, steps=30\\), got 30"):
        load_config(CONFIGS / "fmnist_tiny.yaml", ["phase1.steps=30", "phase1.warmup_steps=30"])
