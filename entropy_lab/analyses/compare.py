"""Compare training runs of several methods (and seeds) from their metrics and evaluations.

Inputs: ``metrics`` (one row per training step: ``step``, ``entropy/mean``,
``reward/mean``, ...) and optionally ``evals`` (``step``, ``eval/accuracy``,
``eval/pass@k``, ...), each the concatenation of several runs with a string column
``method`` and an integer column ``seed`` added by the caller.

Deliberate simplifications:

- Without a ``method`` column, ``run`` is used as the method label, else all rows are one
  method called "run"; without a ``seed`` column every method is one seed (0).
- "Initial" is the value at the first step; "final" is the mean over the last
  ``tail_fraction`` (10%) of a run's logged steps, at least the last one, which damps
  step-to-step noise. Evaluations are sparse, so their "final" is the last evaluation.
- ``mean_abs_entropy_step`` is the mean |entropy/mean[t+1] - entropy/mean[t]| over
  consecutive logged steps (batch-level entropy, so it includes sampling noise).
- ``entropy_tracking_error`` is the mean |entropy/mean - entropy/target| over the second half
  of a run's logged steps, where the metrics carry the run's target (``entropy/target``).
- Across seeds: the mean and the half-width of a two-sided t-interval
  (``<stat>_ci``; mean +- half-width covers the method's mean at ``confidence``). One
  seed gives a NaN half-width; identical seeds give 0.
- Duplicate rows for one (method, seed, step) are averaged first.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
from scipy import stats

from .tightness import as_float, require_columns

ENTROPY = "entropy/mean"
ENTROPY_TARGET = "entropy/target"
REWARD = "reward/mean"
ACCURACY = "eval/accuracy"
PASS_AT_K = re.compile(r"^eval/pass@(\d+)$")
TAIL_FRACTION = 0.1


def pass_at_k_columns(evals: pd.DataFrame) -> dict[int, str]:
    """Map k -> column for every ``eval/pass@k`` column of ``evals``, sorted by k."""
    found = {int(m.group(1)): c for c in evals.columns if (m := PASS_AT_K.match(str(c)))}
    return dict(sorted(found.items()))


def t_interval(values: np.ndarray | pd.Series, confidence: float = 0.95) -> tuple[float, float]:
    """(mean, half-width) of the two-sided Student-t interval of the mean of ``values``.

    Non-finite values are ignored. Half-width = t_{(1+c)/2, n-1} * sd(ddof=1) / sqrt(n);
    NaN when fewer than two values remain, 0 when they are identical.
    """
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return float("nan"), float("nan")
    mean = float(x.mean())
    if len(x) < 2:
        return mean, float("nan")
    sd = float(x.std(ddof=1))
    return mean, float(stats.t.ppf(0.5 + confidence / 2, len(x) - 1) * sd / math.sqrt(len(x)))


def label_runs(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy with ``method`` and ``seed`` columns present (see the module docstring)."""
    out = frame.copy()
    if "method" not in out.columns:
        out["method"] = out["run"].astype(str) if "run" in out.columns else "run"
    if "seed" not in out.columns:
        out["seed"] = 0
    return out


def _per_step(frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Mean of ``columns`` per (method, seed, step), as floats, sorted by step."""
    numeric = frame[["method", "seed", "step"]].copy()
    for column in columns:
        numeric[column] = as_float(frame[column])
    return numeric.groupby(["method", "seed", "step"], sort=True, observed=True)[columns].mean().reset_index()


def _tail_mean(values: np.ndarray, tail_fraction: float) -> float:
    finite = values[np.isfinite(values)]
    if len(finite) == 0:
        return float("nan")
    n_tail = max(1, math.ceil(tail_fraction * len(finite)))
    return float(finite[-n_tail:].mean())


def _first(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite[0]) if len(finite) else float("nan")


def _metric_stats(run: pd.DataFrame, tail_fraction: float) -> dict[str, float]:
    out: dict[str, float] = {"n_steps": len(run)}
    if ENTROPY in run.columns:
        entropy = run[ENTROPY].to_numpy()
        out["initial_entropy"] = _first(entropy)
        out["final_entropy"] = _tail_mean(entropy, tail_fraction)
        steps = np.abs(np.diff(entropy[np.isfinite(entropy)]))
        out["mean_abs_entropy_step"] = float(steps.mean()) if len(steps) else float("nan")
        if ENTROPY_TARGET in run.columns:
            gap = np.abs(entropy - run[ENTROPY_TARGET].to_numpy())[len(entropy) // 2 :]
            gap = gap[np.isfinite(gap)]
            out["entropy_tracking_error"] = float(gap.mean()) if len(gap) else float("nan")
    if REWARD in run.columns:
        reward = run[REWARD].to_numpy()
        out["initial_reward"] = _first(reward)
        out["final_reward"] = _tail_mean(reward, tail_fraction)
    return out


def _eval_stats(run: pd.DataFrame, ks: dict[int, str]) -> dict[str, float]:
    out: dict[str, float] = {}
    if ACCURACY in run.columns:
        accuracy = run[ACCURACY].to_numpy()
        finite = accuracy[np.isfinite(accuracy)]
        out["best_accuracy"] = float(finite.max()) if len(finite) else float("nan")
        out["final_accuracy"] = float(finite[-1]) if len(finite) else float("nan")
    for k, column in ks.items():
        values = run[column].to_numpy()
        finite = values[np.isfinite(values)]
        out[f"final_pass@{k}"] = float(finite[-1]) if len(finite) else float("nan")
    return out


def run_summary(
    metrics: pd.DataFrame, evals: pd.DataFrame | None = None, tail_fraction: float = TAIL_FRACTION
) -> pd.DataFrame:
    """One row per (method, seed): the statistics ``compare_runs`` averages.

    Returns columns ``method``, ``seed``, ``n_steps`` and, where the inputs have them,
    ``initial_entropy``, ``final_entropy``, ``mean_abs_entropy_step`` (nats, batch-level),
    ``entropy_tracking_error`` (with an ``entropy/target`` column),
    ``initial_reward``, ``final_reward``, ``best_accuracy``, ``final_accuracy``,
    ``final_pass@k`` per k.
    """
    require_columns(metrics, ["step"], "Run comparison")
    metrics = label_runs(metrics)
    columns = [c for c in (ENTROPY, REWARD, ENTROPY_TARGET) if c in metrics.columns]
    per_step = _per_step(metrics, columns)
    rows = {
        key: {"method": key[0], "seed": key[1], **_metric_stats(run, tail_fraction)}
        for key, run in per_step.groupby(["method", "seed"], sort=True, observed=True)
    }
    if evals is not None and len(evals):
        require_columns(evals, ["step"], "Run comparison")
        evals = label_runs(evals)
        ks = pass_at_k_columns(evals)
        eval_columns = [c for c in (ACCURACY, *ks.values()) if c in evals.columns]
        for key, run in _per_step(evals, eval_columns).groupby(["method", "seed"], sort=True, observed=True):
            rows.setdefault(key, {"method": key[0], "seed": key[1], "n_steps": 0}).update(
                _eval_stats(run, ks)
            )
    frame = pd.DataFrame(list(rows.values()))
    if frame.empty:
        return pd.DataFrame(columns=["method", "seed", "n_steps"])
    return frame.sort_values(["method", "seed"], ignore_index=True)


def compare_runs(
    metrics: pd.DataFrame,
    evals: pd.DataFrame | None = None,
    tail_fraction: float = TAIL_FRACTION,
    confidence: float = 0.95,
) -> pd.DataFrame:
    """Per method: initial/final entropy and reward, entropy step size, accuracy and pass@k.

    Args:
        metrics: per-step metrics of one or more runs (``method``, ``seed`` columns added).
        evals: periodic evaluations of the same runs, or None.
        tail_fraction: fraction of last steps averaged into "final" metric values.
        confidence: coverage of the t-interval across seeds.

    Returns:
        One row per method: ``method``, ``n_seeds``, then for every statistic of
        ``run_summary`` its mean across seeds (same name) and the t-interval half-width
        (``<name>_ci``; NaN for a single seed).
    """
    per_run = run_summary(metrics, evals, tail_fraction)
    stat_names = [c for c in per_run.columns if c not in ("method", "seed", "n_steps")]
    rows = []
    for method, runs in per_run.groupby("method", sort=True, observed=True):
        row: dict[str, object] = {"method": method, "n_seeds": runs["seed"].nunique()}
        for name in stat_names:
            row[name], row[f"{name}_ci"] = t_interval(runs[name].to_numpy(dtype=float), confidence)
        rows.append(row)
    columns = ["method", "n_seeds", *[c for name in stat_names for c in (name, f"{name}_ci")]]
    return pd.DataFrame(rows, columns=columns)


def curves(metrics: pd.DataFrame, column: str, confidence: float = 0.95) -> pd.DataFrame:
    """Mean and t-interval of ``column`` across seeds, per method and step, for plotting.

    Returns columns ``method``, ``step``, ``n_seeds`` (seeds with a finite value at that
    step), ``mean``, ``ci`` (half-width; NaN for one seed), ``lower``, ``upper``.
    Works on metrics or eval frames alike.
    """
    require_columns(metrics, ["step", column], "Curves")
    per_step = _per_step(label_runs(metrics), [column])
    rows = []
    for (method, step), group in per_step.groupby(["method", "step"], sort=True, observed=True):
        values = group[column].to_numpy()
        mean, half = t_interval(values, confidence)
        rows.append(
            {
                "method": method,
                "step": step,
                "n_seeds": int(np.isfinite(values).sum()),
                "mean": mean,
                "ci": half,
                "lower": mean - half,
                "upper": mean + half,
            }
        )
    return pd.DataFrame(rows, columns=["method", "step", "n_seeds", "mean", "ci", "lower", "upper"])
