"""What an intervention's per-token weights did: their size and whether they track the measured change.

STEER (and the other reweighting methods) scale each token's loss by ``intervention_weight``;
a weight below 1 damps the token's gradient, above 1 boosts it. This table answers "what do
the weights do" from the trace records alone: their mean and range, the share of tokens damped
and boosted, and how the weight correlates with the measured entropy change (a method that
damps the tokens whose entropy falls most has a positive correlation with dH and a negative
one with |dH|).

Simplifications: pooled over every traced step; tokens with a non-finite weight or change are
left out; "damped" and "boosted" use a 1e-9 margin around 1 so an exact 1 counts as neither.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats as sstats

MARGIN = 1e-9


def _corr(a: np.ndarray, b: np.ndarray, rank: bool) -> float:
    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    fn = sstats.spearmanr if rank else sstats.pearsonr
    return float(fn(a, b)[0])


def intervention_weight_summary(records: pd.DataFrame) -> pd.DataFrame | None:
    """One row per run (``run``/``method`` columns lead when present); None without varying weights."""
    if "intervention_weight" not in records.columns:
        return None
    keys = [c for c in ("run", "method") if c in records.columns]
    groups = records.groupby(keys, sort=False) if keys else [((), records)]
    rows = []
    for key, part in groups:
        w = part["intervention_weight"].to_numpy(np.float64)
        dh = part["delta_entropy"].to_numpy(np.float64)
        ok = np.isfinite(w) & np.isfinite(dh)
        w, dh = w[ok], dh[ok]
        if w.size == 0 or np.ptp(w) == 0:
            continue
        damped, boosted = w < 1 - MARGIN, w > 1 + MARGIN
        key = key if isinstance(key, tuple) else (key,)
        rows.append(
            {
                **dict(zip(keys, key, strict=True)),
                "n": int(w.size),
                "mean_weight": float(w.mean()),
                "min_weight": float(w.min()),
                "max_weight": float(w.max()),
                "share_damped": float(damped.mean()),
                "share_boosted": float(boosted.mean()),
                "pearson_weight_dH": _corr(w, dh, rank=False),
                "spearman_weight_abs_dH": _corr(w, np.abs(dh), rank=True),
                "mean_dH_damped": float(dh[damped].mean()) if damped.any() else float("nan"),
                "mean_dH_rest": float(dh[~damped].mean()) if (~damped).any() else float("nan"),
            }
        )
    return pd.DataFrame(rows) if rows else None
