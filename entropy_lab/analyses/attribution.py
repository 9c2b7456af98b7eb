"""Attribution tables: how the jvp prediction splits over parameter groups, from ``attr_<kind>:`` columns.

Input: trace records with ``attr_<kind>:<part>`` columns (``entropy_lab.trace.attribution``:
each part's additive contribution to ``omega_jvp`` per token, in nats) and the measured
``delta_entropy``. Output: one row per part (and run) with

- ``mean_abs_share``: the mean over tokens of |part_j| / sum_parts |part_j|, the part's
  share of the token's predicted movement (bounded, adds to 1 over the parts; a share
  part_j / omega_jvp_j itself is unbounded where the parts cancel);
- ``signed_share``: sum_j part_j / sum_j omega_jvp_j over the tokens, the part's share of
  the summed predicted change (adds to 1 over the parts; a negative value works against it);
- ``sum``: sum_j part_j (nats);
- ``pearson_measured``: Pearson of the part alone against the measured change, how much of
  the pattern the part explains by itself.

Deliberate simplifications: tokens with a non-finite part are dropped for every part (one
token set per run); the sum of the parts stands in for ``omega_jvp`` (they agree to
round-off, and the records may come without the jvp columns).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from entropy_lab.analyses.tightness import MEASURED, as_float, id_columns, iter_groups, pearson
from entropy_lab.records import attribution_columns

ATTRIBUTION_TABLE_COLUMNS = ["part", "n", "mean_abs_share", "signed_share", "sum", "pearson_measured"]


def has_attribution(records: pd.DataFrame, kind: str = "layer") -> bool:
    """Whether ``records`` hold ``attr_<kind>:`` columns."""
    return bool(attribution_columns(records.columns, kind))


def attribution_table(records: pd.DataFrame, kind: str = "layer") -> pd.DataFrame:
    """One row per part of the ``kind`` attribution (and run): see the module docstring.

    Args:
        records: trace records with ``attr_<kind>:<part>`` columns.
        kind: the attribution kind (``layer``).

    Returns:
        The run columns present (``method``, ``run``), then ``part``, ``n``, ``mean_abs_share``,
        ``signed_share``, ``sum``, ``pearson_measured``; empty without ``attr_<kind>:`` columns.
    """
    parts = attribution_columns(records.columns, kind)
    ids = id_columns(records)
    rows = []
    for run_values, run in iter_groups(records, ids):
        values = np.stack([as_float(run[c]) for c in parts.values()], axis=1) if parts else np.zeros((0, 0))
        keep = np.isfinite(values).all(axis=1) if parts else np.zeros(0, bool)  # (n,)
        values = values[keep]  # (n, P)
        measured = as_float(run[MEASURED])[keep] if MEASURED in run.columns else np.full(len(values), np.nan)
        total = values.sum(axis=1)  # (n,) = omega_jvp
        movement = np.abs(values).sum(axis=1, keepdims=True)  # (n, 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            abs_share = np.where(movement > 0, np.abs(values) / movement, np.nan)  # (n, P)
        summed = float(total.sum())
        ok = np.isfinite(measured)
        for p, part in enumerate(parts):
            column = values[:, p]
            rows.append(
                {
                    **run_values,
                    "part": part,
                    "n": len(column),
                    "mean_abs_share": float(np.nanmean(abs_share[:, p]))
                    if np.isfinite(abs_share[:, p]).any()
                    else np.nan,
                    "signed_share": float(column.sum()) / summed if summed != 0 else np.nan,
                    "sum": float(column.sum()),
                    "pearson_measured": pearson(column[ok], measured[ok]),
                }
            )
    return pd.DataFrame(rows, columns=[*ids, *ATTRIBUTION_TABLE_COLUMNS])
