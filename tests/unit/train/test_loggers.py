"""report_to: TensorBoard event files and a W&B run hold each step's metrics and a traced step's tightness.

The TensorBoard test reads the event files back with tensorboard's own EventAccumulator; W&B
is tested with a stand-in module that records what the logger hands it, and, where wandb is
installed, with a real offline run directory.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import types

import numpy as np
import pandas as pd
import pytest

from entropy_lab.errors import EntropyLabError
from entropy_lab.records import load_records
from entropy_lab.runs import RunDir
from entropy_lab.tasks.arithmetic import ArithmeticTask
from entropy_lab.trainer import Trainer
from entropy_lab.trainer import loggers as loggers_module
from entropy_lab.trainer.loggers import SUM_KEY, logger_names, trace_metrics

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def reference_tightness(records: pd.DataFrame, column: str) -> dict[str, float]:
    """Pearson, gain and sign agreement of one estimator, written out from their definitions."""
    dh, omega = records["delta_entropy"].to_numpy(), records[column].to_numpy()
    floor = 1e-3 * np.abs(dh).max()
    keep = (np.abs(dh) > floor) & (omega != 0)
    return {
        "pearson": float(np.corrcoef(omega, dh)[0, 1]),
        "gain": float((dh * omega).sum() / (omega**2).sum()),
        "sign_agreement": float((np.sign(dh[keep]) == np.sign(omega[keep])).mean()),
    }


def test_trace_metrics_match_their_definitions():
    rng = np.random.default_rng(0)
    omega = rng.normal(size=200)
    records = pd.DataFrame(
        {
            "step": 1,
            "update": 0,
            "delta_entropy": 3.0 * omega + rng.normal(scale=2.0, size=200),
            "omega_softmax": omega,
            "omega_paper": -omega + rng.normal(size=200),
            "omega_logit_grad": np.nan,  # a TRL trace: no statistic, nothing logged
        }
    )
    metrics = trace_metrics(records)
    assert metrics[SUM_KEY] == pytest.approx(records["delta_entropy"].sum())
    for name, column in (("softmax", "omega_softmax"), ("paper", "omega_paper")):
        expected = reference_tightness(records, column)
        for statistic, value in expected.items():
            assert metrics[f"tightness/{name}/{statistic}"] == pytest.approx(value, rel=1e-9)
    assert not any("logit-grad" in key for key in metrics)


def test_unknown_or_missing_logger_is_one_error_naming_the_fix(monkeypatch):
    with pytest.raises(EntropyLabError, match="valid: .*tensorboard.*wandb"):
        logger_names("tensorbord")
    assert logger_names("none") == []
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(EntropyLabError, match=r"pip install 'entropy-lab\[wandb\]'"):
        logger_names("wandb")


@pytest.fixture
def train_run(tiny_policy_dir, tmp_path, monkeypatch, digit_reward, small_config):
    """Train three steps of grpo on the tiny policy with ``report_to``, tracing steps 1 and 3."""
    monkeypatch.setenv("ENTROPY_LAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(ArithmeticTask, "reward", digit_reward)

    def train(report_to: str) -> tuple[RunDir, pd.DataFrame]:
        cfg = small_config("grpo", tiny_policy_dir, steps=3, trace_every=2, report_to=report_to)
        run = RunDir(tmp_path / f"run-{report_to}")
        metrics = Trainer(cfg, run.path).train()
        return run, metrics

    return train


def test_tensorboard_event_files_hold_step_metrics_and_trace_tightness(train_run):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, metrics = train_run("tensorboard")
    events = EventAccumulator(str(run.path / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    reward = [(e.step, e.value) for e in events.Scalars("reward/mean")]
    assert reward == [
        (s, pytest.approx(v, abs=1e-6)) for s, v in zip(metrics["step"], metrics["reward/mean"], strict=True)
    ]
    traced = [int(path.stem.split("_")[1]) for path in run.trace_files()]
    assert traced == [2]
    records = load_records(run.trace_path(2))[0]
    (total,) = events.Scalars(SUM_KEY)
    assert total.step == 2 and total.value == pytest.approx(records["delta_entropy"].sum(), rel=1e-5)
    for statistic, value in reference_tightness(records, "omega_softmax").items():
        (logged,) = events.Scalars(f"tightness/softmax/{statistic}")
        assert logged.step == 2 and logged.value == pytest.approx(value, rel=1e-5, abs=1e-7)
    assert {"eval/accuracy", "loss/pg", "entropy/mean"} <= tags
    run.check_removable()  # tensorboard/ is part of the run: --overwrite still replaces it


class FakeWandb(types.ModuleType):
    """A stand-in for the wandb package: records init's arguments and every log call."""

    def __init__(self) -> None:
        super().__init__("wandb")
        self.inits: list[dict] = []
        self.logged: list[tuple[int, dict]] = []
        self.finished = 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        fake = self

        class Run:
            def log(self, metrics, step):
                fake.logged.append((step, dict(metrics)))

            def finish(self):
                fake.finished += 1

        return Run()


def test_wandb_logger_hands_each_step_and_the_trace_to_wandb(train_run, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr(loggers_module.importlib.util, "find_spec", lambda name, *a: object())
    run, metrics = train_run("wandb")
    (init,) = fake.inits
    assert init["name"] == run.path.name and init["dir"] == str(run.path)
    assert init["config"]["report_to"] == "wandb" and init["config"]["method"] == "grpo"
    assert [step for step, _ in fake.logged] == [1, 2, 3] and fake.finished == 1
    for (_, logged), (_, row) in zip(fake.logged, metrics.iterrows(), strict=True):
        assert logged["reward/mean"] == pytest.approx(row["reward/mean"])
    records = load_records(run.trace_path(2))[0]
    assert fake.logged[1][1][SUM_KEY] == pytest.approx(records["delta_entropy"].sum())
    assert "tightness/softmax/gain" in fake.logged[1][1] and SUM_KEY not in fake.logged[0][1]


def logged_values(path, key: str) -> list[float]:
    """Every value W&B recorded for ``key`` in an offline run file.

    A history item is a protobuf message whose field 2 is the key and field 16 the value as JSON;
    both are short here (one-byte lengths), so the bytes ``0x12 len key 0x82 0x01 len json`` are it.
    """
    data, name = path.read_bytes(), key.encode()
    pattern = re.compile(
        re.escape(bytes([0x12, len(name)]) + name + bytes([0x82, 0x01])) + rb"(.)", re.DOTALL
    )
    values = []
    for match in pattern.finditer(data):
        start = match.end()
        values.append(float(json.loads(data[start : start + match.group(1)[0]])))
    return values


def test_wandb_offline_run_directory(train_run, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run, metrics = train_run("wandb")
    (offline,) = (run.path / "wandb").glob("offline-run-*")
    (data,) = offline.glob("run-*.wandb")  # the run's data, for `wandb sync`
    rewards = logged_values(data, "reward/mean")
    assert all(any(v == pytest.approx(r) for v in rewards) for r in metrics["reward/mean"])
    records = load_records(run.trace_path(2))[0]
    assert logged_values(data, SUM_KEY)[0] == pytest.approx(records["delta_entropy"].sum(), rel=1e-5)
    pearson = reference_tightness(records, "omega_softmax")["pearson"]
    assert logged_values(data, "tightness/softmax/pearson")[0] == pytest.approx(pearson, rel=1e-5)
    run.check_removable()


def test_a_resumed_run_may_change_report_to_but_not_its_numerics(tmp_path):
    from entropy_lab.config import TrainConfig
    from entropy_lab.trainer.resume import check_resumable

    run = RunDir(tmp_path / "run")
    cfg = TrainConfig(task="arithmetic", steps=4)
    run.create(cfg)
    check_resumable(run, cfg.replace(report_to="tensorboard", steps=8))
    with pytest.raises(EntropyLabError, match="differs in lr"):
        check_resumable(run, cfg.replace(report_to="tensorboard", lr=0.5))
