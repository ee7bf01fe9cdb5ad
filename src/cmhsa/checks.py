"""Argument checks shared by the public functions: each returns the value or raises a ``ValueError`` that names
the argument, what is allowed and what was given."""
from __future__ import annotations

import math
import numbers
from typing import Optional

__all__ = ["check_bool", "check_int", "check_real"]


def check_bool(value, name: str) -> bool:
    # a string such as "false" would be truthy: refuse anything but a real bool
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def check_real(value, name: str, minimum: Optional[float] = None, below: Optional[float] = None) -> float:
    """A finite number with ``minimum <= value < below`` (either bound optional)."""
    if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
            or (minimum is not None and value < minimum) or (below is not None and value >= below)):
        bounds = [f" >= {minimum:g}"] if minimum is not None else []
        bounds += [f" < {below:g}"] if below is not None else []
        raise ValueError(f"{name} must be a finite number{' and'.join(bounds)}, got {value!r}")
    return float(value)
