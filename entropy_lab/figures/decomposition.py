"""Figures of why first-order theory misses: the calibrated decomposition and the coupling study.

Inputs are the tables of ``entropy_lab.analyses.decomposition`` and of the coupling study
(``entropy_lab.studies.coupling``); outputs are matplotlib Figures (see ``figures.style``).
Every function draws a "no data" panel instead of failing on empty or NaN-only input.

Deliberate simplifications:

- ``decomposition_bar`` re-pools any per-step summary into one bar per part and run, using
  the additive ``sum_abs`` columns; the gain in the calibrated panel's title is the first
  run's median per-update gain of the tabular base (pooled rows), not re-pooled.
- ``coupling_study_figure`` draws, per optimizer, one colour per estimator and one line
  style per learning rate (ranked within the optimizer, whose rates differ); gains span orders
  of magnitude: a log axis, symmetric-log once one of them is not positive.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from entropy_lab.analyses.decomposition import JVP, SPLIT_JVP
from entropy_lab.analyses.tightness import MEASURED

from .style import LINESTYLES, TOKEN, axis_label, colors, new_figure, no_data, series_labels, styled

PART_LABEL = axis_label("part of ΔH", "identity term", TOKEN)
SHARE_LABEL = axis_label("Σ|part| / Σ|ΔH|", "ratio", TOKEN)
PART_NAMES = {
    MEASURED: "measured ΔH",
    JVP: "ω jvp (network)",
    "coupling": "coupling",
    "nonlinearity": "nonlinearity",
    "curvature": "curvature",
    "omission": "omission",
}
PART_RANK = {MEASURED: 0, JVP: 2, "coupling": 3, "nonlinearity": 4, "curvature": 5, "omission": 6}
TOKENS_LABEL = axis_label("tokens per update", "count, log scale", "batch-level")
# (axis label, what the panel title says it is)
STUDY_METRICS = {
    "pearson": (axis_label("Pearson r", "unitless", TOKEN), "Pearson r of ω with ΔH"),
    "spearman": (axis_label("Spearman ρ", "unitless", TOKEN), "Spearman ρ of ω with ΔH"),
    "gain": (axis_label("gain g", "ratio", TOKEN), "gain g = Σ ΔH ω / Σ ω²"),
}


def part_order(names: Sequence[str] | pd.Series) -> list[str]:
    """Measured change, tabular base, network first order, then the identity's other parts."""
    present = list(dict.fromkeys(names))
    return sorted(present, key=lambda p: PART_RANK.get(p, 1 if str(p).startswith("omega_") else 7))


def _part_name(part: str) -> str:
    return PART_NAMES.get(part, part.replace("omega_", "ω ").replace("_", "-"))


def decomposition_bar(summary: pd.DataFrame) -> Figure:
    """Share of Σ|ΔH| carried by each part, raw (left) and calibrated per update (right).

    Args:
        summary: output of ``decomposition_summary`` (per step or pooled; re-pooled here),
            one bar colour per run.

    Returns:
        A Figure with two axes; its title says which split (four-way with the network's
        first order, or three-way without it) the summary used.
    """
    with styled():
        fig, (raw_ax, cal_ax) = new_figure(2, panel_size=(4.4, 3.2))
        for ax in (raw_ax, cal_ax):
            ax.set_xlabel(PART_LABEL)
            ax.set_ylabel(SHARE_LABEL)
        raw_ax.set_title("raw: estimators as written")
        cal_ax.set_title("calibrated: per-update gain g")
        usable = len(summary) and np.isfinite(pd.to_numeric(summary["sum_abs"], errors="coerce")).any()
        if not usable:
            no_data(raw_ax)
            no_data(cal_ax)
            return fig
        labels = series_labels(summary)
        frame = summary.assign(series=labels)
        pooled = frame.groupby(["series", "part"], sort=False)[["sum_abs", "sum_abs_calibrated"]].sum()
        order = part_order(summary["part"])
        runs = sorted(set(labels))
        palette = colors(runs)
        width = 0.8 / len(runs)
        x = np.arange(len(order))
        for k, run in enumerate(runs):
            block = pooled.loc[run].reindex(order)
            total = block.loc[MEASURED, "sum_abs"] if MEASURED in block.index else np.nan
            offset = x - 0.4 + width * (k + 0.5)
            for ax, column in ((raw_ax, "sum_abs"), (cal_ax, "sum_abs_calibrated")):
                share = block[column].to_numpy(dtype=float) / total if total else np.full(len(order), np.nan)
                ax.bar(offset, share, width, color=palette[run], label=run)
        for ax in (raw_ax, cal_ax):
            ax.set_xticks(x, [_part_name(p) for p in order], rotation=30, ha="right")
            ax.axhline(1.0, color="0.6", lw=0.6, ls=":")
        base = next((p for p in order if str(p).startswith("omega_") and p != JVP), None)
        gains = frame[(frame["part"] == base)]["gain"] if base is not None else pd.Series(dtype=float)
        gains = pd.to_numeric(gains, errors="coerce").dropna()
        if len(gains):
            cal_ax.set_title(f"calibrated: per-update gain (median g = {gains.iloc[0]:.3g})")
        split = set(summary["split"]) if "split" in summary.columns else set()
        fig.suptitle(
            "four-way split: tabular → coupling → nonlinearity → curvature"
            if split == {SPLIT_JVP}
            else "three-way split (no ω jvp column): first order → coupling → curvature",
            fontsize="medium",
        )
        if len(runs) > 1:
            cal_ax.legend(frameon=False, fontsize="small")
    return fig


def coupling_study_figure(
    table: pd.DataFrame,
    estimators: Sequence[str] | None = None,
    metrics: Sequence[str] = ("pearson", "spearman", "gain"),
) -> Figure:
    """Tightness of each estimator against tokens per update, one row of panels per statistic.

    Args:
        table: the coupling study's table: ``optimizer``, ``lr``, ``tokens_per_update``,
            ``estimator`` and the ``metrics`` columns.
        estimators: estimators to draw; None = every one in the table.
        metrics: statistics to plot (keys of ``STUDY_METRICS``); Spearman shows the pattern
            without the heavy tails that dominate Pearson.

    Returns:
        A Figure with one row per statistic and one column per optimizer, one colour per
        estimator (legend outside the panels) and one line style per learning rate (legend in
        the first statistic's panels).
    """
    needed = {"optimizer", "lr", "tokens_per_update", "estimator", *metrics}
    usable = len(table) > 0 and needed <= set(table.columns)
    optimizers = list(dict.fromkeys(table["optimizer"])) if usable else ["optimizer"]
    with styled():
        fig, axes = new_figure(len(metrics) * len(optimizers), ncols=len(optimizers), panel_size=(4.4, 3.0))
        grid = {
            (m, o): axes[i * len(optimizers) + j]
            for i, m in enumerate(metrics)
            for j, o in enumerate(optimizers)
        }
        for (metric, optimizer), ax in grid.items():
            ax.set_xlabel(TOKENS_LABEL)
            label, title = STUDY_METRICS.get(metric, (axis_label(metric, "unitless", TOKEN), metric))
            ax.set_ylabel(label)
            ax.set_title(f"{optimizer}: {title}")
        if not usable:
            for ax in axes:
                no_data(ax)
            return fig
        names = list(dict.fromkeys(table["estimator"])) if estimators is None else list(estimators)
        palette = colors(names)
        for (metric, optimizer), ax in grid.items():
            rows = table[(table["optimizer"] == optimizer) & table["estimator"].isin(names)]
            # learning rates differ between optimizers: line styles rank them within one
            lrs = sorted(set(rows["lr"]))
            styles = {lr: LINESTYLES[i % len(LINESTYLES)] for i, lr in enumerate(lrs)}
            drawn = False
            for (estimator, lr), line in rows.groupby(["estimator", "lr"], sort=True):
                line = line.sort_values("tokens_per_update")
                y = pd.to_numeric(line[metric], errors="coerce").to_numpy(dtype=float)
                ax.plot(line["tokens_per_update"], y, styles[lr], marker=".", color=palette[estimator])
                drawn = drawn or np.isfinite(y).any()
            ax.set_xscale("log")
            if metric == "gain":
                values = pd.to_numeric(rows[metric], errors="coerce")
                # log scale while every gain is positive; symmetric-log once one is not
                if (values.dropna() > 0).all():
                    ax.set_yscale("log")
                else:
                    ax.set_yscale("symlog", linthresh=1.0)
                ax.axhline(1.0, color="0.6", lw=0.6, ls=":")
            else:
                ax.set_ylim(top=1.02)
                ax.axhline(0.0, color="0.6", lw=0.6)
            if metric == metrics[0]:
                handles = [Line2D([], [], color="0.3", ls=styles[lr]) for lr in lrs]
                ax.legend(
                    handles, [f"lr {lr:g}" for lr in lrs], frameon=False, fontsize="small", loc="lower left"
                )
            if not drawn:
                no_data(ax)
        handles = [Line2D([], [], color=palette[e], marker=".") for e in names]
        fig.legend(handles, names, loc="outside right upper", frameon=False, fontsize="small")
    return fig
