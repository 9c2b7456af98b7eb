"""A traced TRL run logs each traced step's tightness and sum of dH through TRL's own report_to."""

from __future__ import annotations

import pytest

pytest.importorskip("trl")
pytest.importorskip("tensorboard")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from trl_common import count_reward, dataset, grpo_args, tiny_model_dir  # noqa: E402

from entropy_lab.integrations.trl import TracedGRPOTrainer  # noqa: E402
from entropy_lab.integrations.trl.trace_log import reports_somewhere  # noqa: E402
from entropy_lab.records import load_records  # noqa: E402
from entropy_lab.runs import RunDir  # noqa: E402
from entropy_lab.trainer.loggers import SUM_KEY, trace_metrics  # noqa: E402


def test_tensorboard_receives_the_trace_metrics_at_the_traced_step(tmp_path):
    model = tiny_model_dir(tmp_path / "tiny")
    args = grpo_args(tmp_path / "run", max_steps=2, report_to=["tensorboard"])
    trainer = TracedGRPOTrainer(
        model=str(model), reward_funcs=count_reward, args=args, train_dataset=dataset(), trace_every=2
    )
    trainer.train()
    run = RunDir(tmp_path / "run")
    assert [p.name for p in run.trace_files()] == ["step_000002.parquet"]
    expected = trace_metrics(load_records(run.trace_path(2))[0])
    assert SUM_KEY in expected and "tightness/softmax/pearson" in expected
    (events_file,) = (tmp_path / "run").rglob("events.out.tfevents.*")  # TRL's own TensorBoard directory
    events = EventAccumulator(str(events_file.parent), size_guidance={"scalars": 0})
    events.Reload()
    for key, value in expected.items():
        (logged,) = events.Scalars(f"train/{key}")  # TRL's TensorBoard callback prefixes train/
        assert logged.step == 2 and logged.value == pytest.approx(value, rel=1e-5, abs=1e-9)
    assert events.Scalars("train/reward")  # TRL's own metrics still arrive
    rows = [row for row in trainer.state.log_history if SUM_KEY in row]
    assert [row["step"] for row in rows] == [2]
    assert not run.read_metrics().filter(like="tightness/").columns.size  # metrics.parquet stays TRL's rows


def test_reports_somewhere():
    assert not reports_somewhere([]) and not reports_somewhere("none") and not reports_somewhere(["none"])
    assert reports_somewhere(["tensorboard"]) and reports_somewhere("wandb")
