"""Quadrant table: sign(A) x sign(l_a), with l_a = log pi_a + H (docs/theory.md sections 1-3).

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

Where the quadrant rule and the exact tabular first order disagree. The rule's sign is
-sign(A l_a); the ``softmax`` estimator's is that of -eta w (pi_a l_a - C), and sign(w) =
sign(A) on unclipped tokens (I_clip, r, lambda, N > 0). So they disagree exactly where
pi_a l_a - C and l_a have opposite signs. C = sum_k pi_k^2 l_k is the covariance under pi of
pi_k and l_k (sum_k pi_k l_k = 0) and l_k = log pi_k + H rises with pi_k, so C >= 0: a token
with l_a < 0 always agrees, and one with l_a > 0 disagrees when pi_a l_a < C, i.e. a likely
token (pi_a > exp(-H)) that still carries less than its collision share, next to a more
likely one. ``softmax_disagreement`` is the share of such tokens per quadrant, counted over
tokens whose ``omega_softmax`` is finite and nonzero (a clipped token has no sign).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from entropy_lab.records import QUADRANTS, THEORY_SIGN

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
    "softmax_disagreement",
]
SOFTMAX = estimator_column("softmax")


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if len(values) else float("nan")


def _disagreement(rule_sign: float, softmax: np.ndarray) -> float:
    """Share of tokens with a finite, nonzero softmax prediction whose sign is not ``rule_sign``."""
    signed = softmax[np.isfinite(softmax) & (softmax != 0)]
    if rule_sign == 0 or not len(signed):
        return float("nan")
    return float(np.mean(np.sign(signed) != rule_sign))


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
        ``noise_floor``, ``softmax_disagreement`` (share of the quadrant's tokens where the
        rule's sign -sign(A l_a) differs from the ``softmax`` estimator's; NaN for A = 0 or
        without an ``omega_softmax`` column); preceded by ``method``/``run`` when present.
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
        softmax = as_float(run[SOFTMAX]) if SOFTMAX in run.columns else np.full(len(run), np.nan)
        ok = np.isfinite(advantage) & np.isfinite(l_a) & np.isfinite(measured)
        advantage, l_a, measured, predicted = advantage[ok], l_a[ok], measured[ok], predicted[ok]
        softmax = softmax[ok]
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
            row["softmax_disagreement"] = _disagreement(THEORY_SIGN.get(theory, 0.0), softmax[inside])
            rows.append({**run_values, **row})
    return pd.DataFrame(rows, columns=[*ids, *QUADRANT_COLUMNS])
