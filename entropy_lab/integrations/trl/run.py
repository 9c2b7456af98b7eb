"""The run directory of a TRL run, in the project's layout (``entropy_lab.runs``).

    <run>/config.json                  {"config": TrainConfig, "seed", "versions", "engine": "trl", "trl": {...}}
    <run>/metrics.parquet              one row per TRL log: TRL's keys, plus entropy/mean and reward/mean
    <run>/traces/step_XXXXXX.parquet   the records of every rank (column ``rank``) of a traced optimizer step

Only the main process writes; the traced records of the other ranks reach it through one
``gather_object`` per traced step (every rank traces the same steps, so the collective matches).
``step`` is TRL's optimizer step (``state.global_step`` after the step), in metrics and traces.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from entropy_lab.config import TrainConfig
from entropy_lab.errors import EntropyLabError
from entropy_lab.runs import RunDir, package_versions, write_text_atomic

ALIASES = {"entropy": "entropy/mean", "reward": "reward/mean"}
"""TRL metric -> the project's name for it (``entropy_lab.analyses.compare`` reads these)."""


def _number(value):
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


class TrlRunWriter:
    """Writes config.json, metrics.parquet and traces/ of one TRL run (main process only)."""

    def __init__(self, path: Path, cfg: TrainConfig, *, trl_args: dict, overwrite: bool, is_main: bool):
        self.run = RunDir(path)
        self.cfg = cfg
        self.trl_args = trl_args
        self.overwrite = overwrite
        self.is_main = is_main
        self.rows: list[dict] = []
        self._first_new_step: int | None = None

    def start(self, resuming: bool) -> None:
        if not self.is_main:
            return
        import trl

        extra = {"engine": "trl", "trl": {"version": trl.__version__, "args": self.trl_args}}
        if self.run.config_path.exists() and resuming:
            self.run.update_config_record(**extra)
            self.rows = self.run.read_metrics().to_dict("records")
            return
        if self.run.config_path.exists() and not self.overwrite:
            raise EntropyLabError(
                f"{self.run.path} already holds an entropy-lab run: choose another output_dir (or run_dir), "
                "pass overwrite_run=True, or resume_from_checkpoint"
            )
        if self.run.config_path.exists():
            for p in [self.run.config_path, self.run.metrics_path, *self.run.trace_files()]:
                p.unlink()
        # Not RunDir.create: it would delete output_dir, where TRL keeps its own checkpoints.
        self.run.path.mkdir(parents=True, exist_ok=True)
        record = {
            "config": self.cfg.to_dict(),
            "seed": self.cfg.seed,
            "versions": package_versions(),
            **extra,
        }
        write_text_atomic(json.dumps(record, indent=2, default=str), self.run.config_path)

    def write_metrics(self, step: int, logs: dict) -> None:
        if not self.is_main:
            return
        if self._first_new_step is None:  # on resume, rows of steps redone are replaced
            self._first_new_step = step
            self.rows = [r for r in self.rows if int(r.get("step", -1)) < step]
        row = {"step": step, **{k: _number(v) for k, v in logs.items()}}
        for src, dst in ALIASES.items():
            if src in logs:
                row[dst] = _number(logs[src])
        self.rows.append(row)
        self.run.write_metrics(self.rows)

    def write_trace(self, traced, records: pd.DataFrame, accelerator, step: int) -> None:
        """Gather every rank's records to the main process and save them as one trace file."""
        if accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            parts = gather_object([records])
            records = pd.concat(parts, ignore_index=True)
        if not self.is_main:
            return
        traced.records = records
        traced.save(self.run.trace_path(step))
