"""The analyses a run report holds: one registered entry per table, with its figure and report section.

A ``ReportEntry`` names one table (an ``analyses`` function of the trace records), the
figure drawn from it (a ``figures`` function) and the section of ``report.md`` that shows
it. ``trace_tables``, ``write_trace_figures`` and ``trace_sections`` walk the registered
entries in order, so adding an analysis to every report, the JSON output and the figure
set is one ``register_report_entry(ReportEntry(...))`` next to the analysis::

    register_report_entry(
        ReportEntry(
            "tokens_per_step",
            table=lambda records, estimator: records.groupby("step", as_index=False).size(),
            figure=FigureSpec("tokens_per_step", lambda records, tables: draw(tables["tokens_per_step"])),
            section=Section("Tokens per step", "Traced tokens of each step.", figures=("tokens_per_step",)),
        )
    )

A table function returns None where the records lack what it needs (no eta sweep): no table, no section.

Deliberate simplifications:

- Trace tables use one estimator (``softmax`` by default) for residuals and quadrants;
  the tightness table covers every estimator that has finite values.
- The decomposition starts from ``logit-grad`` and falls back to ``softmax`` (equal for a
  weighted log-probability loss) when the tracer left ``logit-grad`` all NaN.
- Sign agreement uses the default noise floor of ``analyses.tightness``: 1e-3 times the
  largest |delta_entropy| of the run.
- The linear-regime tables pool the tokens of every traced step that carries an eta sweep.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

import entropy_lab.analyses as analyses
import entropy_lab.figures as figures
from entropy_lab.analyses.tightness import NOISE_FLOOR_FRACTION, available_estimators, estimator_column
from entropy_lab.figures.regime import linear_regime_figure
from entropy_lab.formatting import finite_values, format_number
from entropy_lab.registry import Registry
from entropy_lab.report.markdown import markdown_table

Tables = Mapping[str, pd.DataFrame]
TableFn = Callable[[pd.DataFrame, str], pd.DataFrame | None]
"""(trace records, estimator of the residual and quadrant tables) -> the table, or None when the
records lack what it needs (the entry is then left out of the tables and sections)."""
FigureFn = Callable[[pd.DataFrame, Tables], Figure | None]
"""(trace records, every table so far) -> a figure, or None when there is nothing to show."""


@dataclass(frozen=True)
class SectionContext:
    """What a report section may draw on."""

    records: pd.DataFrame
    tables: Tables
    links: Mapping[str, str]  # figure stem -> markdown image link
    estimator: str  # the estimator of the residual and quadrant tables


@dataclass(frozen=True)
class FigureSpec:
    """A figure written as ``<stem>.png`` and ``<stem>.pdf``."""

    stem: str
    draw: FigureFn


@dataclass(frozen=True)
class Section:
    """A section of ``report.md``: heading, prose, the entry's table (as ``columns``) and figure links."""

    title: str | Callable[[SectionContext], str]
    text: str | Callable[[SectionContext], str]
    columns: Sequence[str] | None = None  # the table's view; None = every column
    figures: Sequence[str] = ()  # stems of figures linked under the table (any entry's)
    show_table: bool = True

    def lines(self, table: pd.DataFrame | None, ctx: SectionContext) -> list[str]:
        title = self.title(ctx) if callable(self.title) else self.title
        text = self.text(ctx) if callable(self.text) else self.text
        lines = [f"## {title}", "", text, ""]
        if self.show_table and table is not None:
            lines += [markdown_table(table, self.columns), ""]
        return [*lines, *[ctx.links[s] for s in self.figures if s in ctx.links], ""]


@dataclass(frozen=True)
class TerminalView:
    """How ``entropy-lab trace`` prints an entry's table: a title after the run label, narrower columns."""

    title: str
    columns: Sequence[str]


@dataclass(frozen=True)
class ReportEntry:
    """One analysis of trace records in the reports: table, figure, section and terminal view, each optional."""

    name: str
    table: TableFn | None = None
    figure: FigureSpec | None = None
    section: Section | None = None
    terminal: TerminalView | None = None


REPORT_ENTRIES: Registry[ReportEntry] = Registry("report entry")


def register_report_entry(entry: ReportEntry) -> ReportEntry:
    """Add ``entry`` after the registered ones (its table, figure and section follow theirs)."""
    return REPORT_ENTRIES.add(entry.name, entry)


# --- helpers of the built-in entries -------------------------------------------------------


def decomposition_base(records: pd.DataFrame) -> str:
    """``logit-grad`` when the records have finite values of it, else ``softmax``."""
    return "logit-grad" if "logit-grad" in available_estimators(records) else "softmax"


def weights_vary(records: pd.DataFrame) -> bool:
    """True when ``intervention_weight`` takes more than one finite value (an intervention acted)."""
    if "intervention_weight" not in records.columns:
        return False
    values = finite_values(records["intervention_weight"])
    return len(values) > 0 and float(np.ptp(values)) > 0.0


def noise_floor(tables: Tables) -> float:
    """The sign-agreement noise floor used in the tightness table (NaN without one)."""
    tightness = tables.get("tightness")
    floors = np.zeros(0)
    if tightness is not None and len(tightness):
        floors = finite_values(tightness["noise_floor"])
    return float(floors[0]) if len(floors) else float("nan")


def _tightness_text(ctx: SectionContext) -> str:
    steps = sorted(pd.unique(ctx.records["step"]))
    span = f"({format_number(steps[0])}-{format_number(steps[-1])})" if steps else ""
    return (
        f"{len(ctx.records)} traced tokens from {len(steps)} step(s) {span}. Gain g = Σ ΔH ω / Σ ω² "
        "(least squares through the origin); r2 is the R² of ΔH ≈ g ω. Sign agreement counts tokens with "
        f"|ΔH| above the noise floor of {format_number(noise_floor(ctx.tables))} nats "
        f"({NOISE_FLOOR_FRACTION:g} × the run's largest |ΔH|). `pearson_update_median`: the median of the "
        "per-update Pearson; `spearman_zero_advantage`: Spearman over the `n_zero_advantage` tokens with "
        "A = 0, where every per-token closed form predicts 0 (NaN for them; covariance centres A)."
    )


def _decomposition_text(ctx: SectionContext) -> str:
    parts = ctx.tables["decomposition"]["part"]
    base = next((p for p in parts if str(p).startswith("omega_")), "n/a")
    return (
        f"ΔH = ω (`{base}`) + coupling + [nonlinearity, with an `omega_jvp` column] + curvature per token; "
        "omission = ω - ω_paper. Share = Σ|part| / Σ|ΔH| (parts of opposite sign cancel, so shares need "
        "not add to 1); calibrated: each ω scaled by its per-update least-squares gain (median in `gain`)."
    )


# --- the built-in entries, in report order ----------------------------------------------------

TIGHTNESS_VIEW = [
    "estimator", "n", "pearson", "spearman", "sign_agreement", "n_above_floor", "gain", "r2",
    "rmse_calibrated", "sum_measured", "sum_calibrated", "pearson_update_median", "n_zero_advantage",
    "spearman_zero_advantage",
]  # fmt: skip
QUADRANTS_VIEW = [
    "quadrant", "theory", "count", "share", "mean_predicted", "mean_measured", "sign_agreement",
    "theory_agreement", "softmax_disagreement",
]  # fmt: skip
QUADRANTS_TERMINAL_VIEW = [
    "quadrant", "theory", "count", "mean_predicted", "mean_measured", "sign_agreement", "softmax_disagreement",
]  # fmt: skip
REGIME_VIEW = ["eta", "estimator", "pearson", "gain"]
REGIME_SHARES_VIEW = ["eta", "curvature", "coupling_raw", "coupling_calibrated", "logit_grad_gain"]

register_report_entry(
    ReportEntry(
        "tightness",
        table=lambda records, estimator: analyses.tightness_summary(records),
        figure=FigureSpec(
            "measured_vs_predicted", lambda records, tables: figures.measured_vs_predicted(records)
        ),
        section=Section(
            "Tightness of the first-order estimators",
            _tightness_text,
            columns=TIGHTNESS_VIEW,
            figures=("measured_vs_predicted", "tightness_over_steps"),
        ),
        terminal=TerminalView(
            "tightness per estimator (token-level, pooled)",
            ["estimator", "n", "pearson", "spearman", "sign_agreement", "gain", "r2"],
        ),
    )
)
register_report_entry(
    ReportEntry(
        "tightness_by_step",
        table=lambda records, estimator: analyses.tightness(records, by=("step",)),
        figure=FigureSpec(
            "tightness_over_steps",
            lambda records, tables: figures.tightness_over_steps(tables["tightness_by_step"]),
        ),
    )
)
register_report_entry(
    ReportEntry(
        "residuals",
        table=lambda records, estimator: analyses.residuals_by_factor(records, estimator),
        figure=FigureSpec(
            "residuals_by_factor",
            lambda records, tables: figures.residuals_by_factor_panels(
                tables["residuals"], tables["factor_share"]
            ),
        ),
    )
)
register_report_entry(
    ReportEntry(
        "factor_share",
        table=lambda records, estimator: analyses.factor_variance_share(records, estimator),
        section=Section(
            lambda ctx: f"Residuals by factor ({ctx.estimator}, calibrated)",
            "Share of the residual variance explained by quantile bins of each factor (η²).",
            columns=["factor", "column", "n", "bins", "share"],
            figures=("residuals_by_factor",),
        ),
        terminal=TerminalView(
            "share of residual variance explained by each factor",
            ["factor", "n", "bins", "share"],
        ),
    )
)
register_report_entry(
    ReportEntry(
        "quadrants",
        table=lambda records, estimator: analyses.quadrants(records, estimator),
        figure=FigureSpec("quadrants", lambda records, tables: figures.quadrant_heatmap(tables["quadrants"])),
        section=Section(
            "Quadrants: sign(A) × sign(l_a)",
            lambda ctx: (
                "First-order theory: ΔH falls for (A>0, l>0) and (A<0, l<0), rises otherwise. Predicted: "
                f"`{ctx.estimator}`, raw. Agreement columns count tokens above the noise floor; "
                "softmax_disagreement: share of tokens where the rule's sign -sign(A l_a) differs from the "
                "`softmax` estimator's (l_a > 0 and π_a l_a < C)."
            ),
            columns=QUADRANTS_VIEW,
            figures=("quadrants",),
        ),
        terminal=TerminalView("quadrants sign(A) x sign(log pi_a + H)", QUADRANTS_TERMINAL_VIEW),
    )
)
register_report_entry(
    ReportEntry(
        "decomposition",
        table=lambda records, estimator: analyses.decomposition_summary(
            records, by=(), base=decomposition_base(records)
        ),
        figure=FigureSpec(
            "decomposition", lambda records, tables: figures.decomposition_bar(tables["decomposition"])
        ),
        section=Section(
            "Decomposition",
            _decomposition_text,
            columns=["part", "split", "n", "sum", "share", "sum_calibrated", "share_calibrated", "gain"],
            figures=("decomposition", "entropy_change_distribution", "steer_weights"),
        ),
        terminal=TerminalView(
            "decomposition of the measured change",
            ["part", "split", "sum", "share", "sum_calibrated", "share_calibrated", "gain"],
        ),
    )
)
register_report_entry(
    ReportEntry(
        "decomposition_by_step",
        table=lambda records, estimator: analyses.decomposition_summary(
            records, by=("step",), base=decomposition_base(records)
        ),
    )
)
register_report_entry(
    ReportEntry(
        "entropy_change_distribution",
        figure=FigureSpec(
            "entropy_change_distribution",
            lambda records, tables: figures.entropy_change_distribution(records),
        ),
    )
)
register_report_entry(
    ReportEntry(
        "intervention_weights",
        table=lambda records, estimator: analyses.intervention_weight_summary(records),
        section=Section(
            "What the intervention's weights did",
            "Per-token loss weights of the method (`intervention_weight`; below 1 damps a token's gradient, "
            "above 1 boosts it): their mean and range, the share of tokens damped and boosted, and how they "
            "correlate with the measured entropy change (Pearson with dH, Spearman with |dH|).",
            figures=("steer_weights",),
        ),
    )
)
register_report_entry(
    ReportEntry(
        "steer_weights",
        figure=FigureSpec(
            "steer_weights",
            lambda records, tables: (
                figures.steer_weight_distribution(records) if weights_vary(records) else None
            ),
        ),
    )
)
ATTRIBUTION_VIEW = ["part", "n", "mean_abs_share", "signed_share", "sum", "pearson_measured"]

register_report_entry(
    ReportEntry(
        "attribution_layer",
        table=lambda records, estimator: (
            analyses.attribution_table(records, "layer")
            if analyses.has_attribution(records, "layer")
            else None
        ),
        section=Section(
            "Where the predicted change comes from: attribution by layer",
            "The jvp prediction split exactly over parameter groups (one forward-mode pass per group, the "
            "step restricted to it; the parts add up to `omega_jvp`). `mean_abs_share`: mean over tokens of "
            "|part| / Σ|parts|; `signed_share`: the part's share of the summed predicted change; "
            "`pearson_measured`: the part alone against the measured change.",
            columns=ATTRIBUTION_VIEW,
        ),
        terminal=TerminalView(
            "attribution by layer: share of the predicted change per group", ATTRIBUTION_VIEW
        ),
    )
)
register_report_entry(
    ReportEntry(
        "entropy_by_position",
        figure=FigureSpec(
            "entropy_by_position", lambda records, tables: figures.entropy_by_position(records)
        ),
        section=Section(
            "Entropy by position and step",
            "Mean token entropy before each traced update at each sequence position, averaged over the "
            "step's traced responses (columns: the traced steps in order). report.html shows every "
            "token of every traced response.",
            figures=("entropy_by_position",),
        ),
    )
)
register_report_entry(
    ReportEntry(
        "linear_regime",
        table=lambda records, estimator: (
            analyses.regime_tightness(records) if analyses.has_sweep(records) else None
        ),
        section=Section(
            "The linear regime along the actual update",
            "The traced tokens' entropy at θ + η Δθ, η a multiple of the actual step (an eta sweep). Per η, "
            "each estimator's Pearson and least-squares gain against the measured change, its prediction "
            "scaled by η (a first-order estimator has gain → 1 as η → 0; jvp-entropy is recomputed per η).",
            columns=REGIME_VIEW,
        ),
        terminal=TerminalView("linear regime: Pearson and gain of the eta-scaled prediction", REGIME_VIEW),
    )
)
register_report_entry(
    ReportEntry(
        "linear_regime_shares",
        table=lambda records, estimator: (
            analyses.regime_shares(records) if analyses.has_sweep(records) else None
        ),
        figure=FigureSpec(
            "linear_regime",
            lambda records, tables: (
                linear_regime_figure(tables["linear_regime"], tables["linear_regime_shares"])
                if "linear_regime_shares" in tables
                else None
            ),
        ),
        section=Section(
            "The linear regime: curvature and coupling",
            "Shares of ||ΔH(η)||² per η: curvature (ΔH - Δ_lin) vanishes as η → 0, the coupling of the "
            "tabular estimators (Δ_lin - η ω_logit-grad, raw and with its least-squares gain) does not.",
            figures=("linear_regime",),
        ),
        terminal=TerminalView(
            "linear regime: shares of ||measured||^2 (curvature -> 0 as eta -> 0; coupling stays)",
            REGIME_SHARES_VIEW,
        ),
    )
)


# --- walking the entries ------------------------------------------------------------------------


def trace_tables(records: pd.DataFrame, estimator: str = "softmax") -> dict[str, pd.DataFrame]:
    """Every registered table of a set of trace records.

    Args:
        records: trace records of one or more runs (``method``/``run`` columns keep runs apart).
        estimator: the estimator whose residuals and quadrants are tabled.

    Returns:
        Entry name -> table, in registration order: ``tightness`` (pooled, one row per
        estimator and run), ``tightness_by_step``, ``residuals`` (per factor bin),
        ``factor_share`` (eta^2 per factor), ``quadrants``, ``decomposition`` (pooled),
        ``decomposition_by_step``, with an eta sweep ``linear_regime`` (per eta and estimator)
        and ``linear_regime_shares`` (per eta), then any registered later. Entries whose
        table function returned None are absent.
    """
    estimator_column(estimator, records)  # fail early, listing the valid names
    tables = {e.name: e.table(records, estimator) for e in REPORT_ENTRIES.values() if e.table is not None}
    return {name: table for name, table in tables.items() if table is not None}


def figure_stems() -> list[str]:
    """The stem of every registered figure (PNG and PDF each), in registration order."""
    return [e.figure.stem for e in REPORT_ENTRIES.values() if e.figure is not None]


def write_trace_figures(records: pd.DataFrame, tables: Tables, out_dir: Path) -> list[Path]:
    """Write every registered figure of trace records and their ``trace_tables`` as PNG and PDF.

    Built-in stems: ``measured_vs_predicted``, ``tightness_over_steps``, ``residuals_by_factor``,
    ``quadrants``, ``decomposition``, ``entropy_change_distribution``, only when the
    intervention weight varies ``steer_weights``, ``entropy_by_position``; with an eta sweep,
    ``linear_regime``.
    Returns the written paths.
    """
    written: list[Path] = []
    for entry in REPORT_ENTRIES.values():
        if entry.figure is not None and (fig := entry.figure.draw(records, tables)) is not None:
            written += figures.save_figure(fig, Path(out_dir) / entry.figure.stem)
    return written


def trace_sections(ctx: SectionContext) -> list[str]:
    """The markdown lines of every registered section, in registration order.

    An entry whose table function gave no table for these records has no section.
    """
    lines: list[str] = []
    for entry in REPORT_ENTRIES.values():
        if entry.section is not None and (entry.table is None or entry.name in ctx.tables):
            lines += entry.section.lines(ctx.tables.get(entry.name), ctx)
    return lines
