"""Argument checks shared by the public constructors: one rule and one message each
("`name` must be <rule>, got <value>.")."""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np


def positive_int(name: str, value: Any, minimum: int = 1, allow_none: bool = False) -> int | None:
    """`value` as an int if it is an integer (not a bool) >= `minimum`, else ValueError."""
    if value is None and allow_none:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) \
            or value < minimum:
        also = " or None" if allow_none else ""
        raise ValueError(f"`{name}` must be an integer >= {minimum}{also}, got {value!r}.")
    return int(value)


def finite_number(name: str, value: Any, minimum: float = 0.0, strict: bool = True) -> float:
    """`value` as a float if it is a finite real number (not a bool) above `minimum` (or at
    least `minimum` when not `strict`), else ValueError."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) and \
        math.isfinite(value) and (value > minimum if strict else value >= minimum)
    if not ok:
        rule = ">" if strict else ">="
        raise ValueError(f"`{name}` must be a finite number {rule} {minimum:g}, got {value!r}.")
    return float(value)
