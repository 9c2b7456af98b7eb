"""Residuals of an estimator, sliced by the four factors of the closed form.

Input: trace records. For one estimator, the residual of each token is
dH - g * omega (calibrated, g the pooled least-squares gain of the run) or dH - omega
(raw). The residuals are binned by quantiles of each factor (docs/theory.md sections 1-3):
weight ``weight``, probability ``prob``, surprisal ``surprisal``, entropy
``entropy_before``. ``factor_variance_share`` reports, per factor, the share of the
residual variance its bins explain (the correlation ratio eta^2).

Deliberate simplifications:

- Binning is on average ranks cut at quantiles, so tied factor values always share a
  bin; heavy ties (e.g. many tokens at prob = 1) can therefore give fewer bins than
  requested. Bin edges are the smallest and largest factor value inside each bin.
- The gain is pooled over all steps of a run, not refitted per bin: a factor that
  changes the gain shows up as a trend in the bin means.
- Tokens with a non-finite measured change, prediction or factor value are dropped
  (per factor), so the counts of different factors can differ.
- Runs (``method``/``run`` columns) are analysed separately; the gain is per run.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from entropy_lab.records import FACTORS

from .tightness import (
    MEASURED,
    as_float,
    estimator_column,
    id_columns,
    iter_groups,
    pearson,
    require_columns,
    through_origin_gain,
)

BIN_COLUMNS = [
    "factor",
    "column",
    "bin",
    "count",
    "bin_low",
    "bin_high",
    "factor_mean",
    "mean_measured",
    "mean_predicted",
    "mean_residual",
    "rms_residual",
    "pearson",
    "gain",
]
SHARE_COLUMNS = ["factor", "column", "n", "bins", "residual_variance", "between_variance", "share"]


def quantile_bins(values: np.ndarray, bins: int) -> np.ndarray:
    """Integer bin codes 0..m-1 (m <= bins) from quantiles of the average ranks of ``values``.

    Naive equivalent: ``pd.qcut(values, bins, duplicates="drop")``, except that cutting
    ranks instead of values never splits tied values and never fails on repeated edges.
    """
    n = len(values)
    if n == 0:
        return np.zeros(0, dtype=int)
    ranks = pd.Series(values).rank(method="average")
    if ranks.nunique() == 1:
        return np.zeros(n, dtype=int)
    codes = pd.qcut(ranks, q=min(bins, n), labels=False, duplicates="drop")
    return codes.to_numpy(dtype=int)


def _resolve_factors(factors: Mapping[str, str] | None) -> dict[str, str]:
    return dict(FACTORS if factors is None else factors)


def _run_residuals(run: pd.DataFrame, estimator: str, calibrated: bool) -> tuple[pd.DataFrame, float]:
    """The run's measured, predicted (calibrated or raw) and residual columns, and the gain used."""
    column = estimator_column(estimator, run)
    measured, omega = as_float(run[MEASURED]), as_float(run[column])
    ok = np.isfinite(measured) & np.isfinite(omega)
    gain = through_origin_gain(measured[ok], omega[ok])
    # An all-zero estimator has no gain; its calibrated prediction is then 0, not NaN.
    scale = (gain if np.isfinite(gain) else 0.0) if calibrated else 1.0
    predicted = scale * omega
    frame = pd.DataFrame(
        {"measured": measured, "predicted": predicted, "residual": measured - predicted},
        index=run.index,
    )
    return frame, gain


def _binned(run: pd.DataFrame, estimator: str, bins: int, calibrated: bool, factors: dict[str, str]):
    """Yield (factor, column, factor values, residual frame restricted to finite rows, codes, gain)."""
    resid, gain = _run_residuals(run, estimator, calibrated)
    for factor, column in factors.items():
        values = as_float(run[column])
        ok = np.isfinite(values) & np.isfinite(resid["residual"].to_numpy())
        codes = quantile_bins(values[ok], bins)
        yield factor, column, values[ok], resid[ok], codes, gain


def residuals_by_factor(
    records: pd.DataFrame,
    estimator: str = "softmax",
    bins: int = 5,
    calibrated: bool = True,
    factors: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """Residual statistics per quantile bin of each factor.

    Args:
        records: trace records with ``delta_entropy``, the estimator's column and the factor columns.
        estimator: estimator name (``ESTIMATOR_COLUMNS``).
        bins: requested number of quantile bins per factor (fewer when values tie).
        calibrated: predict g * omega with the run's pooled gain g (True) or raw omega (False).
        factors: factor name -> column; None = ``FACTORS``.

    Returns:
        One row per run, factor and bin: ``factor``, ``column``, ``bin`` (0 = lowest),
        ``count``, ``bin_low``, ``bin_high``, ``factor_mean``, ``mean_measured``,
        ``mean_predicted``, ``mean_residual``, ``rms_residual``, ``pearson`` (in-bin,
        measured vs predicted; NaN when undefined) and ``gain`` (NaN when not calibrated
        and for an all-zero estimator), preceded by ``method``/``run`` when present.
    """
    factors = _resolve_factors(factors)
    require_columns(
        records, [MEASURED, estimator_column(estimator, records), *factors.values()], "Residual analysis"
    )
    ids = id_columns(records)
    rows = []
    for run_values, run in iter_groups(records, ids):
        for factor, column, values, resid, codes, gain in _binned(run, estimator, bins, calibrated, factors):
            measured, predicted = resid["measured"].to_numpy(), resid["predicted"].to_numpy()
            residual = resid["residual"].to_numpy()
            for code in np.unique(codes):
                inside = codes == code
                rows.append(
                    {
                        **run_values,
                        "factor": factor,
                        "column": column,
                        "bin": int(code),
                        "count": int(inside.sum()),
                        "bin_low": float(values[inside].min()),
                        "bin_high": float(values[inside].max()),
                        "factor_mean": float(values[inside].mean()),
                        "mean_measured": float(measured[inside].mean()),
                        "mean_predicted": float(predicted[inside].mean()),
                        "mean_residual": float(residual[inside].mean()),
                        "rms_residual": float(np.sqrt(np.mean(residual[inside] ** 2))),
                        "pearson": pearson(predicted[inside], measured[inside]),
                        "gain": gain if calibrated else float("nan"),
                    }
                )
    return pd.DataFrame(rows, columns=[*ids, *BIN_COLUMNS])


def correlation_ratio(values: np.ndarray, codes: np.ndarray) -> tuple[float, float, float]:
    """(eta^2, total variance, between-bin variance) of ``values`` grouped by ``codes``.

    eta^2 = sum_b n_b (mean_b - mean)^2 / sum_i (v_i - mean)^2; NaN when the total is 0.
    Variances are population variances (divided by n).
    """
    n = len(values)
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    centred = values - values.mean()
    total = float(np.dot(centred, centred))
    counts = np.bincount(codes)
    sums = np.bincount(codes, weights=centred)
    used = counts > 0
    between = float(np.sum(sums[used] ** 2 / counts[used]))
    share = between / total if total > 0 else float("nan")
    return share, total / n, between / n


def factor_variance_share(
    records: pd.DataFrame,
    estimator: str = "softmax",
    bins: int = 5,
    calibrated: bool = True,
    factors: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """Share of the residual variance explained by each factor's quantile bins (eta^2).

    Same arguments as ``residuals_by_factor``. Returns one row per run and factor:
    ``factor``, ``column``, ``n``, ``bins`` (bins actually used), ``residual_variance``,
    ``between_variance`` and ``share`` = between / residual variance in [0, 1] (NaN when
    the residual is constant). With many bins and few tokens, even an unrelated factor
    gets a share of about (bins - 1) / n by chance.
    """
    factors = _resolve_factors(factors)
    require_columns(
        records, [MEASURED, estimator_column(estimator, records), *factors.values()], "Residual analysis"
    )
    ids = id_columns(records)
    rows = []
    for run_values, run in iter_groups(records, ids):
        for factor, column, _values, resid, codes, _gain in _binned(
            run, estimator, bins, calibrated, factors
        ):
            share, total, between = correlation_ratio(resid["residual"].to_numpy(), codes)
            rows.append(
                {
                    **run_values,
                    "factor": factor,
                    "column": column,
                    "n": len(codes),
                    "bins": len(np.unique(codes)),
                    "residual_variance": total,
                    "between_variance": between,
                    "share": share,
                }
            )
    return pd.DataFrame(rows, columns=[*ids, *SHARE_COLUMNS])
