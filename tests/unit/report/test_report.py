"""Reports from synthetic run directories whose numbers are known by construction.

The trace records are built so that delta_entropy = GAIN * omega_softmax + tiny noise,
delta_logit_linear = 0.75 * delta_entropy's first-order part (so coupling and curvature
are known shares) and omega_paper = 0.9 * omega_logit_grad.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from entropy_lab.config import TrainConfig
from entropy_lab.errors import EntropyLabError
from entropy_lab.records import COLUMNS, save_records
from entropy_lab.report.compose import (
    _steps_per_seed,
    compare_report,
    format_number,
    load_run_records,
    markdown_table,
    report_json,
    run_report,
    trace_tables,
)
from entropy_lab.runs import RunDir

GAIN = 2.0
STEPS = 20
TRACE_STEPS = (5, 10, 15)
TOKENS_PER_STEP = 300


def synthetic_records(step: int, seed: int, steer: bool) -> pd.DataFrame:
    """One trace file's records with every column of the contract; dH = GAIN * omega_softmax + noise."""
    rng = np.random.default_rng(1000 * seed + step)
    n = TOKENS_PER_STEP
    prob = rng.uniform(0.05, 0.99, n)
    logprob = np.log(prob)
    entropy = rng.uniform(0.1, 2.0, n)
    advantage = rng.choice([-1.0, 1.0], n) * rng.uniform(0.2, 1.5, n)
    lam = rng.uniform(0.8, 1.0, n) if steer else np.ones(n)
    weight = advantage * lam / n
    omega = rng.normal(scale=1e-6, size=n)
    measured = GAIN * omega + rng.normal(scale=1e-9, size=n)
    frame = pd.DataFrame(
        {
            "step": step,
            "update": 0,
            "sample": np.arange(n) // 10,
            "position": np.arange(n) % 10,
            "token_id": rng.integers(0, 50, n),
            "advantage": advantage,
            "ratio": 1.0,
            "clip_indicator": 1.0,
            "intervention_weight": lam,
            "normalizer": float(n),
            "weight": weight,
            "lr": 1e-3,
            "prob": prob,
            "logprob": logprob,
            "surprisal": -logprob,
            "entropy_before": entropy,
            "entropy_after": entropy + measured,
            "collision": rng.uniform(-0.1, 0.1, n),
            "delta_entropy": measured,
            "delta_logit_linear": 0.75 * GAIN * omega,
            "omega_paper": 0.9 * GAIN * omega,
            "omega_sampled_logit": 0.6 * omega,
            "omega_softmax": omega,
            "omega_logit_grad": GAIN * omega,
            "omega_covariance": rng.normal(scale=1e-6, size=n),
        }
    )
    assert list(frame.columns) == list(COLUMNS)
    return frame


def make_run(path, method: str = "grpo", seed: int = 0, traces: bool = True) -> RunDir:
    """A run directory with config.json, metrics.parquet, eval.parquet and (optionally) traces."""
    run = RunDir(path)
    cfg = TrainConfig(method=method, seed=seed, steps=STEPS, lr=1e-3, task="countdown")
    run.create(cfg)
    rng = np.random.default_rng(seed)
    steps = np.arange(1, STEPS + 1)
    entropy = np.linspace(1.0, 0.5 if method == "grpo" else 0.8, STEPS)
    metrics = pd.DataFrame(
        {
            "step": steps,
            "reward/mean": np.linspace(0.1, 0.6, STEPS) + rng.normal(scale=0.01, size=STEPS),
            "reward/std": 0.3,
            "entropy/mean": entropy,
            "response/length": 12.0,
            "advantage/zero_frac": 0.1,
            "loss/pg": rng.normal(size=STEPS),
            "clip/frac": 0.05,
            "grad/norm": 0.5,
            "lr": 1e-3,
            "time/step_s": 0.2,
        }
    )
    run.write_metrics(metrics.to_dict("records"))
    evals = [
        {
            "step": s,
            "eval/accuracy": 0.1 + s / 50,
            **{f"eval/pass@{k}": min(1.0, 0.1 * k + s / 50) for k in range(1, 5)},
        }
        for s in (0, 10, 20)
    ]
    run.write_eval(evals)
    if traces:
        for step in TRACE_STEPS:
            save_records(
                synthetic_records(step, seed, method == "steer"), run.trace_path(step), cfg.to_dict()
            )
    return run


def table_column(text: str, first_cell: str, column: str) -> str:
    """The cell of ``column`` in the first markdown-table row of ``text`` whose first cell is ``first_cell``."""
    header: list[str] = []
    lines = text.splitlines()
    for line, following in zip(lines, [*lines[1:], ""], strict=True):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if following.startswith("| ---"):
            header = cells
        elif header and line.startswith("|") and cells[0] == first_cell:
            return cells[header.index(column)]
    raise AssertionError(f"no table row starting with {first_cell!r}")


@pytest.fixture(scope="module")
def traced_report(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("runs") / "grpo_s0")
    return run, run_report(run)


def test_run_report_tightness_gain_in_markdown(traced_report):
    run, result = traced_report
    assert result["report"] == run.report_path and run.report_path.is_file()
    text = run.report_path.read_text()
    assert text.startswith("# entropy-lab report: grpo_s0")
    assert "method `grpo`" in text and "task `countdown`" in text and f"{STEPS} steps" in text
    assert float(table_column(text, "softmax", "gain")) == pytest.approx(GAIN, rel=1e-2)
    assert float(table_column(text, "logit-grad", "gain")) == pytest.approx(1.0, rel=1e-2)
    table = result["tables"]["tightness"].set_index("estimator")
    assert table.loc["softmax", "gain"] == pytest.approx(GAIN, rel=1e-3)
    assert table.loc["softmax", "pearson"] > 0.999
    assert table.loc["softmax", "n"] == TOKENS_PER_STEP * len(TRACE_STEPS)
    assert "noise floor of" in text
    floor = result["summary"]["noise_floor"]
    assert floor == pytest.approx(1e-3 * np.abs(load_run_records(run)["delta_entropy"]).max())


def test_run_report_sections_and_known_decomposition(traced_report):
    run, result = traced_report
    text = run.report_path.read_text()
    for heading in (
        "## Training",
        "## Tightness",
        "## Residuals by factor",
        "## Quadrants",
        "## Decomposition",
    ):
        assert heading in text
    decomposition = result["tables"]["decomposition"].set_index("part")["share"]
    # base = logit-grad = dH (up to noise); linear = 0.75 base -> coupling 0.25, curvature 0.25.
    assert decomposition["omega_logit_grad"] == pytest.approx(1.0, rel=1e-2)
    assert decomposition["coupling"] == pytest.approx(0.25, rel=1e-2)
    assert decomposition["curvature"] == pytest.approx(0.25, rel=2e-2)
    assert decomposition["omission"] == pytest.approx(0.1, rel=1e-2)
    summary = result["summary"]
    assert summary["initial_entropy"] == pytest.approx(1.0)
    assert summary["final_entropy"] == pytest.approx(np.linspace(1.0, 0.5, STEPS)[-2:].mean())
    assert summary["trace_tokens"] == TOKENS_PER_STEP * len(TRACE_STEPS)
    assert summary["trace_steps"] == len(TRACE_STEPS)


def test_run_report_figures_exist_and_are_linked(traced_report):
    run, result = traced_report
    text = run.report_path.read_text()
    stems = {p.stem for p in result["figures"]}
    expected = {
        "training_curves", "pass_at_k", "measured_vs_predicted", "residuals_by_factor", "quadrants",
        "decomposition", "tightness_over_steps", "entropy_change_distribution", "entropy_by_position",
    }  # fmt: skip
    assert expected <= stems
    assert "steer_weights" not in stems  # grpo: intervention weight constant
    for path in result["figures"]:
        assert path.parent == run.figures_dir and path.stat().st_size > 0
    for stem in expected:
        assert f"(figures/{stem}.png)" in text
        assert (run.figures_dir / f"{stem}.pdf").is_file()


def test_run_report_writes_the_html_page_next_to_report_md(traced_report):
    run, result = traced_report
    assert result["html"] == run.path / "report.html"
    page = result["html"].read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == len([p for p in result["figures"] if p.suffix == ".png"])
    assert '<script type="application/json" id="token-data">' in page
    assert "(report.html)" in run.report_path.read_text()


def test_report_json_is_plain_json(traced_report):
    _run, result = traced_report
    data = report_json(result["tables"])
    assert set(data) == set(result["tables"])
    text = json.dumps(data, allow_nan=False)  # NaN would raise here
    assert json.loads(text)["tightness"][0]["estimator"]
    json.dumps(result["summary"], allow_nan=False)


def test_compare_report_two_methods(tmp_path):
    runs = {
        "grpo": [make_run(tmp_path / "g0", "grpo", 0), make_run(tmp_path / "g1", "grpo", 1, traces=False)],
        "steer": [make_run(tmp_path / "s0", "steer", 0)],
    }
    out = tmp_path / "cmp"
    result = compare_report(runs, out)
    table = result["table"]
    assert sorted(table["method"]) == ["grpo", "steer"]
    assert table.set_index("method").loc["grpo", "n_seeds"] == 2
    assert table.set_index("method").loc["steer", "final_entropy"] == pytest.approx(
        np.linspace(1.0, 0.8, STEPS)[-2:].mean()
    )
    tight = result["tightness"]
    assert set(tight["method"]) == {"grpo", "steer"}
    assert (tight[tight["estimator"] == "softmax"]["gain"]).to_numpy() == pytest.approx(
        [GAIN, GAIN], rel=1e-2
    )
    stems = {p.stem for p in result["figures"]}
    assert {"training_curves", "pass_at_k", "entropy_change_distribution", "steer_weights"} <= stems
    assert all(p.parent == out / "figures" and p.stat().st_size > 0 for p in result["figures"])
    text = result["report"].read_text()
    assert text.startswith("# entropy-lab comparison: grpo vs steer")
    assert "(figures/training_curves.png)" in text and "(figures/steer_weights.png)" in text
    assert "| steer |" in text and "±" in text


def test_steps_per_seed_keeps_seeds_apart():
    records = pd.DataFrame({"method": "m", "step": [5, 5, 10, 10], "delta_entropy": [1.0, 2.0, 3.0, 4.0]})
    out = _steps_per_seed(records, pd.Series([0, 1, 0, 1]))
    assert out["step"].nunique() == 4 and list(out["delta_entropy"]) == [1.0, 2.0, 3.0, 4.0]


def test_run_without_traces_gives_metrics_only_report(tmp_path):
    run = make_run(tmp_path / "plain", traces=False)
    with pytest.raises(EntropyLabError, match="no trace files"):
        load_run_records(run)
    result = run_report(run)
    assert result["tables"] == {}
    assert {p.stem for p in result["figures"]} == {"training_curves", "pass_at_k"}
    text = run.report_path.read_text()
    assert "No trace files" in text and "## Training" in text
    assert result["summary"]["noise_floor"] is None
    assert result["summary"]["final_reward"] is not None


def test_trace_file_missing_columns_names_the_file(tmp_path):
    run = make_run(tmp_path / "broken", traces=False)
    bad = run.trace_path(5)
    bad.parent.mkdir(parents=True)
    synthetic_records(5, 0, False).drop(columns=["omega_softmax"]).to_parquet(bad)
    with pytest.raises(EntropyLabError, match=r"step_000005\.parquet.*omega_softmax"):
        load_run_records(run)
    with pytest.raises(EntropyLabError, match="step_000005"):
        run_report(run)


def test_load_run_records_labels_and_method(tmp_path):
    run = make_run(tmp_path / "st", "steer", 3)
    records = load_run_records(run, label="mine")
    assert list(records.columns[:2]) == ["method", "run"]
    assert set(records["method"]) == {"steer"} and set(records["run"]) == {"mine"}
    assert len(records) == TOKENS_PER_STEP * len(TRACE_STEPS)
    with pytest.raises(EntropyLabError, match="Unknown estimator"):
        trace_tables(records, estimator="nope")


def test_decomposition_falls_back_to_softmax_without_logit_grad():
    records = synthetic_records(5, 0, False).assign(omega_logit_grad=np.nan)
    tables = trace_tables(records)
    assert "omega_softmax" in set(tables["decomposition"]["part"])
    assert "logit-grad" not in set(tables["tightness"]["estimator"])


def test_markdown_table_and_number_format():
    frame = pd.DataFrame({"name": ["a|b", "c"], "n": [3, 40], "x": [1.23456e-7, float("nan")]})
    text = markdown_table(frame)
    assert text.splitlines() == [
        "| name | n | x |",
        "| --- | ---: | ---: |",
        "| a\\|b | 3 | 1.23e-07 |",
        "| c | 40 | n/a |",
    ]
    assert format_number(0.123456) == "0.123" and format_number(None) == "n/a"


def test_a_registered_report_entry_reaches_tables_figures_sections_and_json(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from entropy_lab.report import entries as report_entries
    from entropy_lab.report.entries import (
        REPORT_ENTRIES,
        FigureSpec,
        ReportEntry,
        Section,
        SectionContext,
        register_report_entry,
        trace_sections,
        write_trace_figures,
    )

    def tokens_per_step(records, estimator):
        return records.groupby("step", as_index=False).size().rename(columns={"size": "tokens"})

    def draw(records, tables):
        fig, ax = plt.subplots()
        ax.bar(tables["tokens_per_step"]["step"], tables["tokens_per_step"]["tokens"])
        return fig

    saved = []

    def save_stub(fig, stem):  # no rendering: only which figures would be written
        plt.close(fig)
        saved.append(stem.name)
        return [stem.with_suffix(".png")]

    monkeypatch.setattr(report_entries.figures, "save_figure", save_stub)
    register_report_entry(
        ReportEntry(
            "tokens_per_step",
            table=tokens_per_step,
            figure=FigureSpec("tokens_per_step", draw),
            section=Section("Tokens per step", "Traced tokens of each step.", figures=("tokens_per_step",)),
        )
    )
    try:
        records = pd.concat([synthetic_records(s, 0, False) for s in TRACE_STEPS], ignore_index=True)
        tables = trace_tables(records)
        assert tables["tokens_per_step"]["tokens"].tolist() == [TOKENS_PER_STEP] * len(TRACE_STEPS)
        written = write_trace_figures(records, tables, tmp_path)
        assert saved[-1] == "tokens_per_step" and "measured_vs_predicted" in saved
        links = {p.stem: f"![{p.stem}]({p.name})" for p in written}
        text = "\n".join(trace_sections(SectionContext(records, tables, links, "softmax")))
        assert text.index("## Decomposition") < text.index("## Tokens per step")  # after the built-ins
        assert table_column(text, str(TRACE_STEPS[0]), "tokens") == str(TOKENS_PER_STEP)
        assert "![tokens_per_step](tokens_per_step.png)" in text
        assert report_json(tables)["tokens_per_step"][0] == {"step": 5, "tokens": TOKENS_PER_STEP}
    finally:
        REPORT_ENTRIES.remove("tokens_per_step")
    assert "tokens_per_step" not in trace_tables(synthetic_records(5, 0, False))


def with_sweep(records: pd.DataFrame, etas=(0.5, 1.0)) -> pd.DataFrame:
    """``records`` plus an eta sweep whose measured change is GAIN * eta * omega_softmax exactly."""
    from entropy_lab.records import regime_column

    omega = records["omega_softmax"].to_numpy()
    extra = {}
    for eta in etas:
        extra[regime_column(eta, "delta_entropy")] = GAIN * eta * omega
        extra[regime_column(eta, "delta_logit_linear")] = 0.5 * GAIN * eta * omega  # curvature share 1/4
        extra[regime_column(eta, "jvp_entropy")] = GAIN * eta * omega
    return records.assign(**extra)


def test_a_run_with_an_eta_sweep_gets_the_linear_regime_tables_figure_and_sections(tmp_path):
    run = make_run(tmp_path / "swept", traces=False)
    cfg = run.train_config().to_dict()
    for step in TRACE_STEPS:
        save_records(with_sweep(synthetic_records(step, 0, False)), run.trace_path(step), cfg)
    result = run_report(run)
    tightness = result["tables"]["linear_regime"].set_index(["eta", "estimator"])
    assert tightness.loc[(0.5, "softmax"), "gain"] == pytest.approx(GAIN, rel=1e-12)
    assert tightness.loc[(1.0, "logit-grad"), "gain"] == pytest.approx(1.0, rel=1e-12)
    assert tightness.loc[(1.0, "jvp-entropy"), "pearson"] == pytest.approx(1.0, abs=1e-12)
    shares = result["tables"]["linear_regime_shares"].set_index("eta")
    assert shares["curvature"].to_numpy() == pytest.approx([0.25, 0.25], rel=1e-12)
    assert shares["coupling_calibrated"].to_numpy() == pytest.approx([0.0, 0.0], abs=1e-20)
    text = run.report_path.read_text()
    assert text.index("## Decomposition") < text.index("## The linear regime along the actual update")
    assert "## The linear regime: curvature and coupling" in text and "(figures/linear_regime.png)" in text
    assert (run.figures_dir / "linear_regime.pdf").is_file()
    assert {"linear_regime", "linear_regime_shares"} <= set(report_json(result["tables"]))


def test_a_run_without_a_sweep_has_no_linear_regime_anywhere(traced_report):
    run, result = traced_report
    assert not {"linear_regime", "linear_regime_shares"} & set(result["tables"])
    assert "linear regime" not in run.report_path.read_text().lower()
    assert not (run.figures_dir / "linear_regime.png").exists()
