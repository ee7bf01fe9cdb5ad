"""``cmhsa report results/``: REPORT.md from the committed experiment results, with the paper's numbers beside ours.

Reads ``results/<grid>/cells/*.json`` (written by :mod:`cmhsa.experiments`) and ``results/analysis/*/analysis.json``
(written by ``cmhsa analyze``), writes ``results/<grid>/summary.csv``, the figures, and ``results/REPORT.md``.
Every number in the report comes from those files; nothing is typed in by hand except the paper's Table 1.
One module per part of the report: :mod:`.converged` (the converged protocol and grid size), :mod:`.short_budget`
(Table 1, warm-up, data efficiency, ablations, forms), :mod:`.analysis`; this one assembles them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Tuple

import matplotlib

matplotlib.use("Agg")  # files only, before any submodule imports pyplot

from ..experiments import load_experiment, read_cells  # noqa: E402
from ..layout import BUDGETS, grid_dir  # noqa: E402
from ._common import COMMANDS, PAPER_TABLE1, _seed_noise, two_standard_errors  # noqa: E402
from .analysis import _analysis, _shift  # noqa: E402
from .converged import _converged, _geometry, plateau_gain  # noqa: E402
from .short_budget import _ablations, _efficiency, _forms, _table1, _warmup  # noqa: E402

__all__ = ["PAPER_TABLE1", "grid_dir", "plateau_gain", "two_standard_errors", "write_report"]


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


def _nothing_to_report(results: Path, budget: str) -> str:
    """Why a results root gives an empty report, and the fix: usually another budget's grids (a quick run) or the
    wrong directory."""
    others = [b for b in BUDGETS if b != budget and any((grid_dir(results, g, b) / "cells").is_dir() for g in COMMANDS)]
    hint = (f"it holds {' and '.join(others)}-budget grids: add --budget {others[0]}" if others else
            "pass the results root the grids wrote to (cmhsa experiment --results), or run `cmhsa experiment <name>` "
            "first")
    return (f"{results} holds no results to report for the {budget} budget (no {grid_dir(results, '<grid>', budget)}"
            f"/cells/*.json, no analysis/): {hint}")


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
    if all(body is None for _, _, body in sections):
        raise FileNotFoundError(_nothing_to_report(results, budget))
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
