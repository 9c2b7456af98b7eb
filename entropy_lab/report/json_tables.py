"""Report tables as plain JSON-ready data (``entropy-lab trace --format json``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from entropy_lab.formatting import finite_float


def json_value(value: Any) -> Any:
    """A JSON-safe scalar: numpy types to Python, NaN/inf/NA to None, timestamps to ISO text."""
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, np.bool_ | bool):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return finite_float(value)
    if isinstance(value, pd.Timestamp):
        return value.isoformat()
    return value


def frame_records(frame: pd.DataFrame) -> list[dict]:
    """``frame.to_dict("records")`` with every value made JSON-safe (NaN -> None)."""
    return [{str(k): json_value(v) for k, v in row.items()} for row in frame.to_dict("records")]


def report_json(tables: Mapping[str, pd.DataFrame]) -> dict:
    """The tables as plain JSON-ready data: name -> list of row dicts (records orientation, NaN -> None)."""
    return {name: frame_records(frame) for name, frame in tables.items()}
