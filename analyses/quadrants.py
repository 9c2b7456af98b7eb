"""Quadrant table: sign(A) x sign(l_a), with l_a = log pi_a + H (DESIGN.md section 1).

First-order theory: entropy falls for (A>0, l_a>0) and (A<0, l_a<0) - a likely token
reinforced or an unlikely one penalised - and rises for the other two quadrants.

Deliberate simplifications:

- The sign of the advantage A is used, as in the theory, not that of the full weight w:
  clipped tokens (zero weight) stay in their quadrant.
- Tokens with A == 0 (e.g. groups whose rewards all tie) form their own row "A=0",
  with theory "flat" (no first-order change). l_a == 0 exactly is counted with l>0.
- Tokens with a non-finite advantage, logprob, entropy or measured change are dropped;
  a non-finite prediction only drops the token from ``mean_predicted`` and
  ``sign_agreement``, so an unavailable estimator leaves those columns NaN.
- ``sign_agreement`` and ``theory_agreement`` count tokens with |dH| above the noise
  floor of ``tightness`` (1e-3 times the run's max |dH| by default).
- Runs (``method``/``run`` columns) are tabled separately.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .tightness import (
    MEASURED,
    as_float,
    default_noise_floor,
    estimator_column,
    id_columns,
    iter_groups,
    require_columns,
    sign_agreement,
    through_origin_gain,
)

# (label, sign of A, sign of l_a, first-order theory)
QUADRANTS: tuple[tuple[str, int, int, str], ...] = (
    ("A>0, l>0", 1, 1, "falls"),
    ("A>0, l<0", 1, -1, "rises"),
    ("A<0, l>0", -1, 1, "rises"),
    ("A<0, l<0", -1, -1, "falls"),
    ("A=0", 0, 0, "flat"),
)
THEORY_SIGN = {"falls": -1.0, "rises": 1.0}
QUADRANT_COLUMNS = [
    "quadrant",
    "sign_advantage",
    "sign_l",
    "theory",
    "count",
    "share",
    "mean_predicted",
    "mean_measured",
    "sign_agreement",
    "theory_agreement",
    "n_above_floor",
    "noise_floor",
]


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if len(values) else float("nan")


def _quadrant_row(label, sign_a, sign_l, theory, measured, predicted, floor, total) -> dict:
    finite = np.isfinite(predicted)
    agree, _ = sign_agreement(measured[finite], predicted[finite], floor)
    above = np.abs(measured) > floor
    if theory in THEORY_SIGN and above.any():
        theory_agree = float(np.mean(np.sign(measured[above]) == THEORY_SIGN[theory]))
    else:
        theory_agree = float("nan")
    return {
        "quadrant": label,
        "sign_advantage": sign_a,
        "sign_l": sign_l,
        "theory": theory,
        "count": len(measured),
        "share": len(measured) / total if total else float("nan"),
        "mean_predicted": _mean(predicted[finite]),
        "mean_measured": _mean(measured),
        "sign_agreement": agree,
        "theory_agreement": theory_agree,
        "n_above_floor": int(above.sum()),
        "noise_floor": floor,
    }


def quadrants(
    records: pd.DataFrame,
    estimator: str = "softmax",
    calibrated: bool = False,
    noise_floor: float | None = None,
) -> pd.DataFrame:
    """Token counts, mean predicted and measured change and sign agreement per quadrant.

    Args:
        records: trace records with ``advantage``, ``logprob``, ``entropy_before``,
            ``delta_entropy`` and the estimator's column.
        estimator: estimator name whose prediction is averaged (``ESTIMATOR_COLUMNS``).
        calibrated: scale the prediction by the run's pooled least-squares gain.
        noise_floor: |dH| threshold for the agreement columns (nats); None = default rule.

    Returns:
        Five rows per run (the ``QUADRANTS`` order, empty quadrants included with count 0):
        ``quadrant``, ``sign_advantage``, ``sign_l``, ``theory`` ("falls", "rises", "flat"),
        ``count``, ``share`` (of the run's tokens), ``mean_predicted``, ``mean_measured``
        (nats, token-level), ``sign_agreement`` (estimator vs measured),
        ``theory_agreement`` (measured sign vs the quadrant's theory), ``n_above_floor``,
        ``noise_floor``; preceded by ``method``/``run`` when present.
    """
    column = estimator_column(estimator, records)
    require_columns(
        records, ["advantage", "logprob", "entropy_before", MEASURED, column], "Quadrant analysis"
    )
    ids = id_columns(records)
    rows = []
    for run_values, run in iter_groups(records, ids):
        advantage = as_float(run["advantage"])
        l_a = as_float(run["logprob"]) + as_float(run["entropy_before"])
        measured, predicted = as_float(run[MEASURED]), as_float(run[column])
        ok = np.isfinite(advantage) & np.isfinite(l_a) & np.isfinite(measured)
        advantage, l_a, measured, predicted = advantage[ok], l_a[ok], measured[ok], predicted[ok]
        if calibrated:
            both = np.isfinite(predicted)
            predicted = predicted * through_origin_gain(measured[both], predicted[both])
        floor = default_noise_floor(measured) if noise_floor is None else float(noise_floor)
        sign_a = np.sign(advantage)
        sign_l = np.where(l_a >= 0, 1, -1)
        for label, qa, ql, theory in QUADRANTS:
            inside = (sign_a == 0) if qa == 0 else (sign_a == qa) & (sign_l == ql)
            row = _quadrant_row(
                label, qa, ql, theory, measured[inside], predicted[inside], floor, len(measured)
            )
            rows.append({**run_values, **row})
    return pd.DataFrame(rows, columns=[*ids, *QUADRANT_COLUMNS])
