"""The experiment runner (resumable cells, JSON results) and the report built from them."""
import json
from pathlib import Path

import pytest
import yaml

from cmhsa.cli import main
from cmhsa.config import train_config
from cmhsa.experiments import cell_configs, load_experiment, read_cells, run_experiment
from cmhsa.report import write_report

GRIDS = Path(__file__).resolve().parent.parent / "configs" / "experiments"
TINY_MODEL = "{patch_size: 2, pixel_dim: 8, depth: 1, mlp_ratio: 1.0}"


@pytest.mark.parametrize("grid", ["table1", "warmup", "efficiency", "ablations"])
def test_shipped_grids_expand_to_valid_runs(grid):
    spec = load_experiment(GRIDS / f"{grid}.yaml")
    for budget in ("quick", "full"):
        entries = cell_configs(spec, budget, spec["seeds"])
        assert len(entries) == len(spec["cells"]) * len(spec["seeds"])
        for e in entries:
            for phase in ("phase1", "phase2"):
                train_config(e["config"], phase, 10)  # raises on a misspelt setting
            assert e["config"]["train"]["seed"] == e["seed"]
    if grid == "efficiency":
        sizes = {e["config"]["data"]["train_subset"] for e in cell_configs(spec, "full", [0])}
        assert len(sizes) >= 4 and min(sizes) <= 1000


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
    assert list(runs.rglob("model.safetensors")) and not list(results.rglob("*.safetensors"))  # checkpoints stay out

    stamps = {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}
    run_experiment(spec, results_root=results, runs_root=runs, progress=False)
    assert {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")} == stamps  # nothing re-run

    # a changed cell config re-runs that cell only
    spec["cells"][0]["overrides"].append("phase1.lr=1.0e-4")
    run_experiment(spec, results_root=results, runs_root=runs, progress=False, seeds=[0])
    changed = [p.name for p in (out / "cells").glob("*.json") if p.stat().st_mtime_ns != stamps[p]]
    assert changed == ["conv__seed0.json"]


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
    assert "test cpu" in report and "Not run yet: `cmhsa experiment warmup --budget full`" in report
    assert (tmp_path / "results/table1/summary.csv").read_text().startswith("model,params,top1_mean")
    assert "Progress: 10 of 18 cells finished" in report  # the shipped table1 grid: 9 cells x 2 seeds


def test_experiment_cli_quick_budget(tmp_path, capsys):
    """`cmhsa experiment <grid> --budget quick` end to end on the shipped ablations grid (minutes, tiny sizes)."""
    args = ["experiment", "ablations", "--budget", "quick", "--cells", "beta60_nonull",
            "--results", str(tmp_path / "results"), "--runs", str(tmp_path / "runs")]
    assert main(args) == 0
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
