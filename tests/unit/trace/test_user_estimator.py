"""An estimator registered in user code reaches records, analyses, figures, report and `trace --format json`."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from entropy_lab import analyses, figures
from entropy_lab.cli.app import app
from entropy_lab.config import TrainConfig
from entropy_lab.errors import EntropyLabError
from entropy_lab.records import COLUMNS, load_records, save_records, validate_records
from entropy_lab.runs import RunDir
from entropy_lab.stats import gather_logprobs
from entropy_lab.theory import (
    ESTIMATORS,
    TokenQuantities,
    predict_all,
    register_estimator,
    unregister_estimator,
)
from entropy_lab.trace import EntropyTracer

NAME = "twice-softmax"  # 2 x softmax: its correlations equal softmax's and its gain is half
NEEDY = "needs-input"  # requires a per-token input only some producers fill


@pytest.fixture
def user_estimators():
    """Registers the two estimators for one test and removes them afterwards, whatever happens."""
    before = list(ESTIMATORS)

    @register_estimator(NAME)
    def twice_softmax(q: TokenQuantities) -> torch.Tensor:
        return 2 * ESTIMATORS["softmax"](q)

    @register_estimator(NEEDY, requires=("my_input",))
    def needs_input(q: TokenQuantities) -> torch.Tensor:
        return q.lr * q.inputs["my_input"]

    try:
        yield
    finally:
        for name in (NAME, NEEDY):
            if name in ESTIMATORS:
                unregister_estimator(name)
        assert list(ESTIMATORS) == before


def traced_records(model, seed=0, my_input=False):
    g = torch.Generator().manual_seed(seed)
    B, T = 4, 10
    ids = torch.randint(0, 64, (B, T), generator=g)
    resp = torch.zeros(B, T, dtype=torch.long)
    resp[:, 5:] = 1
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with EntropyTracer(model).step(ids, None, resp, advantages=adv, optimizer=opt) as step:
        logp = gather_logprobs(model(input_ids=ids).logits[:, :-1], ids[:, 1:])  # (B, T-1)
        (-(logp * adv[:, None] * resp[:, 1:]).sum() / resp.sum()).backward()
        opt.step()
        if my_input:
            step.add_token_input("my_input", torch.arange(step.n, dtype=torch.float64))
    return step.records


def test_user_estimator_in_records_tightness_figures_and_cli(user_estimators, tmp_path, make_tiny_lm):
    records = traced_records(make_tiny_lm(seed=1))
    column = "omega_twice_softmax"
    # contract columns first, in order, then the registered estimators beyond it
    assert list(records.columns) == [*COLUMNS, "omega_paper_appendix", column]
    np.testing.assert_array_equal(records[column], 2 * records.omega_softmax)
    assert "omega_needs_input" not in records.columns  # requirement absent: not computed, no NaN column

    summary = analyses.tightness_summary(records).set_index("estimator")
    assert NAME in summary.index
    assert summary.loc[NAME, "pearson"] == pytest.approx(summary.loc["softmax", "pearson"])
    assert summary.loc[NAME, "gain"] == pytest.approx(summary.loc["softmax", "gain"] / 2)
    quad = analyses.quadrants(records, NAME)
    np.testing.assert_allclose(
        quad.mean_predicted, 2 * analyses.quadrants(records, "softmax").mean_predicted, rtol=1e-12
    )

    fig = figures.measured_vs_predicted(records)
    titles = [ax.get_title() for ax in fig.axes]
    assert any(t.startswith(f"{NAME}:") for t in titles), titles
    by_step = analyses.tightness(records, by=("step",))
    legend = figures.tightness_over_steps(by_step).legends[0]
    assert NAME in [t.get_text() for t in legend.get_texts()]

    run = RunDir(tmp_path / "run")
    cfg = TrainConfig(method="grpo", steps=1)
    run.create(cfg)
    save_records(records, run.trace_path(0), cfg.to_dict())
    result = CliRunner().invoke(app, ["trace", "--run", str(run.path), "--format", "json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    rows = {row["estimator"]: row for row in data["tightness"]}
    assert rows[NAME]["pearson"] == pytest.approx(rows["softmax"]["pearson"])
    assert NAME in run.report_path.read_text()


def test_required_input_given_by_the_producer(user_estimators, make_tiny_lm):
    records = traced_records(make_tiny_lm(seed=2), my_input=True)
    np.testing.assert_allclose(records["omega_needs_input"], 0.5 * np.arange(len(records)))
    assert analyses.available_estimators(records)[-2:] == [NAME, NEEDY]


def test_predict_all_skips_estimators_whose_input_is_absent(user_estimators):
    n = 5
    q = TokenQuantities(
        logprob=torch.full((n,), -1.0, dtype=torch.float64),
        entropy=torch.ones(n, dtype=torch.float64),
        collision=torch.zeros(n, dtype=torch.float64),
        advantage=torch.ones(n, dtype=torch.float64),
        old_logprob=torch.full((n,), -1.0, dtype=torch.float64),
    )
    assert NEEDY not in predict_all(q) and NAME in predict_all(q)
    q.inputs["my_input"] = torch.ones(n, dtype=torch.float64)
    torch.testing.assert_close(predict_all(q)[NEEDY], torch.ones(n, dtype=torch.float64))
    assert q.select(torch.tensor([True, False, True, False, True])).inputs["my_input"].shape == (3,)


def test_estimator_names_map_back_from_columns_and_unregistering_unknown_fails():
    with pytest.raises(EntropyLabError, match="kebab-case"):
        register_estimator("my_estimator")
    with pytest.raises(EntropyLabError, match="unknown estimator 'nope'"):
        unregister_estimator("nope")


def test_records_accept_extra_columns(tmp_path, make_tiny_lm):
    records = traced_records(make_tiny_lm(seed=3))
    extra = records.assign(omega_user_thing=0.0, rank=np.arange(len(records)))
    validate_records(extra)
    save_records(extra, tmp_path / "t.parquet")
    loaded, _ = load_records(tmp_path / "t.parquet")
    pd.testing.assert_frame_equal(loaded, extra)
    assert analyses.available_estimators(loaded)[-1] == "user-thing"
