"""`entropy-lab figures --run PATH ...`: rebuild every figure and report from saved records only."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from entropy_lab.cli.common import console, friendly_errors
from entropy_lab.runs import RunDir


@friendly_errors
def figures(
    run: Annotated[list[Path], typer.Option("--run", help="Run directory (repeatable).")],
    out: Annotated[
        Path | None, typer.Option(help="Where a comparison of several runs goes.", show_default="none")
    ] = None,
) -> None:
    """Regenerate each run's figures and report.md (and a comparison with --out), no model needed."""
    from entropy_lab.report.compose import check_outputs, compare_report, run_report

    runs = [RunDir(p) for p in run]
    for rd in runs:  # before anything is written: a user's file in the way of any output is one line
        rd.read_config()
        check_outputs(rd.path)
    if out is not None:
        check_outputs(out.resolve())
    by_method: dict[str, list[RunDir]] = {}
    for rd in runs:
        method = rd.read_config()["config"]["method"]
        result = run_report(rd)
        console.print(f"{rd.path}: {len(result['figures'])} figure files, {result['report']}")
        by_method.setdefault(method, []).append(rd)
    if out is not None:
        result = compare_report(by_method, out)
        console.print(f"comparison: {result['report']}")
