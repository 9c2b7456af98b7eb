"""`entropy-lab train`: one GRPO-family run of a named method."""

from __future__ import annotations

import shlex
import signal
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from entropy_lab.analyses import run_summary
from entropy_lab.cli.common import (
    SetOption,
    check_set_pairs,
    console,
    err_console,
    friendly_errors,
    quiet_transformers,
)
from entropy_lab.cli.progress import TrainProgress
from entropy_lab.config import parse_overrides
from entropy_lab.errors import EntropyLabError, EntropyLabWarning
from entropy_lab.formatting import format_number
from entropy_lab.model_sources import model_forms
from entropy_lab.presets import describe, resolve_with_preset
from entropy_lab.runs import RunDir

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
    return resolve_with_preset(method, given_settings(task, dataset, model, steps, seed, sets))


def given_settings(
    task: str | None,
    dataset: Path | None,
    model: str | None,
    steps: int | None,
    seed: int | None,
    sets: list[str] | None,
) -> dict:
    """The settings the user gave (options and ``--set`` pairs, typed); one given twice is an error."""
    overrides: dict = {}
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
    return overrides


def resume_config(out: Path, method: str | None, given: dict, overwrite: bool):
    """The configuration ``--resume`` continues: the run's own config.json, with a larger ``steps`` if given.

    Any other setting given must be the run's already: one that differs is refused, so
    ``entropy-lab train --out RUN --resume`` alone continues a run as it was started.
    """
    rd = RunDir(out)
    rd.check_target(resume=True, overwrite=overwrite)  # no run there, or --overwrite too: one line
    saved = rd.train_config()
    wanted = {**given, **({"method": method} if method is not None else {})}
    diff = [k for k, v in wanted.items() if k != "steps" and getattr(saved, k, None) != v]
    if diff:
        shown = ", ".join(f"{k} ({getattr(saved, k, None)!r} -> {wanted[k]!r})" for k in diff[:4])
        raise EntropyLabError(
            f"cannot resume {out}: its configuration differs in {shown} from the settings given; --resume continues the run "
            f"with its own config.json (`entropy-lab train --out {shlex.quote(str(out))} --resume`, "
            "--steps may extend it): drop them, or start a new --out"
        )
    return saved.replace(steps=wanted.get("steps", saved.steps))


class Interrupted(Exception):
    """SIGINT or SIGTERM ended training; ``line`` says how to continue."""

    def __init__(self, line: str):
        super().__init__(line)
        self.line = line


def interrupt_line(cfg, out: Path, step: int | None, again: str) -> str:
    """'interrupted at step N; continue with: CMD' - the command that works from what is on disk.

    When ``out`` holds this run (its config.json is ``cfg`` up to ``steps``) that is
    ``train --out OUT --resume`` (with ``--steps`` when the budget is not the saved one), and
    the checkpoint it resumes from is named; otherwise nothing of this run was written yet and
    it is ``again``, the command that was interrupted.
    """
    rd = RunDir(out)
    try:
        saved = rd.train_config() if rd.holds_run() else None
    except EntropyLabError:
        saved = None
    where = "during set-up" if step is None else f"at step {step}" if step else "before step 1"
    if saved is None or saved.replace(steps=cfg.steps) != cfg:
        return f"interrupted {where}; nothing of this run was written yet; start it again with: {again}"
    command = f"entropy-lab train --out {shlex.quote(str(out))} --resume"
    if saved.steps != cfg.steps:
        command += f" --steps {cfg.steps}"
    latest = rd.latest_checkpoint()
    since = f"the checkpoint at step {latest[0]}" if latest else "the start (no checkpoint yet)"
    return f"interrupted {where}; continue with: {command} (it resumes from {since})"


def invoked_command() -> str:
    """The command line this process was started with, as ``entropy-lab ...``."""
    return shlex.join(["entropy-lab", *sys.argv[1:]])


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM ends training like Ctrl-C (KeyboardInterrupt), so both say how to continue."""
    try:
        previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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
    progress = TrainProgress(label or out.name, quiet=quiet)
    try:
        with sigterm_as_interrupt(), progress, warnings.catch_warnings():
            warnings.simplefilter(
                "ignore", EntropyLabWarning
            )  # the progress display prints them, one line each
            metrics = Trainer(cfg, out, resume=resume, overwrite=overwrite, callback=progress).train()
    except KeyboardInterrupt:
        raise Interrupted(interrupt_line(cfg, out, progress.last_step, invoked_command())) from None
    s = run_summary(metrics).iloc[0]  # start = first step, final = mean of the last 10% of steps
    console.print(
        f"[bold]{out}[/]: entropy {format_number(s['initial_entropy'], 3, '-')} -> {format_number(s['final_entropy'], 3, '-')} nats, "
        f"reward {format_number(s['initial_reward'], 3, '-')} -> {format_number(s['final_reward'], 3, '-')} (first step -> mean of last 10%)"
    )
    return out


@friendly_errors
def train(
    ctx: typer.Context,
    method: Annotated[
        str | None,
        typer.Option(
            "--method",
            "-m",
            help="Method preset; `entropy-lab methods` lists them.",
            show_default="grpo",
        ),
    ] = None,
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
    out: Annotated[
        Path | None,
        typer.Option(
            help="Run directory (runs/<method>-<task> for another task or a dataset).",
            show_default="runs/<method>",
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue the run in --out from its latest checkpoint, with its own config.json "
            "(other settings given must match it; --steps may extend the run).",
        ),
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
    check_set_pairs(sets, ctx.args)
    if ctx.args:
        raise EntropyLabError(
            f"unexpected argument(s) {' '.join(ctx.args)}; `entropy-lab train --help` lists the options"
        )
    given = given_settings(task, dataset, model, steps, seed, sets)
    cfg = resolve_with_preset(method or "grpo", given)
    out = out or default_out(cfg)
    if resume:
        cfg = resume_config(out, method, given, overwrite)
    try:
        run_training(cfg, out, resume=resume, overwrite=overwrite, quiet=quiet)
    except Interrupted as stop:
        err_console.print(stop.line, highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(130) from None
