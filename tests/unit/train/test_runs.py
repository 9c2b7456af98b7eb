"""Run directories: --overwrite removes only a run entropy-lab recognisably wrote, and only after
the new configuration and policy loaded; everything else is refused with one line, untouched."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from entropy_lab.config import TrainConfig
from entropy_lab.errors import EntropyLabError
from entropy_lab.runs import MARKER, RunDir
from entropy_lab.trainer import Trainer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def refused(fn, *fragments) -> str:
    with pytest.raises(EntropyLabError) as err:
        fn()
    message = str(err.value)
    assert "\n" not in message
    for f in fragments:
        assert f in message, message
    return message


def make_run(path: Path) -> RunDir:
    run = RunDir(path)
    run.create(TrainConfig(steps=3))
    run.write_metrics([{"step": 1, "reward/mean": 0.5}])
    (run.checkpoints_dir / "step_000001").mkdir(parents=True)
    (run.checkpoints_dir / "step_000001" / "trainer_state.pt").write_bytes(b"x")
    return run


def test_a_recognised_run_is_replaced(tmp_path):
    run = make_run(tmp_path / "run")
    assert run.marker_path.is_file()
    run.create(TrainConfig(steps=7), overwrite=True)
    assert sorted(p.name for p in run.path.iterdir()) == [MARKER, "config.json"]
    assert run.train_config().steps == 7


def test_an_existing_run_needs_a_flag(tmp_path):
    run = make_run(tmp_path / "run")
    before = snapshot(run.path)
    refused(lambda: run.create(TrainConfig()), "already holds a run", "--resume", "--overwrite")
    assert snapshot(run.path) == before


@pytest.mark.parametrize("where", ["cwd", "parent"])
def test_the_working_directory_and_its_parents_are_never_replaced(tmp_path, monkeypatch, where):
    run = make_run(tmp_path / "run")
    inner = run.path / "checkpoints"
    monkeypatch.chdir(run.path if where == "cwd" else inner)
    before = snapshot(run.path)
    out = Path(".") if where == "cwd" else Path("..")
    refused(lambda: RunDir(out).create(TrainConfig(), overwrite=True), "working directory")
    assert snapshot(run.path) == before


def test_a_model_directory_is_never_taken_for_a_run(tmp_path, tiny_policy_dir):
    model = tmp_path / "model"
    shutil.copytree(tiny_policy_dir, model)
    before = snapshot(model)
    for overwrite in (False, True):
        msg = refused(
            lambda o=overwrite: RunDir(model).create(TrainConfig(), overwrite=o), "Hugging Face model"
        )
        assert "--overwrite" not in msg  # never steer the user towards deleting weights
    refused(lambda: RunDir(model).read_config(), "Hugging Face model")
    assert snapshot(model) == before


def test_a_directory_with_unknown_files_is_not_replaced(tmp_path):
    run = make_run(tmp_path / "run")
    (run.path / "notes.txt").write_text("mine")
    before = snapshot(run.path)
    refused(lambda: run.create(TrainConfig(), overwrite=True), "did not write", "notes.txt")
    assert snapshot(run.path) == before


def test_a_run_without_the_marker_is_not_replaced(tmp_path):
    run = make_run(tmp_path / "run")
    run.marker_path.unlink()
    before = snapshot(run.path)
    refused(lambda: run.create(TrainConfig(), overwrite=True), MARKER, "delete it yourself")
    assert snapshot(run.path) == before


def test_a_foreign_non_empty_directory_is_not_used(tmp_path):
    d = tmp_path / "project"
    d.mkdir()
    (d / "main.py").write_text("print(1)")
    before = snapshot(d)
    for overwrite in (False, True):
        refused(lambda o=overwrite: RunDir(d).create(TrainConfig(), overwrite=o), "not empty")
    assert snapshot(d) == before


def test_out_at_a_file(tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    refused(lambda: RunDir(f).create(TrainConfig()), "is a file")
    assert f.read_text() == "x"


def test_home_is_never_replaced(tmp_path, monkeypatch):
    run = make_run(tmp_path / "home")
    monkeypatch.setenv("HOME", str(run.path))
    refused(lambda: run.create(TrainConfig(), overwrite=True), "home directory")


def test_resume_and_overwrite_together_are_refused(tmp_path):
    run = make_run(tmp_path / "run")
    refused(lambda: run.check_target(overwrite=True, resume=True), "--resume", "--overwrite")


def test_overwrite_happens_only_after_the_new_configuration_and_policy_load(
    tmp_path, tiny_policy_dir, isolated_cache, small_config
):
    """A bad value or a bad model path fails before the old run is touched."""
    out = tmp_path / "run"
    cfg = small_config("grpo", tiny_policy_dir, steps=1, eval_every=0)
    Trainer(cfg, out).train()
    before = snapshot(out)
    bad_values = [dict(temperature=0.0), dict(max_new_tokens=0), dict(prompts_per_step=0), dict(eval_k=0)]
    for bad in bad_values + [dict(steps=0), dict(model=str(tmp_path / "no-such-model"))]:
        refused(lambda b=bad: Trainer(cfg.replace(**b), out, overwrite=True).train())
        assert snapshot(out) == before, bad
    Trainer(cfg.replace(steps=2), out, overwrite=True).train()  # a good one replaces it
    assert RunDir(out).read_metrics()["step"].tolist() == [1, 2]
