"""Per-token decomposition of the measured entropy change (DESIGN.md section 1).

An identity, not a model:

    delta_entropy = omega_logit_grad + coupling + curvature
    coupling  = delta_logit_linear - omega_logit_grad   # shared parameters, other tokens, Adam
    curvature = delta_entropy - delta_logit_linear      # second and higher order in dz
    omission  = omega_logit_grad - omega_paper          # what the closed form leaves out

Deliberate simplifications:

- The first-order base defaults to ``logit-grad``; where the tracer could not compute it,
  ``base="softmax"`` (equal to it for a weighted log-probability loss) can stand in. The
  base's column keeps its own name (``omega_logit_grad`` or ``omega_softmax``) in the output.
- Summaries keep only tokens whose identity parts (dH, delta_logit_linear, base) are
  finite; ``omission`` is summed over those of them with a finite ``omega_paper``.
- Shares are sum|part| / sum|delta_entropy| over the same tokens: they need not add to 1,
  because parts of opposite sign cancel.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from .tightness import (
    ESTIMATOR_COLUMNS,
    MEASURED,
    as_float,
    estimator_column,
    id_columns,
    iter_groups,
    require_columns,
)

LINEAR = "delta_logit_linear"
PAPER = ESTIMATOR_COLUMNS["paper"]
WHERE_COLUMNS = ("step", "update", "sample", "position", "token_id")
SUMMARY_COLUMNS = ["part", "n", "sum", "sum_abs", "share"]


def parts(base: str = "logit-grad") -> list[str]:
    """Names of the summary parts, in order: measured, base, coupling, curvature, omission."""
    return [MEASURED, estimator_column(base), "coupling", "curvature", "omission"]


def decompose(records: pd.DataFrame, base: str = "logit-grad") -> pd.DataFrame:
    """Split every token's measured entropy change into first-order, coupling and curvature.

    Args:
        records: trace records with ``delta_entropy``, ``delta_logit_linear``, the base's
            ``omega_*`` column and ``omega_paper``.
        base: the first-order estimator the identity starts from (``logit-grad`` by default).

    Returns:
        One row per token, same index as ``records``: the run and where-columns present
        (``method``, ``run``, ``step``, ``update``, ``sample``, ``position``, ``token_id``),
        then ``delta_entropy``, ``delta_logit_linear``, the base column, ``omega_paper``,
        ``coupling``, ``curvature``, ``omission``. NaN inputs give NaN parts.
        ``delta_entropy == base + coupling + curvature`` up to rounding.
    """
    base_column = estimator_column(base, records)
    require_columns(records, [MEASURED, LINEAR, base_column, PAPER], "Decomposition")
    keep = id_columns(records) + [c for c in WHERE_COLUMNS if c in records.columns]
    measured, linear = as_float(records[MEASURED]), as_float(records[LINEAR])
    first_order, paper = as_float(records[base_column]), as_float(records[PAPER])
    out = records[keep].copy()
    out[MEASURED] = measured
    out[LINEAR] = linear
    out[base_column] = first_order
    if base_column != PAPER:
        out[PAPER] = paper
    out["coupling"] = linear - first_order
    out["curvature"] = measured - linear
    out["omission"] = first_order - paper
    return out


def decomposition_summary(
    records: pd.DataFrame,
    by: Sequence[str] | str | None = None,
    base: str = "logit-grad",
) -> pd.DataFrame:
    """Sum of each part and the share of sum|delta_entropy| it carries, per group.

    Args:
        records: trace records (see ``decompose``).
        by: grouping columns; None = ``("step",)`` when present; ``()`` pools every token.
            The ``method``/``run`` columns, when present, are always prepended.
        base: the first-order estimator (see ``decompose``).

    Returns:
        Long format, one row per group and part (``parts(base)``): the group columns,
        ``part``, ``n`` (tokens used), ``sum`` (signed, nats), ``sum_abs`` (nats) and
        ``share`` = sum_abs / sum_abs of delta_entropy (NaN when that is 0). ``sum_abs``
        is additive over groups, so coarser shares can be rebuilt from finer rows.
    """
    decomposed = decompose(records, base)
    if by is None:
        keys = ["step"] if "step" in records.columns else []
    else:
        keys = [by] if isinstance(by, str) else list(by)
        require_columns(records, keys, "Grouping")
    ids = [c for c in id_columns(records) if c not in keys]
    keys = ids + keys
    names = parts(base)
    identity = decomposed[[MEASURED, LINEAR, names[1]]].to_numpy(dtype=float)
    decomposed = decomposed[np.isfinite(identity).all(axis=1)]
    rows = []
    for group_values, group in iter_groups(decomposed, keys):
        total_abs = float(np.abs(group[MEASURED].to_numpy()).sum())
        for name in names:
            values = group[name].to_numpy(dtype=float)
            values = values[np.isfinite(values)]
            sum_abs = float(np.abs(values).sum())
            rows.append(
                {
                    **group_values,
                    "part": name,
                    "n": len(values),
                    "sum": float(values.sum()),
                    "sum_abs": sum_abs,
                    "share": sum_abs / total_abs if total_abs > 0 else float("nan"),
                }
            )
    return pd.DataFrame(rows, columns=[*keys, *SUMMARY_COLUMNS])
