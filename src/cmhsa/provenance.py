"""Which code produced a result: recorded in every result JSON, so a number can be traced to its commit."""
from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any, Dict

__all__ = ["git_state"]


def git_state() -> Dict[str, Any]:
    """The commit of the code that ran, and whether its tree had uncommitted changes (None outside a checkout)."""
    root = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}
