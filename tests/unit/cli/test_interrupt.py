"""Ctrl-C and SIGTERM end training with one line naming the command that continues it, exit code 130;
``train --out RUN --resume`` alone continues a run with its own config.json."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
from test_cli import SETS, assert_one_line_error, invoke

LINE = re.compile(
    r"interrupted at step (\d+); continue with: (entropy-lab train .* --resume) \(it resumes from (.*)\)"
)


def start_training(model_dir, out, steps: int) -> subprocess.Popen:
    """`entropy-lab train` in a child process, stdout a pipe (no terminal), checkpoints every 2 steps."""
    args = ["--method", "grpo", "--task", "arithmetic", "--model", str(model_dir), "--steps", str(steps)]
    code = "from entropy_lab.cli.app import main; main()"
    # the untrained policy earns no reward: the tracer's warnings about zero deltas are expected here
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore::UserWarning",
    }
    return subprocess.Popen(
        [sys.executable, "-c", code, "train", *args, *map(str, SETS), "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip


def interrupt_after_steps(proc: subprocess.Popen, out, steps: int, sig: int) -> tuple[str, str]:
    """Send ``sig`` once metrics.parquet holds ``steps`` rows; (stdout, stderr) of the child."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if len(pd.read_parquet(out / "metrics.parquet")) >= steps:
                break
        except (OSError, ValueError):  # not written yet, or mid-rename
            pass
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(sig)
    return proc.communicate(timeout=120)


@pytest.mark.parametrize(
    "sig",
    [
        signal.SIGINT,
        pytest.param(signal.SIGTERM, marks=pytest.mark.slow),
    ],  # about 15 s each (a child process)
    ids=["SIGINT", "SIGTERM"],
)
def test_a_signal_ends_training_with_the_command_that_continues_it(tmp_path, tiny_policy_dir, sig):
    out = tmp_path / "run"
    proc = start_training(tiny_policy_dir, out, steps=400)
    stdout, stderr = interrupt_after_steps(proc, out, 3, sig)  # step 3 written, maybe not finished
    assert proc.returncode == 130, stderr[-2000:]
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("warning:")]
    assert len(lines) == 1, stderr
    match = LINE.fullmatch(lines[0])
    assert match, lines[0]
    assert int(match[1]) >= 2 and match[2] == f"entropy-lab train --out {shlex.quote(str(out))} --resume"
    assert "Traceback" not in stderr and "run: train  started: step 0/400" in stdout  # non-TTY progress lines
    latest = max(int(p.name[5:]) for p in (out / "checkpoints").iterdir())
    assert match[3] == f"the checkpoint at step {latest}"
    if sig == signal.SIGINT:  # the printed command itself, with a smaller budget given as allowed
        resumed = invoke(*shlex.split(match[2])[1:], "--steps", latest + 1, "--quiet")
        assert resumed.exit_code == 0, resumed.output
        assert pd.read_parquet(out / "metrics.parquet")["step"].tolist() == list(range(1, latest + 2))


def test_resume_takes_the_runs_own_configuration(tmp_path, tiny_policy_dir, dense_reward):
    from test_cli import train_args

    out = tmp_path / "run"
    assert invoke(*train_args(tiny_policy_dir, out), "--set", "lr=0.002").exit_code == 0
    more = invoke("train", "--out", out, "--resume", "--steps", 3, "--quiet")  # nothing else given
    assert more.exit_code == 0, more.output
    assert pd.read_parquet(out / "metrics.parquet")["step"].tolist() == [1, 2, 3]
    assert_one_line_error(
        invoke("train", "--out", out, "--resume", "--set", "lr=0.01", "--quiet"),
        "differs in lr (0.002 -> 0.01)",
        "--resume continues the run with its own config.json",
    )
    assert_one_line_error(invoke("train", "--out", out, "--resume", "--method", "steer"), "differs in method")
    same = invoke("train", "--out", out, "--resume", "--method", "grpo", "--set", "lr=0.002", "--quiet")
    assert same.exit_code == 0, same.output  # settings that are the run's own are fine


def test_the_interrupt_line_before_anything_was_written_repeats_the_command(tmp_path):
    from entropy_lab.cli.train import build_config, interrupt_line

    cfg = build_config("grpo", None, None, None, 5, None, None)
    line = interrupt_line(cfg, tmp_path / "nothing", None, "entropy-lab train --steps 5")
    assert line == (
        "interrupted during set-up; nothing of this run was written yet; "
        "start it again with: entropy-lab train --steps 5"
    )
