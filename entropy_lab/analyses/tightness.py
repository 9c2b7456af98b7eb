"""Tightness: how well each first-order estimator predicts the measured entropy change.

Input: trace records (docs/theory.md section 10), one row per traced response token, with the
measured ``delta_entropy`` and one ``omega_<name>`` column per estimator. Output: one
row per estimator and group of tokens with correlation, sign agreement, a calibrated
gain and the aggregate check sum(dH) vs g * sum(omega).

This module also holds the small pieces the other analyses share: the estimator-name
registry, the run-identifier columns and NaN-safe statistics.

Deliberate simplifications:

- Tokens whose measured change or prediction is not finite are dropped, per estimator.
- The gain is a least-squares fit through the origin, g = sum(dH * omega) / sum(omega^2):
  the theory predicts no offset, only a scale (Adam, shared parameters).
- ``r2`` is the R^2 of that calibrated fit, 1 - SS_res / SS_tot with SS_tot about the
  mean of dH, so it can be negative when the fit is worse than a constant.
- Default noise floor: ``NOISE_FLOOR_FRACTION`` (1e-3) times the largest finite
  |delta_entropy| among the tokens of the same run (the ``method``/``run`` columns when
  present, else all records passed), pooled over steps so every step and estimator of a
  run is judged against the same floor. Sign agreement counts only tokens above it whose
  prediction is not exactly zero.
- Degenerate inputs (n < 2, constant columns, all-zero predictions) give NaN, never an
  exception or a warning.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd
from scipy.stats import rankdata

from entropy_lab.errors import EntropyLabError
from entropy_lab.records import COLUMN_GROUPS, estimator_name, predicted_columns

ESTIMATOR_COLUMNS: dict[str, str] = {estimator_name(column): column for column in COLUMN_GROUPS["predicted"]}
"""The built-in estimators of the record contract: name -> column (``omega_`` + name with '-' as '_').

Every trace record has these; records may hold more ``omega_*`` columns (estimators registered
by the user), which ``estimator_columns`` finds. Taken from the record contract rather than the
torch-side estimator registry, so analyses never import torch."""

MEASURED = "delta_entropy"
"""The exact per-token entropy change, H_after - H_before (nats)."""

ID_COLUMNS: tuple[str, ...] = ("method", "run")
"""Columns that identify a run when several runs' records are concatenated."""

DEFAULT_GROUPS: tuple[str, ...] = ("step", "update")
NOISE_FLOOR_FRACTION = 1e-3


def estimator_columns(records: pd.DataFrame | None = None) -> dict[str, str]:
    """Estimator name -> column for every ``omega_*`` column of ``records`` (built-ins first).

    None gives the built-ins (``ESTIMATOR_COLUMNS``).
    """
    if records is None:
        return dict(ESTIMATOR_COLUMNS)
    return {estimator_name(c): c for c in predicted_columns(records.columns)}


def estimator_column(name: str, records: pd.DataFrame | None = None) -> str:
    """Return the record column of estimator ``name``; raise listing the valid names.

    Valid names: the built-ins and, when ``records`` is given, every estimator it has a column for.
    """
    known = {**ESTIMATOR_COLUMNS, **estimator_columns(records)}
    try:
        return known[name]
    except KeyError:
        valid = ", ".join(known)
        raise EntropyLabError(f"Unknown estimator '{name}'; valid names are: {valid}.") from None


def available_estimators(records: pd.DataFrame) -> list[str]:
    """Estimator names whose ``omega_*`` column exists in ``records`` with at least one finite value.

    All-NaN columns (an estimator the tracer could not compute, e.g. ``logit-grad``)
    are left out; built-ins first, in contract order, then the others in frame order.
    """
    return [
        name
        for name, column in estimator_columns(records).items()
        if np.isfinite(as_float(records[column])).any()
    ]


def id_columns(records: pd.DataFrame) -> list[str]:
    """The run-identifier columns (``method``, ``run``) present in ``records``."""
    return [c for c in ID_COLUMNS if c in records.columns]


def require_columns(records: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    """Raise ``EntropyLabError`` naming the columns of ``columns`` missing from ``records``."""
    missing = [c for c in columns if c not in records.columns]
    if missing:
        raise EntropyLabError(f"{what} needs the record columns {missing}, which are missing.")


def resolve_estimators(records: pd.DataFrame, estimators: Sequence[str] | str | None) -> list[str]:
    """Validate requested estimator names; None means every available one.

    Requested estimators that are all-NaN in ``records`` are skipped, not an error.
    """
    available = available_estimators(records)
    if estimators is None:
        return available
    if isinstance(estimators, str):
        estimators = [estimators]
    for name in estimators:
        estimator_column(name, records)
    return [name for name in estimators if name in available]


def iter_groups(frame: pd.DataFrame, keys: Sequence[str]) -> Iterator[tuple[dict, pd.DataFrame]]:
    """Yield ({key: value}, sub-frame) per group; one group of everything when ``keys`` is empty."""
    keys = list(keys)
    if not keys:
        yield {}, frame
        return
    for values, group in frame.groupby(keys, sort=True, dropna=False, observed=True):
        values = values if isinstance(values, tuple) else (values,)
        yield dict(zip(keys, values, strict=True)), group


def as_float(series: pd.Series) -> np.ndarray:
    """A column as a float64 array; non-numeric entries and missing values become NaN."""
    return pd.to_numeric(series, errors="coerce").to_numpy(dtype=float, na_value=np.nan)


def finite_pairs(frame: pd.DataFrame, y: str, x: str) -> tuple[np.ndarray, np.ndarray]:
    """The float arrays of columns ``y`` and ``x``, restricted to rows where both are finite."""
    yv, xv = as_float(frame[y]), as_float(frame[x])
    keep = np.isfinite(yv) & np.isfinite(xv)
    return yv[keep], xv[keep]


# --- NaN-safe statistics -------------------------------------------------------------


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation; NaN when n < 2 or either input is constant (no warning)."""
    if len(x) < 2:
        return float("nan")
    # Test constancy exactly: centring a constant column can leave rounding noise
    # that would otherwise yield a spurious correlation of +-1.
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    xc, yc = x - x.mean(), y - y.mean()
    denom = np.sqrt(np.dot(xc, xc) * np.dot(yc, yc))
    if not np.isfinite(denom) or denom == 0.0:
        return float("nan")
    return float(np.clip(np.dot(xc, yc) / denom, -1.0, 1.0))


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); NaN when undefined."""
    if len(x) < 2:
        return float("nan")
    return pearson(rankdata(x), rankdata(y))


def through_origin_gain(measured: np.ndarray, predicted: np.ndarray) -> float:
    """Least-squares g in measured ~ g * predicted: sum(y x) / sum(x^2); NaN if x is all zero."""
    denom = float(np.dot(predicted, predicted))
    if len(predicted) == 0 or denom == 0.0 or not np.isfinite(denom):
        return float("nan")
    return float(np.dot(measured, predicted) / denom)


def r_squared(measured: np.ndarray, fitted: np.ndarray) -> float:
    """1 - SS_res / SS_tot with SS_tot about the mean; NaN when SS_tot is 0 or inputs are empty."""
    if len(measured) < 2 or not np.isfinite(fitted).all():
        return float("nan")
    ss_tot = float(np.sum((measured - measured.mean()) ** 2))
    if ss_tot == 0.0:
        return float("nan")
    return 1.0 - float(np.sum((measured - fitted) ** 2)) / ss_tot


def default_noise_floor(measured: np.ndarray) -> float:
    """``NOISE_FLOOR_FRACTION`` times the largest finite |measured|; 0.0 when there is none."""
    finite = np.abs(measured[np.isfinite(measured)])
    return float(NOISE_FLOOR_FRACTION * finite.max()) if len(finite) else 0.0


def sign_agreement(measured: np.ndarray, predicted: np.ndarray, floor: float) -> tuple[float, int]:
    """Fraction of tokens with |measured| > floor whose prediction has the same sign, and their count.

    Tokens predicted exactly 0 (zero advantage: the estimator claims no first-order change)
    are left out: they carry no sign to agree with. NaN when no token qualifies.
    """
    above = (np.abs(measured) > floor) & (predicted != 0)
    n_above = int(above.sum())
    if n_above == 0:
        return float("nan"), 0
    same = np.sign(measured[above]) == np.sign(predicted[above])
    return float(same.mean()), n_above


def fit_statistics(measured: np.ndarray, predicted: np.ndarray, floor: float) -> dict[str, float]:
    """Every tightness statistic for one set of finite (measured, predicted) pairs."""
    n = len(measured)
    gain = through_origin_gain(measured, predicted)
    fitted = gain * predicted
    agree, n_above = sign_agreement(measured, predicted, floor)
    nan = float("nan")
    return {
        "n": n,
        "pearson": pearson(predicted, measured),
        "spearman": spearman(predicted, measured),
        "sign_agreement": agree,
        "noise_floor": floor,
        "n_above_floor": n_above,
        "gain": gain,
        "r2": r_squared(measured, fitted),
        "rmse_raw": float(np.sqrt(np.mean((measured - predicted) ** 2))) if n else nan,
        "rmse_calibrated": float(np.sqrt(np.mean((measured - fitted) ** 2)))
        if n and np.isfinite(gain)
        else nan,
        "sum_measured": float(measured.sum()) if n else nan,
        "sum_predicted": float(predicted.sum()) if n else nan,
        "sum_calibrated": float(gain * predicted.sum()) if n else nan,
    }


TIGHTNESS_COLUMNS = list(fit_statistics(np.zeros(0), np.zeros(0), 0.0))


def _resolve_groups(records: pd.DataFrame, by: Sequence[str] | None, split_runs: bool) -> list[str]:
    if by is None:
        keys = [c for c in DEFAULT_GROUPS if c in records.columns]
    else:
        keys = [by] if isinstance(by, str) else list(by)
        require_columns(records, keys, "Grouping")
    ids = id_columns(records) if split_runs else []
    return [c for c in ids if c not in keys] + keys


def tightness(
    records: pd.DataFrame,
    estimators: Sequence[str] | str | None = None,
    by: Sequence[str] | str | None = None,
    noise_floor: float | None = None,
    split_runs: bool = True,
) -> pd.DataFrame:
    """Tightness of each estimator against the measured entropy change, per group of tokens.

    Args:
        records: trace records with ``delta_entropy`` and ``omega_*`` columns.
        estimators: estimator names (``estimator_columns(records)``); None = every available one.
            All-NaN estimators are skipped.
        by: grouping columns; None = ``("step", "update")``, whichever are present; ``()``
            pools all tokens (see ``tightness_summary``).
        noise_floor: |dH| threshold for sign agreement (nats); None = the default rule of the
            module docstring, computed per run.
        split_runs: prepend the ``method``/``run`` columns, when present, to the groups so that
            different runs are never pooled.

    Returns:
        One row per group and estimator: the group columns, ``estimator``, then ``n``,
        ``pearson``, ``spearman``, ``sign_agreement``, ``noise_floor``, ``n_above_floor``,
        ``gain``, ``r2``, ``rmse_raw``, ``rmse_calibrated``, ``sum_measured``,
        ``sum_predicted``, ``sum_calibrated``. Groups in which an estimator has no finite
        token appear with n = 0 and NaN statistics.
    """
    require_columns(records, [MEASURED], "Tightness")
    keys = _resolve_groups(records, by, split_runs)
    names = resolve_estimators(records, estimators)
    columns = estimator_columns(records)
    run_keys = [c for c in id_columns(records) if split_runs]
    rows = []
    for run_values, run in iter_groups(records, run_keys):
        floor = default_noise_floor(as_float(run[MEASURED])) if noise_floor is None else float(noise_floor)
        inner = [k for k in keys if k not in run_keys]
        for group_values, group in iter_groups(run, inner):
            for name in names:
                measured, predicted = finite_pairs(group, MEASURED, columns[name])
                stats = fit_statistics(measured, predicted, floor)
                rows.append({**run_values, **group_values, "estimator": name, **stats})
    return pd.DataFrame(rows, columns=[*keys, "estimator", *TIGHTNESS_COLUMNS])


SUMMARY_EXTRA_COLUMNS = [
    "updates",
    "pearson_update_median",
    "spearman_update_median",
    "n_zero_advantage",
    "pearson_zero_advantage",
    "spearman_zero_advantage",
]
"""Columns ``tightness_summary`` adds after the pooled statistics."""


def tightness_summary(
    records: pd.DataFrame,
    estimators: Sequence[str] | str | None = None,
    noise_floor: float | None = None,
    split_runs: bool = True,
) -> pd.DataFrame:
    """Pooled tightness: ``tightness(records, by=())``, one row per estimator (and run), plus

    - ``updates``, ``pearson_update_median``, ``spearman_update_median``: the number of
      (step, update) groups and the median of their per-update Pearson and Spearman (NaN
      per-update values left out; NaN when the records have no ``step``/``update`` column);
    - ``n_zero_advantage``, ``pearson_zero_advantage``, ``spearman_zero_advantage``: the same
      statistics over the tokens whose ``advantage`` is exactly 0 (every per-token closed form
      predicts 0 there, so their correlations are NaN; ``covariance`` centres A over the batch and
      the network's own first order moves them too).
    """
    pooled = tightness(records, estimators, by=(), noise_floor=noise_floor, split_runs=split_runs)
    keys = [c for c in pooled.columns if c in ID_COLUMNS] + ["estimator"]
    out = pooled.reindex(columns=[*pooled.columns, *SUMMARY_EXTRA_COLUMNS])
    if not len(pooled):
        return out
    groups = [c for c in DEFAULT_GROUPS if c in records.columns]
    if groups:
        per = tightness(records, estimators, by=groups, noise_floor=noise_floor, split_runs=split_runs)
        med = per.groupby(keys, sort=False).agg(
            updates=("n", "size"),
            pearson_update_median=("pearson", "median"),
            spearman_update_median=("spearman", "median"),
        )
        out = _fill(out, med.reset_index(), keys)
    if "advantage" in records.columns:
        out["n_zero_advantage"] = 0
        zero = records[as_float(records["advantage"]) == 0.0]
        if len(zero):
            z = tightness(zero, estimators, by=(), noise_floor=noise_floor, split_runs=split_runs)
            z = z[[*keys, "n", "pearson", "spearman"]].rename(
                columns={
                    "n": "n_zero_advantage",
                    "pearson": "pearson_zero_advantage",
                    "spearman": "spearman_zero_advantage",
                }
            )
            out = _fill(out, z, keys)
    return out


def _fill(out: pd.DataFrame, values: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """``out`` with its columns named in ``values`` taken from ``values`` (matched on ``keys``)."""
    merged = out.drop(columns=[c for c in values.columns if c not in keys]).merge(values, on=keys, how="left")
    return merged[out.columns]
