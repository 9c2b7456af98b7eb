"""`entropy-lab warm-start`: where each default warm start comes from; rebuild and export them."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import pandas as pd
import typer

from entropy_lab.cli.common import console, err_console, friendly_errors, print_table, quiet_transformers
from entropy_lab.cli.progress import ProgressCallback

SOURCES = {"cache": "user cache", "shipped": "shipped", "build": "built now"}


@friendly_errors
def warm_start_command(
    task: Annotated[
        list[str] | None,
        typer.Option("--task", help="Built-in task (repeatable; default: countdown and arithmetic)."),
    ] = None,
    rebuild: Annotated[
        bool,
        typer.Option(
            help="Train again into the user cache, which then comes before the shipped asset "
            "(an interrupted rebuild resumes from its checkpoint)."
        ),
    ] = False,
    export: Annotated[
        Path | None,
        typer.Option(
            help="Write each cached warm start as an asset (NAME.safetensors + NAME.json) into this directory "
            "(the package's own: entropy_lab/assets/warm_starts)."
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Say where each default warm start comes from (user cache, shipped, or built now); rebuild them."""
    from entropy_lab import models, warm_starts
    from entropy_lab.tasks import get_task

    quiet_transformers()
    tasks = [get_task(name) for name in (task or models.DEFAULT_WARM_START_TASKS)]
    rows, where = [], []
    for t in tasks:
        found = models.locate_warm_start(t)
        source = "build" if rebuild else found.source
        started = time.perf_counter()
        if source == "build":
            info = _train(t, rebuild, quiet)
        else:
            info = models.warm_start(t)[2]
        entry = models.cache_root() / "warmstart" / found.name
        sha = (
            info["sha256"]
            if source == "shipped"
            else warm_starts.sha256_file(entry / warm_starts.WEIGHTS_FILE)
        )
        if export is not None:
            record = models.export_warm_start(t, export)
            console.print(f"wrote {record} and {record.with_suffix('.safetensors').name}", highlight=False)
        shipped = warm_starts.shipped_record(found.name)
        shipped_sha = json.loads(shipped.read_text())["sha256"] if shipped else None
        rows.append(
            {
                "task": t.name,
                "source": SOURCES[source],
                "steps": info["steps"],
                "pass@1": info["pass@1"],
                "entropy": info["entropy"],
                "sha256": sha[:12],
                "vs shipped": "-"
                if shipped_sha is None
                else ("identical" if sha == shipped_sha else "differs"),
                "seconds": round(time.perf_counter() - started, 1),
            }
        )
        where.append(f"{t.name}: {found.path if source == 'shipped' else entry}")
    print_table(pd.DataFrame(rows), "warm starts")
    console.print("\n".join(where), highlight=False, soft_wrap=True)


def _train(task, rebuild: bool, quiet: bool) -> dict:
    """The warm start's ``info``, trained now (resuming a checkpoint) under a bar; Ctrl-C says how to continue."""
    from entropy_lab import models

    with ProgressCallback(task.name, quiet) as bar:
        try:
            info = models.warm_start(
                task, progress=lambda step: bar("warm_start_progress", step), use_cache=not rebuild
            )[2]
            bar.end_warm_start(info)
            return info
        except KeyboardInterrupt:
            err_console.print(
                f"interrupted; the warm start of {task.name} continues from its last checkpoint with: "
                f"entropy-lab warm-start --task {task.name} --rebuild",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(130) from None
