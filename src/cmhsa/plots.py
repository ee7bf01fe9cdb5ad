"""Training curves: loss and accuracy of consecutive phases on one epoch axis."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["read_metrics", "plot_curves"]


def read_metrics(path: str | Path) -> List[Dict]:
    """The JSON lines of a metrics file (empty if it does not exist yet)."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(phases: Dict[str, List[Dict]], out_png: str | Path, title: Optional[str] = None) -> Path:
    """Train/val loss and val top-1 of each phase, later phases continuing the epoch axis; a dotted line marks
    each phase change."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    start = 0
    for i, (name, lines) in enumerate(phases.items()):
        if not lines:
            continue
        epochs = [start + m["epoch"] + 1 for m in lines]
        evaluated = [(e, m) for e, m in zip(epochs, lines) if "val_top1" in m]  # eval_every may skip epochs
        color = f"C{i}"
        ax_loss.plot(epochs, [m["train_loss"] for m in lines], "--", color=color, label=f"{name} train")
        ax_loss.plot([e for e, _ in evaluated], [m["val_loss"] for _, m in evaluated], "-", color=color,
                     label=f"{name} val")
        ax_acc.plot([e for e, _ in evaluated], [m["val_top1"] for _, m in evaluated], "-o", ms=3, color=color,
                    label=f"{name} val top-1")
        if start:
            for ax in (ax_loss, ax_acc):
                ax.axvline(start + 0.5, color="grey", ls=":", lw=1)
        start = epochs[-1]
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="top-1 (%)", title="validation accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png
