"""The linear regime: tables of an eta sweep, the traced tokens' entropy along the actual update.

Input: trace records carrying the ``regime@<eta>:<quantity>`` columns of an eta sweep
(``entropy_lab.trace.probes.EtaSweepProbe``: per eta the measured change at theta + eta
dtheta, its first order along the actual logit change, and the jvp-entropy prediction).
Output, per eta: each estimator's Pearson and least-squares gain against the measured change
(``regime_tightness``), and the shares of curvature and coupling in it (``regime_shares``).

First-order theory holds as eta -> 0: the logit-space ``curvature`` (measured -
delta_logit_linear) vanishes relative to the change, the ``coupling`` of the tabular
estimators (delta_logit_linear - eta * omega_logit_grad: parameter sharing and the
optimizer's preconditioning) does not (docs/theory.md section 5).

Deliberate simplifications:

- The predictions of the record's linear estimators are scaled by eta (their first order is
  linear in the step), so a first-order estimator has gain -> 1 as eta -> 0; the
  jvp-entropy prediction is the one recomputed per eta.
- Shares are ||part||^2 / ||measured||^2 over the tokens of each eta; coupling raw (against
  eta * omega_logit_grad) and calibrated (against g * eta * omega_logit_grad, g its
  least-squares gain at that eta), so a wrong scale is not mistaken for a wrong pattern.
- Tokens of all traced steps in the records are pooled.
- Pearson and gain keep the sweep's own arithmetic (``np.corrcoef`` and plain sums over the
  finite tokens) rather than ``tightness.pearson`` / ``through_origin_gain``, whose centred
  dot products agree to about 1e-16 but not bit for bit; the tables stay as published.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd

from entropy_lab.errors import EntropyLabError
from entropy_lab.records import REGIME_COLUMN, estimator_name, predicted_columns, regime_column

__all__ = ["has_sweep", "regime_column", "regime_shares", "regime_table", "regime_tightness", "sweep_long"]

_LINEAR_EXCLUDED = "omega_jvp_entropy"  # not linear in the step: recomputed per eta instead


def has_sweep(records: pd.DataFrame) -> bool:
    """Whether ``records`` carry any ``regime@`` column."""
    return any(REGIME_COLUMN.match(str(c)) for c in records.columns)


def sweep_long(records: pd.DataFrame) -> pd.DataFrame:
    """The ``regime@`` columns of ``records`` as a long table: token, eta and one column per quantity.

    Args:
        records: trace records with an eta sweep, n rows.

    Returns:
        n rows per eta, sorted by eta: ``token`` (the record's row), ``eta`` and one column per
        recorded quantity (``delta_entropy``, ``delta_logit_linear``, ``jvp_entropy``).
    """
    parts: dict[float, dict[str, np.ndarray]] = {}
    for col in records.columns:
        m = REGIME_COLUMN.match(str(col))
        if m:
            parts.setdefault(float(m["eta"]), {})[m["quantity"]] = records[col].to_numpy()  # (n,)
    if not parts:
        raise EntropyLabError(
            "these records hold no eta sweep: trace with EntropyTracer(..., eta_grid=...) "
            "or `entropy-lab trace --run CKPT --eta-sweep`"
        )
    frames = [
        pd.DataFrame({"token": np.arange(len(records)), "eta": eta, **q}) for eta, q in sorted(parts.items())
    ]
    return pd.concat(frames, ignore_index=True)


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 2 or np.std(x[ok]) == 0 or np.std(y[ok]) == 0:
        return float("nan")
    return float(np.corrcoef(x[ok], y[ok])[0, 1])


def _gain(measured: np.ndarray, pred: np.ndarray) -> float:
    ok = np.isfinite(measured) & np.isfinite(pred)
    den = float((pred[ok] ** 2).sum())
    return float((measured[ok] * pred[ok]).sum() / den) if den > 0 else float("nan")


def _per_eta(records: pd.DataFrame) -> Iterator[tuple[float, pd.DataFrame, dict[str, np.ndarray]]]:
    """(eta, that eta's rows of ``sweep_long``, estimator name -> (n,) prediction) in eta order."""
    long = sweep_long(records)
    omegas = {c: records[c].to_numpy() for c in predicted_columns(records) if c != _LINEAR_EXCLUDED}
    for eta, part in long.groupby("eta", sort=True):
        preds = {estimator_name(c): eta * v for c, v in omegas.items()}  # (n,) each, scaled by eta
        preds["jvp-entropy"] = part["jvp_entropy"].to_numpy()
        yield eta, part, preds


def regime_tightness(records: pd.DataFrame) -> pd.DataFrame:
    """Per eta and estimator, Pearson and gain of the eta-scaled prediction against the change at eta.

    Args:
        records: trace records with an eta sweep.

    Returns:
        ``eta``, ``estimator``, ``pearson``, ``gain`` (least squares through the origin; 1 =
        right scale), one row per eta and estimator, etas ascending, estimators in record order.
    """
    rows = []
    for eta, part, preds in _per_eta(records):
        dh = part["delta_entropy"].to_numpy()  # (n,)
        for name, pred in preds.items():
            rows.append(
                {"eta": eta, "estimator": name, "pearson": _pearson(pred, dh), "gain": _gain(dh, pred)}
            )
    return pd.DataFrame(rows)


def regime_shares(records: pd.DataFrame) -> pd.DataFrame:
    """Per eta, the shares of curvature and coupling in ||measured||^2.

    Args:
        records: trace records with an eta sweep.

    Returns:
        ``eta``, ``curvature`` and, when the records hold ``omega_logit_grad``,
        ``coupling_raw``, ``coupling_calibrated`` and ``logit_grad_gain`` (g of the logit-grad
        prediction against the first-order change at that eta); NaN where ||measured|| is 0.
    """
    shares = []
    for eta, part, preds in _per_eta(records):
        dh = part["delta_entropy"].to_numpy()  # (n,)
        lin = part["delta_logit_linear"].to_numpy()  # (n,)
        norm = float(np.nansum(dh**2))
        row = {"eta": eta, "curvature": float(np.nansum((dh - lin) ** 2)) / norm if norm > 0 else np.nan}
        if "logit-grad" in preds:
            lg = preds["logit-grad"]
            g = _gain(lin, lg)
            row["coupling_raw"] = float(np.nansum((lin - lg) ** 2)) / norm if norm > 0 else np.nan
            row["coupling_calibrated"] = float(np.nansum((lin - g * lg) ** 2)) / norm if norm > 0 else np.nan
            row["logit_grad_gain"] = g
        shares.append(row)
    return pd.DataFrame(shares)


def regime_table(records: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(``regime_tightness``, ``regime_shares``) of records carrying a sweep."""
    return regime_tightness(records), regime_shares(records)
