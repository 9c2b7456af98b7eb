"""Shared look of every entropy-lab figure: theme, colour-blind palette, axis labels.

Deliberate simplifications:

- Figures are ``matplotlib.figure.Figure`` objects on an Agg canvas, built without
  pyplot: rendering is headless, nothing enters pyplot's global figure list, and the
  user's interactive backend is never switched (no global ``matplotlib.use``).
- The seaborn theme is applied through its context managers while a figure is built
  (``styled``), never set globally, so importing entropy_lab changes no rcParams.
- Colours: seaborn's "colorblind" palette for categories (cycled past 10 series),
  viridis for densities and ColorBrewer RdBu for signed values, all colour-blind safe.
- Every axis label names its unit and its level: token-level (one traced token),
  batch-level (one training step's batch) or problem-level (evaluation problems).
  ``fit_labels`` breaks a label that is longer than its axes before the unit, so that
  no label runs out of the figure; it measures text, so it needs a drawn canvas.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

PALETTE = "colorblind"
SEQUENTIAL_CMAP = "viridis"
DIVERGING_CMAP = "RdBu_r"
LINESTYLES = ("-", "--", ":", "-.")
TOKEN, BATCH, PROBLEM = "token-level", "batch-level", "problem-level"
STEP_LABEL = f"training step (count, {BATCH})"
DELTA_H_LABEL = f"measured ΔH (nats, {TOKEN})"
ALL = "all"
"""Series label used when the frame has no ``method``/``run`` column."""


def axis_label(quantity: str, unit: str, level: str) -> str:
    """``"<quantity> (<unit>, <level>)"``, the one format of every axis label."""
    return f"{quantity} ({unit}, {level})"


@contextmanager
def styled() -> Iterator[None]:
    """Apply the seaborn theme (white grid, paper context) while a figure is built."""
    with sns.axes_style("whitegrid"), sns.plotting_context("paper"):
        yield


def colors(labels: Iterable[str]) -> dict[str, tuple[float, float, float]]:
    """A stable colour per label: the sorted unique labels take the palette in order."""
    unique = sorted({str(label) for label in labels})
    palette = sns.color_palette(PALETTE, n_colors=10)
    return {label: tuple(palette[i % len(palette)]) for i, label in enumerate(unique)}


def extend_colors(
    palette: dict[str, tuple[float, float, float]], labels: Iterable[str]
) -> dict[str, tuple[float, float, float]]:
    """``palette`` plus a colour for each new label (sorted), taking the palette slots after the existing ones."""
    base = sns.color_palette(PALETTE, n_colors=10)
    new = sorted({str(label) for label in labels} - set(palette))
    extra = {label: tuple(base[(len(palette) + i) % len(base)]) for i, label in enumerate(new)}
    return {**palette, **extra}


def series_labels(frame: pd.DataFrame) -> pd.Series:
    """One label per row naming its series: ``method`` and ``run`` joined by " / ", else "all"."""
    columns = [c for c in ("method", "run") if c in frame.columns]
    if not columns:
        return pd.Series(ALL, index=frame.index, dtype=object)
    labels = frame[columns[0]].astype(str)
    for column in columns[1:]:
        labels = labels + " / " + frame[column].astype(str)
    return labels


def new_figure(
    n_panels: int, ncols: int | None = None, panel_size: tuple[float, float] = (3.6, 2.9)
) -> tuple[Figure, list[Axes]]:
    """A constrained-layout Figure on an Agg canvas with exactly ``n_panels`` axes (grid, row-major).

    Call inside ``styled()`` so the axes take the theme.
    """
    n_panels = max(1, n_panels)
    ncols = min(n_panels, ncols or 3)
    nrows = math.ceil(n_panels / ncols)
    fig = Figure(figsize=(panel_size[0] * ncols, panel_size[1] * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.subplots(nrows, ncols, squeeze=False)
    axes = list(grid.ravel())
    for extra in axes[n_panels:]:
        extra.remove()
    return fig, axes[:n_panels]


def integer_ticks(ax: Axes, which: str = "x") -> None:
    """Whole-number ticks on the given axis ("x" or "y"): steps and counts are never 2.5."""
    axis = ax.xaxis if which == "x" else ax.yaxis
    axis.set_major_locator(MaxNLocator(nbins=6, integer=True))


def fit_labels(fig: Figure) -> Figure:
    """Break each axis label longer than its axes onto two lines, before ``" ("`` (the unit).

    Label lengths are measured on a draw of the figure, so this is called once the figure is
    complete (``save_figure`` does). Returns ``fig``.
    """
    if not hasattr(fig.canvas, "get_renderer"):  # a Figure made without pyplot has no drawing canvas yet
        FigureCanvasAgg(fig)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    for ax in fig.axes:
        box = ax.get_window_extent(renderer)
        # (label, its length along the axis, the room the axes gives it); a y label is rotated.
        for label, room, horizontal in (
            (ax.xaxis.label, box.width, True),
            (ax.yaxis.label, box.height, False),
        ):
            text = label.get_text()
            if "\n" in text or " (" not in text:
                continue
            extent = label.get_window_extent(renderer)
            if (extent.width if horizontal else extent.height) > room:
                head, _, tail = text.rpartition(" (")
                label.set_text(f"{head}\n({tail}")
    return fig


def no_data(ax: Axes, note: str = "no data") -> None:
    """Mark an axes as empty with a centred note (labels are still set by the caller)."""
    ax.text(0.5, 0.5, note, transform=ax.transAxes, ha="center", va="center", color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def compact_ticks(ax: Axes, which: str = "y") -> None:
    """Tick labels such as ``2e-07`` on the given axis ("x", "y" or "both").

    Per-token entropy changes are ~1e-7 nats; matplotlib's default puts the exponent in a
    detached offset text that collides with the axis label.
    """
    axes = (ax.xaxis, ax.yaxis) if which == "both" else ((ax.xaxis,) if which == "x" else (ax.yaxis,))
    for axis in axes:
        axis.set_major_locator(MaxNLocator(5))
        axis.set_major_formatter(FuncFormatter(lambda value, _pos: f"{value:.2g}"))
