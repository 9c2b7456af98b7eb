"""Numbers for people and for JSON: the one number formatter and the finite-value helpers.

Reports, figures and the CLI all format and filter numbers through here, so a NaN reads
the same way everywhere and "finite" means the same thing everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd

DIGITS = 3
"""Significant digits of the numbers in report tables and prose."""


def format_number(value: Any, digits: int = DIGITS, missing: str = "n/a") -> str:
    """A table cell: ints as is, floats to ``digits`` significant digits, NaN/None as ``missing``.

    Strings pass through; booleans print as True/False; anything else numeric is read as a float.
    """
    if value is None:
        return missing
    if isinstance(value, str):
        return value
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        value = float(value)
        if math.isnan(value):
            return missing
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.{digits}g}"
    return str(value)


def finite_values(values: Iterable[Any] | np.ndarray | pd.Series) -> np.ndarray:
    """Values as a float64 array with NaN, infinities and non-numeric entries removed."""
    array = pd.to_numeric(pd.Series(values), errors="coerce").to_numpy(dtype=float, na_value=np.nan)
    return array[np.isfinite(array)]


def finite_float(value: Any) -> float | None:
    """``value`` as a Python float when it is a finite number, else None (for JSON: NaN is not JSON)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
