"""Figures comparing training runs: curves, entropy-change spread, pass@k, STEER weights, entropy by position.

Inputs: run metrics and eval frames (``method`` and ``seed`` columns added by the
caller, see ``entropy_lab.analyses.compare``) or trace records with a ``method`` (or
``run``) column. Outputs: matplotlib Figures; every function draws a "no data" panel
instead of failing on empty or NaN-only input.

Deliberate simplifications:

- CI bands are t-intervals of the mean across seeds (``analyses.compare.curves``), drawn
  only where a step has two or more seeds.
- ``entropy_change_distribution`` shows token-level |ΔH| as an ECDF on a log axis, so
  tokens with ΔH exactly 0 are left out of that panel.
- ``pass_at_k_curves`` uses each run's last evaluation step unless ``step`` is given.
- ``entropy_by_position`` puts the traced steps side by side in order (one column each,
  evenly spaced whatever the gaps between them) and averages the entropy over the traced
  responses and updates of a step at each sequence position.
- ``training_curves`` drops, per panel, the rows where that metric is not finite (a TRL run
  with several iterations per generation logs reward on every other row only), so a curve
  joins the steps that have a value instead of breaking into invisible fragments.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from entropy_lab.analyses.compare import ENTROPY, REWARD, curves, label_runs, pass_at_k_columns, t_interval
from entropy_lab.analyses.tightness import MEASURED, as_float
from entropy_lab.formatting import finite_values

from .style import (
    BATCH,
    PROBLEM,
    STEP_LABEL,
    TOKEN,
    axis_label,
    colors,
    compact_ticks,
    integer_ticks,
    new_figure,
    no_data,
    series_labels,
    styled,
)

ECDF_POINTS = 2000
METRIC_LABELS = {
    ENTROPY: axis_label("mean token entropy", "nats", BATCH),
    REWARD: axis_label("mean reward", "reward units", BATCH),
    "response/length": axis_label("response length", "tokens", BATCH),
    "kl/ref": axis_label("KL to reference", "nats", BATCH),
    "clip/frac": axis_label("clipped tokens", "fraction", BATCH),
    "eval/accuracy": axis_label("greedy accuracy", "fraction", PROBLEM),
}


def metric_label(column: str) -> str:
    """Axis label of a metrics/eval column; unknown columns say "as logged"."""
    return METRIC_LABELS.get(column, axis_label(column, "as logged", BATCH))


def training_curves(
    metrics: pd.DataFrame, columns: Sequence[str] = (ENTROPY, REWARD), confidence: float = 0.95
) -> Figure:
    """Metric vs step per method, with a t-interval band across seeds where there are several.

    Args:
        metrics: per-step metrics of one or more runs (``method``/``seed`` columns optional).
        columns: metric columns, one panel each (a missing column gives a "no data" panel).
        confidence: coverage of the bands.

    Returns:
        A Figure with one axes per column.
    """
    with styled():
        fig, axes = new_figure(len(columns), panel_size=(4.2, 3.0))
        for ax, column in zip(axes, columns, strict=True):
            ax.set_xlabel(STEP_LABEL)
            ax.set_ylabel(metric_label(column))
            if (
                column not in metrics.columns
                or "step" not in metrics.columns
                or not len(finite_values(metrics[column]))
            ):
                no_data(ax)
                continue
            logged = metrics[np.isfinite(as_float(metrics[column]))]
            table = curves(logged, column, confidence)
            palette = colors(table["method"].astype(str))
            for method, rows in table.groupby("method", sort=True):
                color = palette[str(method)]
                # A lone step is a point; a line needs two.
                marker = "o" if len(rows) == 1 else None
                ax.plot(rows["step"], rows["mean"], color=color, marker=marker, label=str(method))
                if (rows["n_seeds"] > 1).any():
                    ax.fill_between(
                        rows["step"].to_numpy(dtype=float),
                        rows["lower"].to_numpy(dtype=float),
                        rows["upper"].to_numpy(dtype=float),
                        color=color,
                        alpha=0.2,
                        lw=0,
                    )
            integer_ticks(ax)
            ax.legend(frameon=False, fontsize="small")
    return fig


def entropy_change_distribution(records: pd.DataFrame) -> Figure:
    """Spread of entropy changes per method: token-level |ΔH| ECDF and batch-level per-step |mean ΔH|.

    Args:
        records: trace records (``delta_entropy``, ``step``) with a ``method`` or ``run``
            column when several methods are compared.

    Returns:
        A Figure with two axes: left, the ECDF of |ΔH| over tokens (log x); right, one box
        per method of |mean ΔH over a step's traced tokens| across steps.
    """
    with styled():
        fig, (token_ax, step_ax) = new_figure(2, panel_size=(4.2, 3.0))
        token_ax.set_xlabel(axis_label("|ΔH|", "nats, log scale", TOKEN))
        token_ax.set_ylabel(axis_label("ECDF of tokens", "fraction", TOKEN))
        step_ax.set_xlabel(axis_label("method", "name", BATCH))
        step_ax.set_ylabel(axis_label("|mean ΔH| of a step", "nats", BATCH))
        token_ax.set_title("per token")
        step_ax.set_title("per step (mean over traced tokens)")
        if MEASURED not in records.columns or not len(finite_values(records[MEASURED])):
            no_data(token_ax)
            no_data(step_ax)
            return fig
        labels = series_labels(records)
        methods = sorted(set(labels))
        palette = colors(methods)
        drawn = False
        for method in methods:
            values = np.abs(finite_values(records.loc[labels == method, MEASURED]))
            values = np.sort(values[values > 0])
            if len(values):
                fraction = np.arange(1, len(values) + 1) / len(values)
                # Thin to at most ECDF_POINTS evenly spaced ranks: same curve, small PDF files.
                keep = np.unique(np.linspace(0, len(values) - 1, ECDF_POINTS).astype(int))
                token_ax.step(values[keep], fraction[keep], where="post", color=palette[method], label=method)
                drawn = True
        if drawn:
            token_ax.set_xscale("log")
            token_ax.legend(frameon=False, fontsize="small")
        else:
            no_data(token_ax, "no data (no nonzero ΔH)")
        _per_step_boxes(step_ax, records, labels, methods, palette)
    return fig


def _per_step_boxes(ax, records: pd.DataFrame, labels: pd.Series, methods: list[str], palette: dict) -> None:
    measured = pd.to_numeric(records[MEASURED], errors="coerce")
    frame = pd.DataFrame({"method": labels, "measured": measured.where(np.isfinite(measured))})
    frame["step"] = records["step"] if "step" in records.columns else 0
    per_step = frame.groupby(["method", "step"], sort=True)["measured"].mean().abs().dropna()
    data = [(m, per_step.loc[m].to_numpy()) for m in methods if m in per_step.index.get_level_values(0)]
    if not data:
        no_data(ax)
        return
    positions = np.arange(len(data))
    boxes = ax.boxplot(
        [values for _, values in data],
        positions=positions,
        widths=0.5,
        patch_artist=True,
        showfliers=False,  # every point is drawn below
        medianprops={"color": "black"},
    )
    for patch, (method, _values) in zip(boxes["boxes"], data, strict=True):
        patch.set_facecolor(palette[method])
        patch.set_alpha(0.5)
    for position, (method, values) in zip(positions, data, strict=True):
        jitter = np.linspace(-0.12, 0.12, len(values)) if len(values) > 1 else np.zeros(1)
        ax.plot(position + jitter, values, ".", color=palette[method], ms=3)
    ax.set_xticks(positions, [method for method, _ in data], rotation=20, ha="right")
    compact_ticks(ax, "y")


def pass_at_k_curves(evals: pd.DataFrame, step: int | None = None, confidence: float = 0.95) -> Figure:
    """pass@k vs k per method at one evaluation step, with t-interval bars across seeds.

    Args:
        evals: eval frames (``step``, ``eval/pass@k`` columns; ``method``/``seed`` optional).
        step: evaluation step to read; None = each run's last evaluation.
        confidence: coverage of the error bars (drawn where there are two or more seeds).

    Returns:
        A Figure with one axes (log2 k axis when the largest k is at least 4 times the smallest).
    """
    ks = pass_at_k_columns(evals) if len(evals) else {}
    with styled():
        fig, (ax,) = new_figure(1, panel_size=(4.2, 3.0))
        ax.set_xlabel(axis_label("k", "samples per problem", PROBLEM))
        ax.set_ylabel(axis_label("pass@k", "fraction", PROBLEM))
        if not ks or "step" not in evals.columns:
            no_data(ax)
            return fig
        frame = label_runs(evals)
        if step is not None:
            frame = frame[frame["step"] == step]
        frame = frame.sort_values("step").groupby(["method", "seed"], sort=True).tail(1)
        palette = colors(frame["method"].astype(str))
        drawn = False
        for method, runs in frame.groupby("method", sort=True):
            stats = [t_interval(pd.to_numeric(runs[c], errors="coerce"), confidence) for c in ks.values()]
            means = np.array([m for m, _ in stats])
            halves = np.array([h for _, h in stats])
            if not np.isfinite(means).any():
                continue
            ax.errorbar(
                list(ks), means, yerr=np.where(np.isfinite(halves), halves, 0.0), marker="o", ms=3,
                capsize=2, color=palette[str(method)], label=str(method),
            )  # fmt: skip
            drawn = True
        if not drawn:
            no_data(ax)
            return fig
        if max(ks) >= 4 * min(ks):
            ax.set_xscale("log", base=2)
        ax.set_xticks(list(ks), [str(k) for k in ks])
        ax.legend(frameon=False, fontsize="small")
    return fig


def steer_weight_distribution(records: pd.DataFrame, bins: int = 40) -> Figure:
    """Histogram of the per-token intervention weight λ, one outline per method.

    Args:
        records: trace records with ``intervention_weight`` and a ``method`` or ``run`` column.
        bins: number of shared bins over the pooled range.

    Returns:
        A Figure with one axes; bar heights are the fraction of the method's tokens per bin,
        so a method without intervention (all λ = 1) shows one bar of height 1.
    """
    with styled():
        fig, (ax,) = new_figure(1, panel_size=(4.2, 3.0))
        ax.set_xlabel(axis_label("intervention weight λ", "multiplier", TOKEN))
        ax.set_ylabel(axis_label("tokens per bin", "fraction", TOKEN))
        column = "intervention_weight"
        if column not in records.columns or not len(finite_values(records[column])):
            no_data(ax)
            return fig
        labels = series_labels(records)
        methods = sorted(set(labels))
        palette = colors(methods)
        edges = np.histogram_bin_edges(finite_values(records[column]), bins=bins)
        for method in methods:
            values = finite_values(records.loc[labels == method, column])
            if len(values):
                ax.hist(
                    values,
                    bins=edges.tolist(),
                    weights=np.full(len(values), 1.0 / len(values)),
                    histtype="step",
                    lw=1.4,
                    color=palette[method],
                    label=method,
                )
        ax.legend(frameon=False, fontsize="small")
    return fig


def entropy_by_position(records: pd.DataFrame, column: str = "entropy_before") -> Figure:
    """Heatmap of the mean token entropy at each sequence position (rows) and traced step (columns).

    Args:
        records: trace records (``step``, ``position``, ``column``); several runs (``method`` or
            ``run`` columns) get one panel each, on one shared colour scale.
        column: the entropy column (``entropy_before`` or ``entropy_after``).

    Returns:
        A Figure with one axes per run plus a colour-bar axes (one "no data" axes without one
        when nothing is finite).
    """
    needed = {"step", "position", column}
    usable = needed <= set(records.columns) and len(finite_values(records[column])) > 0
    position_label = axis_label("position in the sequence", "token index", TOKEN)
    with styled():
        if not usable:
            fig, (ax,) = new_figure(1, panel_size=(4.2, 3.0))
            ax.set_xlabel(STEP_LABEL)
            ax.set_ylabel(position_label)
            no_data(ax)
            return fig
        labels = series_labels(records)
        runs = sorted(set(labels))
        frame = pd.DataFrame(
            {
                "run": labels,
                "step": records["step"].to_numpy(),
                "position": records["position"].to_numpy(),
                "value": as_float(records[column]),
            }
        )
        grids = {
            run: rows.pivot_table(index="position", columns="step", values="value", aggfunc="mean")
            for run, rows in frame.groupby("run", sort=True)
        }
        vmax = max(float(np.nanmax(g.to_numpy())) for g in grids.values())
        fig, axes = new_figure(len(runs), panel_size=(4.2, 3.2))
        image = None
        for ax, run in zip(axes, runs, strict=True):
            grid = grids[run]  # (positions, steps)
            steps, positions = grid.columns.to_numpy(), grid.index.to_numpy()
            image = ax.imshow(
                grid.to_numpy(dtype=float), aspect="auto", origin="lower", cmap="viridis",
                vmin=0.0, vmax=vmax or 1.0, interpolation="nearest",
                extent=(-0.5, len(steps) - 0.5, positions.min() - 0.5, positions.max() + 0.5),
            )  # fmt: skip
            ticks = np.unique(np.linspace(0, len(steps) - 1, min(len(steps), 6)).round().astype(int))
            ax.set_xticks(ticks, [str(int(steps[i])) for i in ticks])
            integer_ticks(ax, "y")
            ax.grid(False)
            ax.set_xlabel(axis_label("traced step", "step number", BATCH))
            ax.set_ylabel(position_label)
            if len(runs) > 1:
                ax.set_title(run)
        assert image is not None  # at least one run
        bar = fig.colorbar(image, ax=axes, shrink=0.9)
        bar.set_label(axis_label(f"mean {column.replace('_', ' ')}", "nats", TOKEN))
    return fig
