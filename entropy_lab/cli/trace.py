"""`entropy-lab trace --run PATH`: trace an update from a checkpoint, or analyse a run's traces.

Three modes, one function each: ``analyse_run`` (a run with traces and no checkpoint or
method asked for; it also lists the run's retraces), ``retrace_update`` (one update from a
checkpoint, tabled on its own) and ``sweep_update`` (``--eta-sweep``: that update along
theta + eta dtheta, the linear regime). A traced checkpoint never changes the run: its
records, report and figures go to ``RUN/retrace/...`` (``entropy_lab.trainer.retrace``).
``--attribution layer`` makes the retraced update split its jvp prediction over parameter
groups (``entropy_lab.trace.attribution``), tabled with the update's other tables.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from entropy_lab.cli.common import console, friendly_errors, print_table, quiet_transformers
from entropy_lab.errors import EntropyLabError
from entropy_lab.runs import Retrace, RunDir, list_retraces


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
    """Every registered report entry that has a terminal view, in report order.

    An entry whose table function gave no table for these records (``trace_tables`` left it out) is skipped.
    """
    from entropy_lab.report.entries import REPORT_ENTRIES

    for entry in REPORT_ENTRIES.values():
        if entry.terminal is not None and (entry.table is None or entry.name in tables):
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
    attribution: Annotated[
        str | None,
        typer.Option(
            "--attribution",
            help="Trace from the checkpoint with the jvp prediction split over parameter groups: layer "
            "(embedding, each block's attention and MLP, norms, LM head); one forward-mode pass per group.",
        ),
    ] = None,
) -> None:
    """Trace one update from a checkpoint and table that update, or analyse a run's existing traces."""
    if output not in ("table", "json"):
        raise EntropyLabError(f"--format must be table or json, got {output!r}")
    rd, ckpt_step = locate(run)
    rd.read_config()  # one clear error for a missing or malformed run directory
    if ckpt_step is not None and step is not None and step != ckpt_step:
        raise EntropyLabError(
            f"--run names checkpoint step {ckpt_step} but --step says {step}; give the step once"
        )
    step = step if step is not None else ckpt_step
    if attribution is not None:
        from entropy_lab.trace.attribution import parse_attribution

        if not parse_attribution(attribution):  # an unknown kind: one error listing the valid ones
            attribution = None  # "none": as if not given
        if eta_sweep:
            raise EntropyLabError("--attribution traces one update; run it without --eta-sweep")
    if eta_sweep:  # the sweep records the jvp estimators anyway
        sweep_update(rd, step, method, output)
    elif step is None and method is None and not jvp and attribution is None and rd.trace_files():
        analyse_run(rd, output)
    else:
        retrace_update(rd, step, method, jvp, output, attribution)


def retrace_entry(r: Retrace) -> dict:
    """One retrace as the json output and the listing show it."""
    traced = None if r.checkpoint_step is None else r.checkpoint_step + 1
    return {
        "path": str(r.path),
        "checkpoint_step": r.checkpoint_step,
        "traced_step": traced,
        "method": r.method,
        "variant": r.variant or None,
        "layout": "legacy" if r.legacy else "retrace",
    }


def print_retraces(rd: RunDir) -> None:
    """Which updates were traced from the run's checkpoints; each has its own report (`trace --run PATH`)."""
    found = list_retraces(rd)
    if not found:
        console.print(f"no retraces (updates traced from a checkpoint) in {rd.path}")
        return
    console.print(
        f"retraces of {rd.path.name} (each its own report; analyse one with `entropy-lab trace --run PATH`):"
    )
    for r in found:
        e = retrace_entry(r)
        known = e["checkpoint_step"] is not None
        what = f"update {e['traced_step']} from checkpoint {e['checkpoint_step']}" if known else "update ?"
        what += f", {r.method}"
        what += f", {r.variant}" if r.variant else ""
        console.print(f"  {r.path}  ({what}{', older layout' if r.legacy else ''})", highlight=False)


def analyse_run(rd: RunDir, output: str) -> None:
    """The run's report from the traces training wrote, its tables pooled over every traced step, and its retraces."""
    from entropy_lab.report.compose import report_json, run_report

    result = run_report(rd)
    n = len(rd.trace_files())
    if output == "json":
        payload = {
            "run": str(rd.path),
            "scope": "run",
            "traced_steps": n,
            "retraces": [retrace_entry(r) for r in list_retraces(rd)],
            **report_json(result["tables"]),
        }
        print(json.dumps(payload, indent=2))
        return
    console.print(f"{rd.path}: tables pool all {n} traced steps of the run")
    print_trace_tables(result["tables"], rd.path.name)
    console.print(f"report: {result['report']}  figures: {rd.figures_dir}")
    print_retraces(rd)


def retrace_update(
    rd: RunDir, step: int | None, method: str | None, jvp: bool, output: str, attribution: str | None = None
) -> None:
    """One traced update from the checkpoint at ``step``: its tables, report and figures, apart from the run's."""
    from entropy_lab.records import load_records
    from entropy_lab.report.compose import report_json, run_report, trace_tables
    from entropy_lab.trainer.retrace import trace_checkpoint

    quiet_transformers()
    if output == "table":
        console.print(f"tracing one update of {rd.path} from its checkpoint ...")
    done = trace_checkpoint(rd, step, method, jvp=jvp, attribution=attribution)
    records, _ = load_records(done.trace_path)
    records.insert(0, "run", done.run.path.name)
    records.insert(0, "method", done.method)
    tables = trace_tables(records)  # this update only
    result = run_report(done.run)  # the retrace's own report: the run's stays that of training
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
    console.print(
        f"report of this update: {result['report']}  figures: {done.run.figures_dir} "
        f"({rd.path.name}'s own traces and report are unchanged)"
    )


def sweep_update(rd: RunDir, step: int | None, method: str | None, output: str) -> None:
    """One update from the checkpoint at ``step`` swept over eta: the linear-regime tables and figure.

    The update goes to ``run/retrace/step_N[-<method>]-eta-sweep`` (``entropy_lab.trainer.retrace``)
    with the jvp estimators; its tables are ``analyses.regime``; that directory gets its own
    report and figures, ``linear_regime.png`` among them.
    """
    from entropy_lab.analyses.regime import regime_table
    from entropy_lab.figures.regime import linear_regime_figure
    from entropy_lab.figures.save import save_figure
    from entropy_lab.records import load_records
    from entropy_lab.report.compose import run_report
    from entropy_lab.trace.probes import DEFAULT_ETAS
    from entropy_lab.trainer.retrace import trace_checkpoint

    quiet_transformers()
    if output == "table":
        console.print(f"eta sweep of one update of {rd.path} from its checkpoint ...")
    done = trace_checkpoint(rd, step, method, jvp=True, eta_grid=DEFAULT_ETAS)
    report = run_report(done.run)["report"]  # the sweep's own report.md and report.json
    tightness, shares = regime_table(load_records(done.trace_path)[0])
    figure = save_figure(linear_regime_figure(tightness, shares), done.run.figures_dir / "linear_regime")[0]
    if output == "json":
        payload = {"tightness": tightness.to_dict("records"), "shares": shares.to_dict("records")}
        print(json.dumps({**payload, "figure": str(figure), "report": str(report)}, indent=2))
        return
    for values, title in (
        ("pearson", "linear regime: Pearson per estimator against the measured change at theta + eta dtheta"),
        ("gain", "linear regime: least-squares gain of the eta-scaled prediction (1 = right scale)"),
    ):
        print_table(tightness.pivot(index="eta", columns="estimator", values=values).reset_index(), title)
    print_table(
        shares, "linear regime: shares of ||measured||^2 (curvature -> 0 as eta -> 0; coupling stays)"
    )
    console.print(f"figure: {figure}  report: {report}")
