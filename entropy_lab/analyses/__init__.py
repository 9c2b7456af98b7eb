"""entropy_lab.analyses: pure functions from trace records and run metrics to tables.

DataFrames in, DataFrames out; no I/O and no plotting. Trace records follow the column
contract of docs/theory.md section 10. When records of several runs are concatenated with a
``method`` and/or ``run`` column, every record analysis treats each run separately
(those columns lead the output) so that runs are never pooled by accident.

- ``tightness``: estimator vs measured entropy change (correlation, gain, sign agreement).
- ``residuals``: residuals per quantile bin of weight, probability, surprisal, entropy.
- ``decomposition``: the identity dH = first order + coupling + curvature, and omission.
- ``quadrants``: sign(A) x sign(l_a) table against first-order theory.
- ``regime``: the linear regime, per multiple eta of the step, from an eta sweep's records.
- ``weights``: what an intervention's per-token weights did (size, share damped, correlation with dH).
- ``attribution``: the jvp prediction split over parameter groups (``attr_<kind>:`` columns).
- ``compare``: per-method summaries and curves of training metrics across seeds.
"""

from entropy_lab.records import FACTORS, QUADRANTS

from .attribution import attribution_table, has_attribution
from .compare import compare_runs, curves, pass_at_k_columns, run_summary, t_interval
from .decomposition import decompose, decomposition_summary
from .quadrants import quadrants
from .regime import has_sweep, regime_shares, regime_table, regime_tightness, sweep_long
from .residuals import factor_variance_share, residuals_by_factor
from .tightness import (
    ESTIMATOR_COLUMNS,
    available_estimators,
    estimator_column,
    tightness,
    tightness_summary,
)
from .weights import intervention_weight_summary

__all__ = [
    "ESTIMATOR_COLUMNS",
    "FACTORS",
    "QUADRANTS",
    "attribution_table",
    "available_estimators",
    "compare_runs",
    "curves",
    "decompose",
    "decomposition_summary",
    "estimator_column",
    "factor_variance_share",
    "has_attribution",
    "has_sweep",
    "intervention_weight_summary",
    "pass_at_k_columns",
    "quadrants",
    "regime_shares",
    "regime_table",
    "regime_tightness",
    "residuals_by_factor",
    "run_summary",
    "sweep_long",
    "t_interval",
    "tightness",
    "tightness_summary",
]
