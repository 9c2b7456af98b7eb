"""Per-token decomposition of the measured entropy change, with scale separated from pattern.

An identity, not a model. With the network's own first order ``omega_jvp`` (J dtheta
pushed through dH/dz; an opt-in trace column) the split is four-way:

    delta_entropy = tabular + coupling + nonlinearity + curvature
    tabular      = g * omega_logit_grad                  # the tabular first order
    coupling     = omega_jvp - tabular                   # shared parameters, other tokens, Adam
    nonlinearity = delta_logit_linear - omega_jvp        # dz is not linear in dtheta
    curvature    = delta_entropy - delta_logit_linear    # second and higher order in dz
    omission     = g * omega_logit_grad - g_paper * omega_paper   # left out by the closed form

Without an ``omega_jvp`` column (or with it all NaN) it falls back to the three-way split

    delta_entropy = tabular + coupling + curvature,  coupling = delta_logit_linear - tabular

and every summary row says which split it used (``split``: ``"jvp"`` or ``"no-jvp"``).

Scale and pattern. The tabular estimators model one plain SGD step on free logits; a real
network and Adam change the scale by orders of magnitude (gains of 1e3-1e5 under Adam), and
a raw share cannot tell a wrong scale from a wrong pattern. So every part is computed twice:

- raw: ``g = 1`` (and ``g_paper = 1``): the estimators as written, learning rate included;
- calibrated: ``g`` is the least-squares gain of the estimator within its own update,
  g = sum(dH omega) / sum(omega^2), so that only the pattern is left to explain.

``omega_jvp`` is never calibrated: it is built from the step the optimizer actually took,
so its scale is part of what it predicts.

Deliberate simplifications:

- The first-order base defaults to ``logit-grad``; ``base="softmax"`` (equal to it for a
  weighted log-probability loss) can stand in where the tracer could not compute it. The
  base's column keeps its own name (``omega_logit_grad`` or ``omega_softmax``) in the output.
- An update is one value of (``method``, ``run``, ``step``, ``update``), whichever columns are
  present. Its gain uses its tokens with finite measured change and prediction; an update
  whose prediction is all zero gets gain NaN and a calibrated prediction of 0.
- Summaries keep only tokens whose identity parts are all finite; ``omission`` is summed
  over those of them with a finite ``omega_paper``.
- Shares are sum|part| / sum|delta_entropy| over the same tokens: they need not add to 1,
  because parts of opposite sign cancel. The summary's ``gain`` is the median of the
  per-update gains in the group (``update_gains`` has them all).
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
    through_origin_gain,
)

LINEAR = "delta_logit_linear"
PAPER = ESTIMATOR_COLUMNS["paper"]
JVP = "omega_jvp"
"""The network's linear first order, -sum_k pi_k l_k (J dtheta)_k: an opt-in trace column."""
WHERE_COLUMNS = ("step", "update", "sample", "position", "token_id")
UPDATE_COLUMNS = ("step", "update")
SPLIT_JVP, SPLIT_NO_JVP = "jvp", "no-jvp"
SUMMARY_COLUMNS = [
    "part", "split", "n", "sum", "sum_abs", "share", "sum_calibrated", "sum_abs_calibrated",
    "share_calibrated", "gain",
]  # fmt: skip
GAIN_COLUMNS = ["estimator", "column", "n", "gain"]


def has_jvp(records: pd.DataFrame) -> bool:
    """True when ``records`` hold an ``omega_jvp`` column with at least one finite value."""
    return JVP in records.columns and bool(np.isfinite(as_float(records[JVP])).any())


def parts(base: str = "logit-grad", jvp: bool = False, records: pd.DataFrame | None = None) -> list[str]:
    """Summary rows, in order: measured, base, [omega_jvp], coupling, [nonlinearity], curvature, omission.

    ``records`` make their own ``omega_*`` columns valid bases (see ``estimator_column``).
    """
    base_column = estimator_column(base, records)
    if jvp:
        return [MEASURED, base_column, JVP, "coupling", "nonlinearity", "curvature", "omission"]
    return [MEASURED, base_column, "coupling", "curvature", "omission"]


def _update_keys(records: pd.DataFrame) -> list[str]:
    return id_columns(records) + [c for c in UPDATE_COLUMNS if c in records.columns]


def _per_update_gain(records: pd.DataFrame, column: str) -> np.ndarray:
    """(n,) the least-squares gain of ``column`` in each token's update (NaN where undefined)."""
    measured, predicted = as_float(records[MEASURED]), as_float(records[column])
    ok = np.isfinite(measured) & np.isfinite(predicted)
    gain = np.full(len(records), np.nan)
    keys = _update_keys(records)
    positions = np.arange(len(records))
    groups = [positions] if not keys else records.groupby(keys, sort=False, dropna=False).indices.values()
    for rows in groups:
        use = rows[ok[rows]]
        gain[rows] = through_origin_gain(measured[use], predicted[use])
    return gain


def update_gains(records: pd.DataFrame, estimators: Sequence[str] | None = None) -> pd.DataFrame:
    """Least-squares gain g = sum(dH omega) / sum(omega^2) of each estimator in each update.

    Args:
        records: trace records with ``delta_entropy`` and the estimators' columns.
        estimators: estimator names; None = every ``omega_*`` column present in ``records``
            (the registered estimators and opt-in columns such as ``omega_jvp``).

    Returns:
        One row per update and estimator: the run and update columns present (``method``,
        ``run``, ``step``, ``update``), ``estimator``, ``column``, ``n`` (tokens with a finite
        measured change and prediction) and ``gain`` (NaN when the prediction is all zero).
    """
    require_columns(records, [MEASURED], "Update gains")
    if estimators is None:
        columns = [c for c in records.columns if str(c).startswith("omega_")]
    else:
        columns = [estimator_column(name, records) for name in estimators]
        require_columns(records, columns, "Update gains")
    keys = _update_keys(records)
    rows = []
    for values, group in iter_groups(records, keys):
        measured = as_float(group[MEASURED])
        for column in columns:
            predicted = as_float(group[column])
            ok = np.isfinite(measured) & np.isfinite(predicted)
            rows.append(
                {
                    **values,
                    "estimator": column.removeprefix("omega_").replace("_", "-"),
                    "column": column,
                    "n": int(ok.sum()),
                    "gain": through_origin_gain(measured[ok], predicted[ok]),
                }
            )
    return pd.DataFrame(rows, columns=[*keys, *GAIN_COLUMNS])


def decompose(
    records: pd.DataFrame, base: str = "logit-grad", calibrated: bool = False, jvp: bool | None = None
) -> pd.DataFrame:
    """Split every token's measured entropy change into the parts of the module docstring.

    Args:
        records: trace records with ``delta_entropy``, ``delta_logit_linear``, the base's
            ``omega_*`` column and ``omega_paper`` (and ``omega_jvp`` for the four-way split).
        base: the tabular first-order estimator the identity starts from.
        calibrated: scale the base and ``omega_paper`` by their per-update gains.
        jvp: use the four-way split; None = exactly when ``has_jvp(records)``.

    Returns:
        One row per token, same index as ``records``: the run and where-columns present, then
        ``delta_entropy``, ``delta_logit_linear``, the base column (calibrated when asked),
        ``omega_paper`` (likewise), [``omega_jvp``], ``coupling``, [``nonlinearity``],
        ``curvature``, ``omission``, and ``gain`` (the base's per-update gain; NaN when raw).
        ``delta_entropy`` equals the sum of the identity's parts up to rounding; NaN inputs
        give NaN parts.
    """
    base_column = estimator_column(base, records)
    jvp = has_jvp(records) if jvp is None else jvp
    need = [MEASURED, LINEAR, base_column, PAPER] + ([JVP] if jvp else [])
    require_columns(records, need, "Decomposition")
    keep = id_columns(records) + [c for c in WHERE_COLUMNS if c in records.columns]
    measured, linear = as_float(records[MEASURED]), as_float(records[LINEAR])
    first_order, paper = as_float(records[base_column]), as_float(records[PAPER])
    gain = np.full(len(records), np.nan)
    if calibrated:
        gain = _per_update_gain(records, base_column)
        # An all-zero prediction has no gain but predicts zero whatever the scale.
        first_order = np.nan_to_num(gain, nan=0.0) * first_order
        paper = np.nan_to_num(_per_update_gain(records, PAPER), nan=0.0) * paper
    out = records[keep].copy()
    out[MEASURED] = measured
    out[LINEAR] = linear
    out[base_column] = first_order
    if base_column != PAPER:
        out[PAPER] = paper
    if jvp:
        network = as_float(records[JVP])
        out[JVP] = network
        out["coupling"] = network - first_order
        out["nonlinearity"] = linear - network
    else:
        out["coupling"] = linear - first_order
    out["curvature"] = measured - linear
    out["omission"] = first_order - paper
    out["gain"] = gain
    return out


def decomposition_summary(
    records: pd.DataFrame,
    by: Sequence[str] | str | None = None,
    base: str = "logit-grad",
) -> pd.DataFrame:
    """Sum of each part and the share of sum|delta_entropy| it carries, raw and calibrated, per group.

    Args:
        records: trace records (see ``decompose``). The four-way split is used when they hold
            a finite ``omega_jvp``, the three-way one otherwise (column ``split``).
        by: grouping columns; None = ``("step",)`` when present; ``()`` pools every token.
            The ``method``/``run`` columns, when present, are always prepended.
        base: the tabular first-order estimator (see ``decompose``).

    Returns:
        Long format, one row per group and part (``parts(base, jvp)``): the group columns,
        ``part``, ``split``, ``n`` (tokens used), ``sum`` and ``sum_abs`` (raw, nats),
        ``share`` = sum_abs / sum_abs of delta_entropy (NaN when that is 0), the same three
        for the calibrated parts (``sum_calibrated``, ``sum_abs_calibrated``,
        ``share_calibrated``), and ``gain``: the median over the group's updates of the
        per-update gain of the base (on its row), of ``omega_paper`` (on the omission row: the
        gains the calibrated parts use) and of ``omega_jvp`` (on its row: never applied, it
        shows how far the network's own first order is off in scale); NaN on other rows.
        ``sum`` and ``sum_abs`` columns are additive over groups, so coarser shares can be
        rebuilt from finer rows.
    """
    jvp = has_jvp(records)
    raw = decompose(records, base, calibrated=False, jvp=jvp)
    calibrated = decompose(records, base, calibrated=True, jvp=jvp)
    paper_gain = _per_update_gain(records, PAPER)
    if by is None:
        keys = ["step"] if "step" in records.columns else []
    else:
        keys = [by] if isinstance(by, str) else list(by)
        require_columns(records, keys, "Grouping")
    ids = [c for c in id_columns(records) if c not in keys]
    keys = ids + keys
    names = parts(base, jvp, records)
    identity = [MEASURED, LINEAR, names[1]] + ([JVP] if jvp else [])
    finite = np.isfinite(raw[identity].to_numpy(dtype=float)).all(axis=1)
    raw, calibrated = raw[finite], calibrated[finite]
    raw = raw.assign(_paper_gain=paper_gain[finite], _row=np.arange(len(raw)))
    calibrated_values = {name: calibrated[name].to_numpy(dtype=float) for name in names}
    gains = {names[1]: calibrated["gain"].to_numpy(dtype=float), "omission": raw["_paper_gain"].to_numpy()}
    if jvp:
        gains[JVP] = _per_update_gain(records, JVP)[finite]
    update_ids = _update_ids(raw)
    split = SPLIT_JVP if jvp else SPLIT_NO_JVP
    rows = []
    for group_values, group in iter_groups(raw, keys):
        at = group["_row"].to_numpy()
        total_raw = float(np.abs(group[MEASURED].to_numpy(dtype=float)).sum())
        for name in names:
            row = {**group_values, "part": name, "split": split}
            values = group[name].to_numpy(dtype=float)
            ok = np.isfinite(values)
            row["n"] = int(ok.sum())
            row.update(_sums(values[ok], total_raw, ""))
            row.update(_sums(calibrated_values[name][at][ok], total_raw, "_calibrated"))
            row["gain"] = _median_update_gain(gains[name][at], update_ids[at]) if name in gains else np.nan
            rows.append(row)
    return pd.DataFrame(rows, columns=[*keys, *SUMMARY_COLUMNS])


def _sums(values: np.ndarray, total_abs: float, suffix: str) -> dict[str, float]:
    sum_abs = float(np.abs(values).sum())
    return {
        f"sum{suffix}": float(values.sum()),
        f"sum_abs{suffix}": sum_abs,
        f"share{suffix}": sum_abs / total_abs if total_abs > 0 else float("nan"),
    }


def _update_ids(frame: pd.DataFrame) -> np.ndarray:
    """(n,) an integer id of each token's update."""
    keys = _update_keys(frame)
    if not keys:
        return np.zeros(len(frame), dtype=int)
    return frame.groupby(keys, sort=False, dropna=False).ngroup().to_numpy()


def _median_update_gain(gain: np.ndarray, update_id: np.ndarray) -> float:
    """Median over updates (one value each, not one per token) of the finite per-update gains."""
    if not len(gain):
        return float("nan")
    _, first = np.unique(update_id, return_index=True)
    per_update = gain[first]
    per_update = per_update[np.isfinite(per_update)]
    return float(np.median(per_update)) if len(per_update) else float("nan")
