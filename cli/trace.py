"""`entropy-lab trace --run PATH`: trace an update from a checkpoint, or analyse a run's traces."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from entropy_lab.cli.common import console, friendly_errors, print_table, quiet_transformers
from entropy_lab.errors import EntropyLabError
from entropy_lab.runs import RunDir

TIGHTNESS_COLUMNS = ["estimator", "n", "pearson", "spearman", "sign_agreement", "gain", "r2"]


def locate(path: Path) -> tuple[RunDir, int | None]:
    """(run directory, checkpoint step or None) for a run or a checkpoint directory."""
    if not path.exists():
        raise EntropyLabError(f"no run or checkpoint directory at {path}")
    if (path / "trainer_state.pt").is_file() and path.name.startswith("step_") and path.name[5:].isdigit():
        return RunDir(path.parent.parent), int(path.name[5:])
    return RunDir(path), None


def print_trace_tables(tables: dict, label: str) -> None:
    print_table(
        tables.get("tightness"), f"{label}: tightness per estimator (token-level, pooled)", TIGHTNESS_COLUMNS
    )
    print_table(
        tables.get("factor_share"),
        f"{label}: share of residual variance explained by each factor",
        ["factor", "n", "bins", "share"],
    )
    print_table(
        tables.get("quadrants"),
        f"{label}: quadrants sign(A) x sign(log pi_a + H)",
        ["quadrant", "theory", "count", "mean_predicted", "mean_measured", "sign_agreement"],
    )
    print_table(
        tables.get("decomposition"),
        f"{label}: decomposition of the measured change",
        ["part", "sum", "sum_abs", "share"],
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
) -> None:
    """Trace one update from a checkpoint (or analyse existing traces); print tightness, factors, quadrants."""
    from entropy_lab.report import report_json, run_report

    if output not in ("table", "json"):
        raise EntropyLabError(f"--format must be table or json, got {output!r}")
    rd, ckpt_step = locate(run)
    rd.read_config()  # one clear error for a missing or malformed run directory
    if eta_sweep:
        from entropy_lab.linear_regime import eta_sweep_command

        return eta_sweep_command(rd, step if step is not None else ckpt_step, output)
    target = rd
    if ckpt_step is not None or step is not None or method is not None or not rd.trace_files():
        from entropy_lab.trainer import trace_checkpoint

        quiet_transformers()
        if output == "table":
            console.print(f"tracing one update of {rd.path} from its checkpoint ...")
        target = trace_checkpoint(rd, step if step is not None else ckpt_step, method)
    result = run_report(target)
    if output == "json":
        print(json.dumps({"run": str(target.path), **report_json(result["tables"])}, indent=2))
        return
    print_trace_tables(result["tables"], target.path.name)
    console.print(f"report: {result['report']}  figures: {target.figures_dir}")
