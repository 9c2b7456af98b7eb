"""Experiment loggers for the bundled trainer (``report_to``): TensorBoard, Weights & Biases, none.

``report_to`` names one or more registered loggers, comma-separated (``LOGGERS``;
``register_logger`` adds one). ``with_loggers`` wraps the trainer's callback: after every
step the logger receives the step's finite numeric metrics (the row of ``metrics.parquet``,
with the evaluation's when there was one) and, after a traced step, ``trace_metrics`` of its
records: per estimator the Pearson correlation, sign agreement and least-squares gain
against the measured change (``analyses.tightness``), and the measured sum of dH.

- ``tensorboard``: event files in ``<run>/tensorboard/`` (``torch.utils.tensorboard``, which
  needs the ``tensorboard`` package: ``pip install 'entropy-lab[tensorboard]'``).
- ``wandb``: one W&B run in ``<run>/wandb/``, named after the run directory, with the
  configuration; project from ``WANDB_PROJECT`` (default ``entropy-lab``). W&B's own settings
  decide where it goes: ``WANDB_MODE=offline`` keeps it on disk and needs no network
  (``wandb sync`` uploads it later).

The TRL integration logs ``trace_metrics`` through TRL's own ``report_to``
(``entropy_lab.integrations.trl.trace_log``).

Deliberate simplifications:

- The loggers are created when training starts (after the run directory is created), and a
  missing package is one error line at construction, before any model is loaded.
- Metrics are logged as scalars only; a non-finite value (a NaN statistic of a step whose
  every advantage is 0) is left out rather than logged as NaN.
- A resumed run appends to the same TensorBoard directory and starts a new W&B run.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

import pandas as pd

from entropy_lab.analyses.tightness import tightness_summary
from entropy_lab.config import TrainConfig
from entropy_lab.errors import EntropyLabError
from entropy_lab.records import load_records
from entropy_lab.registry import Registry
from entropy_lab.runs import RunDir

TIGHTNESS_STATISTICS = ("pearson", "sign_agreement", "gain")
SUM_KEY = "trace/delta_entropy_sum"


class MetricLogger(Protocol):
    """Where scalar metrics go: ``log`` once per step, ``close`` at the end."""

    def log(self, metrics: Mapping[str, float], step: int) -> None: ...

    def close(self) -> None: ...


LoggerFactory = Callable[[RunDir, TrainConfig], MetricLogger]
LOGGERS: Registry[LoggerFactory] = Registry("logger (report_to)")
REQUIRES: dict[str, tuple[str, str]] = {}
"""Logger name -> (module it imports, the pip extra that installs it)."""


def register_logger(
    name: str, requires: tuple[str, str] | None = None
) -> Callable[[LoggerFactory], LoggerFactory]:
    """Register a logger factory ``(run, cfg) -> MetricLogger``; ``requires`` = (module, extra)."""

    def add(factory: LoggerFactory) -> LoggerFactory:
        LOGGERS.add(name, factory)
        if requires is not None:
            REQUIRES[name] = requires
        return factory

    return add


def logger_names(report_to: str) -> list[str]:
    """The logger names of a ``report_to`` value (comma-separated; ``none`` = no logger).

    Raises:
        EntropyLabError: an unknown name (the message lists the valid ones) or a logger whose
            package is not installed (the message names the pip command).
    """
    names = [n.strip() for n in report_to.split(",") if n.strip() and n.strip() != "none"]
    for name in names:
        LOGGERS[name]  # noqa: B018 - an unknown name raises, listing the valid ones
        module, extra = REQUIRES.get(name, ("", ""))
        if module and importlib.util.find_spec(module) is None:
            raise EntropyLabError(
                f"report_to={name} needs the {module} package: pip install 'entropy-lab[{extra}]'"
            )
    return names


def trace_metrics(records: pd.DataFrame) -> dict[str, float]:
    """The scalars of one traced step: ``tightness/<estimator>/{pearson,sign_agreement,gain}`` and
    ``trace/delta_entropy_sum`` (nats, summed over the traced tokens); non-finite values are left out."""
    out: dict[str, float] = {}
    if "delta_entropy" not in records.columns or not len(records):
        return out
    out[SUM_KEY] = float(pd.to_numeric(records["delta_entropy"], errors="coerce").sum())
    pooled = records.drop(columns=[c for c in ("method", "run", "rank") if c in records.columns])
    for _, row in tightness_summary(pooled, split_runs=False).iterrows():
        for statistic in TIGHTNESS_STATISTICS:
            out[f"tightness/{row['estimator']}/{statistic}"] = float(row[statistic])
    return {key: value for key, value in out.items() if math.isfinite(value)}


def finite_scalars(row: Mapping) -> dict[str, float]:
    """The finite int and float entries of a metrics row, without ``step``."""
    return {
        key: float(value)
        for key, value in row.items()
        if key != "step"
        and isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
    }


class LoggingCallback:
    """A trainer callback that sends each step's metrics (and a traced step's ``trace_metrics``) to loggers."""

    def __init__(self, inner: Callable[[str, dict], None], run: RunDir, cfg: TrainConfig, names: list[str]):
        self.inner, self.run, self.cfg, self.names = inner, run, cfg, names
        self.loggers: list[MetricLogger] = []

    def __call__(self, event: str, info: dict) -> None:
        if event == "start" and not self.loggers:
            self.loggers = [LOGGERS[name](self.run, self.cfg) for name in self.names]
        elif event == "step" and self.loggers:
            step = int(info["step"])
            metrics = finite_scalars(info)
            trace = self.run.trace_path(step)
            if trace.is_file():
                metrics.update(trace_metrics(load_records(trace)[0]))
            for logger in self.loggers:
                logger.log(metrics, step)
        elif event == "end":
            self.close()
        self.inner(event, info)

    def close(self) -> None:
        loggers, self.loggers = self.loggers, []
        for logger in loggers:
            logger.close()


def with_loggers(
    callback: Callable[[str, dict], None], cfg: TrainConfig, run: RunDir
) -> Callable[[str, dict], None]:
    """``callback`` itself when ``cfg.report_to`` is ``none``, else a ``LoggingCallback`` around it."""
    names = logger_names(cfg.report_to)
    return LoggingCallback(callback, run, cfg, names) if names else callback


# --- the built-in loggers ------------------------------------------------------------------------


class NoLogger:
    """``report_to=none``: registered so that it is listed among the valid names; never built."""

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def close(self) -> None:
        pass


@register_logger("none")
def _none(run: RunDir, cfg: TrainConfig) -> MetricLogger:
    return NoLogger()


class TensorBoardLogger:
    """Scalars in ``<run>/tensorboard/`` (one tag per metric key)."""

    def __init__(self, path: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(path))

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()  # a killed run keeps what it logged

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    """One W&B run in ``<run>/wandb/`` (mode, entity and project from W&B's own settings)."""

    def __init__(self, run: RunDir, cfg: TrainConfig) -> None:
        import wandb

        self.wandb_run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "entropy-lab"),
            name=run.path.name,
            dir=str(run.path),
            config=cfg.to_dict(),
        )

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self.wandb_run.log(dict(metrics), step=step)

    def close(self) -> None:
        self.wandb_run.finish()


@register_logger("tensorboard", requires=("tensorboard", "tensorboard"))
def _tensorboard(run: RunDir, cfg: TrainConfig) -> MetricLogger:
    return TensorBoardLogger(run.path / "tensorboard")


@register_logger("wandb", requires=("wandb", "wandb"))
def _wandb(run: RunDir, cfg: TrainConfig) -> MetricLogger:
    (run.path / "wandb").mkdir(exist_ok=True)  # W&B keeps its files in <dir>/wandb/
    return WandbLogger(run, cfg)
