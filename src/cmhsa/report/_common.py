"""What every section of the report shares: the paper's Table 1, where grids live, formatting, and judging a gap
against seed noise."""
from __future__ import annotations

import csv
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ..experiments import read_cells

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


def _se_text(values: List[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.2f} (1)"
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values) / len(values) ** 0.5:.2f} ({len(values)})"


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


