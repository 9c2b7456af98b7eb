"""`entropy-lab trace --run PATH`: trace an update from a checkpoint, or analyse a run's traces."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from entropy_lab.cli.common import console, friendly_errors, print_table, quiet_transformers
from entropy_lab.errors import EntropyLabError
from entropy_lab.runs import RunDir


def _step_of(name: str) -> int | None:
    """'step_000150' or 'step_150' -> 150; anything else -> None."""
    digits = name[5:] if name.startswith("step_") else ""
    return int(digits) if digits.isdigit() else None


def locate(path: Path) -> tuple[RunDir, int | None]:
    """(run directory, checkpoint step or None) for a run or a checkpoint directory.

    ``RUN/checkpoints/step_150`` names the checkpoint ``step_000150``; a step without a
    checkpoint is one error listing the checkpoints that exist.
    """
    step = _step_of(path.name)
    if step is not None and path.parent.name == "checkpoints":
        run = RunDir(path.parent.parent)
        if not run.path.is_dir():
            raise EntropyLabError(f"no run directory at {run.path}")
        run.find_checkpoint(step)
        return run, step
    if not path.exists():
        raise EntropyLabError(f"no run or checkpoint directory at {path}")
    if not path.is_dir():
        raise EntropyLabError(
            f"{path} is a file; pass a run directory or one of its checkpoints/step_N directories"
        )
    return RunDir(path), None


def print_trace_tables(tables: dict, label: str) -> None:
    """Every registered report entry that has a terminal view, in report order."""
    from entropy_lab.report.entries import REPORT_ENTRIES

    for entry in REPORT_ENTRIES.values():
        if entry.terminal is not None:
            print_table(
                tables.get(entry.name), f"{label}: {entry.terminal.title}", list(entry.terminal.columns)
            )


@friendly_errors
def trace(
    run: Annotated[
        Path, typer.Option("--run", help="A run directory or one of its checkpoints/step_N directories.")
    ],
    step: Annotated[int | None, typer.Option(help="Checkpoint step to trace from (default: latest).")] = None,
    method: Annotated[
        str | None, typer.Option(help="Method for the traced update (default: the run's).")
    ] = None,
    output: Annotated[str, typer.Option("--format", help="table or json.")] = "table",
    eta_sweep: Annotated[
        bool,
        typer.Option(
            "--eta-sweep",
            help="Measure the traced tokens' entropy at theta + eta dtheta (eta 1/64 ... 2); per eta each "
            "estimator's Pearson and gain, the curvature and coupling shares, and linear_regime.png.",
        ),
    ] = False,
    jvp: Annotated[
        bool,
        typer.Option(
            "--jvp",
            help="Trace from the checkpoint with the jvp and jvp-entropy estimators too (one forward-mode "
            "pass, a few forwards' cost).",
        ),
    ] = False,
) -> None:
    """Trace one update from a checkpoint and table that update, or analyse a run's existing traces."""
    from entropy_lab.report.compose import report_json, run_report

    if output not in ("table", "json"):
        raise EntropyLabError(f"--format must be table or json, got {output!r}")
    rd, ckpt_step = locate(run)
    rd.read_config()  # one clear error for a missing or malformed run directory
    if eta_sweep:
        from entropy_lab.linear_regime import eta_sweep_command

        return eta_sweep_command(rd, step if step is not None else ckpt_step, output)
    if ckpt_step is not None and step is not None and step != ckpt_step:
        raise EntropyLabError(
            f"--run names checkpoint step {ckpt_step} but --step says {step}; give the step once"
        )
    if ckpt_step is None and step is None and method is None and not jvp and rd.trace_files():
        result = run_report(rd)  # analyse what training traced
        n = len(rd.trace_files())
        if output == "json":
            print(
                json.dumps(
                    {"run": str(rd.path), "scope": "run", "traced_steps": n, **report_json(result["tables"])},
                    indent=2,
                )
            )
            return
        console.print(f"{rd.path}: tables pool all {n} traced steps of the run")
        print_trace_tables(result["tables"], rd.path.name)
        console.print(f"report: {result['report']}  figures: {rd.figures_dir}")
        return

    from entropy_lab.records import load_records
    from entropy_lab.report.compose import trace_tables
    from entropy_lab.trainer.retrace import trace_checkpoint

    quiet_transformers()
    if output == "table":
        console.print(f"tracing one update of {rd.path} from its checkpoint ...")
    done = trace_checkpoint(rd, step if step is not None else ckpt_step, method, jvp=jvp)
    records, _ = load_records(done.trace_path)
    records.insert(0, "run", done.run.path.name)
    records.insert(0, "method", done.method)
    tables = trace_tables(records)  # this update only
    result = run_report(done.run)  # the run's report and figures pool every trace it holds
    what = f"step {done.step} ({done.method}), traced from {done.checkpoint}"
    if output == "json":
        payload = {
            "run": str(done.run.path),
            "scope": "update",
            "traced_step": done.step,
            "checkpoint": str(done.checkpoint),
            "trace": str(done.trace_path),
            **report_json(tables),
        }
        print(json.dumps(payload, indent=2))
        return
    console.print(f"tables below cover one update: {what}; trace in {done.trace_path}")
    print_trace_tables(tables, f"step {done.step}")
    n = len(done.run.trace_files())
    console.print(
        f"report (pools all {n} traced step{'s' if n != 1 else ''} of {done.run.path.name}): "
        f"{result['report']}  figures: {done.run.figures_dir}"
    )
