"""A rich progress display for training: step, reward, entropy and time remaining."""

from __future__ import annotations

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from entropy_lab.cli.common import console, err_console


def progress_bar(field: str, quiet: bool = False) -> Progress:
    """The project's bar layout: description, bar, n/total, one status field ``field``, elapsed, eta."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(f"{{task.fields[{field}]}}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        disable=quiet,
        transient=False,
    )


class ProgressCallback:
    """A callback that owns a rich ``Progress``; used as a context manager around the work."""

    progress: Progress

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)


class TrainProgress(ProgressCallback):
    """Trainer callback drawing one bar for the warm start and one for RL steps."""

    def __init__(self, label: str, quiet: bool = False):
        self.label = label
        self.quiet = quiet
        self.progress = progress_bar("stats", quiet)
        self.warm = None
        self.train = None
        self.first: dict | None = None
        self.last: dict | None = None

    def __call__(self, event: str, info: dict) -> None:
        p = self.progress
        if event == "warm_start_progress":
            if self.warm is None:
                self.warm = p.add_task(f"{self.label}: warm start", total=info["total"], stats="")
            p.update(self.warm, completed=info["step"], stats=f"sft loss {info['loss']:.3f}")
        elif event == "start":
            if self.warm is not None:
                ws = info.get("warm_start") or {}
                p.update(
                    self.warm,
                    total=ws.get("steps", 0),
                    completed=ws.get("steps", 0),
                    stats=f"pass@1 {ws.get('pass@1', float('nan')):.2f}  H {ws.get('entropy', float('nan')):.2f}",
                )
            self.train = p.add_task(
                f"{self.label}: train", total=info["steps"], completed=info["start"], stats=""
            )
        elif event == "step":
            self.first = self.first or info
            self.last = info
            stats = f"reward {info['reward/mean']:.3f}  entropy {info['entropy/mean']:.3f}"
            if "eval/accuracy" in info:
                stats += f"  acc {info['eval/accuracy']:.2f}"
            p.update(self.train, completed=info["step"], stats=stats)
        elif event == "resumed":
            console.print(info["message"])
        elif event == "warning":
            err_console.print(f"[bold yellow]warning:[/] {info['message']}", highlight=False, soft_wrap=True)
