"""Where an experiment grid's results live, in one place (the run directory's own layout is ``rundir``).

::

    <results>/<grid>/cells/<cell>__seed<k>.json          the full budget
    <results>/<grid>-<budget>/cells/<cell>__seed<k>.json  any other budget (e.g. ``quick``)

Kept free of heavy imports: the command-line parser reads ``BUDGETS`` for every command.
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["BUDGETS", "grid_dir", "cell_record"]

BUDGETS = ("quick", "full")


def grid_dir(results: str | Path, name: str, budget: str = "full") -> Path:
    """Where grid ``name``'s results for ``budget`` live under the results root ``results``."""
    return Path(results) / (name if budget == "full" else f"{name}-{budget}")


def cell_record(grid: str | Path, cell: str, seed: int | str) -> Path:
    """The JSON record of ``cell``'s run with ``seed`` in the grid results directory ``grid``."""
    return Path(grid) / "cells" / f"{cell}__seed{seed}.json"
