"""Shared pieces of the commands: one-line errors, tables, progress."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Annotated

import pandas as pd
import typer
from rich.console import Console
from rich.table import Table

from entropy_lab.errors import EntropyLabError
from entropy_lab.formatting import format_number

CLI_DIGITS = 4
"""Significant digits of numbers in the commands' tables."""

console = Console()
if not console.is_terminal:  # piped or captured output: wide tables, nothing truncated at 80 columns
    console.width = max(console.width, 160)
err_console = Console(stderr=True)

SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set", help="Override a config field, key=value (repeatable); see `entropy-lab methods --fields`."
    ),
]


def check_set_pairs(sets: list[str] | None, extra: list[str]) -> None:
    """A ``--set`` without '=' is one line; ``--set lr 1e-3`` (``extra`` holding the stray '1e-3') is
    explained: --set takes one key=value argument."""
    bare = [p for p in sets or [] if "=" not in p]
    if not bare:
        return
    if extra:
        raise EntropyLabError(
            f"--set takes one key=value argument: write --set {bare[0]}={extra[0]}, not --set {bare[0]} {extra[0]}"
        )
    raise EntropyLabError(f"--set expects key=value, got {bare[0]!r}; write --set {bare[0]}=VALUE")


def quiet_transformers() -> None:
    """Our progress bars replace transformers' per-file loading and saving bars."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def friendly_errors(fn: Callable) -> Callable:
    """Bad input ends the command with one line on stderr and exit code 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EntropyLabError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def print_table(df: pd.DataFrame, title: str, columns: list[str] | None = None) -> None:
    """Render ``df`` (selected ``columns``) as a rich table."""
    if df is None or df.empty:
        console.print(f"[dim]{title}: no data[/]")
        return
    # columns that hold nothing (a CI with one seed) are left out rather than printed as dashes
    cols = [c for c in (columns or list(df.columns)) if c in df.columns and not df[c].isna().all()]
    table = Table(title=title, title_justify="left", header_style="bold")
    for c in cols:
        table.add_column(
            c, justify="left" if df[c].dtype == object else "right", no_wrap=True, min_width=len(c)
        )
    for _, row in df[cols].iterrows():
        table.add_row(*(format_number(row[c], CLI_DIGITS, missing="-") for c in cols))
    console.print(table)
