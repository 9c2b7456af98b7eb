"""`entropy-lab study coupling`: reproducible studies behind the README's theory claims."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, cast

import typer

from entropy_lab.cli.common import console, friendly_errors, print_table, quiet_transformers
from entropy_lab.cli.progress import ProgressCallback, ProgressView
from entropy_lab.errors import EntropyLabError
from entropy_lab.model_sources import model_forms

study_app = typer.Typer(
    help="Reproducible studies of why the first-order theory holds or fails.", no_args_is_help=True
)


def parse_list(text: str, what: str, cast=float) -> tuple:
    """'1e-3, 1e-2' -> (0.001, 0.01); 'all' (tokens only) -> 0; one error line on bad input."""
    try:
        return tuple(
            cast(0 if item.strip() == "all" else item.strip()) for item in text.split(",") if item.strip()
        )
    except ValueError:
        raise EntropyLabError(f"{what} expects a comma-separated list of numbers, got {text!r}") from None


class StudyProgress(ProgressCallback):
    """Study callback: the warm start (when the task's is not cached), then one phase over all traced updates."""

    def __init__(self, quiet: bool = False, view: ProgressView | None = None):
        super().__init__("coupling study", quiet, view)
        self.task: int | None = None

    def on_start(self, info: dict) -> None:
        self.end_warm_start({})
        jvp = "with" if info["jvp"] else "without"
        console.print(
            f"{info['sequences']} sequences, {info['candidates']} tokens with nonzero advantage; "
            f"network first order (jvp): {jvp}"
        )
        self.task = self.view.add("coupling study", total=info["total"], unit="update")

    def on_update(self, info: dict) -> None:
        assert self.task is not None
        self.view.update(self.task, completed=info["done"], status=info["setting"])

    def on_end(self, info: dict) -> None:
        if self.task is not None:
            self.view.finish(self.task)


@study_app.command()
@friendly_errors
def coupling(
    out: Annotated[Path, typer.Option(help="Output directory (table, records, figure).")] = Path(
        "runs/coupling_study"
    ),
    tokens: Annotated[
        str, typer.Option(help="Tokens per update, comma-separated; 'all' = the whole batch.")
    ] = "1,4,16,64,256,1024,all",
    sgd_lr: Annotated[str, typer.Option(help="SGD learning rates, comma-separated; '' to skip SGD.")] = (
        "1e-4,1e-3,1e-2"
    ),
    adamw_lr: Annotated[str, typer.Option(help="AdamW learning rates, comma-separated; '' to skip.")] = (
        "1e-5,1e-4,1e-3"
    ),
    min_tokens: Annotated[
        int, typer.Option(help="Traced tokens per setting at least (small updates repeat).")
    ] = 256,
    task: Annotated[str, typer.Option(help="Built-in task of the rollout batch.")] = "countdown",
    model: Annotated[
        str | None, typer.Option(help=f"Causal LM: {model_forms()} (default: the task's warm start).")
    ] = None,
    prompts: Annotated[int, typer.Option(help="Prompts in the rollout batch.")] = 32,
    samples: Annotated[int, typer.Option(help="Responses per prompt.")] = 8,
    max_new_tokens: Annotated[int, typer.Option(help="Response length limit of the rollout.")] = 16,
    dtype: Annotated[str, typer.Option(help="float64 or float32 for the traced updates.")] = "float64",
    jvp: Annotated[bool, typer.Option(help="Trace the network's own first order when available.")] = True,
    seed: Annotated[int, typer.Option(help="Seed of the rollout and the token draws.")] = 0,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto.")] = "cpu",
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Tightness of every estimator against tokens per update and lr, under SGD and AdamW."""
    from entropy_lab.studies.coupling import CouplingStudyConfig, write_coupling_study

    lrs = {name: parse_list(text, f"--{name}-lr") for name, text in (("sgd", sgd_lr), ("adamw", adamw_lr))}
    cfg = CouplingStudyConfig(
        tokens_per_update=parse_list(tokens, "--tokens", int),
        lrs={name: values for name, values in lrs.items() if values},
        min_tokens=min_tokens,
        task=task,
        model=model,
        prompts=prompts,
        samples_per_prompt=samples,
        max_new_tokens=max_new_tokens,
        dtype=dtype,
        jvp=jvp,
        seed=seed,
        device=device,
    )
    if not cfg.lrs:
        raise EntropyLabError("no optimizer left: give --sgd-lr or --adamw-lr")
    quiet_transformers()
    start = time.perf_counter()
    with StudyProgress(quiet) as progress:
        result = write_coupling_study(cfg, out, progress)
    wide = result["wide"]
    print_table(wide, "coupling study: Pearson r and gain g per estimator (token-level, pooled per setting)")
    paths = cast(list[Path], result["paths"])
    written = ", ".join(str(p) for p in paths if p.suffix != ".pdf")
    console.print(f"{time.perf_counter() - start:.0f} s; wrote {written}")


@study_app.command("noise-floor")
@friendly_errors
def noise_floor(
    run: Annotated[Path, typer.Option(help="A run directory with checkpoints.")],
    step: Annotated[int | None, typer.Option(help="Checkpoint step to start from (default: latest).")] = None,
    lr: Annotated[str, typer.Option(help="Learning rates of the traced updates (default: the run's).")] = "",
    bf16: Annotated[bool, typer.Option(help="Also trace each update under bf16 autocast.")] = True,
    prompts: Annotated[
        int | None, typer.Option(help="Prompts in the rollout batch (default: the run's).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Output directory (default: RUN/noise-floor-step_N).")
    ] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """How large a traced entropy change is against a zero step and against bf16 rounding."""
    from entropy_lab.runs import RunDir
    from entropy_lab.studies.noise_floor import write_noise_floor

    rd = RunDir(run)
    if not rd.holds_run():
        raise EntropyLabError(f"{run} is not an entropy-lab run directory (no run config.json)")
    lrs = parse_list(lr, "--lr") if lr else None
    if step is None and rd.checkpoints():
        step = list(rd.checkpoints())[-1]
    target = out or rd.path / f"noise-floor-step_{step or 0:06d}"
    quiet_transformers()
    start = time.perf_counter()
    with NoiseFloorProgress(quiet) as progress:
        table, paths = write_noise_floor(
            rd, target, step=step, lrs=lrs, bf16=bf16, prompts=prompts, callback=progress
        )
    print_table(table, "noise floor of delta_entropy: each update against the fp32 update of its lr")
    console.print(f"{time.perf_counter() - start:.0f} s; wrote {', '.join(str(p) for p in paths)}")


class NoiseFloorProgress(ProgressCallback):
    """Noise-floor callback: one phase over the traced settings."""

    def __init__(self, quiet: bool = False, view: ProgressView | None = None):
        super().__init__("noise floor", quiet, view)
        self.task: int | None = None

    def on_start(self, info: dict) -> None:
        self.task = self.view.add("noise floor", total=info["total"], unit="update")

    def on_setting(self, info: dict) -> None:
        assert self.task is not None
        self.view.update(self.task, completed=info["done"], status=info["name"])
        if info["done"] == info.get("total"):
            self.view.finish(self.task)
