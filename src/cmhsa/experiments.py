"""Experiment grids: many ordinary resumable runs ("cells"), results committed as JSON/CSV.

An experiment config (``configs/experiments/<name>.yaml``) names a base run config, budgets (``quick`` for smoke
tests, ``full`` for the real grid) as override lists, seeds, and cells. A cell is either ``pipeline`` (phase 1 ->
convert -> phase 2) or ``train`` (one model, trained with the ``phase1`` settings). Each cell x seed runs in
``<runs>/<experiment>/<budget>/<cell>/seed<k>`` (checkpoints, not committed) and, when finished, writes
``<results>/<experiment>[-quick]/cells/<cell>__seed<k>.json`` with its config, per-epoch metrics, timings and the
hardware. A finished cell is skipped; an interrupted one resumes from its checkpoint. A cell whose run config is
identical (apart from its name and output directory) to a finished cell of any grid under the same results root
reuses that record instead of training again; the record says where it came from (``reused_from``). Likewise a
pipeline cell whose phase 1 is the same run as a finished phase 1 under the same runs root (e.g. two phase-2 recipes
of one seed) copies that phase 1 and trains only phase 2 (``phase1_from`` in its record).

Budgets in optimizer steps. A cell (or the grid's ``steps``) may give ``steps: {phase1: S1, phase2: S2}`` and
``warmup_steps``: they become epochs for the cell's subset size and batch size (``ceil(S / (n // batch))``), so a
small subset trains for as many updates as a large one. A grid with ``sizes: {n: batch_size, ...}`` repeats every
cell that has no ``train_size`` of its own at each subset size ``n`` (named ``<cell>_n<n>``), with that batch size;
a cell's own ``sizes: [n, ...]`` keeps it to some of them.
Every finished cell is also scored once on the dataset's whole test split (``test`` in its record).

Several processes may run one grid side by side (e.g. two one-thread processes on a 2-core CPU): a cell's run
directory is locked while it trains, so each process skips the cells another is running and takes the next.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import platform
import shutil
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

import torch

from .analysis.shift import shift_consistency
from .atomic import atomic_write_text
from .checkpoint import has_checkpoint
from .config import RESUME_FREE_KEYS, RunConfig, load_config, parse_overrides, read_yaml
from .engine import evaluate, resolve_device, resolve_precision
from .layout import BUDGETS, cell_record, grid_dir
from .pipeline import (build_loaders, create_model, load_model, model_spec, open_run, run_pipeline, train_phase,
                       with_epochs)
from .provenance import git_state
from .rundir import RunDir, RunDirLocked

__all__ = ["load_experiment", "cell_configs", "grid_status", "run_experiment", "find_finished", "read_cells",
           "hardware", "STATUSES", "UNFINISHED"]


def _did_you_mean(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f"did you mean {close[0]!r}? " if close else ""


def load_experiment(path: str | Path) -> Dict[str, Any]:
    path = Path(path)
    if not path.exists():
        if not path.parent.is_dir():
            raise FileNotFoundError(f"experiment config {path} does not exist, nor does {path.parent}/: run from the "
                                    f"repository's root (the grids are in configs/experiments/), or pass --config")
        grids = sorted(p.stem for p in path.parent.glob("*.yaml"))
        listing = ", ".join(grids) or "none (the shipped grids are in configs/experiments/)"
        raise FileNotFoundError(f"experiment config {path} does not exist; {_did_you_mean(path.stem, grids)}"
                                f"grids in {path.parent}/: {listing}")
    spec = read_yaml(path)
    if not isinstance(spec, dict):
        raise ValueError(f"{path} must hold a YAML mapping (name, base, cells; see configs/experiments)")
    for key in ("name", "base", "cells"):
        if key not in spec:
            raise ValueError(f"{path}: missing '{key}' (an experiment needs name, base, cells; see configs/experiments)")
    spec["base"] = str((path.parent / spec["base"]).resolve())
    spec["cells"] = _expand_sizes(spec, path)
    names = [c["name"] for c in spec["cells"]]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: cell names must be unique, got {names}")
    for cell in spec["cells"]:
        if cell.get("kind", "pipeline") not in ("pipeline", "train"):
            raise ValueError(f"{path}: cell {cell['name']!r} has kind {cell.get('kind')!r}; use pipeline or train")
    return spec


def _expand_sizes(spec: Dict[str, Any], path: Path) -> List[Dict[str, Any]]:
    """Cells repeated over the grid's ``sizes`` ({subset size: batch size}), or over the cell's own ``sizes`` (a list,
    some of the grid's); cells with a train_size stay as they are."""
    sizes = spec.get("sizes")
    if not sizes:
        return spec["cells"]
    if not isinstance(sizes, dict) or not all(isinstance(n, int) and isinstance(b, int) and 0 < b <= n
                                                for n, b in sizes.items()):
        raise ValueError(f"{path}: sizes must map training-subset sizes to batch sizes, e.g. {{1000: 32, 2000: 64}}, "
                         f"got {sizes!r}")
    cells = []
    for cell in spec["cells"]:
        if "train_size" in cell:
            cells.append(cell)
            continue
        only = cell.get("sizes", list(sizes))
        if not isinstance(only, list) or not only or not set(only) <= set(sizes):
            raise ValueError(f"{path}: cell {cell['name']!r} has sizes {only!r}; give a list of the grid's sizes "
                             f"({', '.join(map(str, sizes))}), or leave it out to run at all of them")
        for n, batch in ((n, b) for n, b in sizes.items() if n in only):
            cells.append({**cell, "name": f"{cell['name']}_n{n}", "train_size": n,
                          "overrides": [*cell.get("overrides", []), f"data.train_subset={n}",
                                        f"train.batch_size={batch}"]})
    return cells


def _step_budget(spec: Dict[str, Any], cell: Dict[str, Any], config: RunConfig) -> RunConfig:
    """``config`` with the cell's (or grid's) ``steps`` / ``warmup_steps`` per phase as the epochs they come to for
    its ``data.train_subset`` (:meth:`RunConfig.in_epochs`: the phases of one continued run round once)."""
    budget = {}
    for key, epochs_key in (("steps", "epochs"), ("warmup_steps", "warmup_epochs")):
        for phase, steps in {**spec.get(key, {}), **cell.get(key, {})}.items():
            budget.update({f"{phase}.{key}": steps, f"{phase}.{epochs_key}": None})
    if not budget:
        return config
    n = config.data.train_subset
    if not isinstance(n, int):
        raise ValueError(f"cell {cell['name']!r}: a budget in steps needs data.train_subset as an image count, "
                         f"got {n!r}")
    try:
        return config.set(budget).in_epochs(n)
    except ValueError as e:
        raise ValueError(f"cell {cell['name']!r}: {e}") from None


def _run_path(runs_root: str | Path, grid: str, budget: str, cell: str, seed: int | str) -> Path:
    return Path(runs_root) / grid / budget / cell / f"seed{seed}"


def cell_configs(spec: Dict[str, Any], budget: str, seeds: Iterable[int], runs_root: str | Path = "runs/experiments",
                 only: Optional[List[str]] = None) -> List[Dict[str, Any]]:
    """One entry per cell x seed: ``{cell, label, kind, seed, config, runs}``: the base config, then the experiment's
    ``common`` overrides, the cell's, the budget's (so ``quick`` can shrink any cell) and the seed."""
    if budget not in BUDGETS:
        raise ValueError(f"budget must be one of {BUDGETS}, got {budget!r}")
    names = [cell["name"] for cell in spec["cells"]]
    for name in only or []:
        if name not in names:
            raise ValueError(f"experiment {spec['name']!r} has no cell {name!r}; {_did_you_mean(name, names)}"
                             f"its cells: {', '.join(names)}")
    budget_overrides = spec.get("budgets", {}).get(budget, [])
    out = []
    # seeds outermost: a whole seed of the grid lands before the next one starts
    for seed in seeds:
        for cell in spec["cells"]:
            if only and cell["name"] not in only:
                continue
            # a base config's own budget in steps as epochs for the cell's data, before the grid's budget
            config = with_epochs(load_config(spec["base"], [*spec.get("common", []), *cell.get("overrides", [])]))
            config = _step_budget(spec, cell, config).set({
                **parse_overrides(budget_overrides), "train.seed": seed, "name": cell["name"],
                "output": str(_run_path(runs_root, spec["name"], budget, cell["name"], seed))})
            out.append({"cell": cell["name"], "label": cell.get("label", cell["name"]),
                        "kind": cell.get("kind", "pipeline"), "seed": seed, "config": config, "runs": runs_root})
    return out


def hardware() -> Dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


# shift consistency on the first 8 x 256 test images: ~1% of a 7x7 cell's time; at 14x14 (196 tokens) the
# attention model's test + shift scoring took ~17 of a mid-run cell's ~140 CPU-min
SHIFT_BATCHES = 8


def _test_metrics(config: RunConfig, run: Path, budget: str) -> Dict[str, Any]:
    """The run's final weights scored on the dataset's whole test split (``data.val_subset`` lifted), and the
    shift consistency of its predictions (circular and black-filled shifts, see :func:`cmhsa.analysis.shift_consistency`)
    on the first test images. The quick budget (a smoke test) scores its validation subset and one batch instead."""
    model, spec, _ = load_model(run, which="last")
    full = config.set({"data.val_subset": None}) if budget == "full" else config
    cfg = full.phase_config("phase1", spec["kwargs"]["num_classes"])
    device = resolve_device(cfg)
    _, test_loader, info = build_loaders(full, 256, spec["kwargs"]["in_chans"])
    metrics = evaluate(model.to(device), test_loader, device, resolve_precision(device, cfg.precision, model),
                       cfg.num_classes)
    black = [-m / s for m, s in zip(info.mean, info.std)]
    batches = SHIFT_BATCHES if budget == "full" else 1
    shift = {mode: shift_consistency(model.float(), test_loader, mode=mode, fill=black, max_batches=batches)
             for mode in ("circular", "zero")}
    return {**metrics, "images": len(test_loader.dataset), "shift_consistency": shift}


def _can_resume(run: RunDir, config: RunConfig) -> bool:
    """True if ``run`` holds an interrupted run of ``config`` (a changed config starts the cell again)."""
    try:
        return run.saved_config() is not None and not run.differences(config)
    except ValueError:  # a config.yaml this version cannot read
        return False


def _computed(config: RunConfig) -> RunConfig:
    """``config`` with the training settings that do not change what a run computes (where it runs, how often it
    logs, evaluates or keeps weights: RESUME_FREE_KEYS) at their defaults."""
    defaults = RunConfig()

    def settled(section: str):
        default = getattr(defaults, section)
        return dataclasses.replace(getattr(config, section),
                                   **{k: getattr(default, k) for k in RESUME_FREE_KEYS if hasattr(default, k)})

    return dataclasses.replace(config, train=settled("train"), phase1=settled("phase1"), phase2=settled("phase2"))


def _phase1_identity(config: RunConfig) -> tuple:
    """What a pipeline's phase 1 computes: the model, the data and the resolved phase-1 training settings."""
    config = _computed(config)
    return config.model, config.data, config.phase_config("phase1")


def _finished_phase1(config: RunConfig, runs_root: str | Path) -> Optional[Path]:
    """Another run directory under ``runs_root`` whose phase 1 is the finished phase 1 ``config`` would train."""
    identity, epochs = _phase1_identity(config), config.phase_config("phase1").epochs
    for path in sorted(Path(runs_root).glob(_run_path(".", "*", "*", "*", "*").as_posix())):
        donor = RunDir(path)
        try:
            saved = donor.saved_config()
        except ValueError:  # a config.yaml this version cannot read
            continue
        if saved is None or path.resolve() == config.run_dir().resolve() or _phase1_identity(saved) != identity:
            continue
        phase1 = donor.phase("phase1")
        if len(phase1.read_metrics()) == epochs and has_checkpoint(phase1.last):
            return path
    return None


def _run_cell(entry: Dict[str, Any], budget: str, progress: bool) -> Dict[str, Any]:
    config: RunConfig = entry["config"]
    run = RunDir(config.run_dir())
    resume = _can_resume(run, config)
    if entry["kind"] == "pipeline":
        donor = None if resume else _finished_phase1(config, entry["runs"])
        if donor is not None:  # start the run with that phase 1 in place; resuming it trains phase 2 only
            with run:
                run.start(config, resume=False)
                shutil.copytree(RunDir(donor).phase("phase1").root, run.phase("phase1").root)
        summary = run_pipeline(config, resume=resume or donor is not None, progress=progress)
        phases = {p: run.phase(p).read_metrics() for p in ("phase1", "phase2")}
        return {"final": phases["phase2"][-1], "phases": phases, "params": summary["phase2"]["params"],
                "train_seconds": summary["phase1"]["train_seconds"] + summary["phase2"]["train_seconds"],
                "transfer": summary["transfer"], "test": _test_metrics(config, run.root, budget),
                **({"phase1_from": str(donor)} if donor is not None else {})}
    spec = model_spec(config)
    model = create_model(spec, seed=config.phase_config("phase1").seed)
    params = sum(p.numel() for p in model.parameters())
    with open_run(config, resume) as opened:
        train_phase(model, spec, config, "phase1", opened.phase("train"), resume=resume, progress=progress)
    lines = run.phase("train").read_metrics()
    return {"final": lines[-1], "phases": {"train": lines}, "params": params,
            "train_seconds": sum(m["epoch_seconds"] for m in lines),
            "test": _test_metrics(config, run.phase("train").root, budget)}


def recorded_config(record: Dict[str, Any]) -> Optional[RunConfig]:
    """The RunConfig a cell record ran, defaults filled (records written before a setting existed hold its
    default), or None when this version cannot read it as what it ran."""
    values = record["config"]
    convert = values.get("convert", {})
    if "qk_dim" not in convert and convert.get("form", "paper") != "paper":
        return None  # written before convert.form existed, when the key was ignored: it ran the paper form
    try:
        return RunConfig.from_dict(values)
    except ValueError:
        return None


def _run_identity(kind: str, config: Optional[RunConfig]) -> Optional[tuple]:
    """What a cell computes: its kind, data, model and each phase's resolved training settings (``train`` layered
    with the phase), without the settings that do not change the result (:func:`_computed`); a pipeline adds its
    conversion, a single training run reads only phase 1's settings."""
    if config is None:
        return None
    phase1 = _phase1_identity(config)
    if kind == "train":
        return kind, *phase1
    return kind, *phase1, config.convert, _computed(config).phase_config("phase2")


@functools.lru_cache(maxsize=4096)
def _record_identity(path: str, mtime_ns: int) -> Optional[tuple]:
    record = read_record(path, ("kind", "config"))  # what ran, to compare with a cell's run
    return _run_identity(record["kind"], recorded_config(record))


def find_finished(entry: Dict[str, Any], results_root: str | Path) -> Optional[Path]:
    """The record of a finished cell, in any grid under ``results_root``, that ran exactly what ``entry`` runs."""
    identity = _run_identity(entry["kind"], entry["config"])
    for path in sorted(Path(results_root).glob("*/cells/*.json")):
        if _record_identity(str(path), path.stat().st_mtime_ns) == identity:  # read once per version of the file
            return path
    return None


def _is_finished(entry: Dict[str, Any], path: Path) -> bool:
    """Whether ``path`` is the record of the run ``entry`` describes (a changed cell config runs again)."""
    return path.exists() and _record_identity(str(path), path.stat().st_mtime_ns) == \
        _run_identity(entry["kind"], entry["config"])


def _progress(entry: Dict[str, Any]) -> Optional[str]:
    """How far the interrupted run of ``entry`` got, e.g. ``phase2 epoch 12/97``; None if it has none to resume."""
    run = RunDir(entry["config"].run_dir())
    if not _can_resume(run, entry["config"]) or not run.trained_anything():
        return None
    phases = ("phase1", "phase2") if entry["kind"] == "pipeline" else ("train",)
    done = [(p, lines) for p in phases if (lines := run.phase(p).read_metrics())]
    if not done:
        return "started"
    phase, lines = done[-1]
    total = entry["config"].phase_config("phase1" if phase == "train" else phase).epochs  # a train cell: phase 1
    return f"{phase} epoch {lines[-1]['epoch'] + 1}/{total}"


def _score(record: Dict[str, Any]) -> str:
    """A finished cell's headline number: its test-set top-1, or for a record written before cells were scored on
    the test set, its last validation top-1."""
    if "test" in record:
        return f"test top-1 {record['test']['top1']:.2f}"
    return f"val top-1 {record['final']['val_top1']:.2f} (no test score in this record)"


# what grid_status says of a cell x seed, in the order a listing counts them; the last three are runs still to finish
STATUSES = ("finished", "reuse", "running", "resume", "to run")
UNFINISHED = STATUSES[2:]


def grid_status(spec: Dict[str, Any], budget: str = "full", seeds: Optional[Iterable[int]] = None,
                results_root: str | Path = "results", runs_root: str | Path = "runs/experiments",
                only: Optional[List[str]] = None) -> List[Dict[str, Any]]:
    """What :func:`run_experiment` would do, cell by cell, without running anything: one ``{cell, seed, status,
    detail, minutes}`` per cell x seed, status ``finished`` (detail: test top-1), ``reuse`` (a finished identical
    run of another grid), ``running`` (another process holds its run directory: its PID and how far it got),
    ``resume`` (detail: how far its checkpointed run got) or ``to run``. ``minutes``: the
    training time a finished run took, and for a run still to do the mean of the same cell's finished seeds in the
    results, whichever seeds were asked for (None without one), so a grid can be planned to fit a session."""
    seeds = list(seeds if seeds is not None else spec.get("seeds", [0]))
    out = grid_dir(results_root, spec["name"], budget)
    rows, took = [], defaultdict(list)
    for record in read_cells(out):
        took[record["cell"]].append(record["train_seconds"] / 60)
    for entry in cell_configs(spec, budget, seeds, runs_root, only):
        path, minutes = cell_record(out, entry["cell"], entry["seed"]), None
        if _is_finished(entry, path):
            record = read_record(path)
            status, detail = "finished", _score(record)
            minutes = record["train_seconds"] / 60
        elif (same := find_finished(entry, results_root)) is not None:
            status, detail = "reuse", same.relative_to(results_root).as_posix()
        elif (pid := RunDir(entry["config"].run_dir()).holder()) is not None:
            status, detail = "running", f"by process {pid}: {_progress(entry) or 'started'}"
        elif (progress := _progress(entry)) is not None:
            status, detail = "resume", f"{progress} in {entry['config'].run_dir()}"
        else:
            status, detail = "to run", ""
        rows.append({"cell": entry["cell"], "seed": entry["seed"], "status": status, "detail": detail,
                     "minutes": minutes})
    for row in rows:
        if row["status"] in UNFINISHED and took[row["cell"]]:
            row["minutes"] = statistics.fmean(took[row["cell"]])
    return rows


def run_experiment(spec: Dict[str, Any], budget: str = "full", seeds: Optional[Iterable[int]] = None,
                   results_root: str | Path = "results", runs_root: str | Path = "runs/experiments",
                   only: Optional[List[str]] = None, progress: bool = True) -> Path:
    """Run every unfinished cell of the grid; returns the results directory."""
    seeds = list(seeds if seeds is not None else spec.get("seeds", [0]))
    entries = cell_configs(spec, budget, seeds, runs_root, only)  # checks the cell names before anything is written
    out = grid_dir(results_root, spec["name"], budget)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    code = git_state()  # the code as it was when the grid started, not when a cell ends
    for i, entry in enumerate(entries, 1):
        path = cell_record(out, entry["cell"], entry["seed"])
        if _is_finished(entry, path):
            continue
        header = f"[{spec['name']} {i}/{len(entries)}] {entry['label']} (cell {entry['cell']}, seed {entry['seed']})"
        record = {**{k: entry[k] for k in ("cell", "label", "kind", "seed")}, "config": entry["config"].to_dict()}
        same = find_finished(entry, results_root)
        if same is not None:
            # the same run already finished in another grid (e.g. efficiency's 2k cells are table1's): reuse it
            kept = {k: v for k, v in read_record(same).items() if k not in record}
            record.update(kept, reused_from=same.relative_to(results_root).as_posix())
            if progress:
                print(f"{header}: same run as {record['reused_from']}, reused")
        else:
            if progress:
                print(header)
            try:
                record.update(_run_cell(entry, budget, progress), budget=budget, hardware=hardware(), git=code)
            except RunDirLocked:
                if progress:
                    print(f"{header}: another process is running it, skipped")
                continue
        atomic_write_text(path, json.dumps(record, indent=1))
    return out


def read_cells(results: str | Path) -> List[Dict[str, Any]]:
    """Every finished cell record under ``results/cells``."""
    return [read_record(p) for p in sorted(Path(results).glob("cells/*.json"))]


# what every finished cell's record holds, whichever grid wrote it (the report reads these)
RECORD_KEYS = ("cell", "label", "seed", "final", "phases", "params", "train_seconds", "hardware")


def read_record(path: str | Path, keys: Sequence[str] = RECORD_KEYS) -> Dict[str, Any]:
    """A finished cell's record holding ``keys``; a file that is not one (cut short, edited by hand) is an error
    naming it."""
    path = Path(path)
    cell, _, seed = path.stem.rpartition("__seed")
    fix = (f"delete it and run the cell again (cmhsa experiment {path.parent.parent.name} --cells {cell} --seeds "
           f"{seed}), or restore it (git checkout -- {path})")
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}): {fix}") from None
    missing = [key for key in keys if key not in record] if isinstance(record, dict) else ["everything"]
    if missing:
        raise ValueError(f"{path} is not a finished cell's record (it lacks {', '.join(missing)}): {fix}")
    return record
