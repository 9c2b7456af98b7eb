"""Figures of theory vs measurement: scatter densities, residual bins, quadrants, tightness per step.

Inputs are trace records or the tables of ``entropy_lab.analyses``; outputs are
matplotlib Figures (see ``figures.style``). Every function draws a "no data" panel
instead of failing on empty or NaN-only input.

Deliberate simplifications:

- ``measured_vs_predicted`` pools all runs in ``records`` (one panel per estimator);
  filter the records to compare runs. Hexbin colour is the log token count, without a
  colour bar to keep panels compact.
- ``tightness_over_steps`` averages the rows of several updates within a step.
- The decomposition's figures live in ``figures.decomposition``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter

from entropy_lab.analyses.quadrants import QUADRANTS
from entropy_lab.analyses.residuals import FACTORS
from entropy_lab.analyses.tightness import (
    ESTIMATOR_COLUMNS,
    MEASURED,
    estimator_columns,
    finite_pairs,
    resolve_estimators,
    tightness_summary,
)

from .style import (
    ALL,
    DELTA_H_LABEL,
    DIVERGING_CMAP,
    LINESTYLES,
    SEQUENTIAL_CMAP,
    STEP_LABEL,
    TOKEN,
    axis_label,
    colors,
    compact_ticks,
    extend_colors,
    integer_ticks,
    new_figure,
    no_data,
    series_labels,
    styled,
)

FACTOR_LABELS = {
    "weight": axis_label("weight w", "signed, unitless", TOKEN),
    "probability": axis_label("probability π_a", "unitless", TOKEN),
    "surprisal": axis_label("surprisal −log π_a", "nats", TOKEN),
    "entropy": axis_label("entropy H before", "nats", TOKEN),
}
GAIN_LINE_COLOR = "C3"
NO_STATISTIC_STYLE: dict[str, Any] = {"color": "0.6", "ls": "--", "lw": 0.9}
NO_STATISTIC_LABEL = "traced, no statistic\n(every ω = 0, e.g. all A = 0)"
PREDICTED_LABEL = axis_label("predicted ω", "nats", TOKEN)
RESIDUAL_LABEL = axis_label("residual ΔH − pred.", "nats", TOKEN)
# (axis label, panel title): short labels, the definition goes in the title.
TIGHTNESS_LABELS = {
    "pearson": (axis_label("Pearson r", "unitless", TOKEN), "correlation of ω with ΔH"),
    "spearman": (axis_label("Spearman ρ", "unitless", TOKEN), "rank correlation of ω with ΔH"),
    "sign_agreement": (axis_label("sign agreement", "fraction", TOKEN), "sign(ω) = sign(ΔH), |ΔH| > floor"),
    "gain": (axis_label("gain g", "ratio", TOKEN), "g = Σ ΔH ω / Σ ω²"),
    "r2": (axis_label("R²", "unitless", TOKEN), "R² of ΔH ≈ g ω"),
}


def measured_vs_predicted(
    records: pd.DataFrame, estimators: Sequence[str] | str | None = None, gridsize: int = 40
) -> Figure:
    """Hexbin density of measured vs predicted ΔH, one panel per available estimator.

    Args:
        records: trace records (``delta_entropy`` and ``omega_*`` columns).
        estimators: estimator names; None = every available one (all-NaN ones are skipped).
        gridsize: hexagons across the x range.

    Returns:
        A Figure with one axes per estimator that has a finite, nonzero prediction (one "no
        data" axes when none has; the estimators left out are named under the panels); each
        shows the line y = g x of the pooled least-squares gain g and, in its title, the
        Pearson r and g.
    """
    names = resolve_estimators(records, estimators) if MEASURED in records.columns else []
    # Only estimators with a token to plot get a panel; the others are named under the figure.
    usable = [name for name in names if _plottable(records, name)]
    left_out = [name for name in names if name not in usable]
    stats = tightness_summary(records, usable, split_runs=False).set_index("estimator") if usable else None
    with styled():
        fig, axes = new_figure(len(usable), panel_size=(3.8, 3.2))
        if not usable:
            _label(axes[0], PREDICTED_LABEL, DELTA_H_LABEL)
            no_data(axes[0], "no data" if not left_out else f"no nonzero prediction: {', '.join(left_out)}")
            return fig
        for ax, name in zip(axes, usable, strict=True):
            measured, predicted = finite_pairs(records, MEASURED, estimator_columns(records)[name])
            _label(ax, PREDICTED_LABEL, DELTA_H_LABEL)
            if np.ptp(predicted) > 0 and np.ptp(measured) > 0:
                ax.hexbin(
                    predicted, measured, gridsize=gridsize, mincnt=1, bins="log", cmap=SEQUENTIAL_CMAP,
                    linewidths=0, rasterized=True,
                )  # fmt: skip
            else:  # hexbin needs a non-degenerate extent
                ax.scatter(predicted, measured, s=6, rasterized=True)
            assert stats is not None  # usable is non-empty inside this loop
            gain, r = stats.loc[name, "gain"], stats.loc[name, "pearson"]
            if np.isfinite(gain):
                xs = np.linspace(predicted.min(), predicted.max(), 2)
                ax.plot(xs, gain * xs, color=GAIN_LINE_COLOR, lw=1.2)
            ax.axhline(0, color="0.6", lw=0.6)
            ax.axvline(0, color="0.6", lw=0.6)
            ax.set_title(f"{name}: r = {r:.3f}, g = {gain:.3g}")
            compact_ticks(ax, "both")
        note = "red line: ΔH = g ω, g the least-squares gain through the origin"
        if left_out:
            note += f"; no panel (no finite, nonzero prediction): {', '.join(left_out)}"
        fig.supxlabel(note, fontsize="small", color="0.3")
    return fig


def _plottable(records: pd.DataFrame, name: str) -> bool:
    """Whether estimator ``name`` has a finite (measured, predicted) pair with a nonzero prediction."""
    _measured, predicted = finite_pairs(records, MEASURED, estimator_columns(records)[name])
    return bool(np.any(predicted != 0))


def residuals_by_factor_panels(table: pd.DataFrame, shares: pd.DataFrame | None = None) -> Figure:
    """Mean (solid) and RMS (dotted) residual per quantile bin, one panel per factor.

    Args:
        table: output of ``residuals_by_factor`` (one line per run when it has several).
        shares: optional output of ``factor_variance_share``; its ``share`` (eta²) goes in
            the titles (first run's value when there are several).

    Returns:
        A Figure with one axes per factor (those of ``FACTORS`` when the table is empty).
    """
    factors = list(dict.fromkeys(table["factor"])) if len(table) else list(FACTORS)
    labels = series_labels(table)
    palette = colors(labels)
    share_of = {}
    if shares is not None and len(shares):
        share_of = shares.drop_duplicates("factor").set_index("factor")["share"].to_dict()
    with styled():
        fig, axes = new_figure(len(factors), ncols=2 if len(factors) == 4 else None, panel_size=(3.8, 3.0))
        for ax, factor in zip(axes, factors, strict=True):
            _label(ax, FACTOR_LABELS.get(factor, axis_label(factor, "as recorded", TOKEN)), RESIDUAL_LABEL)
            title = factor if factor not in share_of else f"{factor} (η² = {share_of[factor]:.2f})"
            ax.set_title(title)
            rows = table[table["factor"] == factor] if len(table) else table
            drawn = False
            for label in sorted(set(labels[rows.index])):
                run = rows[labels[rows.index] == label].sort_values("bin")
                x = run["factor_mean"].to_numpy(dtype=float)
                color = palette[label]
                ax.plot(x, run["mean_residual"].to_numpy(dtype=float), "-o", ms=3, color=color, label=label)
                ax.plot(x, run["rms_residual"].to_numpy(dtype=float), ":", color=color)
                drawn = drawn or np.isfinite(x).any()
            if not drawn:
                no_data(ax)
                continue
            ax.axhline(0, color="0.6", lw=0.6)
            compact_ticks(ax, "both")  # weights are ~1e-4: long tick labels would overlap
            handles, names = ax.get_legend_handles_labels()
            handles.append(Line2D([], [], ls=":", color="0.3"))
            names.append("RMS")
            ax.legend(handles, names, frameon=False, fontsize="small")
    return fig


def quadrant_heatmap(table: pd.DataFrame) -> Figure:
    """Mean measured ΔH per sign(A) x sign(l_a) quadrant as a 2x2 heatmap, one panel per run.

    Args:
        table: output of ``quadrants``. Cells are annotated with the token share, mean
            measured and predicted change, estimator sign agreement and the theory's call.

    Returns:
        A Figure with one axes per run plus one shared colour-bar axes (a single "no data"
        axes, no colour bar, when the table has no tokens).
    """
    counts = pd.to_numeric(table["count"], errors="coerce") if len(table) else pd.Series(dtype=float)
    grid_label = axis_label("sign of l_a = log π_a + H", "sign", TOKEN)
    advantage_label = axis_label("sign of advantage A", "sign", TOKEN)
    with styled():
        if not len(table) or not (counts.fillna(0) > 0).any():
            fig, axes = new_figure(1)
            _label(axes[0], grid_label, advantage_label)
            no_data(axes[0])
            return fig
        labels = series_labels(table)
        runs = sorted(set(labels))
        fig, axes = new_figure(len(runs), panel_size=(3.8, 3.4))
        values = pd.to_numeric(table["mean_measured"], errors="coerce").to_numpy(dtype=float)
        limit = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 1.0
        vmax = limit or 1.0
        norm = Normalize(-vmax, vmax)
        image = None
        for ax, run in zip(axes, runs, strict=True):
            rows = table[labels == run].set_index("quadrant")
            grid = np.full((2, 2), np.nan)
            for label, sign_a, sign_l, theory in QUADRANTS:
                if sign_a == 0 or label not in rows.index:
                    continue
                i, j = (0 if sign_a > 0 else 1), (0 if sign_l > 0 else 1)
                row = rows.loc[label]
                grid[i, j] = row["mean_measured"]
                dark = np.isfinite(row["mean_measured"]) and abs(row["mean_measured"]) > 0.55 * vmax
                ax.text(j, i, _cell_text(row, theory), ha="center", va="center", fontsize=6.5,
                        color="white" if dark else "black")  # fmt: skip
            image = ax.imshow(grid, cmap=DIVERGING_CMAP, norm=norm)
            ax.set_xticks([0, 1], ["l_a > 0", "l_a < 0"])
            ax.set_yticks([0, 1], ["A > 0", "A < 0"])
            ax.grid(False)
            _label(ax, grid_label, advantage_label)
            zero = rows.loc["A=0", "share"] if "A=0" in rows.index else 0.0
            # Two lines: a run name and the share side by side are wider than the panel.
            ax.set_title(
                f"{run}\nA = 0: {zero:.0%} of tokens" if run != ALL else f"A = 0: {zero:.0%} of tokens"
            )
        assert image is not None  # the table holds at least one run
        bar = fig.colorbar(image, ax=axes, shrink=0.8)
        bar.set_label(axis_label("mean measured ΔH", "nats", TOKEN))
        bar.formatter = FuncFormatter(lambda value, _pos: f"{value:.2g}")
        bar.update_ticks()
    return fig


def _cell_text(row: pd.Series, theory: str) -> str:
    if not row["count"]:
        return f"no tokens\ntheory: {theory}"
    return (
        f"{row['share']:.0%} of tokens\n"
        f"meas {row['mean_measured']:+.2g}\n"
        f"pred {row['mean_predicted']:+.2g}\n"
        f"sign agree {row['sign_agreement']:.2f}\n"
        f"theory: {theory}"
    )


def tightness_over_steps(
    table: pd.DataFrame, metrics: Sequence[str] = ("pearson", "sign_agreement", "gain")
) -> Figure:
    """Tightness statistics per step, one panel per statistic, one colour per estimator.

    Args:
        table: output of ``tightness`` grouped by step (rows of several updates per step are
            averaged); several runs get different line styles.
        metrics: tightness columns to plot.

    Returns:
        A Figure with one axes per statistic and one legend outside the panels. Every traced
        step of the table is shown: a step where no estimator has a finite statistic (every
        ω is 0 when no token has a nonzero advantage, so correlation and gain are undefined)
        is a dashed grey vertical line, named in the legend, and the curves join its
        neighbours.
    """
    usable = len(table) > 0 and "step" in table.columns and set(metrics) <= set(table.columns)
    with styled():
        fig, axes = new_figure(len(metrics), panel_size=(3.4, 2.9))
        for ax, metric in zip(axes, metrics, strict=True):
            label, title = TIGHTNESS_LABELS.get(metric, (axis_label(metric, "unitless", TOKEN), metric))
            _label(ax, STEP_LABEL, label)
            ax.set_title(title)
        if not usable:
            for ax in axes:
                no_data(ax, "no data (needs per-step rows)")
            return fig
        frame = table.assign(series=series_labels(table))
        means = frame.groupby(["series", "estimator", "step"], sort=True)[list(metrics)].mean().reset_index()
        # An estimator without a single finite statistic (an all-NaN column) gets no line and no legend entry.
        has_value = np.isfinite(means[list(metrics)].to_numpy(dtype=float)).any(axis=1)
        shown = set(means.loc[has_value, "estimator"])
        means = means[means["estimator"].isin(shown)] if shown else means
        # Built-ins keep their colours whatever else is present; further estimators take the next ones.
        palette = extend_colors(colors(ESTIMATOR_COLUMNS), means["estimator"])
        runs = sorted(set(means["series"]))
        styles = {run: LINESTYLES[i % len(LINESTYLES)] for i, run in enumerate(runs)}
        marked = False
        for ax, metric in zip(axes, metrics, strict=True):
            drawn = False
            for (run, estimator), rows in means.groupby(["series", "estimator"], sort=True):
                steps, y = rows["step"].to_numpy(dtype=float), rows[metric].to_numpy(dtype=float)
                finite = np.isfinite(y)  # joined across a step without a value; that step is marked below
                ax.plot(
                    steps[finite], y[finite], styles[run], marker=".", color=palette.get(estimator, "0.3")
                )
                drawn = drawn or bool(finite.any())
            for step in _steps_without_statistic(means, metric):
                ax.axvline(step, **NO_STATISTIC_STYLE)
                marked = True
            if not drawn:
                no_data(ax, "no statistic at any traced step")
            else:
                compact_ticks(ax, "y")  # gains reach 1e5 or more
                integer_ticks(ax)
        estimators = list(dict.fromkeys(means["estimator"]))
        handles = [Line2D([], [], color=palette.get(e, "0.3"), marker=".") for e in estimators]
        names = list(estimators)
        if len(runs) > 1:
            handles += [Line2D([], [], color="0.3", ls=styles[run]) for run in runs]
            names += runs
        if marked:
            handles.append(Line2D([], [], **NO_STATISTIC_STYLE))
            names.append(NO_STATISTIC_LABEL)
        fig.legend(handles, names, loc="outside right upper", frameon=False, fontsize="small")
    return fig


def _steps_without_statistic(means: pd.DataFrame, metric: str) -> list[float]:
    """Traced steps at which no estimator of some series has a finite ``metric``."""
    finite = means.assign(finite=np.isfinite(means[metric].to_numpy(dtype=float)))
    per_step = finite.groupby(["series", "step"], sort=True)["finite"].any()
    return sorted({float(step) for (_series, step), any_finite in per_step.items() if not any_finite})


def _label(ax: Axes, xlabel: str, ylabel: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
