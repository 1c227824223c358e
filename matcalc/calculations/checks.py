"""Parameter checks: each raises ``ValueError`` naming the parameter and the allowed range."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


def positive(name: str, value: Any) -> float:
    v = _number(name, value)
    if not v > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return v


def non_negative(name: str, value: Any) -> float:
    v = _number(name, value)
    if v < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return v


def in_range(name: str, value: Any, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> float:
    v = _number(name, value)
    too_low = v <= lo if lo_open else v < lo
    too_high = v >= hi if hi_open else v > hi
    if too_low or too_high:
        lb = "(" if lo_open else "["
        rb = ")" if hi_open else "]"
        raise ValueError(f"{name} must be in {lb}{lo}, {hi}{rb}, got {value!r}")
    return v


def integer(name: str, value: Any, *, minimum: int = 0, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int,)) and not (
        isinstance(value, float) and value.is_integer()
    ):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    v = int(value)
    if v < minimum or (maximum is not None and v > maximum):
        upper = f" and <= {maximum}" if maximum is not None else ""
        raise ValueError(f"{name} must be an integer >= {minimum}{upper}, got {value!r}")
    return v


def choice(name: str, value: Any, options: Iterable[str]) -> str:
    opts = list(options)
    key = str(value)
    lookup = {o.lower(): o for o in opts}
    if key.lower() not in lookup:
        raise ValueError(f"{name} must be one of {', '.join(opts)}, got {value!r}")
    return lookup[key.lower()]


def _number(name: str, value: Any) -> float:
    if isinstance(value, (bool, str, bytes)):  # "1" is text, not a number (float() would take it)
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return v
