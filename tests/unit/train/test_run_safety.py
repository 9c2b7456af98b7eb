"""Run-directory safety in depth: --overwrite and --resume delete only what entropy-lab wrote
(at any depth, never through a link, after the path is resolved), writers never replace a
user's file, and one process at a time trains a run (the lock)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from entropy_lab.config import TrainConfig
from entropy_lab.errors import EntropyLabError
from entropy_lab.run_files import (
    BUILTIN_FIGURES,
    LEDGER,
    LOCK,
    check_replaceable,
    foreign_paths,
    record_written,
)
from entropy_lab.run_lock import RunLock, check_unlocked, read_lock
from entropy_lab.runs import RunDir
from entropy_lab.trainer import Trainer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def snapshot(*roots: Path) -> dict[str, bytes]:
    files = {str(p): p.read_bytes() for r in roots for p in sorted(Path(r).rglob("*")) if p.is_file()}
    return files | {str(p) + "/": b"" for r in roots for p in Path(r).rglob("*") if p.is_dir()}


def refused(fn, *fragments) -> str:
    with pytest.raises(EntropyLabError) as err:
        fn()
    message = str(err.value)
    assert "\n" not in message
    for f in fragments:
        assert f in message, message
    return message


def make_run(path: Path) -> RunDir:
    """A run as the trainer lays it out: metrics, a trace, a complete checkpoint with its manifest."""
    run = RunDir(path)
    run.create(TrainConfig(steps=3))
    run.write_metrics([{"step": 1, "reward/mean": 0.5}])
    run.traces_dir.mkdir()
    pd.DataFrame({"step": [1]}).to_parquet(run.trace_path(1))
    ckpt = run.checkpoint_path(1)
    (ckpt / "model").mkdir(parents=True)
    (ckpt / "model" / "config.json").write_text("{}")
    (ckpt / "trainer_state.pt").write_bytes(b"x")
    files = {"model/config.json": "0", "trainer_state.pt": "0"}
    (ckpt / "checkpoint.json").write_text(json.dumps({"step": 1, "files": files}))
    return run


def replace(run: RunDir) -> None:
    run.create(TrainConfig(steps=5), overwrite=True)


# --- --overwrite vets every path it would delete ------------------------------------------------


def test_the_layout_itself_is_replaceable(tmp_path):
    run = make_run(tmp_path / "run")
    (run.path / "metrics.parquet.tmp").write_bytes(b"half")  # a write in flight when it was killed
    (run.checkpoints_dir / "step_000002.tmp" / "model").mkdir(parents=True)
    (run.checkpoints_dir / "step_000002.tmp" / "model" / "model.safetensors").write_bytes(b"half")
    (run.traces_dir / "step_000002.parquet.tmp").write_bytes(b"half")
    assert foreign_paths(run.path) == []
    replace(run)
    assert sorted(p.name for p in run.path.iterdir()) == [".entropy-lab-run", "config.json"]


@pytest.mark.parametrize(
    "plant, named",
    [
        (lambda run: (run.traces_dir / "notes.txt").write_text("mine"), "traces/notes.txt"),
        (lambda run: (run.path / "notes.txt.tmp").write_text("mine"), "notes.txt.tmp"),
        (lambda run: (run.path / "traces.tmp").write_text("mine"), "traces.tmp"),
        (lambda run: (run.figures_dir.mkdir(), (run.figures_dir / "poster.pdf").write_bytes(b"%PDF")), "figures/poster.pdf"),
        (lambda run: (run.checkpoint_path(1) / "model" / "notes.md").write_text("mine"), "checkpoints/step_000001/model/notes.md"),
        (lambda run: (run.checkpoints_dir / "step_000002.tmp" / "data").mkdir(parents=True), "checkpoints/step_000002.tmp/data/"),
        (lambda run: (run.path / "retrace-grpo-step_000001").mkdir(), "retrace-grpo-step_000001/"),
    ],
    ids=["user-file-in-traces", "foreign-tmp-name", "tmp-of-a-folder", "poster-in-figures",
         "file-in-a-checkpoint", "folder-in-a-partial-checkpoint", "retrace-dir-without-marker"],
)  # fmt: skip
def test_a_users_file_anywhere_in_the_run_refuses_the_overwrite(tmp_path, plant, named):
    run = make_run(tmp_path / "run")
    plant(run)
    before = snapshot(run.path)
    refused(lambda: replace(run), "refusing to --overwrite", "did not write", named)
    assert snapshot(run.path) == before


def test_a_model_folder_copied_into_checkpoints_is_never_deleted(tmp_path, tiny_policy_dir):
    run = make_run(tmp_path / "run")
    shutil.copytree(tiny_policy_dir, run.checkpoints_dir / "my-model")
    shutil.copytree(
        tiny_policy_dir, run.checkpoints_dir / "step_000007" / "model"
    )  # named like ours, no manifest
    (run.checkpoints_dir / "step_000007" / "weights.bin").write_bytes(b"w")
    before = snapshot(run.path)
    msg = refused(lambda: replace(run), "checkpoints/my-model/", "checkpoints/step_000007/weights.bin")
    assert snapshot(run.path) == before, msg


def test_the_error_names_every_foreign_path_up_to_five(tmp_path):
    run = make_run(tmp_path / "run")
    for i in range(7):
        (run.traces_dir / f"mine_{i}.txt").write_text("x")
    msg = refused(lambda: replace(run), "traces/mine_0.txt", "traces/mine_4.txt", "and 2 more")
    assert "mine_5" not in msg


def test_figures_entropy_lab_wrote_are_replaceable_and_a_changed_one_is_not(tmp_path):
    run = make_run(tmp_path / "run")
    run.figures_dir.mkdir()
    (run.figures_dir / "training_curves.png").write_bytes(
        b"png"
    )  # built-in name: a run from before the ledger
    custom = run.figures_dir / "my_entry.png"
    custom.write_bytes(b"png")
    record_written([custom])  # a registered report entry's figure, written through save_figure
    assert foreign_paths(run.path) == []
    custom.write_bytes(b"edited by hand")
    assert foreign_paths(run.path) == ["figures/my_entry.png"]


# --- paths are resolved, links never followed -------------------------------------------------------


def test_a_path_through_a_missing_folder_is_the_run_it_names(tmp_path, monkeypatch):
    run = make_run(tmp_path / "run")
    before = snapshot(tmp_path)
    monkeypatch.chdir(tmp_path)
    ghost = RunDir(Path("ghost/../run"))
    assert ghost.path == run.path
    refused(lambda: ghost.create(TrainConfig()), "already holds a run", "--overwrite")
    assert snapshot(tmp_path) == before and not (tmp_path / "ghost").exists()


def linked_traces(tmp_path: Path) -> tuple[RunDir, Path]:
    """A run whose traces/ is a link to a folder outside it, holding a file named like a trace."""
    run = make_run(tmp_path / "run")
    outside = tmp_path / "elsewhere"
    shutil.move(run.traces_dir, outside)
    (outside / "step_000002.parquet").write_bytes(b"someone's data")
    run.traces_dir.symlink_to(outside, target_is_directory=True)
    return run, outside


def test_overwrite_never_deletes_through_a_linked_traces_folder(tmp_path):
    run, outside = linked_traces(tmp_path)
    before = snapshot(outside)
    refused(lambda: replace(run), "traces (a symbolic link)")
    assert snapshot(outside) == before and run.traces_dir.is_symlink()


def test_resume_never_deletes_through_a_linked_traces_folder(tmp_path):
    run, outside = linked_traces(tmp_path)
    before = snapshot(outside)
    refused(lambda: run.check_target(resume=True), "--resume", "symbolic links", "traces")
    refused(lambda: run.truncate_after(1), "symbolic link")  # the deleting call checks on its own too
    assert snapshot(outside) == before


def test_a_linked_run_directory_is_the_folder_it_names(tmp_path):
    run = make_run(tmp_path / "real")
    (tmp_path / "alias").symlink_to(run.path, target_is_directory=True)
    assert RunDir(tmp_path / "alias").path == run.path


# --- writers never replace a user's file ------------------------------------------------------------


def test_check_replaceable_refuses_a_users_file_and_accepts_its_own(tmp_path):
    mine, theirs, absent = tmp_path / "a.png", tmp_path / "report.md", tmp_path / "b.png"
    mine.write_bytes(b"1")
    record_written([mine])
    theirs.write_text("my notes")
    check_replaceable([mine, absent])
    refused(lambda: check_replaceable([mine, theirs]), "did not write", str(theirs))
    assert json.loads((tmp_path / LEDGER).read_text())["files"] == {
        "a.png": __import__("hashlib").sha256(b"1").hexdigest()
    }


def test_save_figure_never_replaces_a_users_file(tmp_path):
    from matplotlib.figure import Figure

    from entropy_lab.figures import save_figure

    (tmp_path / "training_curves.pdf").write_bytes(b"a poster")  # no ledger, no run: the user's
    refused(lambda: save_figure(Figure(), tmp_path / "training_curves"), "training_curves.pdf")
    assert not (tmp_path / "training_curves.png").exists()
    assert (tmp_path / "training_curves.pdf").read_bytes() == b"a poster"
    written = save_figure(Figure(), tmp_path / "other")
    assert save_figure(Figure(), tmp_path / "other") == written  # its own files it replaces


def test_every_builtin_figure_stem_is_known():
    from entropy_lab.report.entries import figure_stems

    assert set(figure_stems()) | {"training_curves", "pass_at_k"} <= BUILTIN_FIGURES


# --- the lock -------------------------------------------------------------------------------------


def lock_of(run: Path, pid: int, host: str | None = None, **extra) -> Path:
    """A lock file as another process would have written it."""
    run.mkdir(parents=True, exist_ok=True)
    record = {"pid": pid, "host": host or socket.gethostname(), "started": "2026-01-01T00:00:00+00:00"}
    (run / LOCK).write_text(json.dumps({**record, "token": "theirs", **extra}))
    return run / LOCK


@pytest.fixture
def live_pid():
    """The pid of a live child process (``sleep``), killed afterwards."""
    child = subprocess.Popen(["sleep", "3600"])
    yield child.pid
    child.kill()
    child.wait()


@pytest.fixture
def dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_the_lock_is_taken_atomically_and_given_back(tmp_path):
    lock = RunLock(tmp_path / "new" / "run")
    lock.acquire()
    info = read_lock(lock.run)
    assert (info.pid, info.host) == (os.getpid(), socket.gethostname()) and info.started
    check_unlocked(lock.run, "train")  # this process's own lock does not stop it
    other = RunLock(lock.run)
    refused(other.acquire, "training it already", f"pid {os.getpid()}", info.started)
    lock.release()
    assert not (tmp_path / "new").exists()  # the folders it made, left empty, are gone


def test_a_live_lock_refuses_train_resume_and_overwrite(tmp_path, live_pid):
    run = make_run(tmp_path / "run")
    lock_of(run.path, live_pid)
    before = snapshot(run.path)
    for kw in ({}, {"resume": True}, {"overwrite": True}):
        refused(lambda k=kw: run.check_target(**k), "another process", f"pid {live_pid}", "2026-01-01")
    refused(lambda: replace(run), "another process")
    assert snapshot(run.path) == before


def test_a_lock_held_by_this_test_process_refuses_the_trainer(tmp_path, small_config, tiny_policy_dir):
    run = make_run(tmp_path / "run")
    lock_of(run.path, os.getpid(), proc_start=None)  # a live pid not holding it through RunLock
    before = snapshot(run.path)
    cfg = small_config("grpo", tiny_policy_dir, steps=1)
    refused(lambda: Trainer(cfg, run.path, overwrite=True).train(), "another process", "--overwrite")
    assert snapshot(run.path) == before


def test_a_stale_lock_is_named_and_replaced(tmp_path, dead_pid):
    run = make_run(tmp_path / "run")
    lock_of(run.path, dead_pid)
    messages: list[str] = []
    run.check_target(overwrite=True)  # a stale lock does not refuse
    lock = RunLock(run.path, warn=messages.append)
    lock.acquire()
    assert len(messages) == 1 and f"pid {dead_pid}" in messages[0] and "stale" in messages[0]
    assert read_lock(run.path).pid == os.getpid()
    replace(run)  # the lock this process holds is kept; everything else replaced
    assert read_lock(run.path).token == lock.token
    lock.release()
    assert not (run.path / LOCK).exists() and run.config_path.is_file()


def test_a_reused_pid_is_a_stale_lock(tmp_path, live_pid):
    lock_of(tmp_path, live_pid, proc_start="1")  # the live pid now belongs to another process
    assert read_lock(tmp_path).alive() is False


def test_another_hosts_lock_is_never_taken_over(tmp_path):
    path = lock_of(tmp_path, 1, host="elsewhere.example")
    refused(RunLock(tmp_path).acquire, "elsewhere.example", "cannot be checked", f"delete {path}")
    assert path.is_file()


def test_an_unreadable_lock_is_young_then_stale(tmp_path):
    (tmp_path / LOCK).write_text("")
    refused(RunLock(tmp_path).acquire, "another process")  # being written right now
    os.utime(tmp_path / LOCK, (0, 0))
    messages: list[str] = []
    RunLock(tmp_path, warn=messages.append).acquire()
    assert "stale" in messages[0]


class Stop(BaseException):
    pass


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_training_holds_the_lock_and_gives_it_back_on_any_exit(
    tmp_path, small_config, tiny_policy_dir, isolated_cache, error
):
    out = tmp_path / "run"
    seen = []

    def callback(event, info):
        if event == "step":
            seen.append(read_lock(out))
            raise error

    cfg = small_config("grpo", tiny_policy_dir, steps=2, eval_every=0)
    with pytest.raises(error):
        Trainer(cfg, out, callback=callback).train()
    assert seen[0].pid == os.getpid()
    assert not (out / LOCK).exists()
    Trainer(cfg, out, resume=True).train()  # nothing is left that stops the resume
    assert not (out / LOCK).exists() and RunDir(out).read_metrics()["step"].tolist() == [1, 2]


def test_a_run_whose_process_died_resumes_with_a_warning_naming_the_stale_lock(
    tmp_path, small_config, tiny_policy_dir, isolated_cache, dead_pid
):
    from entropy_lab.errors import EntropyLabWarning

    out = tmp_path / "run"
    cfg = small_config("grpo", tiny_policy_dir, steps=1, eval_every=0)
    Trainer(cfg, out).train()
    lock_of(out, dead_pid)  # what a run killed with kill -9 leaves behind
    events = []
    with pytest.warns(EntropyLabWarning, match=f"stale lock .*pid {dead_pid}"):
        Trainer(cfg.replace(steps=2), out, resume=True, callback=lambda e, i: events.append((e, i))).train()
    assert [i["message"] for e, i in events if e == "warning" and "lock" in i["message"]] == [
        f"removing the stale lock {out / LOCK}: pid {dead_pid} on host {socket.gethostname()}, "
        "started 2026-01-01T00:00:00+00:00 is no longer running"
    ]
    assert RunDir(out).read_metrics()["step"].tolist() == [1, 2] and not (out / LOCK).exists()


def test_readers_of_a_live_run_read_complete_files_and_leave_the_lock(
    tmp_path, small_config, tiny_policy_dir, isolated_cache, live_pid
):
    from typer.testing import CliRunner

    from entropy_lab.cli.app import app
    from entropy_lab.trainer.retrace import trace_checkpoint

    out = tmp_path / "run"
    Trainer(small_config("grpo", tiny_policy_dir, steps=2, eval_every=0, trace_every=2), out).train()
    run = RunDir(out)
    lock = lock_of(out, live_pid)  # now "being trained" by another process
    (run.traces_dir / "step_000003.parquet.tmp").write_bytes(b"PAR1 half")  # its write in flight
    (out / "metrics.parquet.tmp").write_bytes(b"PAR1 half")
    lock_bytes = lock.read_bytes()
    result = CliRunner().invoke(app, ["figures", "--run", str(out)])
    assert result.exit_code == 0, result.output
    done = trace_checkpoint(run, 2)  # a checkpoint trace never goes into the run's own traces/
    assert done.run.path == out / "retrace" / "step_000002"
    assert [f.name for f in run.trace_files()] == ["step_000002.parquet"]
    assert lock.read_bytes() == lock_bytes
    # what the trainer, the report and the retrace wrote is exactly what --overwrite recognises
    assert foreign_paths(out) == []
    assert (out / "figures" / LEDGER).is_file() and (done.run.path / ".entropy-lab-run").is_file()
