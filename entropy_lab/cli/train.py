"""`entropy-lab train`: one GRPO-family run of a named method."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated

import typer

from entropy_lab.analyses import run_summary
from entropy_lab.cli.common import SetOption, console, friendly_errors, quiet_transformers
from entropy_lab.cli.progress import TrainProgress
from entropy_lab.config import parse_overrides
from entropy_lab.errors import EntropyLabError, EntropyLabWarning
from entropy_lab.formatting import format_number
from entropy_lab.model_sources import model_forms
from entropy_lab.presets import describe, resolve_with_preset

MODEL_HELP = f"Causal LM to train: {model_forms()} (default: the embedded tiny policy)."


def build_config(
    method: str,
    task: str | None,
    dataset: Path | None,
    model: str | None,
    steps: int | None,
    seed: int | None,
    sets: list[str] | None,
):
    """The resolved config: the task's pretrained-model preset (``entropy_lab.presets``, only with a model),
    then the preset of ``method``, then the explicit options, then ``--set`` pairs."""
    overrides = {}
    for key, value in (
        ("task", task),
        ("dataset", dataset),
        ("model", model),
        ("steps", steps),
        ("seed", seed),
    ):
        if value is not None:
            overrides[key] = str(value) if isinstance(value, Path) else value
    pairs = parse_overrides(sets or [])
    for key in sorted(set(pairs) & set(overrides)):
        raise EntropyLabError(
            f"{key} is given twice (--{key} {overrides[key]} and --set {key}={pairs[key]}); give it once"
        )
    overrides.update(pairs)
    return resolve_with_preset(method, overrides)


def default_out(cfg) -> Path:
    name = (
        cfg.method
        if cfg.dataset is None and cfg.task == "countdown"
        else (f"{cfg.method}-{Path(cfg.dataset).stem if cfg.dataset else cfg.task}")
    )
    return Path("runs") / name


def run_training(
    cfg,
    out: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
    label: str | None = None,
) -> Path:
    """Train ``cfg`` into ``out`` with progress (labelled ``label``, default the run's name) and a summary line."""
    from entropy_lab.trainer.loop import Trainer  # torch and transformers load only when training

    quiet_transformers()
    if describe(cfg):
        console.print(describe(cfg), highlight=False, soft_wrap=True)
    with TrainProgress(label or out.name, quiet=quiet) as progress, warnings.catch_warnings():
        warnings.simplefilter("ignore", EntropyLabWarning)  # the progress display prints them, one line each
        metrics = Trainer(cfg, out, resume=resume, overwrite=overwrite, callback=progress).train()
    s = run_summary(metrics).iloc[0]  # start = first step, final = mean of the last 10% of steps
    console.print(
        f"[bold]{out}[/]: entropy {format_number(s['initial_entropy'], 3, '-')} -> {format_number(s['final_entropy'], 3, '-')} nats, "
        f"reward {format_number(s['initial_reward'], 3, '-')} -> {format_number(s['final_reward'], 3, '-')} (first step -> mean of last 10%)"
    )
    return out


@friendly_errors
def train(
    method: Annotated[
        str, typer.Option("--method", "-m", help="Method preset; `entropy-lab methods` lists them.")
    ] = "grpo",
    task: Annotated[
        str | None,
        typer.Option(
            help="Built-in task (countdown, arithmetic, word-arithmetic). With --model, word-arithmetic fills every "
            "setting you do not give from its measured preset (printed at start, recorded in config.json)."
        ),
    ] = None,
    dataset: Annotated[Path | None, typer.Option(help="verl-format Parquet file (needs --model).")] = None,
    model: Annotated[str | None, typer.Option(help=MODEL_HELP)] = None,
    steps: Annotated[int | None, typer.Option(help="RL steps.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    sets: SetOption = None,
    out: Annotated[Path | None, typer.Option(help="Run directory [default: runs/<method>].")] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in --out from its latest checkpoint.")
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite", help="Replace the entropy-lab run in --out (nothing else is ever deleted)."
        ),
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Train a policy with one method and write a run directory (config, metrics, eval, traces, checkpoints)."""
    cfg = build_config(method, task, dataset, model, steps, seed, sets)
    run_training(cfg, out or default_out(cfg), resume=resume, overwrite=overwrite, quiet=quiet)
