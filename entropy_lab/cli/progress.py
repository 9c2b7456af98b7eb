"""Progress of long work: one interface, two renderers (bars on a terminal, timed lines otherwise).

A progress callback (``TrainProgress``, ``StudyProgress``; both ``ProgressCallback``) turns
the library's events into phases - a label, done/total, a status text and, where the
stopping rule is not "reach total", its own ETA - on a ``ProgressView``:

- ``BarView``: rich bars, redrawn live (a terminal);
- ``LineView``: one plain line when a phase starts and ends and, while work runs, at least
  every ``interval`` seconds - a heartbeat thread keeps that promise when one step (or the
  set-up before the first) outlasts the interval - so CI logs, ``nohup`` and ``> log`` show
  the phase, step/total, rate and ETA;
- ``NullView``: ``--quiet``.

Simplifications: the rate is the phase's mean since it started (the steps a resumed run
had already done are not counted); the warm start's ETA (``threshold_eta``) extrapolates the
last few pass@1 checks linearly, and says "up to" the cap until pass@1 has risen.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from entropy_lab.cli.common import console, err_console

LINE_INTERVAL_S = 30.0
"""Without a terminal, a progress line at least this often."""

EtaRule = Callable[[float], str]
"""A phase's own ETA from its rate (items per second), for a phase that does not simply stop at its total."""


def format_duration(seconds: float) -> str:
    """12 -> '12s', 135 -> '2m15s', 11580 -> '3h13m'."""
    s = max(int(round(seconds)), 0)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def format_rate(per_second: float, unit: str) -> str:
    """2.5 -> '2.50 step/s'; 0.05 -> '20.0 s/step' (slow work reads better per item)."""
    if per_second <= 0:
        return f"- {unit}/s"
    return f"{per_second:.2f} {unit}/s" if per_second >= 1 else f"{1 / per_second:.1f} s/{unit}"


def threshold_eta(
    checks: list[tuple[int, float]], target: float, step: int, cap: int, per_second: float
) -> str:
    """ETA of a loop that stops when a measured value first reaches ``target``, or at step ``cap``.

    Args:
        checks: (step, measured value) of the checks so far, in order.
        target: the stopping threshold.
        step: the step reached.
        cap: the last step the loop may run.
        per_second: steps per second.

    Returns:
        '~1m20s, at most 3h13m' (the line through the last three checks, which must be rising,
        reaches ``target`` at a step before ``cap``), else 'up to 3h13m' (the cap is all that is known).
    """
    if per_second <= 0:
        return "?"
    at_most = format_duration((cap - step) / per_second)
    recent = checks[-3:]
    if len(recent) >= 2:
        steps = [s for s, _ in recent]
        values = [v for _, v in recent]
        ms, mv = sum(steps) / len(steps), sum(values) / len(values)
        var = sum((s - ms) ** 2 for s in steps)
        slope = sum((s - ms) * (v - mv) for s, v in recent) / var if var else 0.0
        if slope > 0:
            reach = min(max(steps[-1] + (target - values[-1]) / slope, step), cap)
            return f"~{format_duration((reach - step) / per_second)}, at most {at_most}"
    return f"up to {at_most}"


@dataclass
class Phase:
    """One phase of work as the views see it."""

    label: str
    total: int
    started: float  # the clock when the phase began
    completed: int = 0
    first: int = 0  # completed when the phase began (a resumed run's steps are not its work)
    status: str = ""
    eta: EtaRule | None = None  # the caller's own rule; None: (total - completed) / rate
    unit: str = "step"
    done: bool = False

    def per_second(self, now: float) -> float:
        elapsed = now - self.started
        return (self.completed - self.first) / elapsed if elapsed > 0 else 0.0

    def eta_text(self, now: float) -> str:
        rate = self.per_second(now)
        if self.eta is not None:
            return self.eta(rate)
        return format_duration((self.total - self.completed) / rate) if rate > 0 else "?"

    def line(self, now: float) -> str:
        """'grpo: train  step 12/200 (6%)  0.85 step/s  elapsed 14s  eta 3m41s  reward 0.312 ...'."""
        pct = f" ({100 * self.completed / self.total:.0f}%)" if self.total else ""
        parts = [
            f"{self.label}  {self.unit} {self.completed}/{self.total}{pct}",
            format_rate(self.per_second(now), self.unit),
            f"elapsed {format_duration(now - self.started)}",
            "done" if self.done else f"eta {self.eta_text(now)}",
        ]
        return "  ".join(parts + ([self.status] if self.status else []))


class ProgressView:
    """The progress interface: phases added, updated and finished; a context manager around the work."""

    def add(self, label: str, total: int, completed: int = 0, status: str = "", unit: str = "step") -> int:
        raise NotImplementedError

    def update(
        self,
        key: int,
        *,
        completed: int | None = None,
        total: int | None = None,
        status: str | None = None,
        eta: EtaRule | None = None,
    ) -> None:
        raise NotImplementedError

    def finish(self, key: int, *, status: str | None = None) -> None:
        """The phase ended (an early stop, e.g. the warm start's threshold, shows as done)."""
        raise NotImplementedError

    def per_second(self, key: int) -> float:
        """The phase's rate so far (0 when unknown)."""
        return 0.0

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


class NullView(ProgressView):
    """``--quiet``: nothing drawn."""

    def add(self, label, total, completed=0, status="", unit="step") -> int:
        return 0

    def update(self, key, *, completed=None, total=None, status=None, eta=None) -> None:
        pass

    def finish(self, key, *, status=None) -> None:
        pass


class EtaColumn(ProgressColumn):
    """The phase's own ETA when it gave one (``eta`` field), else rich's time remaining."""

    def __init__(self):
        super().__init__()
        self.remaining = TimeRemainingColumn()

    def render(self, task) -> Text:
        own = task.fields.get("eta")
        return Text(own, style="progress.remaining") if own else self.remaining.render(task)


class BarView(ProgressView):
    """Rich bars: description, bar, n/total, status, elapsed, eta."""

    def __init__(self, out: Console = console):
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            EtaColumn(),
            console=out,
            transient=False,
        )

    def add(self, label, total, completed=0, status="", unit="step") -> int:
        return int(self.progress.add_task(label, total=total, completed=completed, status=status, eta=""))

    def update(self, key, *, completed=None, total=None, status=None, eta=None) -> None:
        fields = {} if status is None else {"status": status}
        self.progress.update(key, completed=completed, total=total, **fields)
        if eta is not None:
            self.progress.update(key, eta=eta(self.per_second(key)))

    def finish(self, key, *, status=None) -> None:
        task = self.progress.tasks[key]
        self.update(key, total=int(task.completed), status=status, eta=lambda rate: "")

    def per_second(self, key) -> float:
        task = self.progress.tasks[key]
        elapsed = task.elapsed or 0.0
        return task.completed / elapsed if elapsed > 0 else 0.0

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)


class LineView(ProgressView):
    """Plain timed lines: at each phase's start and end, and at least every ``interval`` seconds.

    Args:
        out: where the lines go.
        clock: seconds, monotonic (tests pass a fake one).
        interval: the longest silence while work runs.
        heartbeat: run a thread that prints when no update came for ``interval`` seconds
            (tests call ``tick`` instead).
    """

    def __init__(
        self,
        out: Console = console,
        clock: Callable[[], float] | None = None,
        interval: float | None = None,
        heartbeat: bool = True,
    ):
        self.out = out
        self.clock = clock or time.monotonic
        self.interval = LINE_INTERVAL_S if interval is None else interval
        self.phases: list[Phase] = []
        self.began = self.last_line = self.clock()
        self.idle_label = "setting up"
        self.lock = threading.RLock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True) if heartbeat else None

    def _print(self, text: str) -> None:
        self.out.print(text, highlight=False, markup=False, soft_wrap=True)
        self.last_line = self.clock()

    def add(self, label, total, completed=0, status="", unit="step") -> int:
        with self.lock:
            now = self.clock()
            self.phases.append(Phase(label, total, now, completed, completed, status, unit=unit))
            self._print(f"{label}  started: {unit} {completed}/{total}")
            return len(self.phases) - 1

    def update(self, key, *, completed=None, total=None, status=None, eta=None) -> None:
        with self.lock:
            phase = self.phases[key]
            phase.completed = phase.completed if completed is None else completed
            phase.total = phase.total if total is None else total
            phase.status = phase.status if status is None else status
            phase.eta = phase.eta if eta is None else eta
            self.tick()

    def finish(self, key, *, status=None) -> None:
        with self.lock:
            phase = self.phases[key]
            if phase.done:
                return
            phase.done, phase.total = True, phase.completed
            phase.status = phase.status if status is None else status
            self._print(phase.line(self.clock()))

    def per_second(self, key) -> float:
        with self.lock:
            return self.phases[key].per_second(self.clock())

    def tick(self) -> None:
        """Print the running phase's line (or that set-up goes on) if nothing was printed for ``interval``."""
        with self.lock:
            now = self.clock()
            if now - self.last_line < self.interval:
                return
            running = [p for p in self.phases if not p.done]
            if running:
                self._print(running[-1].line(now))
            else:
                self._print(f"{self.idle_label}  elapsed {format_duration(now - self.began)}")

    def _beat(self) -> None:
        while not self.stop.wait(min(self.interval / 6, 5.0)):
            self.tick()

    def __enter__(self):
        if self.thread is not None:
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        if self.thread is not None and self.thread.is_alive():
            self.thread.join()


def make_view(quiet: bool = False, out: Console = console) -> ProgressView:
    """``NullView`` when quiet, ``BarView`` on a terminal, else ``LineView``."""
    if quiet:
        return NullView()
    return BarView(out) if out.is_terminal else LineView(out)


@dataclass
class WarmStartState:
    """The warm start's phase and its pass@1 checks."""

    key: int | None = None
    checks: list[tuple[int, float]] = field(default_factory=list)


class ProgressCallback:
    """A library event callback drawing on a ``ProgressView``; a context manager around the work.

    ``__call__(event, info)`` dispatches to ``on_<event>``; events without a method are ignored.
    Every callback shows the supervised warm start (``entropy_lab.models.warm_start``) the same way.
    """

    def __init__(self, label: str, quiet: bool = False, view: ProgressView | None = None):
        self.label = label
        self.view = view if view is not None else make_view(quiet)
        self.warm = WarmStartState()

    def __call__(self, event: str, info: dict) -> None:
        handler = getattr(self, f"on_{event}", None)
        if handler is not None:
            handler(info)

    def __enter__(self):
        self.view.__enter__()
        return self

    def __exit__(self, *exc):
        return self.view.__exit__(*exc)

    def on_warm_start_progress(self, info: dict) -> None:
        """A step of the warm start: SFT loss, and pass@1 against its threshold when measured."""
        w, view = self.warm, self.view
        if w.key is None:
            # the rate counts from the first step reported (when it began is unknown)
            w.key = view.add(f"{self.label}: warm start", total=info["total"], completed=info["step"])
        if info.get("pass@1") is not None:
            w.checks.append((info["step"], info["pass@1"]))
        status = f"sft loss {info['loss']:.3f}"
        target = info.get("target")
        if target is not None:
            last = f"{w.checks[-1][1]:.2f}" if w.checks else "-"
            status += f"  pass@1 {last} (stops at {target:.2f} or step {info['total']})"
        eta = None
        if target is not None:  # the stopping rule is the threshold: the cap alone would mislead
            checks, step, cap = list(w.checks), info["step"], info["total"]

            def eta(rate: float) -> str:
                return threshold_eta(checks, target, step, cap, rate)

        view.update(w.key, completed=info["step"], status=status, eta=eta)

    def end_warm_start(self, ws: dict) -> None:
        """The warm start is over (its threshold reached, or the cap): its phase shows done."""
        if self.warm.key is not None:
            measured = "pass@1" in ws and "entropy" in ws
            status = f"pass@1 {ws['pass@1']:.2f}  H {ws['entropy']:.2f}" if measured else None
            self.view.finish(self.warm.key, status=status)

    def on_resumed(self, info: dict) -> None:
        console.print(info["message"])

    def on_warning(self, info: dict) -> None:
        err_console.print(f"[bold yellow]warning:[/] {info['message']}", highlight=False, soft_wrap=True)


class TrainProgress(ProgressCallback):
    """Trainer callback: the warm start, then the RL steps."""

    def __init__(self, label: str, quiet: bool = False, view: ProgressView | None = None):
        super().__init__(label, quiet, view)
        self.train: int | None = None
        self.last_step: int | None = None  # the last step finished (what an interrupt reports)

    def on_start(self, info: dict) -> None:
        self.end_warm_start(info.get("warm_start") or {})
        self.last_step = info["start"]
        self.train = self.view.add(f"{self.label}: train", total=info["steps"], completed=info["start"])

    def on_step(self, info: dict) -> None:
        self.last_step = info["step"]
        stats = f"reward {info['reward/mean']:.3f}  entropy {info['entropy/mean']:.3f}"
        if "eval/accuracy" in info:
            stats += f"  acc {info['eval/accuracy']:.2f}"
        assert self.train is not None
        self.view.update(self.train, completed=info["step"], status=stats)

    def on_end(self, info: dict) -> None:
        if self.train is not None:
            self.view.finish(self.train)
