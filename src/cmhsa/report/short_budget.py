"""The short-budget sections (20 epochs, about 300 steps): Table 1, Figure 2's warm-up, data efficiency, the
ablations and the attention forms."""
from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional

import matplotlib.pyplot as plt

from ..experiments import read_cells
from ._common import (PAPER_TABLE1, _by_label, _curve, _fmt, _judge, _mean_std, _se_text, _verdict, _write_csv,
                      attention_form, row_precision, two_standard_errors)

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


