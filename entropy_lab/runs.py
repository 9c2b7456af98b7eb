"""Run directories (DESIGN.md section 4): configuration, per-step metrics, traces, checkpoints.

    runs/<name>/config.json          resolved configuration, seed, package versions
    runs/<name>/metrics.parquet      one row per step, rewritten atomically after every step
    runs/<name>/eval.parquet         periodic evaluation (greedy accuracy, pass@k)
    runs/<name>/traces/step_XXXXXX.parquet   every traced update of that step (column ``update``)
    runs/<name>/checkpoints/step_XXXXXX/     model + tokenizer (save_pretrained), trainer_state.pt
    runs/<name>/figures/, report.md

Every file is written under a temporary name and renamed into place, so a killed run
leaves either the old or the new version, never half of one.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from entropy_lab.config import TrainConfig
from entropy_lab.errors import EntropyLabError


def package_versions() -> dict[str, str]:
    import numpy
    import torch
    import transformers

    import entropy_lab

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
        "pandas": pd.__version__,
        "entropy_lab": entropy_lab.__version__,
    }


def write_parquet_atomic(df: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def write_text_atomic(text: str, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass
class RunDir:
    """Paths and I/O of one run directory."""

    path: Path

    def __post_init__(self):
        self.path = Path(self.path)

    config_path = property(lambda self: self.path / "config.json")
    metrics_path = property(lambda self: self.path / "metrics.parquet")
    eval_path = property(lambda self: self.path / "eval.parquet")
    traces_dir = property(lambda self: self.path / "traces")
    checkpoints_dir = property(lambda self: self.path / "checkpoints")
    figures_dir = property(lambda self: self.path / "figures")
    report_path = property(lambda self: self.path / "report.md")

    # --- creation ----------------------------------------------------------------------
    def create(self, cfg: TrainConfig, *, overwrite: bool = False, extra: dict | None = None) -> None:
        """Start a new run here; refuses to replace an existing run unless ``overwrite``."""
        if self.config_path.exists():
            if not overwrite:
                raise EntropyLabError(
                    f"{self.path} already holds a run; pass --resume to continue it or --overwrite to replace it"
                )
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        record = {"config": cfg.to_dict(), "seed": cfg.seed, "versions": package_versions(), **(extra or {})}
        write_text_atomic(json.dumps(record, indent=2, default=str), self.config_path)

    def read_config(self) -> dict:
        """The whole config.json record; one error line if this is not a run directory."""
        if not self.path.is_dir():
            raise EntropyLabError(f"no run directory at {self.path}")
        if not self.config_path.is_file():
            raise EntropyLabError(f"{self.path} is not a run directory (no config.json)")
        try:
            record = json.loads(self.config_path.read_text())
            record["config"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise EntropyLabError(f"{self.config_path} is malformed (no readable 'config' entry)") from None
        return record

    def train_config(self) -> TrainConfig:
        return TrainConfig().replace(**self.read_config()["config"])

    def update_config_record(self, **entries) -> None:
        record = self.read_config()
        record.update(entries)
        write_text_atomic(json.dumps(record, indent=2, default=str), self.config_path)

    # --- tables ------------------------------------------------------------------------
    def read_metrics(self) -> pd.DataFrame:
        return pd.read_parquet(self.metrics_path) if self.metrics_path.is_file() else pd.DataFrame()

    def read_eval(self) -> pd.DataFrame:
        return pd.read_parquet(self.eval_path) if self.eval_path.is_file() else pd.DataFrame()

    def write_metrics(self, rows: list[dict]) -> None:
        write_parquet_atomic(pd.DataFrame(rows), self.metrics_path)

    def write_eval(self, rows: list[dict]) -> None:
        write_parquet_atomic(pd.DataFrame(rows), self.eval_path)

    def trace_path(self, step: int) -> Path:
        return self.traces_dir / f"step_{step:06d}.parquet"

    def trace_files(self) -> list[Path]:
        return sorted(self.traces_dir.glob("step_*.parquet")) if self.traces_dir.is_dir() else []

    # --- checkpoints -------------------------------------------------------------------
    def checkpoint_path(self, step: int) -> Path:
        return self.checkpoints_dir / f"step_{step:06d}"

    def checkpoints(self) -> dict[int, Path]:
        """step -> complete checkpoint directory (temporary leftovers of a killed save are ignored)."""
        if not self.checkpoints_dir.is_dir():
            return {}
        out = {}
        for p in self.checkpoints_dir.iterdir():
            if p.name.startswith("step_") and p.name[5:].isdigit() and (p / "trainer_state.pt").is_file():
                out[int(p.name[5:])] = p
        return dict(sorted(out.items()))

    def latest_checkpoint(self) -> tuple[int, Path] | None:
        ckpts = self.checkpoints()
        return None if not ckpts else list(ckpts.items())[-1]

    def truncate_after(self, step: int) -> None:
        """Drop metrics, evaluations and traces of steps after ``step`` (they are redone on resume)."""
        for path in (self.metrics_path, self.eval_path):
            if path.is_file():
                df = pd.read_parquet(path)
                write_parquet_atomic(df[df["step"] <= step], path)
        for f in self.trace_files():
            if int(f.stem[5:]) > step:
                f.unlink()
