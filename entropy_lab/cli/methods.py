"""`entropy-lab methods`: the catalogue of entropy interventions."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from entropy_lab.cli.common import console, friendly_errors
from entropy_lab.config import TrainConfig, field_docs, field_ranges
from entropy_lab.methods import METHODS, registered_choices
from entropy_lab.tasks import TASKS


@friendly_errors
def methods(
    fields: Annotated[
        bool, typer.Option("--fields", help="List the config fields that --set accepts instead.")
    ] = False,
) -> None:
    """Print the methods catalogue: name, what it changes, published defaults, reference."""
    if fields:
        table = Table(title="config fields (--set key=value)", title_justify="left", header_style="bold")
        for col in ("field", "default", "admissible", "meaning"):
            table.add_column(col)
        defaults = TrainConfig().to_dict()
        ranges = field_ranges()  # the same annotations TrainConfig.validate checks
        names = registered_choices()
        for name, doc in field_docs().items():
            admissible = ranges.get(name) or " | ".join(names.get(name, []))
            table.add_row(name, repr(defaults[name]), admissible, doc)
        console.print(table)
        # the task presets that replace some of these defaults (entropy_lab.presets)
        for task, cls in TASKS.items():
            if cls.PRETRAINED_DEFAULTS:
                values = ", ".join(f"{k}={v!r}" for k, v in cls.PRETRAINED_DEFAULTS.items())
                console.print(f"with --model and --task {task}, unset fields default to: {values}")
        return
    table = Table(title="entropy-lab methods", title_justify="left", header_style="bold", show_lines=True)
    for col in ("name", "what it changes", "defaults", "reference"):
        table.add_column(col, overflow="fold")
    for m in METHODS.values():
        table.add_row(
            m.name, m.changes, ", ".join(f"{k}={v}" for k, v in m.defaults.items()) or "-", m.reference
        )
    console.print(table)
