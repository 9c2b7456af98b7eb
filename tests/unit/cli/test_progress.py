"""Progress without a terminal: plain timed lines through the same callbacks as the bars (fake clock)."""

from __future__ import annotations

import io
import re
import types

import pytest
from rich.console import Console

from entropy_lab.cli import progress
from entropy_lab.cli.progress import (
    BarView,
    LineView,
    NullView,
    TrainProgress,
    format_duration,
    format_rate,
    make_view,
    threshold_eta,
)


class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def plain_console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=200, force_terminal=False), buf


def lines_of(buf: io.StringIO) -> list[str]:
    return [line for line in buf.getvalue().splitlines() if line.strip()]


def step_row(step: int) -> dict:
    return {"step": step, "reward/mean": 0.25, "entropy/mean": 0.5}


def test_durations_and_rates_by_hand():
    assert [format_duration(s) for s in (0, 12.4, 135, 3600, 11580)] == [
        "0s",
        "12s",
        "2m15s",
        "1h00m",
        "3h13m",
    ]
    assert format_rate(2.5, "step") == "2.50 step/s" and format_rate(0.05, "step") == "20.0 s/step"


def test_threshold_eta_extrapolates_the_checks_not_the_cap():
    # pass@1 0.10 at step 100, 0.20 at step 200: +0.001 per step, so 0.30 at step 300;
    # at 2 steps/s from step 200 that is 50 s, while the cap (1500) is 650 s away
    assert threshold_eta([(100, 0.1), (200, 0.2)], 0.3, 200, 1500, 2.0) == "~50s, at most 10m50s"
    # a least-squares line through the last three checks: 0.0, 0.1, 0.2 at 100, 200, 300 -> 0.3 at 400
    assert threshold_eta([(50, 0.5), (100, 0.0), (200, 0.1), (300, 0.2)], 0.3, 300, 1500, 1.0).startswith(
        "~1m40s"
    )
    # not risen (or one check only): only the cap is known, and it is said to be an upper bound
    assert threshold_eta([(100, 0.2), (200, 0.1)], 0.3, 200, 1500, 2.0) == "up to 10m50s"
    assert threshold_eta([(100, 0.2)], 0.3, 100, 1500, 2.0) == "up to 11m40s"
    assert threshold_eta([], 0.3, 10, 1500, 0.0) == "?"
    # an extrapolation past the cap is the cap
    assert threshold_eta([(100, 0.0), (200, 0.001)], 0.3, 200, 1500, 2.0) == "~10m50s, at most 10m50s"


def test_a_non_tty_train_prints_timed_lines_with_phase_step_rate_and_eta():
    out, buf = plain_console()
    clock = FakeClock()
    view = LineView(out, clock=clock, interval=30.0, heartbeat=False)
    cb = TrainProgress("grpo", view=view)
    with cb:
        cb("start", {"start": 0, "steps": 100, "warm_start": {}})
        assert lines_of(buf) == ["grpo: train  started: step 0/100"]
        for step in range(1, 11):  # 10 steps, 2 s each: no line until 30 s have passed
            clock.now += 2.0
            cb("step", step_row(step))
        assert len(lines_of(buf)) == 1
        for step in range(11, 16):
            clock.now += 2.0
            cb("step", step_row(step))
        line = lines_of(buf)[-1]  # step 15 at 30 s: 0.5 step/s, 85 left -> 170 s
        assert line.startswith("grpo: train  step 15/100 (15%)"), line
        assert "2.0 s/step" in line and "elapsed 30s" in line and "eta 2m50s" in line
        assert "reward 0.250  entropy 0.500" in line
        clock.now += 29.0
        view.tick()  # step 16 is in flight: silence for less than 30 s prints nothing
        assert len(lines_of(buf)) == 2
        clock.now += 1.0
        view.tick()  # ... and 30 s of silence repeat the state (the heartbeat's job)
        assert (
            len(lines_of(buf)) == 3
            and "step 15/100" in lines_of(buf)[-1]
            and "elapsed 1m00s" in lines_of(buf)[-1]
        )
        cb("end", {"steps": 100})
        assert "done" in lines_of(buf)[-1]
    assert not any("\x1b" in line for line in lines_of(buf))  # plain text, no terminal codes


def test_set_up_before_the_first_phase_is_reported_too():
    out, buf = plain_console()
    clock = FakeClock()
    view = LineView(out, clock=clock, interval=30.0, heartbeat=False)
    clock.now += 45.0
    view.tick()
    assert lines_of(buf) == ["setting up  elapsed 45s"]


def test_the_warm_start_eta_follows_pass_at_1_toward_its_threshold():
    out, buf = plain_console()
    clock = FakeClock()
    cb = TrainProgress("grpo", view=LineView(out, clock=clock, interval=30.0, heartbeat=False))
    for step in range(1, 201):  # 1 step/s; pass@1 0.1 at 100 and 0.2 at 200, target 0.3, cap 1500
        clock.now += 1.0
        measured = {100: 0.1, 200: 0.2}.get(step)
        cb(
            "warm_start_progress",
            {"step": step, "total": 1500, "loss": 1.0, "pass@1": measured, "target": 0.3},
        )
    warm = [line for line in lines_of(buf) if "warm start" in line]
    assert warm[0] == "grpo: warm start  started: step 1/1500"
    early, last = warm[1], warm[-1]  # no check yet, then one: only an upper bound is known
    assert "step 31/1500" in early and "1.00 step/s" in early and "eta up to 24m29s" in early
    assert "pass@1 - (stops at 0.30 or step 1500)" in early
    assert "step 181/1500" in last and "eta up to" in last and "pass@1 0.10" in last
    clock.now += 30.0
    cb("warm_start_progress", {"step": 201, "total": 1500, "loss": 1.0, "pass@1": None, "target": 0.3})
    # 2 checks rising 0.001/step reach 0.3 at step 300: ~99 s at the measured rate, not the cap's
    line = lines_of(buf)[-1]
    assert "step 201/1500" in line and "pass@1 0.20" in line, line
    assert re.search(r"eta ~1m\d\ds, at most", line), line
    cb("start", {"start": 0, "steps": 10, "warm_start": {"steps": 201, "pass@1": 0.31, "entropy": 0.9}})
    done = [line for line in lines_of(buf) if "warm start" in line][-1]
    assert "step 201/201" in done and "done" in done and "pass@1 0.31  H 0.90" in done


def test_quiet_prints_nothing_and_the_view_follows_the_terminal():
    out, buf = plain_console()
    assert isinstance(make_view(quiet=True, out=out), NullView)
    assert isinstance(make_view(out=out), LineView)
    tty = Console(file=io.StringIO(), force_terminal=True)
    assert isinstance(make_view(out=tty), BarView)
    cb = TrainProgress("grpo", quiet=True)
    with cb:
        cb("start", {"start": 0, "steps": 2, "warm_start": {}})
        cb("step", step_row(1))
        cb("end", {"steps": 2})
    assert buf.getvalue() == ""


def test_the_bar_view_shows_the_warm_start_eta_of_its_own_stopping_rule():
    tty = Console(file=io.StringIO(), force_terminal=True, width=200)
    view = BarView(tty)
    cb = TrainProgress("grpo", view=view)
    with cb:
        for step in (1, 2):
            cb(
                "warm_start_progress",
                {"step": step, "total": 1500, "loss": 1.0, "pass@1": None, "target": 0.3},
            )
        task = view.progress.tasks[cb.warm.key]
        assert task.fields["eta"].startswith("up to")  # said to be a bound, not the bar's cap ETA


@pytest.fixture
def fast_fake_time(monkeypatch):
    """Every reading of the progress clock is 31 s after the last: every update is due a line."""
    clock = FakeClock()

    def tick() -> float:
        clock.now += 31.0
        return clock.now

    monkeypatch.setattr(progress, "time", types.SimpleNamespace(monotonic=tick))


def test_the_train_command_without_a_terminal_prints_progress_lines(
    tmp_path, tiny_policy_dir, dense_reward, fast_fake_time
):
    from test_cli import invoke, train_args

    args = [a for a in train_args(tiny_policy_dir, tmp_path / "run") if a != "--quiet"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("run: train")]
    assert lines[0] == "run: train  started: step 0/2", result.output
    assert re.fullmatch(
        r"run: train  step 1/2 \(50%\)  \S+ s/step  elapsed \S+  eta \S+  reward .*", lines[1]
    )
    assert "step 2/2 (100%)" in lines[-1] and "done" in lines[-1]
    quiet = invoke(*train_args(tiny_policy_dir, tmp_path / "quiet"))
    assert quiet.exit_code == 0 and "run: train" not in quiet.output and "quiet: train" not in quiet.output


def test_the_warm_start_reports_its_checks_and_stopping_rule(isolated_cache):
    """The real warm-start loop: pass@1 at each check (None between), the threshold, and its stop."""
    from entropy_lab.models import TinyPolicySpec, WarmStartSpec, warm_start
    from entropy_lab.tasks import get_task

    seen: list[dict] = []
    spec = WarmStartSpec(batch_size=4, max_steps=6, check_every=2, target_pass=0.0, probe_prompts=4)
    arch = TinyPolicySpec(hidden_size=16, intermediate_size=32, num_hidden_layers=1)
    _, _, info = warm_start(get_task("arithmetic"), spec, arch, progress=seen.append, use_cache=False)
    # target 0: the first check (step 2) reaches it, so the loop stops there
    assert [s["step"] for s in seen] == [1, 2] and info["steps"] == 2
    assert seen[0]["pass@1"] is None and seen[1]["pass@1"] == info["pass@1"]
    assert {s["target"] for s in seen} == {0.0} and {s["total"] for s in seen} == {6}


def test_the_study_without_a_terminal_prints_timed_lines():
    from entropy_lab.cli.study import StudyProgress

    out, buf = plain_console()
    clock = FakeClock()
    with StudyProgress(view=LineView(out, clock=clock, interval=30.0, heartbeat=False)) as cb:
        cb("start", {"total": 4, "candidates": 10, "sequences": 8, "jvp": False})
        for done in range(1, 5):
            clock.now += 20.0
            cb("update", {"done": done, "total": 4, "setting": f"sgd lr=0.001 k={done}"})
        cb("end", {"total": 4})
    lines = [line for line in lines_of(buf) if line.startswith("coupling study")]
    assert lines[0] == "coupling study  started: update 0/4"
    assert lines[1].startswith("coupling study  update 2/4 (50%)  20.0 s/update  elapsed 40s  eta 40s")
    assert lines[1].endswith("sgd lr=0.001 k=2") and "done" in lines[-1]
