"""``cmhsa report results/``: REPORT.md from the committed experiment results, with the paper's numbers beside ours.

Reads ``results/<grid>/cells/*.json`` (written by :mod:`cmhsa.experiments`) and ``results/analysis/*/analysis.json``
(written by ``cmhsa analyze``), writes ``results/<grid>/summary.csv``, the figures, and ``results/REPORT.md``.
Every number in the report comes from those files; nothing is typed in by hand except the paper's Table 1.
"""
from __future__ import annotations

import csv
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .experiments import load_experiment, read_cells  # noqa: E402

__all__ = ["PAPER_TABLE1", "grid_dir", "write_report"]

# Li et al. (2021), Table 1: CIFAR-100, 224 px, 400 epochs in total (two-phase: 200 + 200); top-1, top-5, time vs ViT
PAPER_TABLE1 = {
    "ViT": (60.90, 86.66, 1.00),
    "DeiT-small": (71.83, 90.99, 0.57),
    "DeiT-base": (69.98, 88.91, 1.00),
    "CMHSA-3 (1st phase)": (76.07, 93.03, 0.45),
    "CMHSA-5 (1st phase)": (76.12, 93.13, 0.49),
    "CMHSA (2nd phase)": (69.83, 91.39, 1.48),
    "CMHSA-3 (ours)": (76.72, 93.74, 0.96),
    "CMHSA-5 (ours)": (78.74, 94.40, 0.98),
}

COMMANDS = {
    "converged": "cmhsa experiment converged --budget full",
    "converged_geometry": "cmhsa experiment converged_geometry --budget full",
    "table1": "cmhsa experiment table1 --budget full",
    "warmup": "cmhsa experiment warmup --budget full",
    "efficiency": "cmhsa experiment efficiency --budget full",
    "ablations": "cmhsa experiment ablations --budget full",
    "forms": "cmhsa experiment forms --budget full",
}


def grid_dir(results: Path, name: str, budget: str = "full") -> Path:
    """Where a grid's results live: results/<name> for the full budget, results/<name>-<budget> otherwise."""
    return results / (name if budget == "full" else f"{name}-{budget}")


def _mean_std(values: List[float]) -> Tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(values: List[float], digits: int = 2) -> str:
    m, s = _mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}" if len(values) > 1 else f"{m:.{digits}f}"


def _by_label(cells: List[dict]) -> Dict[str, List[dict]]:
    groups: Dict[str, List[dict]] = defaultdict(list)
    for c in cells:
        groups[c["label"]].append(c)
    return groups


def attention_form(cell: dict) -> str:
    """The attention layer a cell trained: the conversion's form for a two-phase cell (records from before
    convert.form ran the paper's layer), the form of a CMHSA attention model's timm name, or '—' for other models
    (and for a two-phase control that keeps the convolution)."""
    config = cell.get("config", {})
    if cell.get("kind") == "pipeline":
        convert = config.get("convert", {})
        return "— (conv kept)" if convert.get("keep_conv") else convert.get("form", "paper")
    tag = str(config.get("model", {}).get("name", "")).split("_")[1:2]
    return {"attn": "paper", "fattn": "factorized", "lattn": "local"}.get(tag[0] if tag else "", "—")


def row_precision(cell: dict) -> str:
    """The precision a cell trained in, per phase ('bf16 / fp32' for a two-phase cell whose phases differ): as
    resolved on its machine, or the configured setting with '(setting)' for records from before that was logged."""
    resolved = [lines[-1]["precision"] for lines in cell.get("phases", {}).values() if lines and "precision" in lines[-1]]
    if resolved:
        return " / ".join(dict.fromkeys(resolved))
    return f"{cell.get('config', {}).get('train', {}).get('precision', 'auto')} (setting)"


def _write_csv(path: Path, rows: List[dict]) -> None:
    if not rows:
        return
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _curve(cell: dict, key: str = "val_loss") -> Tuple[List[int], List[float]]:
    """The attention phase's (epochs counted from 1, values) on the epochs that have ``key`` (``eval_every`` may
    skip some): phase 2 of a pipeline, or the single phase of a train cell."""
    lines = [m for m in cell["phases"].get("phase2") or cell["phases"].get("train") or [] if key in m]
    return [m["epoch"] + 1 for m in lines], [m[key] for m in lines]


# --- converged protocol ---------------------------------------------------------------------------------------------

def _trajectory(cell: dict) -> Tuple[List[int], List[float], List[float]]:
    """(optimizer steps, val top-1, training seconds) at the end of every evaluated epoch, both phases of a pipeline
    in a row."""
    n = cell["config"]["data"]["train_subset"]
    steps, top1, seconds, done_steps, done_seconds = [], [], [], 0, 0.0
    for phase in ("phase1", "phase2", "train"):
        batch = {**cell["config"]["train"], **cell["config"].get(phase if phase != "train" else "phase1", {})}
        for m in cell["phases"].get(phase, []):
            done_steps += n // batch.get("batch_size", 128)
            done_seconds += m["epoch_seconds"]
            if "val_top1" not in m:  # not evaluated (eval_every)
                continue
            steps.append(done_steps)
            top1.append(m["val_top1"])
            seconds.append(done_seconds)
    return steps, top1, seconds


def plateau_gain(top1: List[float]) -> float:
    """What the last 20% of training added to val top-1: the mean of the last 5% of epochs minus the mean of the
    5% that end at 80% (windows of at least one epoch, so one noisy evaluation does not decide it)."""
    epochs = len(top1)
    window = max(1, round(0.05 * epochs))
    at80 = max(window, math.ceil(0.8 * epochs))
    return statistics.fmean(top1[-window:]) - statistics.fmean(top1[at80 - window:at80])


def _se_text(values: List[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.2f} (1)"
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values) / len(values) ** 0.5:.2f} ({len(values)})"


# two-phase recipes and their controls (convert.keep_conv: the same schedules on the conv model, no attention)
OURS, OURS_NO_RESTART = "Two-phase, our recipe", "Two-phase, our recipe, no restart"
OURS_CONTINUED = "Two-phase, our recipe, converted mid-run"  # its keep-conv control is the conv row, bit for bit
TIED_CONTINUED = "Two-phase, tied values, converted mid-run"  # the same run, value maps kept the conv kernel's
CONTROLS = {OURS: "Two-phase control, phase 2 keeps the conv",
            OURS_NO_RESTART: "Two-phase control, no restart, phase 2 keeps the conv"}

# (arm a, arm b, sizes where it is claimed, the claim, whether it is the paper's claim or a target of ours,
#  the least gap a - b the claim asks for)
CONVERGED_CLAIMS = [
    ("Two-phase, paper recipe", "Conv phase only", None, "The second phase adds to the first (paper recipe)",
     "paper", 0.0),
    (OURS, "Conv phase only", (2000, 6000),
     "Our phase-2 recipe beats the conv phase alone by 2 points (equal steps)", "target", 2.0),
    ("Two-phase, our recipe + per-parameter lr", "Conv phase only", (2000, 6000),
     "Our phase-2 recipe with per-parameter learning rates beats the conv phase alone by 2 points (equal steps)",
     "target", 2.0),
    ("Two-phase, our recipe + per-parameter lr", OURS, None,
     "Per-parameter learning rates in phase 2 improve our recipe", "target", 0.0),
    ("Two-phase, our recipe, longer phase 2", OURS, None,
     "A longer phase 2 (1000 + 3000 steps instead of 2000 + 2000) improves our recipe", "target", 0.0),
    (OURS, CONTROLS[OURS], None, "The second phase adds to the first, schedule held fixed (control: phase 2 keeps "
     "the conv; phase 1 shared)", "paper", 0.0),
    (OURS_NO_RESTART, "Conv phase only", (2000, 6000),
     "Our recipe without the restart beats the conv phase alone by 2 points (equal steps)", "target", 2.0),
    (OURS_NO_RESTART, OURS, None, "Not restarting the schedule improves our recipe", "target", 0.0),
    (OURS_NO_RESTART, CONTROLS[OURS_NO_RESTART], None, "The second phase adds to the first, schedule held fixed "
     "(no restart; control: phase 2 keeps the conv)", "paper", 0.0),
    (OURS_CONTINUED, "Conv phase only", (2000, 6000),
     "Our recipe converted mid-run beats the conv phase alone by 2 points (equal steps)", "target", 2.0),
    (OURS_CONTINUED, "Conv phase only", None, "The second phase adds to the first, schedule held fixed (one run "
     "converted at its midpoint; its keep-conv control is the conv row, bit for bit)", "paper", 0.0),
    (TIED_CONTINUED, "Conv phase only", None, "Attention routing alone adds to the conv phase (mid-run, value maps "
     "tied to the conv kernel)", "target", 0.0),
    (TIED_CONTINUED, OURS_CONTINUED, None, "Keeping the value maps tied to the kernel improves the mid-run recipe",
     "target", 0.0),
    (OURS, "DeiT-base", (1000, 2000), "Two-phase CMHSA beats DeiT-base with little data",
     "paper", 0.0),
    (OURS, "ConViT", (1000, 2000), "Two-phase CMHSA beats ConViT with little data", "target", 0.0),
    (OURS, "Small CNN (resnet10t, 0.3M)", None,
     "Two-phase CMHSA beats a small timm CNN, what a user would pick instead", "target", 0.0),
    (OURS, "Attention from scratch", None,
     "Convolutional initialisation beats training the attention model from scratch", "paper", 0.0),
    (OURS, "Structure only (conv attention pattern, random filters)", None,
     "The gain comes from the trained filters, not only from the local attention pattern", "target", 0.0),
]


def _converged_claims(test: Dict[str, Dict[int, List[float]]]) -> List[str]:
    lines = []
    for a, b, sizes, text, kind, least in CONVERGED_CLAIMS:
        if a not in test or b not in test:
            continue
        parts, judged = [], []
        for n in sorted(set(test[a]) & set(test[b])):
            if sizes and n not in sizes:
                continue
            gap = statistics.fmean(test[a][n]) - statistics.fmean(test[b][n])
            noise = two_standard_errors(test[a][n], test[b][n])
            parts.append(f"{n}: {gap:+.2f}" + (f" (2 SE ±{noise:.2f})" if noise is not None else " (one seed)"))
            # a paper claim is judged by sign; a target is met when the gap exceeds its margin by 2 SE
            judged.append(None if noise is None else _judge(gap, noise, +1) if kind == "paper" else gap - least > noise)
        if not parts:
            continue
        if kind == "paper":
            verdicts = [v for v in judged if v is not None]
            verdict = ("one seed so far: no spread to judge against" if not verdicts else
                       "**agrees** with the paper" if all(v == "agrees" for v in verdicts) else
                       "**disagrees** with the paper" if any(v == "disagrees" for v in verdicts) else
                       "**inconclusive**: within the noise at " + ", ".join(
                           str(n) for n, v in zip(sorted(test[a]), judged) if v == "inconclusive") + " images")
        else:
            met = [v for v in judged if v is not None]
            verdict = ("not judged yet (one seed)" if not met else "target met" if all(met) else
                       "target **not met**" if not any(met) else "target met at some sizes only")
        lines.append(f"- {text}: {a} − {b}, test top-1 by training-set size: {', '.join(parts)} — {verdict}.")
    best = test.get(OURS, {}).get(6000)
    if best:
        mean = statistics.fmean(best)
        seeds = f"{mean:.2f}, one seed so far" if len(best) == 1 else _se_text(best)
        lines.append(f"- Two-phase at 6,000 images reaches 88% on the full test set (target): {seeds} — "
                     f"{'target met' if mean >= 88 else 'target **not met**'}.")
    return lines


def _control_split(test: Dict[str, Dict[int, List[float]]]) -> List[str]:
    """A two-phase recipe's gap to the conv phase alone, split by its control that keeps the conv through phase 2:
    what the schedule costs (control − conv) plus what converting to attention adds (recipe − control)."""
    lines = []
    for recipe, control_label in CONTROLS.items():
        conv, two_phase, control = (test.get(k, {}) for k in ("Conv phase only", recipe, control_label))
        parts = []
        for n in sorted(set(conv) & set(two_phase) & set(control)):
            pieces = []
            for what, a, b in (("its schedule", control[n], conv[n]),
                               ("converting to attention", two_phase[n], control[n])):
                noise = two_standard_errors(a, b)
                pieces.append(f"{what} {statistics.fmean(a) - statistics.fmean(b):+.2f}"
                              + (f" (2 SE ±{noise:.2f})" if noise is not None else " (one seed)"))
            parts.append(f"{n} images: " + ", ".join(pieces))
        if parts:
            lines.append(f"- {recipe} − conv phase only, split by the control that keeps the conv: "
                         f"{'; '.join(parts)}.")
    return lines


def _budget_figure(budget_grid: Path, steps: Optional[int], out: Path) -> Optional[str]:
    """The pilot curves that set the step budget: val top-1 against optimizer steps, the chosen budget marked."""
    cells = read_cells(budget_grid)
    if not cells:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4))
    rows = []
    for i, c in enumerate(cells):
        x, y, _ = _trajectory(c)
        ax.plot(x, y, color=f"C{i}", label=c["label"])
        rows.append(f"{c['label']}: {y[-1]:.2f} after {x[-1]} steps, the last 20% added {plateau_gain(y):+.2f}")
    if steps:
        ax.axvline(steps, color="k", ls=":", label=f"budget: {steps} steps")
    ax.set(xlabel="optimizer steps", ylabel="val top-1 (%)", title="Pilot: how long until the curves flatten")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return "Pilot (2,000 images, one seed, `configs/experiments/converged_budget.yaml`): " + "; ".join(rows) + "."


def _wall_clock_figure(cells: List[dict], size: int, out: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, (label, group) in enumerate(_by_label([c for c in cells
                                                  if c["config"]["data"]["train_subset"] == size]).items()):
        for j, c in enumerate(sorted(group, key=lambda c: c["seed"])):
            _, y, t = _trajectory(c)
            ax.plot([s / 60 for s in t], y, color=f"C{i}", alpha=0.8, label=label if j == 0 else None)
    ax.set(xlabel="training time (CPU minutes, one thread)", ylabel="val top-1 (%)",
           title=f"Accuracy against wall-clock, {size} images (one line per seed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def _equal_wall_clock(cells: List[dict], labels: List[str], size: int, reference: str = "Conv phase only") -> List[str]:
    """Every row's val top-1 at the same CPU time: the reference row's longest run (the conv phase alone, the
    baseline every row's steps are matched to; without it the cheapest row), each row at its last epoch that ended
    by then (the per-seed values, averaged). A row whose runs all took less shows its end, marked."""
    group = _by_label([c for c in cells if c["config"]["data"]["train_subset"] == size])
    if len(group) < 2:
        return []
    curves = {id(c): _trajectory(c)[1:] for runs in group.values() for c in runs}  # (val top-1, seconds) per run
    took = {label: [curves[id(c)][1][-1] for c in runs] for label, runs in group.items()}
    anchor = reference if reference in took else min(took, key=lambda label: max(took[label]))
    budget = max(took[anchor])
    rows = [f"Equal wall-clock at {size} images: val top-1 after {budget / 60:.0f} CPU minutes (one thread), the "
            f"longest run of {anchor}; a row whose runs ended sooner shows its end (†), one that had not finished an "
            "epoch by then —. Times come from machines that other jobs shared, so read this as a rough ranking.", "",
            "| row | val top-1 at equal time | at the end of its own run | its run took (min) |",
            "| --- | ---: | ---: | ---: |"]
    for label in (l for l in labels if l in group):
        at, end = [], []
        for c in group[label]:
            top1, seconds = curves[id(c)]
            reached = [v for v, t in zip(top1, seconds) if t <= budget * 1.001]
            if reached:
                at.append(reached[-1])
            end.append(top1[-1])
        shorter = " †" if max(took[label]) < budget * 0.999 else ""
        rows.append(f"| {label} | {_fmt(at) + shorter if at else '—'} | {_fmt(end)} | "
                    f"{statistics.fmean(took[label]) / 60:.0f} |")
    return rows + [""]


def _table1_bars(test: Dict[str, Dict[int, List[float]]], paper_rows: Dict[str, str], size: int,
                 out: Path) -> None:
    """Our converged rows at one size beside the paper's Table 1 rows they stand for."""
    pairs = [(label, paper) for label, paper in paper_rows.items() if label in test and size in test[label]]
    fig, ax = plt.subplots(figsize=(8, 4))
    xs = range(len(pairs))
    ours = [test[l][size] for l, _ in pairs]
    errors = [statistics.stdev(v) / len(v) ** 0.5 if len(v) > 1 else 0.0 for v in ours]  # SE over seeds
    bars = ax.bar([x - 0.2 for x in xs], [statistics.fmean(v) for v in ours], 0.4, yerr=errors, capsize=3,
                  label=f"ours: Fashion-MNIST, {size} images (± SE over seeds)")
    ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
    ax.bar_label(ax.bar([x + 0.2 for x in xs], [PAPER_TABLE1[p][0] for _, p in pairs], 0.4,
                        label="paper: CIFAR-100"), fmt="%.1f", fontsize=7, padding=2)
    ax.set_xticks(list(xs), [f"{l}\n(paper: {p})" for l, p in pairs], fontsize=7)
    ax.set(ylabel="top-1 (%)", ylim=(0, 100))
    ax.set_title("Table 1, ours beside the paper's", pad=22)
    ax.legend(ncol=2, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False, fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def _gains_figure(test: Dict[str, Dict[int, List[float]]], labels: List[str], out: Path,
                  reference: str = "Conv phase only") -> bool:
    """Every row's test top-1 minus the conv phase alone's, per training-set size, with 2 standard errors (rows
    with one seed: a hollow marker, no bar); the 2-point target marked. False when there is nothing to draw."""
    if reference not in test:
        return False
    rows = [l for l in labels if l in test and l != reference and set(test[l]) & set(test[reference])]
    if not rows:
        return False
    sizes = sorted({n for l in rows for n in test[l] if n in test[reference]})
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(rows) + 1.6))
    for i, n in enumerate(sizes):
        offset = (i - (len(sizes) - 1) / 2) * 0.22  # the sizes side by side within a row
        points = [(y, test[label][n], test[reference][n]) for y, label in enumerate(rows) if n in test[label]]
        ax.plot([], [], "o", color=f"C{i}", label=f"{n} images")
        for y, a, b in points:
            noise = two_standard_errors(a, b)
            ax.errorbar(statistics.fmean(a) - statistics.fmean(b), y + offset, xerr=noise, fmt="o", capsize=2,
                        color=f"C{i}", mfc=f"C{i}" if noise is not None else "white", ms=5)
    ax.axvline(0, color="k", lw=0.8)
    ax.axvline(2, color="k", ls=":", lw=0.8, label="target: +2 points")
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.invert_yaxis()
    ax.set(xlabel=f"test top-1 − {reference} (points; bars: 2 SE, hollow: one seed)")
    ax.set_title("Each row against the conv phase alone, at equal steps", fontsize=10, pad=24)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7, ncol=len(sizes) + 1, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return True


def _conversion_drops(cells: List[dict], labels: List[str]) -> List[str]:
    """Per two-phase row: val top-1 right after conversion minus at the end of phase 1 (target: within 1 point)."""
    drops: Dict[str, List[float]] = defaultdict(list)
    for c in cells:
        t = c.get("transfer") or {}
        if "val_after_conversion" in t and not t.get("keep_conv"):  # the control converts nothing
            drops[c["label"]].append(t["val_after_conversion"]["top1"] - t["val_before_conversion"]["val_top1"])
    lines = []
    for label in (l for l in labels if l in drops):
        runs = f"{len(drops[label])} run" + ("s" if len(drops[label]) > 1 else "")
        within = "within" if max(map(abs, drops[label])) <= 1 else "**not** within"
        lines.append(f"- {label}: val top-1 right after conversion − end of phase 1: {_fmt(drops[label])} points over "
                     f"{runs} — {within} 1 point in every run.")
    return lines


def _shift_table(cells: List[dict], labels: List[str], size: int) -> List[str]:
    """Shift consistency (fraction of unchanged predictions) at the smallest and largest shift, per row."""
    curves: Dict[str, Dict[str, List[float]]] = defaultdict(lambda: defaultdict(list))
    for c in cells:
        shift = c["test"].get("shift_consistency")
        if shift and c["config"]["data"]["train_subset"] == size:
            for mode, curve in shift.items():
                ends = sorted(curve, key=int)
                for s in (ends[0], ends[-1]):
                    curves[c["label"]][f"{mode} {s} px"].append(curve[s])
    if not curves:
        return []
    columns = list(dict.fromkeys(k for per in curves.values() for k in per))
    rows = [f"Shift consistency at {size} images (fraction of the first test images whose prediction a shift leaves "
            f"unchanged; circular shifts wrap, zero-filled ones bring in black):", "",
            "| row | " + " | ".join(columns) + " |", "| --- |" + " ---: |" * len(columns)]
    rows += [f"| {label} | " + " | ".join(_fmt(curves[label][k], 3) if k in curves[label] else "—" for k in columns)
             + " |" for label in labels if label in curves]
    return rows + [""]


def _converged(grid: Path, budget_grid: Path, config: Path) -> Optional[str]:
    cells = read_cells(grid)
    spec = load_experiment(config) if config.exists() else {"cells": []}
    steps = sum(spec.get("steps", {}).values()) or None
    pilot = _budget_figure(budget_grid, steps, grid.parent / "converged_budget.png")
    if not cells:
        return None if pilot is None else "\n".join(["![budget pilot](converged_budget.png)", "", pilot])
    labels = list(dict.fromkeys([c.get("label", c["name"]) for c in spec["cells"]] + [c["label"] for c in cells]))
    test: Dict[str, Dict[int, List[float]]] = defaultdict(lambda: defaultdict(list))
    gains: Dict[str, List[float]] = defaultdict(list)
    for c in cells:
        test[c["label"]][c["config"]["data"]["train_subset"]].append(c["test"]["top1"])
        gains[c["label"]].append(plateau_gain(_trajectory(c)[1]))
    sizes = sorted({n for per in test.values() for n in per})
    rows = ["| row | " + " | ".join(f"{n} images" for n in sizes) + " | last 20% added (max) | attention form | "
            "precision |", "| --- |" + " ---: |" * (len(sizes) + 1) + " --- | --- |"]
    forms = {c["label"]: attention_form(c) for c in cells}
    precisions = {c["label"]: row_precision(c) for c in cells}
    csv_rows = []
    for label in (l for l in labels if l in test):
        worst = max(gains[label])
        rows.append(f"| {label} | " + " | ".join(_se_text(test[label][n]) if n in test[label] else "—"
                                                 for n in sizes) + f" | {worst:+.2f}" + (" ⚠" if worst >= 1 else "")
                    + f" | {forms[label]} | {precisions[label]} |")
        csv_rows += [{"row": label, "train_size": n, "test_top1_mean": statistics.fmean(v), "seeds": len(v)}
                     for n, v in sorted(test[label].items())]
    _write_csv(grid / "summary.csv", csv_rows)
    middle = sizes[len(sizes) // 2]
    _wall_clock_figure(cells, middle, grid / "wall_clock.png")
    paper_rows = {c.get("label"): c["paper_row"] for c in spec["cells"] if c.get("paper_row")}
    _table1_bars(test, paper_rows, middle, grid / "table1_bars.png")
    gains_plot = _gains_figure(test, labels, grid / "gains.png")
    unplateaued = sorted(l for l, g in gains.items() if max(g) >= 1)
    return "\n".join([
        "Test top-1 on the full 10,000-image test set, mean ± standard error (seeds). Every row gets the same number "
        "of optimizer steps whatever the subset size; the last column is the largest val top-1 gain over the last "
        "20% of training among a row's runs (⚠: not plateaued by the 1-point rule).", "", *rows, "",
        *([f"![each row against the conv phase alone]({grid.name}/gains.png)", ""] if gains_plot else []),
        *_converged_claims(test), *_control_split(test), "", *_conversion_drops(cells, labels), "", *_equal_wall_clock(cells, labels, middle),
        *_shift_table(cells, labels, middle),
        ("Every run plateaued by the rule." if not unplateaued else
         "Not plateaued (last 20% added ≥ 1 point): " + ", ".join(unplateaued) + "."), "",
        f"![accuracy against wall-clock]({grid.name}/wall_clock.png) ![Table 1 bars]({grid.name}/table1_bars.png)",
        "", *([f"![budget pilot](converged_budget.png)", "", pilot] if pilot else []),
    ])


GEOMETRY_ARMS = (OURS, OURS_CONTINUED, TIED_CONTINUED, "Two-phase, paper recipe")
# rows that are the conv row's own run (same seed, data order and lr curve) until their conversion mid-run, so their
# gain over it can be taken seed by seed: the seed-to-seed spread that both share cancels
PAIRED_WITH_CONV = (OURS_CONTINUED, TIED_CONTINUED)


def _grid_of(cell: dict) -> Tuple[int, str]:
    """(tokens per side, "28 px, 7x7 grid") of a cell's patch grid."""
    size = cell["config"]["data"].get("img_size", 28)
    patch = cell["config"].get("model", {}).get("kwargs", {}).get("patch_size", 4)  # the cmhsa*_tiny models' P
    return size // patch, f"{size} px, {size // patch}x{size // patch} grid"


def _paired_gain(arm: Dict[int, float], conv: Dict[int, float]) -> Optional[Tuple[float, float, int]]:
    """``arm − conv`` seed by seed: the mean difference, twice its standard error and the number of seeds both ran."""
    diffs = [arm[s] - conv[s] for s in sorted(set(arm) & set(conv))]
    if len(diffs) < 2:
        return None
    return statistics.fmean(diffs), 2 * statistics.stdev(diffs) / len(diffs) ** 0.5, len(diffs)


def _growth_with_grid(paired: Dict[Tuple[str, int], Dict[str, Tuple[float, float, int]]]) -> List[str]:
    """The lead's claim, seed by seed: a row's gain over the conv phase on each larger grid minus its gain on the
    smallest grid, judged against the two gains' standard errors."""
    lines = []
    for (arm, n), by_grid in sorted(paired.items()):
        (small, (g0, e0, _)), *larger = by_grid.items()  # the converged grid's 7x7 comes first
        for grid, (g1, e1, _) in larger:
            diff, noise = g1 - g0, (e0 ** 2 + e1 ** 2) ** 0.5
            lines.append(f"- Phase 2's gain grows with the grid ({arm}, {n} images, seed by seed): {small} "
                         f"{g0:+.2f} → {grid} {g1:+.2f}, a difference of {diff:+.2f} (2 SE ±{noise:.2f}) — "
                         f"{'target met' if diff > noise else 'target **not met**'}.")
    return lines


def _geometry(converged: Path, geometry: Path) -> Optional[str]:
    """Phase 2's gain (two-phase − conv phase only, full-test top-1) on the converged grid's 7x7 patches beside the
    larger grid of the geometry grid, at the training-set sizes the geometry grid ran."""
    geo = read_cells(geometry)
    if not geo:
        return None
    sizes = {c["config"]["data"]["train_subset"] for c in geo}
    rows = ["| training images | image and grid | Conv phase only | " +
            " | ".join(f"{arm} | gain (2 SE)" for arm in GEOMETRY_ARMS) + " |",
            "| ---: | --- | ---: |" + " ---: | ---: |" * len(GEOMETRY_ARMS)]
    paired: Dict[Tuple[str, int], Dict[str, Tuple[float, float, int]]] = defaultdict(dict)
    plotted: Dict[Tuple[str, int], Dict[int, Tuple[float, float, bool]]] = defaultdict(dict)  # by tokens per side
    for cells in (read_cells(converged), geo):
        test: Dict[Tuple[int, str], Dict[str, Dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
        for c in cells:
            if c["config"]["data"]["train_subset"] in sizes:
                test[(c["config"]["data"]["train_subset"], *_grid_of(c))][c["label"]][c["seed"]] = c["test"]["top1"]
        for (n, side, grid), by in sorted(test.items()):
            conv = list(by["Conv phase only"].values()) if "Conv phase only" in by else None
            cols = []
            for arm in GEOMETRY_ARMS:
                if arm not in by:
                    cols += ["—", "—"]
                    continue
                values = list(by[arm].values())
                noise = two_standard_errors(values, conv) if conv else None
                gain = f"{statistics.fmean(values) - statistics.fmean(conv):+.2f}" if conv else "—"
                cols += [_se_text(values), gain + (f" (±{noise:.2f})" if noise is not None else "")]
                if noise is not None:
                    plotted[arm, n][side] = (statistics.fmean(values) - statistics.fmean(conv), noise, False)
            rows.append(f"| {n} | {grid} | {_se_text(conv) if conv else '—'} | " + " | ".join(cols) + " |")
            for arm in (a for a in PAIRED_WITH_CONV if a in by and conv):
                if (gain := _paired_gain(by[arm], by["Conv phase only"])) is not None:
                    paired[arm, n][grid] = gain
                    plotted[arm, n][side] = (gain[0], gain[1], True)
    return "\n".join([
        "Test top-1 (full test set, mean ± SE over seeds) and phase 2's gain over the conv phase alone at equal steps, "
        "on the 7x7 grid of 28 px images and on a larger grid of the same images upsampled "
        "(`configs/experiments/converged_geometry.yaml`). If phase 2's value is long-range context, the gain should "
        "grow with the grid.", "", *rows,
        *(["", "The same gains seed by seed, for the rows converted mid-run: each is the conv row's own run up to "
           "its conversion (same seed, data order and learning-rate curve), so the seed-to-seed spread the two "
           "share cancels and a smaller gain is resolved than by the two rows' spreads above.", "",
           *(f"- {arm} − Conv phase only, {n} images, {grid}: {gain:+.2f} (2 SE ±{noise:.2f}, {k} seeds)"
             for (arm, n), by_grid in sorted(paired.items()) for grid, (gain, noise, k) in by_grid.items()),
           *_growth_with_grid(paired)] if paired else []),
        *(["", f"![phase 2's gain against grid size]({geometry.name}/gain_vs_grid.png)"]
          if _gain_vs_grid_figure(plotted, geometry / "gain_vs_grid.png") else [])])


def _gain_vs_grid_figure(gains: Dict[Tuple[str, int], Dict[int, Tuple[float, float, bool]]], out: Path) -> bool:
    """Phase 2's gain over the conv phase (± 2 SE) against tokens per side, one line per row and training-set size;
    filled markers where the gain is paired seed by seed. False when no row has two grids to compare."""
    lines = {key: by_side for key, by_side in gains.items() if len(by_side) > 1}
    if not lines:
        return False
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, ((arm, n), by_side) in enumerate(sorted(lines.items())):
        sides = sorted(by_side)
        ax.plot(sides, [by_side[s][0] for s in sides], color=f"C{i}", lw=1, label=f"{arm}, {n} images")
        for s in sides:
            gain, noise, paired = by_side[s]
            ax.errorbar(s, gain, yerr=noise, fmt="o", capsize=3, color=f"C{i}", mfc=f"C{i}" if paired else "white")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(sorted({s for by_side in lines.values() for s in by_side}))
    ax.set(xlabel="patch grid (tokens per side)", ylabel="two-phase − conv phase only (test top-1, points)",
           title="Phase 2's gain against grid size (bars: 2 SE; filled: paired by seed)")
    ax.title.set_fontsize(10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return True


# --- table1 ------------------------------------------------------------------------------------------------------

def _table1(grid: Path) -> Optional[str]:
    cells = read_cells(grid)
    if not cells:
        return None
    groups = _by_label(cells)
    vit_time = statistics.fmean(c["train_seconds"] for c in groups["ViT"]) if "ViT" in groups else None
    rows, lines = [], [
        "| model | params | top-1 (ours) | top-5 (ours) | val loss | time vs ViT | seeds | top-1 (paper) | "
        "top-5 (paper) | time (paper) | attention form | precision |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    order = [label for label in PAPER_TABLE1 if label in groups] + [l for l in groups if l not in PAPER_TABLE1]
    for label in order:
        g = groups[label]
        top1 = [c["final"]["val_top1"] for c in g]
        top5 = [c["final"]["val_top5"] for c in g]
        loss = [c["final"]["val_loss"] for c in g]
        time_rel = statistics.fmean(c["train_seconds"] for c in g) / vit_time if vit_time else float("nan")
        paper = PAPER_TABLE1.get(label)
        p1, p5, pt = (f"{v:.2f}" for v in paper) if paper else ("—", "—", "—")
        lines.append(f"| {label} | {g[0]['params'] / 1e6:.2f}M | {_fmt(top1)} | {_fmt(top5)} | {_fmt(loss, 3)} | "
                     f"{time_rel:.2f} | {len(g)} | {p1} | {p5} | {pt} | {attention_form(g[0])} | {row_precision(g[0])} |")
        rows.append({"model": label, "params": g[0]["params"], "top1_mean": _mean_std(top1)[0],
                     "top1_std": _mean_std(top1)[1], "top5_mean": _mean_std(top5)[0], "val_loss_mean":
                     _mean_std(loss)[0], "time_vs_vit": time_rel, "seeds": len(g),
                     "paper_top1": paper[0] if paper else "", "paper_top5": paper[1] if paper else ""})
    _write_csv(grid / "summary.csv", rows)
    return "\n".join(lines + ["", *_table1_claims(groups)])


def _judge(gap: float, noise: Optional[float], expected: float, at_least: bool = False) -> str:
    """'agrees', 'disagrees', 'inconclusive' or 'unjudged': a measured gap against the paper's sign.
    ``at_least``: the paper only claims "no worse", so a gap within the noise agrees."""
    if noise is None:
        return "unjudged"
    if abs(gap) <= noise:
        return "agrees" if at_least else "inconclusive"
    return "agrees" if (gap > 0) == (expected > 0) else "disagrees"


def _verdict(gap: float, noise: Optional[float], expected: float, at_least: bool = False) -> str:
    return {"unjudged": "one seed so far: no spread to judge the gap against",
            "inconclusive": "**inconclusive**: the gap is within the noise",
            "agrees": "**agrees** with the paper" + (" (no worse, within the noise)" if at_least and
                                                     abs(gap) <= (noise or 0) else ""),
            "disagrees": "**disagrees** with the paper"}[_judge(gap, noise, expected, at_least)]


def _seed_noise(table1: Path) -> Optional[float]:
    """Noise level for one-seed grids: the std of a difference of two single runs, sqrt(2) x the mean seed std of
    the table1 rows (same data, recipe and epoch budget)."""
    stds = [_mean_std(v)[1] for v in (
        [c["final"]["val_top1"] for c in g] for g in _by_label(read_cells(table1)).values()) if len(v) > 1]
    return 2 ** 0.5 * statistics.fmean(stds) if stds else None


def two_standard_errors(a: List[float], b: List[float]) -> Optional[float]:
    """Twice the standard error of ``mean(a) - mean(b)`` from the two arms' seed spreads (unequal variances);
    None unless both arms have at least two seeds. A gap counts when it exceeds this."""
    if min(len(a), len(b)) < 2:
        return None
    return 2 * (statistics.variance(a) / len(a) + statistics.variance(b) / len(b)) ** 0.5


def _claim(groups, a: str, b: str, paper_gap: float, text: str) -> Optional[str]:
    if a not in groups or b not in groups:
        return None
    ta = [c["final"]["val_top1"] for c in groups[a]]
    tb = [c["final"]["val_top1"] for c in groups[b]]
    gap = statistics.fmean(ta) - statistics.fmean(tb)
    noise = two_standard_errors(ta, tb)
    noise_text = f"2 SE ±{noise:.2f}" if noise is not None else "one seed"
    return (f"- {text}: {a} − {b} = {gap:+.2f} points here ({noise_text}), {paper_gap:+.2f} in the "
            f"paper — {_verdict(gap, noise, paper_gap)}.")


def _table1_claims(groups) -> List[str]:
    p = PAPER_TABLE1
    claims = [
        _claim(groups, "CMHSA-5 (ours)", "CMHSA (2nd phase)", p["CMHSA-5 (ours)"][0] - p["CMHSA (2nd phase)"][0],
               "Conv initialisation beats training the attention model from scratch"),
        _claim(groups, "CMHSA-5 (ours)", "DeiT-base", p["CMHSA-5 (ours)"][0] - p["DeiT-base"][0],
               "Two-phase CMHSA beats DeiT in the low-data regime"),
        _claim(groups, "CMHSA-5 (ours)", "CMHSA-5 (1st phase)",
               p["CMHSA-5 (ours)"][0] - p["CMHSA-5 (1st phase)"][0], "The second phase adds to the first"),
        _claim(groups, "CMHSA-3 (ours)", "CMHSA-3 (1st phase)",
               p["CMHSA-3 (ours)"][0] - p["CMHSA-3 (1st phase)"][0], "The second phase adds to the first (K = 3)"),
        _claim(groups, "DeiT-base", "ViT", p["DeiT-base"][0] - p["ViT"][0], "DeiT's recipe beats plain ViT"),
    ]
    return [c for c in claims if c]


# --- warmup (Figure 2) ---------------------------------------------------------------------------------------------

def _warmup_claims(cells: List[dict], noise: Optional[float]) -> List[str]:
    """Paper §4.3 / Fig. 2: conv init starts ahead, needs no warm-up; random init needs it."""
    by = {c["cell"]: c for c in cells}
    noise_text = f"noise ±{noise:.2f}" if noise is not None else "no noise estimate"
    claims = []
    if {"conv_nowarmup", "random_nowarmup"} <= set(by):
        a, b = (_curve(by[k], "val_top1")[1][0] for k in ("conv_nowarmup", "random_nowarmup"))
        claims.append(f"- Conv initialisation starts the attention phase ahead (top-1 after its first epoch, no "
                      f"warm-up): {a:.2f} vs {b:.2f} from random init, {a - b:+.2f} points ({noise_text}) — "
                      f"{_verdict(a - b, noise, +1)}.")
    for init, key, claim, at_least in (("conv", "Convolutional", "needs no warm-up", True),
                                       ("random", "Random", "benefits from warm-up", False)):
        if {f"{init}_warmup", f"{init}_nowarmup"} <= set(by):
            w, wo = (by[f"{init}_{k}"]["final"]["val_top1"] for k in ("warmup", "nowarmup"))
            gap = wo - w if at_least else w - wo
            claims.append(f"- {key} init {claim}: final top-1 {wo:.2f} without vs {w:.2f} with warm-up, "
                          f"{'without − with' if at_least else 'with − without'} = {gap:+.2f} points ({noise_text}) "
                          f"— {_verdict(gap, noise, +1, at_least)}.")
    return claims


def _warmup(grid: Path, noise: Optional[float] = None) -> Optional[str]:
    cells = read_cells(grid)
    if not cells:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4))
    rows = ["| attention phase | val loss after 1 / 3 / last epoch | final top-1 |", "| --- | ---: | ---: |"]
    for i, c in enumerate(sorted(cells, key=lambda c: c["label"])):
        epochs, loss = _curve(c)
        top1 = _curve(c, "val_top1")[1]
        style = "-" if "Convolutional" in c["label"] else "--"
        ax.plot(epochs, loss, style, marker="o", ms=3, color=f"C{i}", label=c["label"])
        at = dict(zip(epochs, loss))
        picks = " / ".join(f"{at[e]:.3f}" if e in at else "—" for e in (1, min(3, epochs[-1]), epochs[-1]))
        rows.append(f"| {c['label']} | {picks} | {top1[-1]:.2f} |")
    ax.set(xlabel="epoch of the attention phase", ylabel="validation loss",
           title="Attention phase: conv vs random initialisation (cf. paper Fig. 2)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(grid / "warmup.png", dpi=120)
    plt.close(fig)
    return "\n".join([f"![warm-up]({grid.name}/warmup.png)", "", *rows, "", *_warmup_claims(cells, noise)])


# --- efficiency -------------------------------------------------------------------------------------------------

def _efficiency_claims(curves: Dict[str, Dict[int, List[float]]], noise: Optional[float]) -> List[str]:
    """The paper's low-data claim, size by size: two-phase CMHSA vs DeiT, and whether the gap closes with data."""
    ours, deit = curves.get("CMHSA-5 (two-phase)"), curves.get("DeiT-base")
    if not ours or not deit:
        return []
    sizes = sorted(set(ours) & set(deit))
    gaps = {n: statistics.fmean(ours[n]) - statistics.fmean(deit[n]) for n in sizes}
    noise_text = f"noise ±{noise:.2f}" if noise is not None else "no noise estimate"
    smallest = sizes[0]
    lines = [f"- Two-phase CMHSA-5 beats DeiT-base with little data: {gaps[smallest]:+.2f} points at {smallest} "
             f"images ({noise_text}); by training-set size: "
             + ", ".join(f"{n}: {g:+.2f} ({_judge(g, noise, +1)})" for n, g in gaps.items())
             + f" — {_verdict(gaps[smallest], noise, +1)}."]
    if len(sizes) > 1:
        first, last = gaps[sizes[0]], gaps[sizes[-1]]
        trend = "narrows" if first - last > (noise or 0) else "widens" if last - first > (noise or 0) else \
            "stays about the same"
        lines.append(f"- The gap {trend} from {first:+.2f} at {sizes[0]} images to {last:+.2f} at {sizes[-1]}: the "
                     f"paper argues the convolutional start matters most when data is scarce.")
    return lines


def _efficiency(grid: Path, noise: Optional[float] = None) -> Optional[str]:
    cells = read_cells(grid)
    if not cells:
        return None
    curves: Dict[str, Dict[int, List[float]]] = defaultdict(lambda: defaultdict(list))
    for c in cells:
        curves[c["label"]][c["config"]["data"]["train_subset"]].append(c["final"]["val_top1"])
    fig, ax = plt.subplots(figsize=(6.5, 4))
    sizes = sorted({n for pts in curves.values() for n in pts})
    rows = ["| model | " + " | ".join(str(n) for n in sizes) + " |", "| --- |" + " ---: |" * len(sizes)]
    csv_rows = []
    for i, (label, pts) in enumerate(sorted(curves.items())):
        xs = sorted(pts)
        ax.plot(xs, [statistics.fmean(pts[n]) for n in xs], "-o", color=f"C{i}", label=label)
        rows.append(f"| {label} | " + " | ".join(_fmt(pts[n]) if n in pts else "—" for n in sizes) + " |")
        csv_rows += [{"model": label, "train_size": n, "top1_mean": statistics.fmean(pts[n]), "seeds": len(pts[n])}
                     for n in xs]
    ax.set(xscale="log", xlabel="training images (Fashion-MNIST, stratified)", ylabel="val top-1 (%)",
           title="Data efficiency")
    ax.set_xticks(sizes, [str(n) for n in sizes], minor=False)
    ax.set_xticks([], minor=True)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(grid / "efficiency.png", dpi=120)
    plt.close(fig)
    _write_csv(grid / "summary.csv", csv_rows)
    return "\n".join([f"![efficiency]({grid.name}/efficiency.png)", "", *rows, "",
                      *_efficiency_claims(curves, noise)])


# --- ablations ----------------------------------------------------------------------------------------------------

def _ablation_analysis(results: Path, cell: str) -> Optional[dict]:
    """``cmhsa analyze`` output for an ablation run, if it was analysed into results/analysis/ablations-<cell>."""
    path = results / "analysis" / f"ablations-{cell}" / "analysis.json"
    return json.loads(path.read_text()) if path.exists() else None


# (cell, cell it is measured against, what the difference isolates)
ABLATION_PAIRS = [
    ("beta10", "beta60", "A softer bias than the exact conversion"),
    ("beta10", "beta10_qk0", "W_Q, W_K started small rather than at the stationary point 0 (the paper's construction)"),
    ("beta60", "beta60_nonull", "The null key (exact at the border) rather than the paper's construction"),
]


def _ablation_pairs(cells: List[dict], noise: Optional[float]) -> List[str]:
    by = {c["cell"]: c for c in cells}
    noise_text = f"noise ±{noise:.2f}" if noise is not None else "no noise estimate"
    lines = []
    for a, b, text in ABLATION_PAIRS:
        if a in by and b in by:
            gap = by[a]["final"]["val_top1"] - by[b]["final"]["val_top1"]
            judged = "no noise estimate" if noise is None else "beyond the noise" if abs(gap) > noise else \
                "within the noise"
            lines.append(f"- {text}: {by[a]['label']} − {by[b]['label']} = {gap:+.2f} points final top-1 "
                         f"({noise_text}) — {judged}.")
    return lines


def _ablations(grid: Path, noise: Optional[float] = None) -> Optional[str]:
    cells = read_cells(grid)
    if not cells:
        return None
    cells = sorted(cells, key=lambda c: (c["config"]["convert"]["bias_strength"], c["label"]))
    rows = ["| setting | logits error f64 | logits error f32 | top-1 before → right after conversion | "
            "final top-1 | final val loss | after phase 2: mass on conv offsets | positional logit share | "
            "distance from a conv |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    csv_rows = []
    fig, (ax_top1, ax_mass, ax_conv) = plt.subplots(1, 3, figsize=(15, 4))
    for i, c in enumerate(cells):
        t = c["transfer"]
        before, after = t["val_before_conversion"]["val_top1"], t["val_after_conversion"]["top1"]
        rc = (_ablation_analysis(grid.parent, c["cell"]) or {}).get("remaining_convolution_over_checkpoints")
        end = rc[-1] if rc else None
        rows.append(f"| {c['label']} | {t['float64']['logits_error']:.1e} | {t['float32']['logits_error']:.1e} | "
                    f"{before:.2f} → {after:.2f} | {c['final']['val_top1']:.2f} | {c['final']['val_loss']:.3f} | "
                    + (f"{end['offset_mass']:.3f} | {end['positional_share']:.3f} | "
                       f"{end['conv_projection_error']:.3f} |" if end else "— | — | — |"))
        csv_rows.append({"setting": c["label"], "bias_strength": t["bias_strength"], "null_key": t["null_key"],
                         "qk_std": t.get("qk_std", 0.0), "logits_error_f64": t["float64"]["logits_error"],
                         "top1_before": before, "top1_after_conversion": after, "final_top1": c["final"]["val_top1"],
                         "offset_mass": end["offset_mass"] if end else "",
                         "positional_share": end["positional_share"] if end else "",
                         "conv_projection_error": end["conv_projection_error"] if end else ""})
        # epoch 0 = right after conversion, then every phase-2 epoch
        epochs, top1 = _curve(c, "val_top1")
        ax_top1.plot([0, *epochs], [after, *top1], "-o", ms=3, color=f"C{i}", label=c["label"])
        if rc:
            epochs = [r["epoch"] for r in rc]
            ax_mass.plot(epochs, [r["offset_mass"] for r in rc], "-o", ms=3, color=f"C{i}", label=c["label"])
            ax_conv.plot(epochs, [r["conv_projection_error"] for r in rc], "-o", ms=3, color=f"C{i}",
                         label=c["label"])
    ax_top1.set(xlabel="phase-2 epoch (0 = right after conversion)", ylabel="val top-1 (%)", title="Accuracy")
    ax_mass.set(xlabel="phase-2 epoch", ylabel="attention mass on the conv offsets", ylim=(0, 1.02),
                title="Does attention leave the conv pattern?")
    ax_conv.set(xlabel="phase-2 epoch", ylabel="relative distance from the best KxK conv", ylim=(0, 1.02),
                title="How far each layer is from a convolution")
    for ax in (ax_top1, ax_mass, ax_conv):
        ax.grid(alpha=0.3)
    ax_top1.legend(fontsize=7)  # one colour per setting in every panel
    fig.tight_layout()
    fig.savefig(grid / "ablations.png", dpi=120)
    plt.close(fig)
    _write_csv(grid / "summary.csv", csv_rows)
    best = max(csv_rows, key=lambda r: r["final_top1"])
    exact = [r["setting"] for r in csv_rows if r["logits_error_f64"] < 1e-6]
    summary = (f"Best final top-1: {best['setting']} ({best['final_top1']:.2f}). Exact conversions (float64 logits "
               f"error < 1e-6): {', '.join(exact) or 'none'}; the others start phase 2 from a perturbed network.")
    analysed = any(r["offset_mass"] != "" for r in csv_rows)
    note = ("The last three columns and the middle/right panels come from `cmhsa analyze` on each run's phase-2 "
            "checkpoints (one per epoch; 256 validation images); each run's full analysis is in "
            "`results/analysis/ablations-<cell>/`." if analysed else
            "Run `cmhsa analyze runs/experiments/ablations/full/<cell>/seed0 --out results/analysis/ablations-<cell>` "
            "to add what phase 2 learns per setting.")
    return "\n".join([f"![ablations]({grid.name}/ablations.png)", "", *rows, "", summary, "",
                      *_ablation_pairs(cells, noise), "", note])


# --- analysis -----------------------------------------------------------------------------------------------------

def _forms(grid: Path) -> Optional[str]:
    """Paper form vs factorized form of the attention phase: the same two-phase run, only ``convert.form`` differs."""
    groups = _by_label(read_cells(grid))
    if not groups:
        return None
    rows = ["| attention phase | test top-1 (mean ± SE, seeds) | phase-2 s/epoch | params |",
            "| --- | ---: | ---: | ---: |"]
    test = {}
    for label, cells in groups.items():
        test[label] = [c["test"]["top1"] for c in cells]
        seconds = statistics.fmean(m["epoch_seconds"] for c in cells for m in c["phases"]["phase2"])
        rows.append(f"| {label} | {_se_text(test[label])} | {seconds:.1f} | {cells[0]['params'] / 1e6:.2f}M |")
    lines = [*rows, ""]
    paper, factorized = (next((lab for lab in test if key in lab), None) for key in ("paper form", "factorized form"))
    if paper and factorized:
        gap = statistics.fmean(test[factorized]) - statistics.fmean(test[paper])
        noise = two_standard_errors(test[factorized], test[paper])
        if noise is None:
            lines.append(f"- Factorized − paper form: {gap:+.2f} points (one seed so far).")
        else:
            within = abs(gap) <= noise
            lines.append(f"- Factorized − paper form: {gap:+.2f} points on the full test set (2 SE ±{noise:.2f}): "
                         + ("within the noise, so the cheaper form gives the same accuracy." if within else
                            "beyond the noise."))
    return "\n".join(lines)


SHIFT_VARIANTS = {"baseline": "CMHSA-5, zero padding, fixed patch grid",
                  "aps_circular": "CMHSA-5, polyphase-anchored patches + circular padding",
                  "local": "CMHSA-5, local attention form",
                  "deit_base": "DeiT-base"}


def _shift(results: Path) -> Optional[str]:
    """``benchmarks/shift_experiment.py``: top-1 and shift consistency per variant and phase, mean ± std over seeds."""
    records = [json.loads(p.read_text()) for p in sorted((results / "shift").glob("*_s*.json"))]
    if not records:
        return None
    budget = records[0]["budget"]
    rows = ["| variant | phase | seeds | top-1 | circular, 1 px | circular, 4 px | zero-fill, 1 px | zero-fill, 4 px |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for variant, label in SHIFT_VARIANTS.items():
        mine = [r for r in records if r["variant"] == variant]
        for phase in ("phase1", "phase2", "phase1_at_56px", "phase2_at_56px"):
            runs = [r[phase] for r in mine if phase in r]
            if not runs or (variant == "local" and phase == "phase1"):
                continue
            # at 56 px the image is twice as large: 2 and 8 px are the 1 and 4 px shifts of the 28 px image
            small, large = ("2", "8") if phase.endswith("56px") else ("1", "4")
            cols = [_fmt([r[k][s] for r in runs], 3) for k in ("shift_circular", "shift_zero") for s in (small, large)]
            rows.append(f"| {label} | {phase.replace('_at_56px', ' at 56 px')} | {len(runs)} | "
                        f"{_fmt([r['top1'] for r in runs])} | " + " | ".join(cols) + " |")
    return "\n".join([
        f"`python benchmarks/shift_experiment.py`: {budget['train_subset']} training images, "
        f"{budget['phase1_epochs']} + {budget['phase2_epochs']} epochs (DeiT-base: their sum), scored on "
        f"{records[0]['phase2']['images']} fixed validation images; mean ± std over seeds. Shift consistency is the "
        "fraction of images whose predicted class a diagonal shift leaves unchanged. DeiT-base has one model, listed "
        "as its phase 2. The local form's phase 1 is the baseline's conv phase; at 56 px (upsampled images, a 14x14 "
        "grid) both of its phases run with the weights trained at 28 px, and shifts of 2 and 8 px are the 28 px "
        "image's 1 and 4 px.", "",
        *rows, *_local_attention_bench(results)])


def _local_attention_bench(results: Path) -> List[str]:
    """``benchmarks/local_attention.py --json``: local against global attention, cost per image at each size."""
    path = results / "shift" / "local_attention_bench.json"
    if not path.exists():
        return []
    bench = json.loads(path.read_text())
    rows = ["| model | image | grid | train img/s | inference img/s | activations (MB/img) | attention GFLOP/img |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    by = {(r["label"], r["img_size"]): r for r in bench["rows"]}
    for r in bench["rows"]:
        rows.append(f"| {r['label']} | {r['img_size']} px | {r['grid'][0]}x{r['grid'][1]} | {r['train_img_s']:.3g} | "
                    f"{r['infer_img_s']:.3g} | {r['saved_mb_per_img']:.3g} | {r['attn_gflop_per_img']:.3g} |")
    ratios = [f"{size} px: train img/s x{by['local attention', size]['train_img_s'] / g['train_img_s']:.2f}, "
              f"activations x{by['local attention', size]['saved_mb_per_img'] / g['saved_mb_per_img']:.2f}"
              for (label, size), g in by.items() if label == "global attention" and ("local attention", size) in by]
    hw = bench.get("hardware", {})
    return ["", f"Cost, local against global attention (`python benchmarks/local_attention.py`, {hw.get('cpu', '?')}, "
            f"{bench.get('threads', '?')} thread(s), commit {str(bench.get('code', {}).get('commit'))[:7]}); local "
            "over global: " + "; ".join(ratios) + ". The local form's cost grows with the image, the global form's "
            "with its square.", "", *rows]


def _analysis(results: Path) -> Optional[str]:
    """One table across the analysed models, two overview figures, and each model's own figures."""
    # the ablation runs are summarised in their own section
    runs = {p.parent.name: json.loads(p.read_text()) for p in sorted(results.glob("analysis/*/analysis.json"))
            if not p.parent.name.startswith("ablations-")}
    if not runs:
        return None
    rows = ["| model | top-1 (sample) | attention distance, first → last layer (patches) | shift consistency, "
            "circular 1 px / P px | zero-fill 1 px | attention mass on conv offset | positional logit share | "
            "distance from a conv |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    fig, (ax_d, ax_s) = plt.subplots(1, 2, figsize=(12, 4))
    for i, (name, a) in enumerate(runs.items()):
        dist = a.get("attention_distance", {}).get("mean")
        circ, zero = a["shift_consistency"]["circular"], a["shift_consistency"]["zero"]
        shifts = sorted(circ, key=int)
        rc = a.get("remaining_convolution")
        rows.append(" | ".join([
            f"| {name}", f"{a['top1']:.1f}", f"{dist[0]:.2f} → {dist[-1]:.2f}" if dist else "— (no attention)",
            f"{circ[shifts[0]]:.2f} / {circ[shifts[-1]]:.2f}", f"{zero[shifts[0]]:.2f}",
            f"{rc['offset_mass']:.3f}" if rc else "—", f"{rc['positional_share']:.3f}" if rc else "—",
            f"{rc['conv_projection_error']:.3f}" if rc else "—"]) + " |")
        if dist:
            ax_d.plot(range(len(dist)), dist, "-o", ms=3, color=f"C{i}", label=name)
        ax_s.plot([int(k) for k in shifts], [circ[k] for k in shifts], "-o", color=f"C{i}", label=f"{name}")
        ax_s.plot([int(k) for k in shifts], [zero[k] for k in shifts], ":", color=f"C{i}")
    ax_d.set(xlabel="layer", ylabel="mean attention distance (patches)", title="Attention distance")
    ax_s.set(xlabel="shift (pixels)", ylabel="prediction unchanged", ylim=(0, 1.02),
             title="Shift consistency (solid: circular, dotted: zero-fill)")
    for ax in (ax_d, ax_s):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(results / "analysis" / "overview.png", dpi=120)
    plt.close(fig)
    parts = [*rows, "", "![analysis overview](analysis/overview.png)", ""]
    for name, a in runs.items():
        pngs = [Path(f) for f in a.get("files", []) if f.endswith(".png")]
        if pngs:
            parts.append(f"**{name}**: " + " ".join(f"![{p.stem}](analysis/{name}/{p.name})" for p in pngs))
            parts.append("")
    return "\n".join(parts)


def _hardware(grids: Dict[str, Path]) -> str:
    """Each machine and software setup the cells ran on, with the grids that used it (a result is read against the
    torch version that produced it)."""
    used: Dict[str, set] = {}
    for name, grid in grids.items():
        for c in read_cells(grid):
            hw = c.get("hardware", {})
            threads = hw.get("threads", "?")
            setup = (f"{hw.get('cpu', '?')}, {threads} thread{'' if threads == 1 else 's'}, torch {hw.get('torch', '?')}"
                     + (f", GPU {hw['cuda']}" if hw.get("cuda") else ""))
            used.setdefault(setup, set()).add(name)
    return "; ".join(f"{setup} ({', '.join(sorted(names))})" for setup, names in sorted(used.items())) or "unknown"


def _progress(grid: Path, config: Path) -> str:
    """How much of a grid has run: finished cells out of all, and their training time."""
    cells = read_cells(grid)
    total = "?"
    if config.exists():
        spec = load_experiment(config)
        total = len(spec["cells"]) * len(spec.get("seeds", [0]))
    minutes = sum(c["train_seconds"] for c in cells) / 60
    return f"Progress: {len(cells)} of {total} cells finished ({minutes:.0f} min of training)."


def _setup(configs: Path) -> str:
    """The header comments of the grid configs: the choices and the reasons, kept beside the settings."""
    parts = []
    for grid in COMMANDS:
        path = configs / f"{grid}.yaml"
        if path.exists():
            lines = [line[2:] for line in path.read_text().splitlines() if line.startswith("# ")]
            parts.append(f"- **{grid}** (`{path.as_posix()}`): " + " ".join(lines))
    return "\n".join(parts)


TARGET_VERDICTS = ("target met", "target **not met**", "target met at some sizes only")
# the sections' figures (by alt text) that the report opens with
LEAD_FIGURES = ("each row against the conv phase alone", "phase 2's gain against grid size")


def _at_a_glance(sections: List[Tuple[str, Optional[str], Optional[str]]]) -> List[str]:
    """Every verdict on a paper claim and every target of ours, gathered from the sections (converged protocol
    first) into one list at the top."""
    claims = ("agrees", "disagrees", "inconclusive")
    verdicts = [(title, line) for title, _, body in sections for line in (body or "").splitlines()
                if line.startswith("- ") and (any(f"**{v}**" in line for v in claims)
                                              or any(f"— {t}" in line for t in TARGET_VERDICTS))]
    if not verdicts:
        return []
    counts = {v: sum(f"**{v}**" in line for _, line in verdicts) for v in claims}
    targets = [line for _, line in verdicts if any(f"— {t}" in line for t in TARGET_VERDICTS)]
    met = sum("— target met." in line for line in targets)
    figures = [line for _, _, body in sections for line in (body or "").splitlines()
               if line.startswith("![") and line[2:].split("]")[0] in LEAD_FIGURES]
    return ["## At a glance", "",
            f"{counts['agrees']} of the paper's claims agree with our measurements, {counts['disagrees']} disagree, "
            f"{counts['inconclusive']} are inconclusive (gap within the noise)"
            + (f"; {met} of our {len(targets)} judged targets {'is' if met == 1 else 'are'} met" if targets else "")
            + ". Each is explained in its section.", "", *([" ".join(figures), ""] if figures else []),
            "| section | claim | measured | verdict |", "| --- | --- | --- | --- |",
            *(f"| {_short_title(title)} | " + " | ".join(_claim_parts(line[2:])) + " |" for title, line in verdicts),
            ""]


def _claim_parts(line: str) -> Tuple[str, str, str]:
    """A verdict line "claim (notes: ...): measurement — verdict." split into its three parts: the claim ends at the
    first colon outside parentheses, the verdict follows the last dash."""
    depth = 0
    for i, char in enumerate(line):
        depth += (char == "(") - (char == ")")
        if char == ":" and depth == 0:
            claim, rest = line[:i], line[i + 1:].strip()
            break
    else:
        claim, rest = "", line
    measured, _, verdict = rest.rpartition(" — ")
    return claim, measured, verdict.rstrip(".")


def _short_title(title: str) -> str:
    """A section title up to its first colon or parenthesis: "Table 1 (short budget: ...)" -> "Table 1 (short budget)"."""
    head = title.split(":")[0]
    return head + ")" if head.count("(") > head.count(")") else head


def write_report(results: str | Path = "results", budget: str = "full",
                 configs: str | Path = "configs/experiments") -> Path:
    """Write ``results/REPORT.md`` (and the figures and summary CSVs) from what ``results/`` holds."""
    results = Path(results)
    if not results.exists():
        raise FileNotFoundError(f"{results} does not exist; run `cmhsa experiment <name>` first")
    grids = {name: grid_dir(results, name, budget) for name in COMMANDS}
    noise = _seed_noise(grids["table1"])
    sections = [
        ("Converged protocol: every row trained until it stops improving", "converged",
         _converged(grids["converged"], grid_dir(results, "converged_budget", budget),
                    Path(configs) / "converged.yaml")),
        ("Grid size: phase 2's gain when the conv phase sees less of the image", "converged_geometry",
         _geometry(grids["converged"], grids["converged_geometry"])),
        ("Table 1 (short budget: 20 epochs, about 300 steps)", "table1", _table1(grids["table1"])),
        ("Figure 2: warm-up (short budget)", "warmup", _warmup(grids["warmup"], noise)),
        ("Data efficiency (short budget)", "efficiency", _efficiency(grids["efficiency"], noise)),
        ("Ablations (short budget): bias strength, null key, W_Q = W_K = 0", "ablations", _ablations(grids["ablations"], noise)),
        ("Attention forms: the paper's layer against the factorized layer (short budget)", "forms",
         _forms(grids["forms"])),
        ("Analysis: what the attention does after conversion", "cmhsa analyze <run> --out results/analysis/<name>",
         _analysis(results)),
        ("Analysis: shift equivariance and local attention (short budget)",
         "python benchmarks/shift_experiment.py --seeds 0 1 2", _shift(results)),
    ]
    out = ["# cmhsa: results", "",
           "Li et al., *Can Vision Transformers Perform Convolution?* (2021), measured on data this machine has: "
           "Fashion-MNIST low-data subsets on a 2-core CPU, beside the paper's CIFAR-100 numbers. Every number "
           "below is read from `results/*/cells/*.json`; regenerate with `cmhsa report results`.", "",
           f"Hardware (grids): {_hardware(grids)}.", "", *_at_a_glance(sections),
           "## Setup", "", _setup(Path(configs)), ""]
    for title, source, body in sections:  # source: a grid's name, or the command that writes the section's data
        out += [f"## {title}", ""]
        if body is None:
            out += [f"Not run yet: `{COMMANDS.get(source, source)}`.", ""]
            continue
        out += [body, ""]
        if source in COMMANDS:
            out += [_progress(grids[source], Path(configs) / f"{source}.yaml"), "",
                    f"Reproduce: `{COMMANDS[source]}` (resumable; results in `{grids[source].as_posix()}/cells/`).", ""]
    path = results / "REPORT.md"
    path.write_text("\n".join(out))
    return path
