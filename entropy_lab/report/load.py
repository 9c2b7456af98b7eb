"""Reading what the trainer wrote into run directories, for reports: trace records, metrics, evaluations.

No model and no torch are needed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd

from entropy_lab.errors import EntropyLabError
from entropy_lab.records import load_records
from entropy_lab.runs import RunDir


def config_record(run: RunDir) -> dict:
    """``config.json``'s validated ``config`` entry, or {} when the directory has none; a damaged one is an error."""
    if not run.config_path.is_file():
        return {}
    return dict(run.read_config()["config"])


def load_run_records(run: RunDir, label: str | None = None) -> pd.DataFrame:
    """All trace records of a run, with ``run`` and ``method`` columns in front.

    Args:
        run: the run directory.
        label: value of the ``run`` column; None = the directory's name.

    Returns:
        The concatenation of every ``traces/step_*.parquet`` (validated by ``load_records``),
        ``method`` taken from ``config.json`` (else the first trace file's metadata, else
        "unknown").

    Raises:
        EntropyLabError: the run has no trace files, or one of them is unreadable, breaks the
            record contract or holds records of another step than its name (the message names
            the file).
    """
    files = run.trace_files()
    if not files:
        raise EntropyLabError(
            f"{run.path} has no trace files (traces/step_*.parquet); train with trace_every > 0"
        )
    frames: list[pd.DataFrame] = []
    metadata: dict = {}
    for path in files:
        frame, config = load_records(path)
        step = int(path.stem[len("step_") :]) if path.stem[len("step_") :].isdigit() else None
        if step is not None and len(frame) and not bool((frame["step"] == step).all()):
            other = int(frame.loc[frame["step"] != step, "step"].iloc[0])
            raise EntropyLabError(
                f"{path} holds records of step {other}, not only of step {step} as its name says; "
                "the file is damaged or was not written by entropy-lab"
            )
        frames.append(frame)
        metadata = metadata or config
    records = pd.concat(frames, ignore_index=True)
    method = config_record(run).get("method") or metadata.get("method") or "unknown"
    records.insert(0, "run", str(label or run.path.name))
    records.insert(0, "method", str(method))
    return records


def read_tables(run: RunDir) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(metrics, evals) of a run; empty frames where the files are absent."""
    return run.read_metrics(), run.read_eval()


def seeds_of(runs: Sequence[RunDir]) -> list[int]:
    """Each run's config seed; 0, 1, 2, ... instead when seeds repeat (they label seeds, so must differ)."""
    seeds = [int(config_record(run).get("seed", i) or 0) for i, run in enumerate(runs)]
    return seeds if len(set(seeds)) == len(seeds) else list(range(len(runs)))


def collect(
    runs: Mapping[str, Sequence[RunDir]],
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, list[dict]]:
    """Concatenated (metrics, evals, trace records) with ``method``/``seed`` columns, and a run listing."""
    metrics, evals, records, listing = [], [], [], []
    for method, dirs in runs.items():
        for run, seed in zip(dirs, seeds_of(dirs), strict=True):
            run_metrics, run_evals = read_tables(run)
            target = config_record(run).get("entropy_target")
            if target is not None and "entropy/target" not in run_metrics.columns:
                # The run's entropy target, so that every method's tracking error is measured against it.
                run_metrics = run_metrics.assign(**{"entropy/target": float(target)})
            if len(run_metrics):
                metrics.append(run_metrics.assign(method=method, seed=seed))
            if len(run_evals):
                evals.append(run_evals.assign(method=method, seed=seed))
            has_traces = bool(run.trace_files())
            if has_traces:
                frame = load_run_records(run, label=f"{method}/seed{seed}")
                records.append(frame.assign(method=method, seed=seed))
            listing.append(
                {
                    "method": method,
                    "seed": seed,
                    "run": str(run.path),
                    "steps": len(run_metrics),
                    "traces": has_traces,
                }
            )
    return _concat(metrics), _concat(evals), _concat(records), listing


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
