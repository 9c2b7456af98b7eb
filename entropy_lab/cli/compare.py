"""`entropy-lab compare METHOD [METHOD ...]`: train each method from the same start and compare."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from entropy_lab.cli.common import (
    SetOption,
    check_set_pairs,
    console,
    err_console,
    friendly_errors,
    print_table,
)
from entropy_lab.cli.progress import make_view
from entropy_lab.cli.train import MODEL_HELP, Interrupted, build_config, invoked_command, run_training
from entropy_lab.config import parse_overrides
from entropy_lab.errors import EntropyLabError
from entropy_lab.runs import RunDir

COMPARE_COLUMNS = [
    "method",
    "n_seeds",
    "initial_entropy",
    "final_entropy",
    "final_entropy_ci",
    "initial_reward",
    "final_reward",
    "final_reward_ci",
    "best_accuracy",
    "final_accuracy",
    "final_pass@1",
    "mean_abs_entropy_step",
]


def ensure_run(cfg, out: Path, quiet: bool, label: str | None = None) -> RunDir:
    """Reuse a finished run with the same configuration, resume an unfinished one, else train."""
    rd = RunDir(out)
    if rd.config_path.is_file():
        saved = rd.train_config()
        if saved.to_dict() != cfg.to_dict():
            diff = sorted(k for k, v in cfg.to_dict().items() if saved.to_dict().get(k) != v)
            raise EntropyLabError(
                f"{out} holds a run with another configuration ({', '.join(diff)}); "
                "choose another --out or delete it"
            )
        done = rd.latest_checkpoint()
        if done is not None and done[0] == cfg.steps:
            console.print(f"reusing {out} (same configuration, finished)")
            return rd
        if done is not None:
            run_training(cfg, out, resume=True, quiet=quiet, label=label)
            return rd
    run_training(cfg, out, overwrite=rd.config_path.is_file(), quiet=quiet, label=label)
    return rd


def seed_configs(method: str, seeds: int, task, dataset, model, steps, sets: list[str] | None) -> list:
    """K configs of ``method`` with distinct seeds S, S+1, ..., S+K-1 (S from ``--set seed=S``, else 0)."""
    first = parse_overrides(sets or []).get("seed", 0)
    rest = [p for p in (sets or []) if p.split("=", 1)[0].strip() != "seed"]
    return [build_config(method, task, dataset, model, steps, first + i, rest) for i in range(seeds)]


@friendly_errors
def compare(
    methods: Annotated[list[str], typer.Argument(help="Method presets to compare, e.g. grpo steer.")],
    seeds: Annotated[
        int, typer.Option(help="Seeds per method: S, S+1, ..., S+K-1 with S from --set seed=S (default 0).")
    ] = 1,
    steps: Annotated[int | None, typer.Option(help="RL steps per run.")] = None,
    task: Annotated[str | None, typer.Option(help="Built-in task.")] = None,
    dataset: Annotated[Path | None, typer.Option(help="verl-format Parquet file (needs --model).")] = None,
    model: Annotated[str | None, typer.Option(help=MODEL_HELP)] = None,
    sets: SetOption = None,
    out: Annotated[Path, typer.Option(help="Directory for the runs and the comparison report.")] = Path(
        "runs/compare"
    ),
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Train each method from the same warm start, seeds and budget; print and write the comparison."""
    from entropy_lab.methods import METHODS
    from entropy_lab.report.compose import compare_report, run_report

    if seeds < 1:
        raise EntropyLabError(f"--seeds must be at least 1, got {seeds}")
    check_set_pairs(sets, [m for m in methods if m not in METHODS])  # `--set lr 1e-3`: '1e-3' lands here
    if len(methods) == 1 and seeds == 1:
        raise EntropyLabError(
            f"compare needs two methods or more (got {methods[0]} alone), or --seeds 2 or more; "
            f"for one run use `entropy-lab train --method {methods[0]}`"
        )
    repeated = sorted({m for m in methods if methods.count(m) > 1})
    if repeated:
        raise EntropyLabError(f"method(s) {', '.join(repeated)} named more than once; name each method once")
    configs = {m: seed_configs(m, seeds, task, dataset, model, steps, sets) for m in methods}
    n = sum(len(cfgs) for cfgs in configs.values())
    runs: dict[str, list[RunDir]] = {m: [] for m in configs}
    try:
        for m, cfgs in configs.items():
            for cfg in cfgs:
                name = f"{m}-s{cfg.seed}"
                done = sum(map(len, runs.values()))
                runs[m].append(ensure_run(cfg, out / name, quiet, label=f"{name} ({done + 1}/{n})"))
    except Interrupted as stop:  # the same command again reuses finished runs and resumes the interrupted one
        where = stop.line.split(";")[0]
        err_console.print(
            f"{where} of {name}; continue with: {invoked_command()}",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
        raise typer.Exit(130) from None
    with make_view(quiet) as view:  # the figures take a while on a small machine: they show progress too
        key = view.add("compare: reports", total=n + 1, unit="report")
        for done, rd in enumerate((rd for rds in runs.values() for rd in rds), start=1):
            run_report(rd)
            view.update(key, completed=done, status=rd.path.name)
        result = compare_report(runs, out)
        view.update(key, completed=n + 1, status="comparison")
        view.finish(key)
    table = result["table"]
    widest_k = [
        c for c in table.columns if c.startswith("final_pass@") and c[11:].isdigit() and c != "final_pass@1"
    ][-1:]
    print_table(
        table, "comparison (batch-level; final = mean of the last 10% of steps)", COMPARE_COLUMNS + widest_k
    )
    print_table(
        result.get("tightness"),
        "tightness per method and estimator (token-level, pooled)",
        ["method", "estimator", "n", "pearson", "spearman", "sign_agreement", "gain", "r2"],
    )
    console.print(f"report: {result['report']}")
