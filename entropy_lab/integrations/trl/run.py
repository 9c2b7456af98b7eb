"""The run directory of a TRL run, in the project's layout (``entropy_lab.runs``).

    <run>/config.json                  {"config": TrainConfig, "seed", "versions", "engine": "trl", "trl": {...}}
    <run>/metrics.parquet              one row per TRL log: TRL's keys, plus entropy/mean and reward/mean
    <run>/traces/step_XXXXXX.parquet   the records of every rank (column ``rank``) of a traced optimizer step

Only the main process writes; the traced records of the other ranks reach it through one
``gather_object`` per traced step (every rank traces the same steps, so the collective matches).
``step`` is TRL's optimizer step (``state.global_step`` after the step), in metrics and traces.

Safety, as for the CLI's ``--out`` (``entropy_lab.runs.RunDir.check_target`` and ``create``, whose
refusals are reworded here in TRL's terms): a new run needs a new or empty directory, or an
entropy-lab run to replace with ``overwrite_run=True`` that holds nothing entropy-lab did not
write (TRL's ``checkpoint-*`` folders of the replaced run included); a Hugging Face model
directory is never a run directory. Resuming continues an entropy-lab run, or starts one in a
directory that holds only TRL's own outputs when none of the run's file names is taken.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from entropy_lab.config import TrainConfig
from entropy_lab.errors import EntropyLabError, os_error_message
from entropy_lab.runs import MARKER, RunDir, package_versions, write_text_atomic

RUN_NAMES = (MARKER, "config.json", "metrics.parquet", "traces")
"""The entries a TRL run writes in its directory."""

TRL_WORDS = (
    ("refusing to --overwrite", "refusing to replace (overwrite_run=True)"),
    ("--overwrite", "overwrite_run=True"),
    ("--resume", "resume_from_checkpoint"),
    ("another --out", "another output_dir (or run_dir)"),
    ("empty --out", "empty output_dir (or run_dir)"),
    ("writable --out", "writable output_dir (or run_dir)"),
    ("its own --out", "its own output_dir (or run_dir)"),
    ("--out ", "output_dir "),
)
"""The CLI's words in ``RunDir``'s refusals -> the TRL trainer's arguments."""


def _in_trl_terms(exc: EntropyLabError) -> EntropyLabError:
    message = str(exc)
    for cli, trl in TRL_WORDS:
        message = message.replace(cli, trl)
    return EntropyLabError(message)


def check_run_dir(path: Path, *, overwrite: bool, resuming: bool | None) -> str:
    """Refuse a run directory the TRL run cannot use (nothing is created or deleted); else how to start.

    Args:
        resuming: None checks only what is wrong whether or not training resumes (before the
            model is loaded); True / False is the full check of ``TrlRunWriter.start``.

    Returns:
        "resume" (continue the run there), "beside" (add a run next to TRL's own outputs) or
        "create" (``RunDir.create``: a new run, or the replaced one with ``overwrite``).
    """
    run = RunDir(path)
    try:
        if resuming is None:
            if (path.exists() and not path.is_dir()) or (run.config_path.is_file() and not run.holds_run()):
                run.check_target()  # a file, or a Hugging Face model: refused whatever the mode
            return "create"
        if resuming and overwrite:
            run.check_target(overwrite=True, resume=True)  # they exclude each other
        if resuming and run.holds_run():
            run.check_target(resume=True)
            return "resume"
        if resuming and path.is_dir() and not run.config_path.exists() and any(path.iterdir()):
            taken = [n for n in RUN_NAMES if (path / n).exists()]
            if taken:
                raise EntropyLabError(
                    f"{path} holds {', '.join(taken)} but no entropy-lab run; move them away or choose another "
                    "output_dir (or run_dir)"
                )
            return "beside"  # TRL's checkpoints only: the run starts next to them
        run.check_target(overwrite=overwrite)
        return "create"
    except EntropyLabError as exc:
        raise _in_trl_terms(exc) from None


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
        how = check_run_dir(self.run.path, overwrite=self.overwrite, resuming=resuming)
        if how == "resume":
            self.run.update_config_record(**extra)
            self.rows = self.run.read_metrics().to_dict("records")
            return
        if how == "beside":  # a directory of TRL's outputs only: add the run, replace nothing
            self._create_beside_trl(extra)
            return
        try:  # vetted just above; create checks again and replaces only a recognised run
            self.run.create(self.cfg, overwrite=self.overwrite, extra=extra)
        except EntropyLabError as exc:
            raise _in_trl_terms(exc) from None

    def _create_beside_trl(self, extra: dict) -> None:
        """Marker and config.json in a directory holding TRL's checkpoints, none of the run's names taken."""
        run = self.run
        try:
            write_text_atomic(json.dumps({"entropy_lab": package_versions()["entropy_lab"]}), run.marker_path)
            record = {
                "config": self.cfg.to_dict(),
                "seed": self.cfg.seed,
                "versions": package_versions(),
                **extra,
            }
            write_text_atomic(json.dumps(record, indent=2, default=str), run.config_path)
        except OSError as exc:
            raise EntropyLabError(
                os_error_message(exc) + "; choose another output_dir (or run_dir)"
            ) from None

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
