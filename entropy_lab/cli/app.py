"""The `entropy-lab` command: train, methods, trace, compare, figures, warm-start, study."""

from __future__ import annotations

from typing import Annotated

import typer

from entropy_lab.cli.compare import compare
from entropy_lab.cli.figures import figures
from entropy_lab.cli.methods import methods
from entropy_lab.cli.study import study_app
from entropy_lab.cli.trace import trace
from entropy_lab.cli.train import train
from entropy_lab.cli.warm_start import warm_start_command

app = typer.Typer(
    name="entropy-lab",
    help="Measure, predict and explain per-token entropy dynamics in RLVR, and compare entropy interventions.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


def version_option(value: bool) -> None:
    if value:
        from entropy_lab import __version__

        print(f"entropy-lab {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=version_option, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Measure, predict and explain per-token entropy dynamics in RLVR, and compare entropy interventions."""


# train takes stray arguments itself, to explain `--set lr 1e-3` (key=value) instead of a usage box
app.command(context_settings={"allow_extra_args": True})(train)
app.command()(methods)
app.command()(trace)
app.command()(compare)
app.command()(figures)
app.command("warm-start")(warm_start_command)
app.add_typer(study_app, name="study")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
