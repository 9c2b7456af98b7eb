"""Every figure function on small synthetic frames, on empty input, and save_figure."""

from __future__ import annotations

import matplotlib
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from entropy_lab.analyses import (
    decomposition_summary,
    factor_variance_share,
    quadrants,
    residuals_by_factor,
    tightness,
)
from entropy_lab.figures import (
    decomposition_bar,
    entropy_change_distribution,
    measured_vs_predicted,
    pass_at_k_curves,
    quadrant_heatmap,
    residuals_by_factor_panels,
    save_figure,
    steer_weight_distribution,
    tightness_over_steps,
    training_curves,
)

LEVELS = ("token-level", "batch-level", "problem-level")


def make_records(n: int = 120, seed: int = 0, method: str = "grpo") -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    dh = rng.normal(scale=1e-6, size=n)
    logprob = -rng.exponential(size=n)
    return pd.DataFrame(
        {
            "method": method,
            "step": np.repeat(np.arange(3), n // 3),
            "update": 0,
            "advantage": rng.choice([-1.0, 0.0, 1.0], size=n),
            "intervention_weight": rng.uniform(0.8, 1.0, size=n),
            "weight": rng.normal(scale=1e-3, size=n),
            "prob": np.exp(logprob),
            "logprob": logprob,
            "surprisal": -logprob,
            "entropy_before": rng.uniform(0.5, 2.5, size=n),
            "delta_entropy": dh,
            "delta_logit_linear": dh * 1.05,
            "omega_paper": dh * 3 + rng.normal(scale=1e-6, size=n),
            "omega_sampled_logit": dh + rng.normal(scale=5e-7, size=n),
            "omega_softmax": dh * 0.9,
            "omega_logit_grad": np.nan,
            "omega_covariance": rng.normal(scale=1e-6, size=n),
        }
    )


@pytest.fixture(scope="module")
def records() -> pd.DataFrame:
    return pd.concat([make_records(seed=0), make_records(seed=1, method="steer")], ignore_index=True)


@pytest.fixture(scope="module")
def metrics() -> pd.DataFrame:
    rng = np.random.default_rng(2)
    frames = []
    for method in ("grpo", "steer"):
        for seed in range(3):
            steps = np.arange(12)
            frames.append(
                pd.DataFrame(
                    {
                        "step": steps,
                        "entropy/mean": 1.0 - 0.05 * steps + rng.normal(scale=0.02, size=12),
                        "reward/mean": 0.05 * steps + rng.normal(scale=0.02, size=12),
                        "method": method,
                        "seed": seed,
                    }
                )
            )
    return pd.concat(frames, ignore_index=True)


@pytest.fixture(scope="module")
def evals() -> pd.DataFrame:
    rows = []
    for method, base in (("grpo", 0.3), ("steer", 0.4)):
        for seed in range(2):
            for step in (5, 11):
                row = {"method": method, "seed": seed, "step": step, "eval/accuracy": base}
                row.update(
                    {f"eval/pass@{k}": min(1.0, base + 0.1 * np.log2(k) + 0.01 * seed) for k in (1, 2, 4, 8)}
                )
                rows.append(row)
    return pd.DataFrame(rows)


def assert_labelled(fig: Figure, n_axes: int, n_colorbars: int = 0) -> None:
    """``n_axes`` panels with both axis labels naming a level, plus labelled colour bars."""
    assert isinstance(fig, Figure)
    assert len(fig.axes) == n_axes + n_colorbars
    for ax in fig.axes[:n_axes]:
        for label in (ax.get_xlabel(), ax.get_ylabel()):
            assert label and any(level in label for level in LEVELS), label
            assert "(" in label  # the unit
    for ax in fig.axes[n_axes:]:
        assert any(level in ax.get_ylabel() for level in LEVELS)


def has_note(fig: Figure, note: str = "no data") -> bool:
    return any(note in text.get_text() for ax in fig.axes for text in ax.texts)


def test_measured_vs_predicted_one_panel_per_available_estimator(records):
    fig = measured_vs_predicted(records)
    assert_labelled(fig, 4)  # logit-grad is all-NaN and skipped
    assert fig.axes[2].get_title().startswith("softmax: r = 1.000")
    assert_labelled(measured_vs_predicted(records, estimators="softmax"), 1)


def test_theory_panels(records):
    residuals = residuals_by_factor(records, "paper")
    fig = residuals_by_factor_panels(residuals, factor_variance_share(records, "paper"))
    assert_labelled(fig, 4)
    assert "η²" in fig.axes[0].get_title()
    assert_labelled(quadrant_heatmap(quadrants(records)), 2, n_colorbars=1)
    assert_labelled(decomposition_bar(decomposition_summary(records, base="softmax")), 2)
    fig = tightness_over_steps(tightness(records))
    assert_labelled(fig, 3)
    assert fig.legends  # one legend outside the panels


def test_training_panels(records, metrics, evals):
    fig = training_curves(metrics)
    assert_labelled(fig, 2)
    assert any(ax.collections for ax in fig.axes)  # CI bands with three seeds
    assert_labelled(training_curves(metrics[metrics["seed"] == 0]), 2)
    assert_labelled(entropy_change_distribution(records), 2)
    fig = pass_at_k_curves(evals)
    assert_labelled(fig, 1)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["1", "2", "4", "8"]
    assert_labelled(steer_weight_distribution(records), 1)


def test_empty_and_nan_input_gives_no_data_panels(records, metrics):
    empty = records.iloc[0:0]
    nan_records = records.assign(**{c: np.nan for c in records.columns if c.startswith(("omega_", "delta_"))})
    figures = [
        (measured_vs_predicted(empty), 1),
        (measured_vs_predicted(nan_records), 1),
        (residuals_by_factor_panels(residuals_by_factor(empty)), 4),
        (residuals_by_factor_panels(residuals_by_factor(nan_records)), 4),
        (quadrant_heatmap(quadrants(empty)), 1),
        (decomposition_bar(decomposition_summary(empty)), 2),
        (decomposition_bar(decomposition_summary(nan_records)), 2),
        (tightness_over_steps(tightness(empty)), 3),
        (training_curves(metrics.iloc[0:0]), 2),
        (training_curves(metrics.assign(**{"entropy/mean": np.nan})), 2),
        (entropy_change_distribution(nan_records), 2),
        (pass_at_k_curves(pd.DataFrame({"step": [1]})), 1),
        (steer_weight_distribution(empty), 1),
    ]
    for fig, n_axes in figures:
        assert_labelled(fig, n_axes)
        assert has_note(fig)


def test_figures_leave_global_state_alone(records):
    import matplotlib.pyplot as plt

    before = dict(matplotlib.rcParams)
    open_before = plt.get_fignums()
    measured_vs_predicted(records)
    assert plt.get_fignums() == open_before  # built without pyplot
    assert dict(matplotlib.rcParams) == before  # theme applied only while building


def test_save_figure_writes_png_and_pdf(tmp_path, records):
    paths = save_figure(steer_weight_distribution(records), tmp_path / "sub" / "weights")
    assert [p.name for p in paths] == ["weights.png", "weights.pdf"]
    for path in paths:
        assert path.exists() and path.stat().st_size > 1000
    assert paths[0].read_bytes()[:4] == b"\x89PNG" and paths[1].read_bytes()[:4] == b"%PDF"
    again = save_figure(decomposition_bar(decomposition_summary(records, base="softmax")), tmp_path / "d.png")
    assert [p.name for p in again] == ["d.png", "d.pdf"]


def test_tightness_over_steps_marks_a_step_without_a_statistic(records):
    # Step 1 of grpo: every advantage 0, so every estimator predicts 0 and no statistic exists.
    zeroed = records[records["method"] == "grpo"].copy()
    omegas = [c for c in zeroed.columns if c.startswith("omega_")]
    zeroed.loc[zeroed["step"] == 1, omegas] = 0.0
    table = tightness(zeroed)
    assert table.loc[table["step"] == 1, "pearson"].isna().all()
    fig = tightness_over_steps(table)
    for ax in fig.axes:
        curves = [line for line in ax.lines if line.get_linestyle() == "-"]
        # one line per estimator with a value (logit-grad is all-NaN in these records) ...
        assert len(curves) == table.dropna(subset=["pearson"])["estimator"].nunique() == 4
        for line in curves:
            assert list(line.get_xdata()) == [0.0, 2.0]  # ... joining the steps that have a value
            assert line.get_marker() == "."
        marks = [line for line in ax.lines if line.get_linestyle() == "--"]
        assert [list(line.get_xdata()) for line in marks] == [[1.0, 1.0]]  # step 1 is marked, not dropped
        assert all(tick == int(tick) for tick in ax.get_xticks())
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert any("no statistic" in text for text in legend)
    for handle in fig.legends[0].legend_handles:  # the legend shows lines, the panels draw lines
        assert handle.get_linestyle() in ("-", "--")


def test_training_curves_drop_rows_without_the_metric(metrics):
    one = metrics[(metrics["method"] == "grpo") & (metrics["seed"] == 0)].copy()
    one.loc[one["step"] % 2 == 1, "reward/mean"] = np.nan  # logged on every other row only
    fig = training_curves(one.drop(columns=["seed"]).assign(method="grpo / run-a"))
    entropy_line, reward_line = (ax.lines[0] for ax in fig.axes)
    assert list(entropy_line.get_xdata()) == list(range(12))
    assert list(reward_line.get_xdata()) == list(range(0, 12, 2))
    assert np.isfinite(reward_line.get_ydata()).all()
    assert [t.get_text() for t in fig.axes[1].get_legend().get_texts()] == ["grpo / run-a"]
    assert all(tick == int(tick) for tick in fig.axes[1].get_xticks())


def test_measured_vs_predicted_has_no_empty_panel(records):
    silent = records.assign(omega_paper=0.0)  # finite but never nonzero: nothing to plot
    fig = measured_vs_predicted(silent)
    assert_labelled(fig, 3)
    assert all(ax.collections for ax in fig.axes)  # every panel holds its hexbin
    assert "paper" in fig.get_supxlabel() and not has_note(fig)


def test_quadrant_titles_clear_of_the_colour_bar(records):
    fig = quadrant_heatmap(quadrants(records))
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    bar = fig.axes[-1].get_window_extent(renderer)
    for ax in fig.axes[:-1]:
        title = ax.title.get_window_extent(renderer)
        assert title.x1 <= bar.x0 and not title.overlaps(bar)
        assert fig.bbox.contains(title.x0, title.y1) and fig.bbox.contains(title.x1, title.y1)


def test_fit_labels_breaks_a_label_longer_than_its_axes():
    from entropy_lab.figures.style import fit_labels, new_figure, styled

    with styled():
        fig, (ax,) = new_figure(1, panel_size=(4.0, 1.5))
    ax.set_ylabel("a quantity with a rather long name (units of it, batch-level)")
    ax.set_xlabel("step (count, batch-level)")
    fit_labels(fig)
    assert ax.get_ylabel() == "a quantity with a rather long name\n(units of it, batch-level)"
    assert ax.get_xlabel() == "step (count, batch-level)"  # fits: unchanged
