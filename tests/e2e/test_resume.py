"""Resume: a run killed with SIGKILL and resumed equals the uninterrupted run, bit for bit on CPU.

The runs happen in subprocesses (one thread each, for determinism) that build a
``TrainConfig`` and call ``Trainer(cfg, out).train()``. The run to be killed stops inside
its step-6 checkpoint write, after half the checkpoint is on disk, so that its latest
complete checkpoint is step 4 while its metrics, evaluation and traces already hold
steps 5 and 6: resuming must discard those and redo them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from entropy_lab.errors import EntropyLabError
from entropy_lab.models import load_policy
from entropy_lab.records import load_records
from entropy_lab.run_files import LOCK
from entropy_lab.runs import RunDir
from entropy_lab.trainer import Trainer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

HELPERS_DIR = Path(__file__).resolve().parents[1] / "helpers"  # the child processes import from here

SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path

    import torch

    torch.set_num_threads(1)

    from tiny_training import digit_reward, small_config
    from entropy_lab.tasks.arithmetic import ArithmeticTask
    from entropy_lab.trainer import Trainer

    policy, out, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    ArithmeticTask.reward = digit_reward
    cfg = small_config("grpo", policy, steps=6, checkpoint_every=2, eval_every=3, trace_every=2,
                       mini_batches=2, micro_batch_size=4)

    if mode == "kill":
        original = Trainer.save_checkpoint

        def save_checkpoint(self, step):
            if step == 6:
                # half a checkpoint on disk, then wait to be killed
                tmp = self.run.checkpoint_path(step).with_name("step_000006.tmp")
                self.model.save_pretrained(tmp / "model")
                Path(out, "KILL_ME").write_text("ready")
                time.sleep(600)
            return original(self, step)

        Trainer.save_checkpoint = save_checkpoint

    Trainer(cfg, out, resume=(mode == "resume")).train()
    """
)


def launch(script: Path, *args: Path | str, cache: Path) -> subprocess.Popen:
    """Run ``script args...`` in a subprocess with one thread and ``cache`` as ENTROPY_LAB_CACHE."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(HELPERS_DIR), os.environ.get("PYTHONPATH", "")]),
        "ENTROPY_LAB_CACHE": str(cache),
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.Popen(
        [sys.executable, str(script), *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def finish(proc: subprocess.Popen, timeout: float = 120) -> None:
    output, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, output.decode()[-3000:]


def kill_when_ready(
    proc: subprocess.Popen, flag: Path, timeout: float = 180, phase: str = "the phase to be killed in"
) -> None:
    """SIGKILL ``proc`` once it has written ``flag``; it must not have exited before."""
    try:
        deadline = time.monotonic() + timeout
        while not flag.exists():
            assert proc.poll() is None, proc.communicate()[0].decode()[-3000:]
            assert time.monotonic() < deadline, f"the run never reached {phase}"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def without_time(df: pd.DataFrame) -> pd.DataFrame:
    return df[[c for c in df.columns if not c.startswith("time/")]]


def test_killed_and_resumed_run_equals_uninterrupted(tmp_path, tiny_policy_dir, isolated_cache):
    script = tmp_path / "train_script.py"
    script.write_text(SCRIPT)
    full_dir, killed_dir = tmp_path / "full", tmp_path / "killed"

    full = launch(script, tiny_policy_dir, full_dir, "full", cache=isolated_cache)
    victim = launch(script, tiny_policy_dir, killed_dir, "kill", cache=isolated_cache)
    kill_when_ready(victim, killed_dir / "KILL_ME", timeout=120, phase="its step-6 checkpoint")
    finish(full)

    killed = RunDir(killed_dir)
    assert (killed_dir / LOCK).is_file(), "a killed run leaves its lock behind"
    assert sorted(killed.checkpoints()) == [2, 4], "step 6 was only half written"
    assert (killed.checkpoints_dir / "step_000006.tmp").is_dir()
    assert killed.read_metrics()["step"].tolist() == [1, 2, 3, 4, 5, 6]
    assert killed.read_eval()["step"].tolist() == [0, 3, 6]
    assert [f.name for f in killed.trace_files()] == [f"step_00000{s}.parquet" for s in (2, 4, 6)]

    os.remove(killed_dir / "KILL_ME")
    finish(launch(script, tiny_policy_dir, killed_dir, "resume", cache=isolated_cache))
    assert not (killed_dir / LOCK).exists()  # the stale lock was replaced, then given back

    reference = RunDir(full_dir)
    pd.testing.assert_frame_equal(
        without_time(killed.read_metrics()), without_time(reference.read_metrics()), check_exact=True
    )
    assert killed.read_metrics()["step"].tolist() == [1, 2, 3, 4, 5, 6]
    pd.testing.assert_frame_equal(killed.read_eval(), reference.read_eval(), check_exact=True)
    assert [f.name for f in killed.trace_files()] == [f.name for f in reference.trace_files()]
    for a, b in zip(killed.trace_files(), reference.trace_files(), strict=True):
        ra, ma = load_records(a)
        rb, mb = load_records(b)
        pd.testing.assert_frame_equal(ra, rb, check_exact=True)
        assert ma == mb
    assert sorted(killed.checkpoints()) == sorted(reference.checkpoints()) == [2, 4, 6]
    assert not list(killed.checkpoints_dir.glob("*.tmp"))
    m_killed, _ = load_policy(killed.checkpoint_path(6) / "model")
    m_ref, _ = load_policy(reference.checkpoint_path(6) / "model")
    for name, value in m_ref.state_dict().items():
        assert torch.equal(m_killed.state_dict()[name], value), name
    s_killed = torch.load(killed.checkpoint_path(6) / "trainer_state.pt", weights_only=True)
    s_ref = torch.load(reference.checkpoint_path(6) / "trainer_state.pt", weights_only=True)
    for group_k, group_r in zip(
        s_killed["optimizer"]["state"].values(), s_ref["optimizer"]["state"].values(), strict=True
    ):
        for key in group_r:
            assert torch.equal(group_k[key], group_r[key]), key
    assert s_killed["scheduler"] == s_ref["scheduler"]


# --- kill -9 at the other phases: warm start, rollout, between checkpoints -------------------------

PHASE_SCRIPT = textwrap.dedent(
    """
    import functools, sys, time
    from pathlib import Path

    import torch

    torch.set_num_threads(1)

    import entropy_lab.models as models_module
    from tiny_training import SMALL, TINY_SPEC, digit_reward
    from entropy_lab.methods import resolve_config
    from entropy_lab.models import WarmStartSpec, warm_start
    from entropy_lab.tasks.arithmetic import ArithmeticTask
    from entropy_lab.trainer import Trainer

    out, mode = sys.argv[1], sys.argv[2]
    ArithmeticTask.reward = digit_reward
    # the embedded policy's real warm start, shrunk to a few SFT steps
    spec = WarmStartSpec(batch_size=16, max_steps=6, check_every=6, probe_prompts=8, target_pass=1.0)
    models_module.warm_start = functools.partial(warm_start, spec=spec, arch=TINY_SPEC)
    cfg = resolve_config("grpo", {**SMALL, "steps": 5, "checkpoint_every": 2, "eval_every": 3,
                                  "trace_every": 2, "mini_batches": 2})

    def hang(where):
        Path(out + ".KILL_ME").write_text(where)
        time.sleep(600)

    def callback(event, info):
        if mode == "warm_start" and event == "warm_start_progress" and info["step"] == 3:
            hang("inside the warm start")
        if mode == "between" and event == "step" and info["step"] == 3:
            hang("after step 3 was written, before the step-4 checkpoint")

    if mode == "rollout":
        original = Trainer.rollout
        calls = []

        def rollout(self):
            calls.append(1)
            if len(calls) == 1:
                hang("inside the rollout of step 1, before any checkpoint")
            return original(self)

        Trainer.rollout = rollout
    Trainer(cfg, out, resume=(mode == "resume"), callback=callback).train()
    """
)


@pytest.fixture(scope="module")
def warm_reference(tmp_path_factory):
    """The uninterrupted 5-step run from a (shrunk) warm start, in a subprocess; shared by the phases."""
    root = tmp_path_factory.mktemp("phases")
    script = root / "phase_script.py"
    script.write_text(PHASE_SCRIPT)
    finish(launch(script, root / "full", "full", cache=root / "cache-full"), timeout=300)
    return script, RunDir(root / "full"), root / "cache-full"


def assert_same_run(run: RunDir, reference: RunDir) -> None:
    pd.testing.assert_frame_equal(
        without_time(run.read_metrics()), without_time(reference.read_metrics()), check_exact=True
    )
    pd.testing.assert_frame_equal(run.read_eval(), reference.read_eval(), check_exact=True)
    assert [f.name for f in run.trace_files()] == [f.name for f in reference.trace_files()]
    for a, b in zip(run.trace_files(), reference.trace_files(), strict=True):
        pd.testing.assert_frame_equal(load_records(a)[0], load_records(b)[0], check_exact=True)
    assert sorted(run.checkpoints()) == sorted(reference.checkpoints()) == [2, 4, 5]
    m_run, _ = load_policy(run.checkpoint_path(5) / "model")
    m_ref, _ = load_policy(reference.checkpoint_path(5) / "model")
    for name, value in m_ref.state_dict().items():
        assert torch.equal(m_run.state_dict()[name], value), name


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["warm_start", "rollout", "between"])
def test_kill_at_each_phase_then_resume_equals_uninterrupted(phase, warm_reference, tmp_path):
    script, reference, shared_cache = warm_reference
    # the warm-start phase needs an empty cache; the others reuse the reference's cached warm start
    out, cache = tmp_path / "run", (tmp_path / "cache" if phase == "warm_start" else shared_cache)
    kill_when_ready(launch(script, out, phase, cache=cache), Path(str(out) + ".KILL_ME"))
    run = RunDir(out)
    if phase == "warm_start":
        # nothing was written before the policy existed, and no half warm start is cached as done
        assert not out.exists()
        assert not list(cache.glob("warmstart/*/info.json"))
        resumed = launch(script, out, "resume", cache=cache)
        output = resumed.communicate(timeout=120)[0].decode()
        assert resumed.returncode != 0 and "no run to resume" in output
        finish(launch(script, out, "full", cache=cache), timeout=300)  # so the same command starts it again
    else:
        assert run.checkpoints() == ({} if phase == "rollout" else {2: run.checkpoint_path(2)})
        assert len(run.read_metrics()) == (0 if phase == "rollout" else 3)
        finish(launch(script, out, "resume", cache=cache), timeout=300)
    assert_same_run(run, reference)


# --- refusals --------------------------------------------------------------------------------


def test_resume_before_the_first_checkpoint_starts_over(
    tmp_path, tiny_policy_dir, isolated_cache, dense_reward, small_config
):
    cfg = small_config("grpo", tiny_policy_dir, steps=2, checkpoint_every=0)
    Trainer(cfg, tmp_path / "full").train()
    out = tmp_path / "run"
    with pytest.raises(Crash):  # died after step 1, before its first checkpoint
        Trainer(cfg, out, callback=crash_after(1)).train()
    assert RunDir(out).read_metrics()["step"].tolist() == [1] and RunDir(out).checkpoints() == {}
    Trainer(cfg, out, resume=True).train()
    pd.testing.assert_frame_equal(
        without_time(RunDir(out).read_metrics()),
        without_time(RunDir(tmp_path / "full").read_metrics()),
        check_exact=True,
    )
    pd.testing.assert_frame_equal(RunDir(out).read_eval(), RunDir(tmp_path / "full").read_eval())


def test_resume_where_there_is_no_run_is_one_clear_error(
    tmp_path, tiny_policy_dir, isolated_cache, small_config
):
    cfg = small_config("grpo", tiny_policy_dir, steps=2)
    for out in (tmp_path / "missing", tmp_path / "empty"):
        if out.name == "empty":
            out.mkdir()
        with pytest.raises(EntropyLabError) as err:
            Trainer(cfg, out, resume=True).train()
        message = str(err.value)
        assert "no run to resume" in message and "without --resume" in message and "\n" not in message
    assert not (tmp_path / "missing").exists() and not any((tmp_path / "empty").iterdir())


def test_resume_with_a_changed_config_names_the_key(tmp_path, tiny_policy_dir, isolated_cache, small_config):
    cfg = small_config("grpo", tiny_policy_dir, steps=2, eval_every=0)
    out = tmp_path / "run"
    Trainer(cfg, out).train()
    before = RunDir(out).read_metrics()
    with pytest.raises(EntropyLabError) as err:
        Trainer(cfg.replace(lr=2e-3), out, resume=True).train()
    message = str(err.value)
    assert "lr" in message and "steps" not in message and "\n" not in message
    pd.testing.assert_frame_equal(RunDir(out).read_metrics(), before)


def test_resume_of_a_finished_run_changes_nothing(tmp_path, tiny_policy_dir, isolated_cache, small_config):
    cfg = small_config("grpo", tiny_policy_dir, steps=2)
    out = tmp_path / "run"
    Trainer(cfg, out).train()
    run = RunDir(out)
    metrics, evals = run.read_metrics(), run.read_eval()
    traces = {f.name: f.read_bytes() for f in run.trace_files()}
    returned = Trainer(cfg, out, resume=True).train()
    pd.testing.assert_frame_equal(run.read_metrics(), metrics)
    pd.testing.assert_frame_equal(returned, metrics, check_dtype=False)
    pd.testing.assert_frame_equal(run.read_eval(), evals)
    assert {f.name: f.read_bytes() for f in run.trace_files()} == traces


# --- unsafe and damaged checkpoints --------------------------------------------------------------


def test_a_malicious_checkpoint_runs_nothing(
    monkeypatch, tmp_path, tiny_policy_dir, isolated_cache, small_config
):
    # importable by name only once pytest has collected tests/unit/cli, so not when this file runs alone
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "unit" / "cli"))
    from test_bad_inputs import plant_payload  # a pickled exec() call where RNG state belongs
    from typer.testing import CliRunner

    from entropy_lab.cli.app import app

    cfg = small_config("grpo", tiny_policy_dir, steps=2, eval_every=0)
    out = tmp_path / "run"
    Trainer(cfg, out).train()
    sentinel = tmp_path / "pwned"
    ckpt = RunDir(out).checkpoint_path(2)
    plant_payload(ckpt, sentinel)
    torch.load(ckpt / "trainer_state.pt", weights_only=False)  # the payload works when unpickled unsafely
    assert sentinel.read_text() == "pwned"
    sentinel.unlink()

    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(EntropyLabError) as err:
        Trainer(cfg.replace(steps=3), out, resume=True).train()
    assert "refusing to load" in str(err.value) and "exec" in str(err.value)
    result = CliRunner().invoke(app, ["trace", "--run", str(ckpt)])
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "refusing to load" in lines[0], result.stderr
    assert not sentinel.exists()
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous(
    tmp_path, tiny_policy_dir, isolated_cache, dense_reward, small_config
):
    cfg = small_config("grpo", tiny_policy_dir, steps=4, checkpoint_every=1, eval_every=2)
    Trainer(cfg, tmp_path / "full").train()
    with pytest.raises(Crash):
        Trainer(cfg, tmp_path / "run", callback=crash_after(3)).train()
    run = RunDir(tmp_path / "run")
    weights = run.checkpoint_path(3) / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated, as by a full disk outside our control
    with pytest.warns(UserWarning, match="model.safetensors is damaged"):
        Trainer(cfg, run.path, resume=True).train()
    pd.testing.assert_frame_equal(
        without_time(run.read_metrics()),
        without_time(RunDir(tmp_path / "full").read_metrics()),
        check_exact=True,
    )
    assert sorted(run.checkpoints()) == [1, 2, 3, 4]


def test_no_usable_checkpoint_names_the_files_to_remove(
    tmp_path, tiny_policy_dir, isolated_cache, small_config
):
    cfg = small_config("grpo", tiny_policy_dir, steps=2, checkpoint_every=1, eval_every=0)
    Trainer(cfg, tmp_path / "run").train()
    run = RunDir(tmp_path / "run")
    for step in (1, 2):
        (run.checkpoint_path(step) / "trainer_state.pt").write_bytes(b"garbage")
    with pytest.raises(EntropyLabError) as err:
        Trainer(cfg.replace(steps=3), run.path, resume=True).train()
    message = str(err.value)
    assert "step_000001" in message and "step_000002" in message and "remove" in message
    assert run.read_metrics()["step"].tolist() == [1, 2]


# --- writes that fail mid-run ---------------------------------------------------------------------


def test_a_full_disk_during_a_checkpoint_stops_with_one_line_and_keeps_the_last_one(
    monkeypatch, tmp_path, tiny_policy_dir, isolated_cache, dense_reward, small_config
):
    import errno

    import entropy_lab.checkpoints as ckpt_module

    cfg = small_config("grpo", tiny_policy_dir, steps=4, checkpoint_every=2, eval_every=0)
    Trainer(cfg, tmp_path / "full").train()
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step") == 4:
            Path(f).write_bytes(b"partial")  # some bytes made it, then the disk filled up
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(ckpt_module.torch, "save", save)
    out = tmp_path / "run"
    with pytest.raises(EntropyLabError) as err:
        Trainer(cfg, out).train()
    message = str(err.value)
    assert "the disk is full" in message and "step_000002" in message and "\n" not in message
    run = RunDir(out)
    assert sorted(run.checkpoints()) == [2] and not list(run.checkpoints_dir.glob("*.tmp"))
    monkeypatch.setattr(ckpt_module.torch, "save", real_save)  # space freed
    Trainer(cfg, out, resume=True).train()
    assert_same_metrics(run, RunDir(tmp_path / "full"))


def test_a_read_only_traces_directory_stops_with_one_line(
    monkeypatch, tmp_path, tiny_policy_dir, isolated_cache, dense_reward, small_config
):
    """Root ignores file modes, so the refusal the kernel gives a user is raised where traces are written."""
    import errno

    import entropy_lab.records as records_module

    cfg = small_config("grpo", tiny_policy_dir, steps=3, checkpoint_every=1, eval_every=0, trace_every=3)
    out = tmp_path / "run"

    real_write = records_module.pq.write_table

    def refuse(table, where, *args, **kwargs):
        if "traces" in str(where):
            raise PermissionError(errno.EACCES, "Permission denied", str(where))
        return real_write(table, where, *args, **kwargs)

    monkeypatch.setattr(records_module.pq, "write_table", refuse)
    with pytest.raises(EntropyLabError) as err:
        Trainer(cfg, out).train()
    message = str(err.value)
    assert "permission denied" in message and "traces" in message and "step_000002" in message
    assert sorted(RunDir(out).checkpoints()) == [1, 2]
    load_policy(RunDir(out).checkpoint_path(2) / "model")  # the last good one loads
    assert RunDir(out).read_metrics()["step"].tolist() == [1, 2]
    from entropy_lab.checkpoints import load_trainer_state

    assert load_trainer_state(RunDir(out).checkpoint_path(2))["step"] == 2


def assert_same_metrics(run: RunDir, reference: RunDir) -> None:
    pd.testing.assert_frame_equal(
        without_time(run.read_metrics()), without_time(reference.read_metrics()), check_exact=True
    )


# --- in-process resume after a crash, for methods that draw random numbers in the loss -------


class Crash(Exception):
    pass


def crash_after(step: int):
    def callback(event, info):
        if event == "step" and info["step"] == step:
            raise Crash

    return callback


@pytest.mark.parametrize("method", ["clip-cov", "kl", "steer"])  # grpo: see the SIGKILL test
def test_resume_after_a_crash_equals_uninterrupted(
    method, tmp_path, tiny_policy_dir, isolated_cache, dense_reward, small_config
):
    """Same process, so same threads: the resumed run matches exactly (clip-cov uses the loss RNG,
    mini-batches the shuffle RNG, trace_max_positions the tracer's position sampling)."""
    overrides = dict(
        steps=4, checkpoint_every=2, eval_every=3, trace_every=1, mini_batches=2, trace_max_positions=6
    )
    if method == "clip-cov":
        overrides["clip_cov_ratio"] = 0.2  # detach some tokens every call
    cfg = small_config(method, tiny_policy_dir, **overrides)
    Trainer(cfg, tmp_path / "full").train()
    with pytest.raises(Crash):
        Trainer(cfg, tmp_path / "crashed", callback=crash_after(3)).train()
    crashed = RunDir(tmp_path / "crashed")
    assert crashed.read_metrics()["step"].tolist() == [1, 2, 3] and sorted(crashed.checkpoints()) == [2]
    Trainer(cfg, tmp_path / "crashed", resume=True).train()

    reference = RunDir(tmp_path / "full")
    pd.testing.assert_frame_equal(
        without_time(crashed.read_metrics()), without_time(reference.read_metrics()), check_exact=True
    )
    pd.testing.assert_frame_equal(crashed.read_eval(), reference.read_eval(), check_exact=True)
    for a, b in zip(crashed.trace_files(), reference.trace_files(), strict=True):
        assert a.name == b.name
        pd.testing.assert_frame_equal(load_records(a)[0], load_records(b)[0], check_exact=True)
    assert len(load_records(crashed.trace_path(4))[0]) == 6 * 2  # 6 positions per update, 2 updates
