"""The analysis sections: what the attention does after conversion (`cmhsa analyze`), and shift equivariance
with local attention (`benchmarks/shift_experiment.py`)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import matplotlib.pyplot as plt

from ._common import _fmt

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


