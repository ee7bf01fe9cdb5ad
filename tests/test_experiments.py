"""The experiment runner (resumable cells, JSON results) and the report built from them."""
import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from cmhsa.cli import main
from cmhsa.experiments import cell_configs, grid_status, load_experiment, read_cells, run_experiment
from cmhsa.pipeline import create_model, model_spec
from cmhsa.report import _short_title, write_report
from cmhsa.rundir import RunDir

GRIDS = Path(__file__).resolve().parent.parent / "configs" / "experiments"
TINY_MODEL = "{patch_size: 2, pixel_dim: 8, depth: 1, mlp_ratio: 1.0}"


SHIPPED_GRIDS = sorted(p.stem for p in GRIDS.glob("*.yaml"))


@pytest.mark.parametrize("grid", SHIPPED_GRIDS)
def test_shipped_grids_expand_to_valid_runs(grid):
    spec = load_experiment(GRIDS / f"{grid}.yaml")
    for budget in ("quick", "full"):
        entries = cell_configs(spec, budget, spec["seeds"])
        assert len(entries) == len(spec["cells"]) * len(spec["seeds"])
        for e in entries:
            assert e["config"].train.seed == e["seed"]
    if grid == "efficiency":
        sizes = {e["config"].data.train_subset for e in cell_configs(spec, "full", [0])}
        assert len(sizes) >= 4 and min(sizes) <= 1000


@pytest.mark.parametrize("grid", SHIPPED_GRIDS)
def test_every_model_of_the_shipped_grids_builds_and_runs(grid):
    """Each distinct model of a grid's full budget builds from its spec and maps a batch of the grid's images to
    one logit per class (a timm CNN gets no img_size: it takes any size)."""
    models = {}
    for e in cell_configs(load_experiment(GRIDS / f"{grid}.yaml"), "full", [0]):
        models.setdefault((e["config"].model.name, repr(e["config"].model.kwargs), e["config"].data.img_size),
                          e["config"])
    for config in models.values():
        spec = model_spec(config)
        model = create_model(spec, seed=0).eval()
        assert ("img_size" in spec["kwargs"]) == (not config.model.name.startswith("resnet"))
        size = config.data.img_size
        with torch.no_grad():
            logits = model(torch.randn(2, spec["kwargs"]["in_chans"], size, size))
        assert logits.shape == (2, spec["kwargs"]["num_classes"]), config.model.name


def make_grid(tmp_path: Path) -> Path:
    spec = {
        "name": "mini", "base": str(GRIDS.parent / "fmnist_tiny.yaml"), "seeds": [0, 1],
        "common": ["data.dataset=digits", "data.img_size=8", "data.train_subset=null", "data.val_subset=null",
                   "data.augment=none", "train.batch_size=64", "train.precision=fp32", "train.warmup_epochs=0",
                   "phase1.warmup_epochs=0", "phase2.warmup_epochs=0", "phase1.epochs=1", "phase2.epochs=1",
                   "train.max_steps_per_epoch=3"],
        "budgets": {"quick": [], "full": []},
        "cells": [
            {"name": "conv", "label": "CMHSA-3 (1st phase)", "kind": "train",
             "overrides": ["model.name=cmhsa3_conv_tiny", f"model.kwargs={TINY_MODEL}"]},
            {"name": "two_phase", "label": "CMHSA-3 (ours)", "kind": "pipeline",
             "overrides": ["model.name=cmhsa3_conv_tiny", f"model.kwargs={TINY_MODEL}"]},
        ],
    }
    path = tmp_path / "mini.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_runner_writes_cells_skips_finished_and_reports(tmp_path):
    spec = load_experiment(make_grid(tmp_path))
    results, runs = tmp_path / "results", tmp_path / "runs"
    out = run_experiment(spec, results_root=results, runs_root=runs, progress=False)
    cells = read_cells(out)
    assert sorted((c["cell"], c["seed"]) for c in cells) == [("conv", 0), ("conv", 1), ("two_phase", 0),
                                                           ("two_phase", 1)]
    two = next(c for c in cells if c["cell"] == "two_phase")
    assert two["transfer"]["float64"]["logits_error"] <= 1e-8
    assert len(two["phases"]["phase1"]) == 1 and len(two["phases"]["phase2"]) == 1
    assert "cpu" in two["hardware"] and two["train_seconds"] > 0
    # scored once more on the whole test split: digits holds out 359 of its 1,797 images
    assert all(c["test"]["images"] == 359 and 0 <= c["test"]["top1"] <= 100 for c in cells)
    # shift consistency per shift of 1..P pixels (P = 2 here), both fills, as fractions of the images
    for c in cells:
        assert set(c["test"]["shift_consistency"]) == {"circular", "zero"}
        assert all(list(curve) == ["1", "2"] and all(0 <= v <= 1 for v in curve.values())
                   for curve in c["test"]["shift_consistency"].values())
    assert two["git"]["commit"] is None or len(two["git"]["commit"]) == 40
    assert list(runs.rglob("model.safetensors")) and not list(results.rglob("*.safetensors"))  # checkpoints stay out

    stamps = {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}
    run_experiment(spec, results_root=results, runs_root=runs, progress=False)
    assert {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")} == stamps  # nothing re-run

    # a changed cell config re-runs that cell only
    spec["cells"][0]["overrides"].append("phase1.lr=1.0e-4")
    run_experiment(spec, results_root=results, runs_root=runs, progress=False, seeds=[0])
    changed = [p.name for p in (out / "cells").glob("*.json") if p.stat().st_mtime_ns != stamps[p]]
    assert changed == ["conv__seed0.json"]


def test_processes_side_by_side_share_a_grid(tmp_path, capsys):
    """A cell another process is running (its run directory locked) is skipped, not trained twice or cleared;
    the next run of the grid picks it up."""
    results, runs = tmp_path / "results", tmp_path / "runs"
    spec = load_experiment(make_grid(tmp_path))
    busy = next(e for e in cell_configs(spec, "full", [0, 1], runs) if (e["cell"], e["seed"]) == ("two_phase", 0))
    other = RunDir(busy["config"].run_dir())
    other.lock()  # a second open file description: flock treats it as another process's lock
    try:
        out = run_experiment(spec, results_root=results, runs_root=runs, only=["two_phase"])
    finally:
        other.unlock()
    assert "(cell two_phase, seed 0): another process is running it, skipped" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "cells").glob("*.json")) == ["two_phase__seed1.json"]
    assert not other.phase("phase1").metrics_path.exists()  # nothing written into the busy run
    run_experiment(spec, results_root=results, runs_root=runs, only=["two_phase"], progress=False)
    assert sorted(p.name for p in (out / "cells").glob("*.json")) == ["two_phase__seed0.json", "two_phase__seed1.json"]


def test_identical_run_in_another_grid_is_reused(tmp_path):
    results, runs = tmp_path / "results", tmp_path / "runs"
    first = load_experiment(make_grid(tmp_path))
    first["seeds"] = [0]
    run_experiment(first, results_root=results, runs_root=runs, progress=False, only=["conv"])
    source = json.loads((results / "mini/cells/conv__seed0.json").read_text())

    # a second grid: one cell identical to mini's conv under another name, one that differs in its learning rate
    second = dict(first, name="other", cells=[dict(first["cells"][0], name="same_as_conv"),
                                              dict(first["cells"][0], name="other_lr",
                                                   overrides=[*first["cells"][0]["overrides"], "phase1.lr=1.0e-4"])])
    run_experiment(second, results_root=results, runs_root=runs, progress=False)
    reused = json.loads((results / "other/cells/same_as_conv__seed0.json").read_text())
    assert reused["reused_from"] == "mini/cells/conv__seed0.json"
    assert reused["final"] == source["final"] and reused["phases"] == source["phases"]
    assert reused["cell"] == "same_as_conv" and reused["config"]["output"].endswith("same_as_conv/seed0")
    assert not (runs / "other/full/same_as_conv").exists()  # nothing trained
    fresh = json.loads((results / "other/cells/other_lr__seed0.json").read_text())
    assert "reused_from" not in fresh and (runs / "other/full/other_lr/seed0/train/metrics.jsonl").exists()


def test_settings_that_do_not_change_results_keep_a_cell_finished(tmp_path):
    """How often a run evaluates or logs, and where it runs, is not what it computes: the record stands."""
    results, runs = tmp_path / "results", tmp_path / "runs"
    spec = load_experiment(make_grid(tmp_path))
    spec["seeds"] = [0]
    run_experiment(spec, results_root=results, runs_root=runs, progress=False, only=["conv"])
    record = results / "mini/cells/conv__seed0.json"
    before = record.read_text()
    conv = spec["cells"][0]
    spec["cells"] = [dict(conv, overrides=[*conv["overrides"], "train.eval_every=2", "train.log_interval=7",
                                           "train.device=cpu"])]
    run_experiment(spec, results_root=results, runs_root=runs, progress=False)
    assert record.read_text() == before
    spec["cells"] = [dict(conv, overrides=[*conv["overrides"], "train.label_smoothing=0.0"])]
    run_experiment(spec, results_root=results, runs_root=runs, progress=False)
    assert json.loads(record.read_text())["config"]["train"]["label_smoothing"] == 0.0  # a real change reruns


def test_pipeline_cell_takes_a_finished_identical_phase1(tmp_path):
    """Two phase-2 recipes of one seed train phase 1 once; a cell whose phase 1 differs trains its own."""
    results, runs = tmp_path / "results", tmp_path / "runs"
    spec = load_experiment(make_grid(tmp_path))
    two_phase = spec["cells"][1]
    spec.update(seeds=[0], cells=[two_phase, dict(two_phase, name="soft", overrides=[
        *two_phase["overrides"], "convert.bias_strength=12"]), dict(two_phase, name="other_lr", overrides=[
        *two_phase["overrides"], "phase1.lr=1.0e-4"])])
    out = run_experiment(spec, "quick", results_root=results, runs_root=runs, progress=False)
    cells = {c["cell"]: c for c in read_cells(out)}
    donor = runs / "mini/quick/two_phase/seed0"
    assert cells["soft"]["phase1_from"] == str(donor) and "phase1_from" not in cells["two_phase"]
    assert cells["soft"]["phases"]["phase1"] == cells["two_phase"]["phases"]["phase1"]
    copied = runs / "mini/quick/soft/seed0/phase1/last"
    assert all((copied / f.name).read_bytes() == f.read_bytes() for f in (donor / "phase1/last").iterdir())
    assert cells["soft"]["config"]["convert"]["bias_strength"] == 12  # its own conversion and phase 2
    assert cells["soft"]["transfer"]["float64"]["logits_error"] > cells["two_phase"]["transfer"]["float64"]["logits_error"]
    assert "phase1_from" not in cells["other_lr"]
    assert cells["other_lr"]["phases"]["phase1"][0]["lr"] != cells["two_phase"]["phases"]["phase1"][0]["lr"]


def test_status_lists_what_a_run_would_do_and_runs_nothing(tmp_path, capsys):
    results, runs = tmp_path / "results", tmp_path / "runs"
    grid = make_grid(tmp_path)
    spec = load_experiment(grid)
    spec["seeds"] = [0]
    status = lambda s: {(r["cell"], r["seed"]): (r["status"], r["detail"])
                        for r in grid_status(s, results_root=results, runs_root=runs)}
    assert status(spec) == {("conv", 0): ("to run", ""), ("two_phase", 0): ("to run", "")}
    assert not results.exists() and not runs.exists()

    run_experiment(spec, results_root=results, runs_root=runs, progress=False)
    record = json.loads((results / "mini/cells/conv__seed0.json").read_text())
    (results / "mini/cells/two_phase__seed0.json").unlink()  # its checkpointed run is left, as after a kill
    assert status(spec) == {("conv", 0): ("finished", f"test top-1 {record['test']['top1']:.2f}"),
                            ("two_phase", 0): ("resume", f"phase2 epoch 1/1 in {runs}/mini/full/two_phase/seed0")}
    with RunDir(runs / "mini/full/two_phase/seed0") as busy:  # another process (here: this one) runs it
        busy.lock()
        assert status(spec)[("two_phase", 0)] == ("running", f"by process {os.getpid()}: phase2 epoch 1/1")
    assert status(spec)[("two_phase", 0)][0] == "resume"  # the lock is gone with its holder
    other = dict(spec, name="other", cells=[dict(spec["cells"][0], name="same_as_conv")])
    assert status(other) == {("same_as_conv", 0): ("reuse", "mini/cells/conv__seed0.json")}
    changed = dict(spec, cells=[dict(spec["cells"][0], overrides=[*spec["cells"][0]["overrides"], "phase1.lr=1e-4"])])
    assert status(changed) == {("conv", 0): ("to run", "")}  # a changed config is not the finished cell
    del record["test"]  # as in a record written before cells were scored on the test set
    (results / "mini/cells/conv__seed0.json").write_text(json.dumps(record))
    assert status(spec)[("conv", 0)] == \
        ("finished", f"val top-1 {record['final']['val_top1']:.2f} (no test score in this record)")

    # how long the runs left should take: what the same cell's finished seeds took, where there is one
    minutes = {(r["cell"], r["seed"]): r["minutes"]
               for r in grid_status(dict(spec, seeds=[0, 1]), results_root=results, runs_root=runs)}
    took = record["train_seconds"] / 60
    assert minutes == {("conv", 0): took, ("conv", 1): took, ("two_phase", 0): None, ("two_phase", 1): None}
    only_seed_1 = grid_status(dict(spec, seeds=[1]), results_root=results, runs_root=runs)
    assert {r["cell"]: r["minutes"] for r in only_seed_1} == {"conv": took, "two_phase": None}

    capsys.readouterr()
    assert main(["experiment", "mini", "--config", str(grid), "--status", "--seeds", "0", "1",
                 "--results", str(results), "--runs", str(runs)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "mini (full budget): 4 cells, 1 finished, 1 resume, 2 to run"
    assert sum("to run" in line for line in printed[1:-1]) == 2
    assert printed[-1].startswith(f"left: 3 runs; 1 of them should take ~{took:.0f} CPU-min") \
        and printed[-1].endswith("2 have no finished seed to estimate from")
    assert main(["experiment", "mini", "--config", str(grid), "--status", "--seeds", "0", "1", "--cells", "two_phase",
                 "--results", str(results), "--runs", str(runs)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "left: 2 runs; 2 have no finished seed to estimate from"
    assert not (results / "mini/cells/two_phase__seed0.json").exists()  # nothing ran


def test_report_tables_and_claims(tmp_path):
    cells = tmp_path / "results" / "table1" / "cells"
    cells.mkdir(parents=True)
    top1 = {"ViT": [50, 52], "DeiT-base": [60, 61], "CMHSA (2nd phase)": [55, 57], "CMHSA-5 (ours)": [70, 71],
            "CMHSA-5 (1st phase)": [69, 70.5]}
    for label, values in top1.items():
        for seed, v in enumerate(values):
            record = {"cell": label, "label": label, "seed": seed, "params": 1000, "train_seconds": 10.0 + seed,
                      "final": {"val_top1": v, "val_top5": 90.0, "val_loss": 1.0}, "phases": {},
                      "hardware": {"cpu": "test cpu", "threads": 2, "torch": "x"}}
            (cells / f"{label}__{seed}.json").write_text(json.dumps(record))
    report = write_report(tmp_path / "results", configs=GRIDS).read_text()
    assert "| CMHSA-5 (ours) | 0.00M | 70.50 ± 0.71 |" in report
    assert "78.74" in report  # the paper's number beside ours
    assert "CMHSA-5 (ours) − CMHSA (2nd phase) = +14.50 points" in report and "**agrees**" in report
    assert "CMHSA-5 (ours) − CMHSA-5 (1st phase) = +0.75 points" in report and "**inconclusive**" in report
    assert "Hardware (grids): test cpu, 2 threads, torch x (table1)." in report  # which grid ran on which setup
    assert "Not run yet: `cmhsa experiment warmup --budget full`" in report
    assert "Not run yet: `python benchmarks/shift_experiment.py --seeds 0 1 2`" in report
    assert (tmp_path / "results/table1/summary.csv").read_text().startswith("model,params,top1_mean")
    assert "Progress: 10 of 18 cells finished" in report  # the shipped table1 grid: 9 cells x 2 seeds


def _cell(grid_dir: Path, cell: str, label: str, top1: float, seed: int = 0, curve=(), **extra) -> None:
    record = {"cell": cell, "label": label, "kind": "train", "seed": seed, "params": 1000, "train_seconds": 1.0,
              "config": {"data": {"train_subset": extra.pop("n", 2000)}}, "hardware": {"cpu": "test cpu"},
              "final": {"val_top1": top1, "val_top5": 99.0, "val_loss": 1.0},
              "phases": {"train": [{"epoch": e, "val_top1": v, "val_loss": 1.0}
                                   for e, v in enumerate((*curve, top1))]}, **extra}
    (grid_dir / "cells").mkdir(parents=True, exist_ok=True)
    (grid_dir / "cells" / f"{cell}__seed{seed}.json").write_text(json.dumps(record))


def test_report_judges_one_seed_grids_against_table1_noise(tmp_path):
    """Warm-up and efficiency verdicts use table1's seed noise: sqrt(2) x mean seed std = sqrt(2) x 0.707 = 1.0."""
    results = tmp_path / "results"
    for seed, (a, b) in enumerate([(50, 60), (52, 60)]):
        _cell(results / "table1", "vit", "ViT", a, seed)
        _cell(results / "table1", "deit_base", "DeiT-base", b, seed)
    _cell(results / "warmup", "conv_nowarmup", "Convolutional init, w/o warm-up", 70.0, curve=[60.0])
    _cell(results / "warmup", "conv_warmup", "Convolutional init, w/ warm-up", 70.5, curve=[55.0])
    _cell(results / "warmup", "random_nowarmup", "Random init, w/o warm-up", 50.0, curve=[30.0])
    _cell(results / "warmup", "random_warmup", "Random init, w/ warm-up", 55.0, curve=[25.0])
    for n, ours, deit in [(1000, 60.0, 50.0), (8000, 80.0, 79.5)]:
        _cell(results / "efficiency", f"cmhsa5_n{n}", "CMHSA-5 (two-phase)", ours, n=n)
        _cell(results / "efficiency", f"deit_base_n{n}", "DeiT-base", deit, n=n)
    report = write_report(results, configs=GRIDS).read_text()
    assert "60.00 vs 30.00 from random init, +30.00 points (noise ±1.00) — **agrees**" in report
    assert "without − with = -0.50 points (noise ±1.00) — **agrees** with the paper (no worse" in report
    assert "with − without = +5.00 points (noise ±1.00) — **agrees**" in report
    assert "1000: +10.00 (agrees), 8000: +0.50 (inconclusive)" in report
    assert "The gap narrows from +10.00 at 1000 images to +0.50 at 8000" in report
    assert "## At a glance" in report and "5 of the paper's claims agree with our measurements, 0 disagree, " \
        "0 are inconclusive" in report  # 3 warm-up, DeiT vs ViT, efficiency at 1000 images
    assert "+10.00 points at 1000 images (noise ±1.00); by training-set size: 1000: +10.00 (agrees), 8000: +0.50 " \
        "(inconclusive) — **agrees** with the paper" in report
    # at a glance, each verdict line is split into its claim, what was measured and the verdict
    assert "| Data efficiency (short budget) | Two-phase CMHSA-5 beats DeiT-base with little data | +10.00 points at " \
        "1000 images (noise ±1.00); by training-set size: 1000: +10.00 (agrees), 8000: +0.50 (inconclusive) | " \
        "**agrees** with the paper |" in report
    assert (results / "warmup" / "warmup.png").exists() and (results / "efficiency" / "efficiency.png").exists()

    # a warm-up that hurts random init by more than the noise disagrees
    _cell(results / "warmup", "random_warmup", "Random init, w/ warm-up", 45.0, curve=[25.0])
    assert "with − without = -5.00 points (noise ±1.00) — **disagrees**" in write_report(results, configs=GRIDS).read_text()


def test_report_ablations_with_phase2_analysis(tmp_path):
    results = tmp_path / "results"
    transfer = {"bias_strength": 10, "null_key": True, "qk_std": 0.02, "float64": {"logits_error": 1e-3},
                "float32": {"logits_error": 1e-3}, "val_before_conversion": {"val_top1": 60.0},
                "val_after_conversion": {"top1": 59.0}}
    for cell, beta in (("beta10", 10), ("beta60", 60)):
        _cell(results / "ablations", cell, f"beta = {beta}", 70.0, curve=[65.0], transfer=dict(transfer, bias_strength=beta))
        for c in read_cells(results / "ablations"):
            c["config"]["convert"] = {"bias_strength": c["transfer"]["bias_strength"]}
            (results / "ablations" / "cells" / f"{c['cell']}__seed0.json").write_text(json.dumps(c))
    over = [{"epoch": e, "offset_mass": 1.0 - 0.1 * e, "positional_share": 0.9, "conv_projection_error": 0.05 * e}
            for e in range(3)]
    (results / "analysis" / "ablations-beta10").mkdir(parents=True)
    (results / "analysis" / "ablations-beta10" / "analysis.json").write_text(json.dumps(
        {"remaining_convolution_over_checkpoints": over}))
    report = write_report(results, configs=GRIDS).read_text()
    assert "| beta = 10 | 1.0e-03 | 1.0e-03 | 60.00 → 59.00 | 70.00 | 1.000 | 0.800 | 0.900 | 0.100 |" in report
    assert "| beta = 60 | 1.0e-03 | 1.0e-03 | 60.00 → 59.00 | 70.00 | 1.000 | — | — | — |" in report
    assert "Exact conversions (float64 logits error < 1e-6): none" in report
    assert "A softer bias than the exact conversion: beta = 10 − beta = 60 = +0.00 points final top-1 (no noise " \
        "estimate)" in report
    assert (results / "ablations" / "ablations.png").exists()
    assert "0.1" in (results / "ablations" / "summary.csv").read_text().splitlines()[1].split(",")[-1]


def test_report_of_an_empty_results_root_is_an_error(tmp_path):
    (tmp_path / "results").mkdir()
    with pytest.raises(FileNotFoundError, match="no results to report for the full budget.*run `cmhsa experiment"):
        write_report(tmp_path / "results", configs=GRIDS)
    (tmp_path / "results" / "ablations-quick" / "cells").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="it holds quick-budget grids: add --budget quick"):
        write_report(tmp_path / "results", configs=GRIDS)


def test_experiment_cli_quick_budget(tmp_path, capsys):
    """`cmhsa experiment <grid> --budget quick` end to end on the shipped ablations grid (minutes, tiny sizes)."""
    args = ["experiment", "ablations", "--budget", "quick", "--cells", "beta60_nonull",
            "--results", str(tmp_path / "results"), "--runs", str(tmp_path / "runs")]
    assert main(args) == 0
    cell = json.loads(next((tmp_path / "results").glob("ablations-quick/cells/*.json")).read_text())
    assert cell["test"]["images"] == 100  # a smoke test scores its 100 validation images, not the 10k test split
    capsys.readouterr()
    # the default (full) budget finds nothing here: an error that names the budget that is there, not an empty report
    assert main(["report", str(tmp_path / "results"), "--configs", str(GRIDS)]) == 2
    assert "holds no results to report for the full budget" in capsys.readouterr().err
    assert not (tmp_path / "results" / "REPORT.md").exists()
    assert main(["report", str(tmp_path / "results"), "--budget", "quick", "--configs", str(GRIDS)]) == 0
    report = (tmp_path / "results" / "REPORT.md").read_text()
    assert "beta = 60, no null key (paper)" in report
    assert "Ablations" in report and "| setting |" in report


def test_bad_experiment_configs(tmp_path):
    with pytest.raises(FileNotFoundError, match="configs/experiments"):
        load_experiment(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("name: x\nbase: ../fmnist_tiny.yaml\n")
    with pytest.raises(ValueError, match="missing 'cells'"):
        load_experiment(tmp_path / "bad.yaml")
    with pytest.raises(ValueError, match="budget must be one of"):
        cell_configs(load_experiment(GRIDS / "table1.yaml"), "medium", [0])


def test_report_analysis_section(tmp_path):
    a = tmp_path / "results" / "analysis" / "cmhsa5"
    a.mkdir(parents=True)
    (a / "shift.png").write_bytes(b"")
    a_json = {"top1": 80.0, "attention_distance": {"mean": [1.5, 2.5]},
              "shift_consistency": {"circular": {"1": 0.9, "4": 1.0}, "zero": {"1": 0.8, "4": 0.5}},
              "remaining_convolution": {"offset_mass": 0.75, "positional_share": 0.6, "conv_projection_error": 0.3},
              "files": [str(a / "analysis.json"), str(a / "shift.png")]}
    (a / "analysis.json").write_text(json.dumps(a_json))
    report = write_report(tmp_path / "results", configs=GRIDS).read_text()
    assert "| cmhsa5 | 80.0 | 1.50 → 2.50 | 0.90 / 1.00 | 0.80 | 0.750 | 0.600 | 0.300 |" in report
    assert (tmp_path / "results/analysis/overview.png").exists() and "analysis/cmhsa5/shift.png" in report


def test_grid_sizes_and_step_budget(tmp_path):
    """sizes repeat cells per subset size with its batch size; steps become epochs for that size."""
    spec = yaml.safe_load(make_grid(tmp_path).read_text())
    spec.update(sizes={100: 10, 400: 20}, steps={"phase1": 50}, warmup_steps={"phase1": 10})
    spec["cells"][1]["steps"] = {"phase2": 25}
    spec["cells"].append({"name": "fixed", "kind": "train", "train_size": 300,
                          "overrides": ["model.name=cmhsa3_conv_tiny", "data.train_subset=300"]})
    path = tmp_path / "sized.yaml"
    path.write_text(yaml.safe_dump(spec))
    entries = {e["cell"]: e["config"] for e in cell_configs(load_experiment(path), "full", [0])}
    assert sorted(entries) == ["conv_n100", "conv_n400", "fixed", "two_phase_n100", "two_phase_n400"]
    small, large = entries["conv_n100"], entries["conv_n400"]
    assert (small.data.train_subset, small.train.batch_size) == (100, 10)
    assert (large.data.train_subset, large.train.batch_size) == (400, 20)
    # 50 steps: 10 per epoch -> 5 epochs; 20 per epoch -> ceil(2.5) = 3; warm-up 10 steps -> 1 epoch each
    assert (small.phase1.epochs, large.phase1.epochs) == (5, 3)
    assert small.phase1.warmup_epochs == large.phase1.warmup_epochs == 1
    assert (entries["two_phase_n100"].phase2.epochs, entries["two_phase_n400"].phase2.epochs) == (3, 2)
    # a cell with its own train_size keeps it, and the grid's batch 64: 4 steps per epoch -> ceil(12.5) = 13
    assert entries["fixed"].data.train_subset == 300 and entries["fixed"].phase1.epochs == 13

    # a cell's own sizes keep it to some of the grid's
    spec["cells"][0]["sizes"] = [400]
    path.write_text(yaml.safe_dump(spec))
    assert sorted(e["cell"] for e in cell_configs(load_experiment(path), "full", [0])) == \
        ["conv_n400", "fixed", "two_phase_n100", "two_phase_n400"]
    for bad in ([300], [], 400):
        spec["cells"][0]["sizes"] = bad
        path.write_text(yaml.safe_dump(spec))
        with pytest.raises(ValueError, match="cell 'conv' has sizes .*give a list of the grid's sizes \\(100, 400\\)"):
            load_experiment(path)
    del spec["cells"][0]["sizes"]

    spec["sizes"] = {100: 200}
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ValueError, match="sizes must map training-subset sizes to batch sizes"):
        load_experiment(path)


def test_two_standard_errors_rule():
    """The pooled rule: 2 x sqrt(s_a^2/n_a + s_b^2/n_b). The old 'larger std' rule called -0.45 with stds of 0.32
    a disagreement; with two seeds per arm its 2 SE is 0.64, so the gap is within the noise."""
    from cmhsa.report import two_standard_errors
    a, b = [70.0, 70.4525], [70.45, 70.9025]  # std 0.32 each, gap -0.45
    assert abs(two_standard_errors(a, b) - 0.64) < 1e-3
    assert two_standard_errors([1.0, 2.0, 3.0], [1.0, 1.0, 1.0]) == pytest.approx(2 * (1 / 3) ** 0.5)
    assert two_standard_errors([1.0], [1.0, 2.0]) is None


def _converged_cell(results: Path, label: str, n: int, seed: int, test_top1: float, curve, grid: str = "converged",
                    img_size: int = 28) -> Path:
    """One cell's JSON as ``cmhsa experiment`` writes it, at this image size (P = 4, so 28 px is the 7x7 grid);
    its path."""
    record = {"cell": f"{label}_n{n}", "label": label, "kind": "train", "seed": seed, "params": 1000,
              "train_seconds": 60.0 * len(curve), "hardware": {"cpu": "test cpu"},
              "config": {"data": {"train_subset": n, "img_size": img_size}, "train": {"batch_size": 100},
                         "phase1": {}},
              "final": {"val_top1": curve[-1], "val_top5": 99.0, "val_loss": 1.0}, "test": {"top1": test_top1},
              "phases": {"train": [{"val_top1": v, "epoch_seconds": 60.0} for v in curve]}}
    (results / grid / "cells").mkdir(parents=True, exist_ok=True)
    path = results / grid / "cells" / f"{label}_{img_size}px_n{n}__seed{seed}.json"
    path.write_text(json.dumps(record))
    return path


def _arms(results: Path, n: int, arms: dict) -> None:
    """One converged cell per row label and seed (seeds 0, 1, ...), with these test top-1s and a flat curve."""
    for label, tops in arms.items():
        for seed, top1 in enumerate(tops):
            _converged_cell(results, label, n, seed, top1, [80.0] * 20)


def test_report_says_what_the_budget_pilot_gained_past_the_grids_budget(tmp_path):
    """The pilot runs longer than the grid's step budget: the report gives what its curves added past that step."""
    results = tmp_path / "results"
    # 100 steps per epoch (10,000 images, batch 100): 60 epochs = 6000 steps; the grid's budget of 4000 is epoch 40
    curve = [70.0] * 38 + [80.0] * 2 + [85.0] * 20
    _converged_cell(results, "Conv phase only", 10000, 0, 85.0, curve, grid="converged_budget")
    report = write_report(results, configs=GRIDS).read_text()
    # window of 3 evaluations: the end (85) minus epochs 38-40 (70, 80, 80)
    assert "past step 4000 the pilot's curves still added Conv phase only +8.33 (val top-1)" in report
    assert (results / "converged_budget.png").exists()


def test_trajectory_skips_unevaluated_epochs_but_counts_their_steps_and_time():
    from cmhsa.report.converged import _trajectory
    lines = [{"epoch_seconds": 10.0, **({"val_top1": 50.0 + e} if e % 2 else {})} for e in range(6)]  # eval_every=2
    cell = {"config": {"data": {"train_subset": 1000}, "train": {"batch_size": 100}, "phase1": {}},
            "phases": {"train": lines}}
    assert _trajectory(cell) == ([20, 40, 60], [51.0, 53.0, 55.0], [20.0, 40.0, 60.0])


def test_report_converged_protocol(tmp_path):
    """The converged section: test top-1 with standard errors, the plateau rule, verdicts by 2 standard errors."""
    from cmhsa.report import plateau_gain
    assert plateau_gain([0, 0, 0, 0, 10, 10, 10, 10, 10, 10]) == 0.0  # flat over the last 20%
    assert plateau_gain(list(range(20))) == pytest.approx(4.0)  # still rising: mean(19) - mean(15)

    results = tmp_path / "results"
    flat, rising = [50.0] * 8 + [80.0] * 12, [float(v) for v in range(60, 80)]
    for seed, (ours, conv, deit) in enumerate([(85.0, 82.0, 70.0), (85.5, 82.5, 71.0), (84.5, 81.5, 69.0)]):
        _converged_cell(results, "Two-phase, our recipe", 2000, seed, ours, flat)
        _converged_cell(results, "Conv phase only", 2000, seed, conv, flat)
        _converged_cell(results, "DeiT-base", 2000, seed, deit, rising)
    report = write_report(results, configs=GRIDS).read_text()
    assert report.index("## Converged protocol") < report.index("## Table 1 (short budget")
    assert "| Two-phase, our recipe | 85.00 ± 0.29 (3) |" in report
    # ours - conv = +3.00 with 2 SE = 2 sqrt(0.25/3 + 0.25/3) = 0.82: beyond 2 + 0.82, so the target is met at
    # 2000; the grid also runs both rows at 6000, which have no runs yet, so the target is not called met
    assert "Our phase-2 recipe beats the conv phase alone by 2 points (equal steps): Two-phase, our recipe − " \
        "Conv phase only, test top-1 by training-set size: 2000: +3.00 (2 SE ±0.82) — target met at 2000 images; " \
        "not judged yet at 6000." in report
    assert "Two-phase CMHSA beats DeiT-base with little data: Two-phase, our recipe − DeiT-base, test top-1 by " \
        "training-set size: 2000: +15.00 (2 SE ±1.29) — **agrees** with the paper." in report
    assert ("- Every run has plateaued (the last 20% of training adds under 1 point of val top-1): 6 of 9 runs have; "
            "still rising, by row (largest gain among its runs): DeiT-base +4.00 — target **not met**.") in report
    # the converged grid leads the at-a-glance list, targets included
    glance = report[report.index("## At a glance"):report.index("## Setup")]
    assert "| Converged protocol | Our phase-2 recipe beats the conv phase alone" in glance
    assert "0 of our 2 judged targets are met" in glance
    assert "| Converged protocol | Every run has plateaued" in glance
    assert (results / "converged" / "wall_clock.png").exists() and (results / "converged" / "table1_bars.png").exists()
    # the report opens with the figure of every row against the conv phase
    assert "![each row against the conv phase alone](converged/gains.png)" in glance
    assert (results / "converged" / "gains.png").exists()

    # a gap of 1 point does not meet a 2-point target
    for seed, ours in enumerate((83.0, 83.5, 82.5)):
        _converged_cell(results, "Two-phase, our recipe", 2000, seed, ours, flat)
    assert "2000: +1.00 (2 SE ±0.82) — target **not met**." in write_report(results, configs=GRIDS).read_text()

    # a target without a margin (beat ConViT) is not met by a gap below zero, nor by one within the noise
    for seed, convit in enumerate((84.0, 84.5, 83.5)):
        _converged_cell(results, "ConViT", 2000, seed, convit, flat)
    assert "Two-phase, our recipe − ConViT, test top-1 by training-set size: 2000: -1.00 (2 SE ±0.82) — target " \
        "**not met**." in write_report(results, configs=GRIDS).read_text()
    for seed, convit in enumerate((82.5, 83.0, 82.0)):
        _converged_cell(results, "ConViT", 2000, seed, convit, flat)
    assert "2000: +0.50 (2 SE ±0.82) — target **not met**." in write_report(results, configs=GRIDS).read_text()


def test_report_calls_a_target_met_only_once_every_size_the_grid_runs_is_judged(tmp_path):
    """"Beats ConViT at 1k and 2k" is not met by 1k alone while the grid runs both rows at 2k too; a size the grid
    does not run for a row (per-parameter lr at 6k) does not hold its target back."""
    results = tmp_path / "results"
    _arms(results, 1000, {"Two-phase, our recipe": (85.0, 85.5, 84.5), "ConViT": (80.0, 80.5, 79.5)})
    _arms(results, 2000, {"Two-phase, our recipe": (86.0, 86.5, 85.5), "ConViT": (81.0,)})
    report = write_report(results, configs=GRIDS).read_text()
    assert "Two-phase, our recipe − ConViT, test top-1 by training-set size: 1000: +5.00 (2 SE ±0.82), 2000: +5.00 " \
        "(one seed) — target met at 1000 images; not judged yet at 2000." in report
    assert "1 of our 2 judged targets is met" in report  # the other: every run plateaued (flat curves)
    _arms(results, 2000, {"ConViT": (81.0, 81.5, 80.5)})
    report = write_report(results, configs=GRIDS).read_text()
    assert "2000: +5.00 (2 SE ±0.82) — target met." in report and "2 of our 2 judged targets are met" in report
    _arms(results, 2000, {"Two-phase, our recipe + per-parameter lr": (89.0, 89.5, 88.5),
                          "Conv phase only": (86.0, 86.5, 85.5)})
    _arms(results, 6000, {"Conv phase only": (89.0, 89.5, 88.5)})
    assert "Two-phase, our recipe + per-parameter lr − Conv phase only, test top-1 by training-set size: 2000: +3.00 " \
        "(2 SE ±0.82) — target met." in write_report(results, configs=GRIDS).read_text()


def test_report_judges_the_per_parameter_lr_recipe_against_conv_and_ours(tmp_path):
    results = tmp_path / "results"
    _arms(results, 2000, {"Two-phase, our recipe + per-parameter lr": (86.0, 86.5, 85.5),
                          "Two-phase, our recipe": (85.0, 85.5, 84.5), "Conv phase only": (83.0, 83.5, 82.5)})
    report = write_report(results, configs=GRIDS).read_text()
    assert "Two-phase, our recipe + per-parameter lr − Conv phase only, test top-1 by training-set size: 2000: " \
        "+3.00 (2 SE ±0.82) — target met." in report
    assert "Two-phase, our recipe + per-parameter lr − Two-phase, our recipe, test top-1 by training-set size: " \
        "2000: +1.00 (2 SE ±0.82) — target met." in report
    _arms(results, 2000, {"Two-phase, our recipe, longer phase 2": (85.0, 85.5, 84.5)})  # equal to ours: no gain
    assert "Two-phase, our recipe, longer phase 2 − Two-phase, our recipe, test top-1 by training-set size: " \
        "2000: +0.00 (2 SE ±0.82) — target **not met**." in write_report(results, configs=GRIDS).read_text()


def test_report_splits_phase_2s_gap_into_the_restart_and_the_conversion(tmp_path):
    """The control that keeps the conv through phase 2 splits ours - conv into (control - conv) + (ours - control)."""
    results = tmp_path / "results"
    _arms(results, 2000, {"Two-phase control, phase 2 keeps the conv": (83.0, 83.5, 82.5),
                          "Two-phase, our recipe": (84.0, 84.5, 83.5), "Conv phase only": (85.0, 85.5, 84.5)})
    _arms(results, 1000, {"Two-phase control, phase 2 keeps the conv": (80.0,)})  # no other arm at 1k
    report = write_report(results, configs=GRIDS).read_text()
    assert "- Two-phase, our recipe − conv phase only, split by the control that keeps the conv: 2000 images: its " \
        "schedule -2.00 (2 SE ±0.82), converting to attention +1.00 (2 SE ±0.82)." in report
    assert "no restart − conv phase only, split" not in report  # that recipe has no cells here
    _arms(results, 2000, {"Two-phase control, no restart, phase 2 keeps the conv": (85.0, 85.5, 84.5),
                          "Two-phase, our recipe, no restart": (88.0, 88.5, 87.5)})
    report = write_report(results, configs=GRIDS).read_text()
    assert "- Two-phase, our recipe, no restart − conv phase only, split by the control that keeps the conv: 2000 " \
        "images: its schedule +0.00 (2 SE ±0.82), converting to attention +3.00 (2 SE ±0.82)." in report
    assert "Two-phase, our recipe, no restart − Conv phase only, test top-1 by training-set size: 2000: +3.00 " \
        "(2 SE ±0.82) — target met." in report
    assert "Two-phase, our recipe, no restart − Two-phase, our recipe, test top-1 by training-set size: 2000: " \
        "+4.00 (2 SE ±0.82) — target met at 2000 images; not judged yet at 1000." in report  # the grid runs both at 1k
    assert "The second phase adds to the first, schedule held fixed (control: phase 2 keeps the conv; phase 1 " \
        "shared): Two-phase, our recipe − Two-phase control, phase 2 keeps the conv, test top-1 by training-set " \
        "size: 2000: +1.00 (2 SE ±0.82) — **agrees** with the paper." in report


def test_report_judges_the_88_percent_target_at_6k_and_says_how_many_seeds(tmp_path):
    results, flat = tmp_path / "results", [80.0] * 20
    _converged_cell(results, "Two-phase, our recipe", 6000, 0, 88.7, flat)
    report = write_report(results, configs=GRIDS).read_text()
    assert "reaches 88% on the full test set (target): 88.70, one seed so far — target met." in report
    assert "2 of our 2 judged targets are met" in report  # the at-a-glance count reads the verdicts (flat: plateaued)
    for seed, top1 in ((1, 87.0), (2, 87.3)):
        _converged_cell(results, "Two-phase, our recipe", 6000, seed, top1, flat)
    report = write_report(results, configs=GRIDS).read_text()
    assert "reaches 88% on the full test set (target): 87.67 ± 0.52 (3) — target **not met**." in report


def test_at_a_glance_splits_a_verdict_line_at_the_colon_outside_parentheses():
    from cmhsa.report import _claim_parts
    line = "The second phase adds (control: keeps the conv): a − b: +1.36 (2 SE ±0.71) — **agrees** with the paper."
    assert _claim_parts(line) == ("The second phase adds (control: keeps the conv)", "a − b: +1.36 (2 SE ±0.71)",
                                  "**agrees** with the paper")
    assert _claim_parts("no colon — target met.") == ("", "no colon", "target met")


def test_at_a_glance_section_titles_keep_their_parentheses_closed():
    assert _short_title("Table 1 (short budget: 20 epochs, about 300 steps)") == "Table 1 (short budget)"
    assert _short_title("Figure 2: warm-up (short budget)") == "Figure 2"
    assert _short_title("Data efficiency (short budget)") == "Data efficiency (short budget)"


def test_report_forms_section_judges_the_gap_against_two_standard_errors(tmp_path):
    grid = tmp_path / "results" / "forms"
    for label, values in {"CMHSA-5, paper form": [80.0, 81.0, 82.0], "CMHSA-5, factorized form": [80.5, 81.5, 82.5]}.items():
        for seed, v in enumerate(values):
            _cell(grid, label.split(", ")[1].replace(" ", "_"), label, v, seed=seed, test={"top1": v},
                  phases={"phase2": [{"epoch_seconds": 2.0}, {"epoch_seconds": 4.0}]})
    report = write_report(tmp_path / "results", configs=GRIDS).read_text()
    assert "| CMHSA-5, factorized form | 81.50 ± 0.58 (3) | 3.0 | 0.00M |" in report
    # gap +0.50, 2 SE = 2 * sqrt(1/3 + 1/3) = 1.63: within the noise
    assert "Factorized − paper form: +0.50 points on the full test set (2 SE ±1.63): within the noise" in report


def test_report_converged_equal_wall_clock(tmp_path):
    """Rows compared at the conv phase's training time: each row's last epoch that ended by then, and a row that
    ended sooner at its end, marked."""
    results = tmp_path / "results"
    for seed in range(2):
        _converged_cell(results, "Conv phase only", 2000, seed, 80.0, [60.0, 70.0, 75.0])   # 3 minutes
        _converged_cell(results, "DeiT-base", 2000, seed, 70.0, [40.0 + seed, 50.0, 60.0, 65.0, 68.0, 70.0])
        _converged_cell(results, "Small CNN (resnet10t, 0.3M)", 2000, seed, 74.0, [71.0, 72.0])  # 2 minutes
    report = write_report(results, configs=GRIDS).read_text()
    assert "val top-1 after 3 CPU minutes (one thread), the longest run of Conv phase only" in report
    assert "| Conv phase only | 75.00 ± 0.00 | 75.00 ± 0.00 | 3 |" in report
    assert "| DeiT-base | 60.00 ± 0.00 | 70.00 ± 0.00 | 6 |" in report
    assert "| Small CNN (resnet10t, 0.3M) | 72.00 ± 0.00 † | 72.00 ± 0.00 | 2 |" in report


def test_report_phase2_gain_against_grid_size(tmp_path):
    """The geometry grid's larger patch grid beside the converged grid's 7x7, at the sizes the geometry grid ran."""
    results = tmp_path / "results"
    for seed in range(3):
        for grid, size, ours in (("converged", 28, 80.0), ("converged_geometry", 40, 84.0)):
            _converged_cell(results, "Conv phase only", 1000, seed, 82.0 + seed, [80.0] * 5, grid, size)
            _converged_cell(results, "Two-phase, our recipe", 1000, seed, ours + seed, [80.0] * 5, grid, size)
        _converged_cell(results, "Conv phase only", 2000, seed, 90.0, [80.0] * 5)  # no 2k geometry cell: left out
    report = write_report(results, configs=GRIDS).read_text()
    section = report[report.index("## Grid size"):report.index("## Table 1")]
    # SE of 3 seeds 0/1/2 apart: 0.58; 2 SE of a difference of two such arms: 2 * sqrt(2/3) = 1.63
    assert "| 1000 | 28 px, 7x7 grid | 83.00 ± 0.58 (3) | 81.00 ± 0.58 (3) | -2.00 (±1.63) | — | — | — | — |" \
        in section
    assert "| 1000 | 40 px, 10x10 grid | 83.00 ± 0.58 (3) | 85.00 ± 0.58 (3) | +2.00 (±1.63) | — | — | — | — |" \
        in section
    assert "| 2000 |" not in section and "Progress: 6 of" in section
    assert "seed by seed" not in section  # no row converted mid-run: nothing to pair


MIDRUN = "Two-phase, our recipe, converted mid-run"


def _mid_run_cells(results: Path, gains: dict) -> str:
    """Conv and mid-run cells with these per-seed gains by image size (7x7 in the converged grid, larger grids in
    the geometry grid); the report's grid-size section."""
    for size, by_seed in gains.items():
        for seed, gain in enumerate(by_seed):
            grid = "converged" if size == 28 else "converged_geometry"
            _converged_cell(results, "Conv phase only", 1000, seed, 82.0 + seed, [80.0] * 5, grid, size)
            _converged_cell(results, MIDRUN, 1000, seed, 82.0 + seed + gain, [80.0] * 5, grid, size)
    report = write_report(results, configs=GRIDS).read_text()
    return report[report.index("## Grid size"):report.index("## Table 1")]


def test_report_pairs_the_mid_run_row_with_the_conv_row_seed_by_seed(tmp_path):
    """The mid-run row is the conv row's run until its conversion: its gain is taken per seed, and whether it grows
    from grid to grid is judged against those per-seed spreads, with each grid's seed count stated."""
    results = tmp_path / "results"
    section = _mid_run_cells(results, {28: [-0.1] * 3, 40: [0.5, 0.7, 0.6], 56: [1.0, 1.2]})
    # unpaired, the seeds' spread of 1 point hides a 0.6-point gain; paired, it cancels
    assert "| 83.60 ± 0.61 (3) | +0.60 (±1.68) |" in section
    assert f"- {MIDRUN} − Conv phase only, 1000 images, 28 px, 7x7 grid: -0.10 (2 SE ±0.00, 3 seeds)" in section
    assert f"- {MIDRUN} − Conv phase only, 1000 images, 40 px, 10x10 grid: +0.60 (2 SE ±0.12, 3 seeds)" in section
    assert f"- {MIDRUN} − Conv phase only, 1000 images, 56 px, 14x14 grid: +1.10 (2 SE ±0.20, 2 seeds)" in section
    # steps: +0.70 against sqrt(0 + 0.12^2) = 0.12; +0.50 against sqrt(0.12^2 + 0.20^2) = 0.23
    assert (f"- Phase 2's gain grows with the grid ({MIDRUN}, 1000 images, seed by seed): 28 px, 7x7 grid -0.10 → "
            "40 px, 10x10 grid +0.60 → 56 px, 14x14 grid +1.10; step by step +0.70 (2 SE ±0.12); +0.50 (2 SE ±0.23); "
            "seeds 3, 3, 2 — target met.") in section
    assert (f"- The second phase adds to the first on the largest grid ({MIDRUN}, 1000 images, 56 px, 14x14 grid, seed "
            "by seed): +1.10 (2 SE ±0.20, 2 seeds), +2.62 in the paper (CIFAR-100, 14x14) — **agrees** with the paper.") \
        in section
    assert "![phase 2's gain against grid size](converged_geometry/gain_vs_grid.png)" in section
    assert (results / "converged_geometry" / "gain_vs_grid.png").exists()


def test_report_gain_that_stops_growing_does_not_meet_the_target(tmp_path):
    """Growth from 7x7 to 10x10 is not enough: a 14x14 gain within the noise of the 10x10 one fails the claim."""
    section = _mid_run_cells(tmp_path / "results", {28: [-0.1] * 3, 40: [0.5, 0.7, 0.6], 56: [0.5, 0.8, 0.6]})
    assert "step by step +0.70 (2 SE ±0.12); +0.03 (2 SE ±0.21); seeds 3, 3, 3 — target **not met**." in section
    assert "14x14 grid, seed by seed): +0.63 (2 SE ±0.18, 3 seeds), +2.62 in the paper (CIFAR-100, 14x14) — **agrees**" \
        in section


def test_gain_figures_are_skipped_when_there_is_nothing_to_compare(tmp_path):
    from cmhsa.report.converged import _gain_vs_grid_figure, _gains_figure
    one_grid = {("Two-phase, our recipe", 1000): {7: (0.5, 0.2, True)}}  # one grid: no line to draw
    assert not _gain_vs_grid_figure(one_grid, tmp_path / "grid.png") and not (tmp_path / "grid.png").exists()
    no_conv = {"Two-phase, our recipe": {2000: [85.0, 86.0]}}  # no conv row to subtract
    assert not _gains_figure(no_conv, list(no_conv), tmp_path / "gains.png")
    assert not (tmp_path / "gains.png").exists()
    with_conv = {**no_conv, "Conv phase only": {2000: [84.0, 85.0]}}
    assert _gains_figure(with_conv, list(with_conv), tmp_path / "gains.png") and (tmp_path / "gains.png").exists()


def test_report_converged_conversion_drop_and_shift_table(tmp_path):
    """Two-phase rows report the top-1 change at conversion against the 1-point target; rows with shift
    consistency get the smallest and largest shift every row measured below the image size, both fills."""
    results = tmp_path / "results"
    for seed, (before, after) in enumerate([(80.0, 79.5), (81.0, 80.8), (79.0, 77.5)]):
        path = _converged_cell(results, "Two-phase, our recipe", 2000, seed, 85.0, [80.0] * 10)
        record = json.loads(path.read_text())
        record["transfer"] = {"val_before_conversion": {"val_top1": before}, "val_after_conversion": {"top1": after}}
        record["test"]["shift_consistency"] = {"circular": {"1": 0.9, "2": 0.8, "4": 0.7 + seed / 100},
                                               "zero": {"1": 0.95, "2": 0.9, "4": 0.85}}
        path.write_text(json.dumps(record))
    # a CNN's default shifts run to its stride 32: 8 and 16 are not the attention rows', 32 is the whole 28 px image
    path = _converged_cell(results, "Small CNN (resnet10t, 0.3M)", 2000, 0, 85.0, [80.0] * 10)
    record = json.loads(path.read_text())
    record["test"]["shift_consistency"] = {mode: {"1": 0.91, "2": 0.8, "4": 0.75, "8": 0.2, "16": 0.2, "32": 0.05}
                                           for mode in ("circular", "zero")}
    path.write_text(json.dumps(record))
    report = write_report(results, configs=GRIDS).read_text()
    # drops -0.5, -0.2, -1.5: mean -0.73, one beyond a point
    assert "- Two-phase, our recipe: val top-1 right after conversion − end of phase 1: -0.73 ± 0.68 points over " \
        "3 runs — **not** within 1 point in every run." in report
    assert "| row | circular 1 px | circular 4 px | zero 1 px | zero 4 px |" in report
    assert "| Two-phase, our recipe | 0.900 ± 0.000 | 0.710 ± 0.010 | 0.950 ± 0.000 | 0.850 ± 0.000 |" in report
    assert "| Small CNN (resnet10t, 0.3M) | 0.910 | 0.750 | 0.910 | 0.750 |" in report


def test_a_training_cell_is_the_same_run_whatever_its_unused_convert_section():
    """A single training run never converts: a changed default of convert.* (or phase2.*) keeps its finished
    record valid, while a two-phase cell with another conversion is another run."""
    from cmhsa.config import load_config
    from cmhsa.experiments import _run_identity
    a = load_config(None, ["convert.form=paper", "phase2.lr=1e-3"])
    b = load_config(None, ["convert.form=factorized", "phase2.lr=5e-4"])
    assert _run_identity("train", a) == _run_identity("train", b)
    assert _run_identity("pipeline", a) != _run_identity("pipeline", b)
    assert _run_identity("train", a) != _run_identity("train", a.set({"phase1.lr": 1e-4}))


def test_a_cell_is_the_same_run_whatever_train_settings_every_phase_overrides():
    """A run's identity is each phase's resolved settings: a train.* value that both phases set themselves never
    reached a phase, so dropping it from a grid keeps that grid's finished records valid."""
    from cmhsa.config import RunConfig
    from cmhsa.experiments import _run_identity
    phases = {"phase1": {"warmup_epochs": 1}, "phase2": {"warmup_epochs": 0}}
    a = RunConfig.from_dict({**phases, "train": {"warmup_epochs": 1}})
    b = RunConfig.from_dict(phases)
    assert a.train != b.train
    assert _run_identity("pipeline", a) == _run_identity("pipeline", b)
    assert _run_identity("pipeline", a) != _run_identity("pipeline", b.set({"phase2.warmup_epochs": 1}))


def test_report_names_the_attention_form_of_every_row():
    from cmhsa.report._common import attention_form
    assert attention_form({"kind": "pipeline", "config": {"convert": {"form": "factorized"}}}) == "factorized"
    assert attention_form({"kind": "pipeline", "config": {"convert": {}}}) == "paper"  # before convert.form existed
    assert attention_form({"kind": "train", "config": {"model": {"name": "cmhsa5_fattn_tiny"}}}) == "factorized"
    assert attention_form({"kind": "train", "config": {"model": {"name": "cmhsa5_attn_224"}}}) == "paper"
    assert attention_form({"kind": "train", "config": {"model": {"name": "deit_base_patch16_224"}}}) == "—"


def test_report_shift_section_reads_the_shift_experiment(tmp_path):
    results = tmp_path / "results"
    (results / "shift").mkdir(parents=True)
    budget = {"train_subset": 100, "val_subset": 50, "phase1_epochs": 1, "phase2_epochs": 1, "batch_size": 8}
    for seed, circ4 in enumerate((1.0, 0.98)):
        phase = {"top1": 40.0 + seed, "images": 50, "shift_circular": {"1": 1.0, "2": 1.0, "3": 1.0, "4": circ4},
                 "shift_zero": {"1": 0.9, "2": 0.8, "3": 0.7, "4": 0.6}}
        record = {"variant": "aps_circular", "seed": seed, "budget": budget, "phase1": phase, "phase2": phase}
        (results / "shift" / f"aps_circular_s{seed}.json").write_text(json.dumps(record))
        deit = {"variant": "deit_base", "seed": seed, "budget": budget, "phase2": {**phase, "top1": 30.0}}
        (results / "shift" / f"deit_base_s{seed}.json").write_text(json.dumps(deit))
    at56 = {"top1": 35.0, "images": 50, "shift_circular": {"2": 0.9, "8": 0.5}, "shift_zero": {"2": 0.8, "8": 0.4}}
    local = {"variant": "local", "seed": 0, "budget": budget, "phase1": phase, "phase2": phase,
             "phase1_at_56px": at56, "phase2_at_56px": {**at56, "top1": 33.0}}
    (results / "shift" / "local_s0.json").write_text(json.dumps(local))
    report = write_report(results, configs=GRIDS).read_text()
    assert "## Analysis: shift equivariance and local attention" in report and "100 training images, 1 + 1 epochs" in report
    # the local form's phase 1 is the baseline's: only its 56 px run is its own row
    assert "| CMHSA-5, local attention form | phase1 |" not in report
    assert "| CMHSA-5, local attention form | phase1 at 56 px | 1 | 35.00 | 0.900 | 0.500 | 0.800 | 0.400 |" in report
    assert "| CMHSA-5, local attention form | phase2 at 56 px | 1 | 33.00 |" in report
    assert "| CMHSA-5, polyphase-anchored patches + circular padding | phase2 | 2 | 40.50 ± 0.71 | 1.000 ± 0.000 | " \
        "0.990 ± 0.014 | 0.900 ± 0.000 | 0.600 ± 0.000 |" in report
    assert "| DeiT-base | phase2 | 2 | 30.00 ± 0.00 |" in report and "| DeiT-base | phase1 |" not in report
    bench = {"rows": [{"label": label, "img_size": 112, "grid": [28, 28], "train_img_s": speed, "infer_img_s": 3.0,
                       "saved_mb_per_img": mb, "attn_gflop_per_img": 1.0}
                      for label, speed, mb in (("global attention", 0.5, 240.0), ("local attention", 1.0, 120.0))],
             "hardware": {"cpu": "test cpu"}, "threads": 1, "code": {"commit": "abcdef0123"}}
    (results / "shift" / "local_attention_bench.json").write_text(json.dumps(bench))
    report = write_report(results, configs=GRIDS).read_text()
    assert "local over global: 112 px: train img/s x2.00, activations x0.50" in report
    assert "| local attention | 112 px | 28x28 | 1 | 3 | 120 | 1 |" in report


def test_report_names_the_precision_of_every_row():
    from cmhsa.report._common import row_precision
    two = {"phases": {"phase1": [{"precision": "fp32"}], "phase2": [{"precision": "bf16"}]}}
    assert row_precision(two) == "fp32 / bf16"
    assert row_precision({"phases": {"train": [{"precision": "fp32"}]}}) == "fp32"
    assert row_precision({"phases": {"train": [{}]}, "config": {"train": {"precision": "auto"}}}) == "auto (setting)"


def test_report_judges_the_mid_run_conversion_against_the_conv_row_its_control(tmp_path):
    results = tmp_path / "results"
    _arms(results, 2000, {"Two-phase, our recipe, converted mid-run": (86.0, 86.5, 85.5),
                          "Conv phase only": (85.0, 85.5, 84.5)})
    report = write_report(results, configs=GRIDS).read_text()
    assert "Our recipe converted mid-run beats the conv phase alone by 2 points (equal steps): Two-phase, our " \
        "recipe, converted mid-run − Conv phase only, test top-1 by training-set size: 2000: +1.00 (2 SE ±0.82) — " \
        "target **not met**." in report
    assert "converted at its midpoint; its keep-conv control is the conv row, bit for bit): Two-phase, our recipe, " \
        "converted mid-run − Conv phase only, test top-1 by training-set size: 2000: +1.00 (2 SE ±0.82) — " \
        "**agrees** with the paper." in report


def test_every_converged_claim_names_rows_of_the_converged_grid():
    """A claim whose row label matches no cell would silently never be judged."""
    from cmhsa.report.converged import CONTROLS, CONVERGED_CLAIMS
    labels = {cell["label"] for cell in yaml.safe_load((GRIDS / "converged.yaml").read_text())["cells"]}
    named = {arm for claim in CONVERGED_CLAIMS for arm in claim[:2]} | set(CONTROLS) | set(CONTROLS.values())
    assert named <= labels, named - labels


def test_a_continued_runs_phases_round_their_step_budget_once_like_the_conv_row():
    """Each phase of a two-run cell rounds its steps up to whole epochs; the phases of one continued run round the
    sum once, so at every size they add up to the conv row's epochs (its keep-conv control is that row)."""
    spec = load_experiment(GRIDS / "converged.yaml")
    configs = {e["cell"]: e["config"] for e in cell_configs(spec, "full", [0])}
    for n in (1000, 2000, 6000):
        continued = configs[f"two_phase_ours_continued_n{n}"]
        halves = [continued.phase_config(p) for p in ("phase1", "phase2")]
        assert halves[0].epochs + halves[1].epochs == configs[f"conv_n{n}"].phase_config("phase1").epochs
        assert halves[1].first_epoch == halves[0].epochs and halves[1].total_epochs == halves[0].total_epochs
    restart = configs["two_phase_ours_n6000"]  # two runs: 2000 steps each, 43.5 epochs, both rounded up
    assert [restart.phase_config(p).epochs for p in ("phase1", "phase2")] == [44, 44]


def test_a_broken_cell_record_is_named_with_its_fix(tmp_path, capsys):
    """A record cut short or edited by hand stops the report with the file and how to redo it, not a traceback."""
    cells = tmp_path / "results" / "table1" / "cells"
    cells.mkdir(parents=True)
    record = cells / "cmhsa5__seed0.json"
    record.write_text('{"cell": "cmhsa5"')
    assert main(["report", str(tmp_path / "results")]) == 2
    err = capsys.readouterr().err
    assert f"{record} is not valid JSON" in err and "cmhsa experiment table1 --cells cmhsa5 --seeds 0" in err
    record.write_text('{"cell": "cmhsa5", "seed": 0}')
    assert main(["report", str(tmp_path / "results")]) == 2
    assert "is not a finished cell's record (it lacks label, final, phases" in capsys.readouterr().err
