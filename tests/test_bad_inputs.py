"""The bad-input catalogue (``bad_input_cases.py``): every case is one clear line, a non-zero exit,
and nothing written or changed in the workspace."""

from __future__ import annotations

import json
import os
import shlex
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from bad_input_cases import BASE, CLI_CASES, LIBRARY_CASES
from typer.testing import CliRunner

from entropy_lab.cli.app import app
from entropy_lab.config import TrainConfig
from entropy_lab.errors import EntropyLabError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

runner = CliRunner()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digit_reward, save_policy):
    """(model directory, finished 2-step run on it), trained once for the module; copied per case."""
    from entropy_lab.tasks.arithmetic import ArithmeticTask

    root = tmp_path_factory.mktemp("bad_inputs")
    model = save_policy(root / "model")
    mp = pytest.MonkeyPatch()
    mp.setattr(ArithmeticTask, "reward", digit_reward)
    args = shlex.split(BASE.format(model=model)) + ["--steps", "2", "--out", str(root / "run")]
    result = runner.invoke(app, ["train", *args])
    mp.undo()
    assert result.exit_code == 0, result.output
    return model, root / "run"


def snapshot(*roots: Path) -> dict[str, bytes]:
    return {
        str(p): p.read_bytes() for root in roots for p in sorted(Path(root).rglob("*")) if p.is_file()
    } | {str(p) + "/": b"" for root in roots for p in Path(root).rglob("*") if p.is_dir()}


@pytest.fixture
def workspace(tmp_path, trained, monkeypatch):
    model, run = trained
    ws = tmp_path / "ws"
    ws.mkdir()
    paths = {"model": str(model), "new": str(ws / "new")}

    def run_copy(name: str) -> Path:
        target = ws / name
        shutil.copytree(run, target)
        paths[name] = str(target)
        return target

    run_copy("run")
    paths["ckpt"] = str(ws / "run" / "checkpoints" / "step_000002")
    (ws / "file.txt").write_text("a text file")
    paths["file"] = str(ws / "file.txt")
    (ws / "empty").mkdir()
    paths["empty"] = str(ws / "empty")
    (ws / "foreign").mkdir()
    (ws / "foreign" / "notes.txt").write_text("someone else's")
    paths["foreign"] = str(ws / "foreign")
    (ws / "ro").mkdir()
    paths["ro"] = str(ws / "ro")
    (ws / "data.parquet").write_text("not parquet")
    paths["junk"] = str(ws / "data.parquet")
    (run_copy("noisy") / "notes.txt").write_text("mine")
    cfg_path = run_copy("badcfg") / "config.json"
    record = json.loads(cfg_path.read_text())
    record["config"]["steps"] = "two"
    cfg_path.write_text(json.dumps(record))
    (run_copy("badjson") / "config.json").write_text("{not json")
    (run_copy("badmetrics") / "metrics.parquet").write_bytes(b"PAR1 truncated")
    trace = run_copy("badtrace") / "traces" / "step_000001.parquet"
    trace.write_bytes(trace.read_bytes()[:200])
    for f in (run_copy("nocol") / "traces").glob("*.parquet"):
        pd.read_parquet(f).drop(columns=["omega_softmax"]).to_parquet(f)
    plant_payload(run_copy("evil") / "checkpoints" / "step_000002", ws / "pwned")

    # {ro} is read-only: chmod does it for a user; root ignores modes, so os.access answers as for a user
    os.chmod(ws / "ro", 0o555)
    real_access = os.access
    monkeypatch.setattr(
        os,
        "access",
        lambda p, mode, **kw: (
            False
            if (mode & os.W_OK and Path(p).resolve().is_relative_to((ws / "ro").resolve()))
            else real_access(p, mode, **kw)
        ),
    )
    yield ws, paths
    os.chmod(ws / "ro", 0o755)


class Payload:
    """Unpickling this runs ``exec``: what a crafted trainer_state.pt in a shared run would carry."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (exec, (f"open({str(self.sentinel)!r}, 'w').write('pwned')",))


def plant_payload(ckpt: Path, sentinel: Path) -> None:
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    state["rng"]["python"] = Payload(sentinel)
    torch.save(state, ckpt / "trainer_state.pt")
    (ckpt / "checkpoint.json").unlink()


def assert_one_error_line(result, fragments) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])


@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_case(case, workspace, monkeypatch):
    ws, paths = workspace
    _, line, fragments, *cwd = case
    argv = shlex.split(line.replace("{base}", BASE).format(**paths))
    if cwd:
        monkeypatch.chdir(cwd[0].format(**paths))
    model = Path(paths["model"])
    before = snapshot(ws, model)
    result = runner.invoke(app, argv)
    assert_one_error_line(result, fragments)
    assert snapshot(ws, model) == before, "the failed command wrote or changed files"
    assert not (ws / "pwned").exists()


# --- library API -------------------------------------------------------------------------------


def loss_with_nan_advantage(paths):
    from entropy_lab.objectives import LossInputs, compute_loss

    logprob = torch.full((2, 3), -1.0, requires_grad=True)  # (B, T)
    adv = torch.tensor([[1.0, 1.0, 1.0], [float("nan"), float("nan"), 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    compute_loss(LossInputs(logprob, logprob.detach(), adv, mask), TrainConfig())


def trainer_with_zero_steps(paths):
    from entropy_lab.trainer import Trainer

    Trainer(TrainConfig(steps=0, model=paths["model"]), paths["new"])


def config_from_mistyped_dict(paths):
    TrainConfig.from_dict({"lr": "fast"})


def config_from_dict_with_unknown_key(paths):
    TrainConfig.from_dict({"lrr": 1.0})


def load_records_of_a_text_file(paths):
    from entropy_lab.records import load_records

    load_records(paths["junk"])


def load_malicious_trainer_state(paths):
    from entropy_lab.checkpoints import load_trainer_state

    load_trainer_state(Path(paths["evil"]) / "checkpoints" / "step_000002")


def load_truncated_trainer_state(paths):
    from entropy_lab.checkpoints import load_trainer_state

    state = Path(paths["run"]) / "checkpoints" / "step_000002" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:64])
    load_trainer_state(state.parent)


def create_run_on_a_model(paths):
    from entropy_lab.runs import RunDir

    RunDir(paths["model"]).create(TrainConfig(), overwrite=True)


@pytest.mark.parametrize("case", LIBRARY_CASES, ids=[c[0] for c in LIBRARY_CASES])
def test_library_case(case, workspace):
    ws, paths = workspace
    _, name, fragments = case
    model = Path(paths["model"])
    before = snapshot(model)
    with pytest.raises(EntropyLabError) as err:
        globals()[name](paths)
    message = str(err.value)
    assert "\n" not in message
    for f in fragments:
        assert f in message, (f, message)
    assert snapshot(model) == before and not (ws / "new").exists() and not (ws / "pwned").exists()


def test_the_catalogue_is_large_and_unique():
    ids = [c[0] for c in CLI_CASES + LIBRARY_CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 30
