"""The bad-input catalogue (``bad_input_cases.py``): every case is one clear line, a non-zero exit,
and nothing written or changed in the workspace."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch
from bad_input_cases import BASE, CLI_CASES, LIBRARY_CASES
from tiny_training import train_cli_run  # the case functions run by name, without fixtures
from typer.testing import CliRunner

from entropy_lab.cli.app import app
from entropy_lab.config import TrainConfig
from entropy_lab.errors import EntropyLabError
from entropy_lab.run_files import LOCK

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

runner = CliRunner()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(model directory, finished 2-step run on it), trained once for the module; copied per case."""
    return train_cli_run(tmp_path_factory.mktemp("bad_inputs"), BASE)


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
    (run_copy("usertrace") / "traces" / "notes.txt").write_text("mine")
    shutil.copytree(model, run_copy("modelckpt") / "checkpoints" / "my-model")
    (run_copy("poster") / "figures").mkdir()
    (ws / "poster" / "figures" / "poster.png").write_bytes(b"a poster")
    paths["ghost"] = str(ws / "ghost" / ".." / "run")
    linked = run_copy("linked")
    shutil.move(linked / "traces", ws / "elsewhere")
    (linked / "traces").symlink_to(ws / "elsewhere", target_is_directory=True)
    lock = {"pid": os.getpid(), "host": socket.gethostname(), "started": "2026-01-01T00:00:00+00:00"}
    (run_copy("locked") / LOCK).write_text(json.dumps({**lock, "token": "another process's"}))
    (ws / "userout").mkdir()
    (ws / "userout" / "report.md").write_text("my notes")
    paths["userout"] = str(ws / "userout")
    untrusted_run_files(run_copy)

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


def untrusted_run_files(run_copy) -> None:
    """The runs whose files were damaged or crafted: {strtrace}, {badprob}, ... (bad_input_cases.py)."""

    def edit_trace(name, edit):
        f = run_copy(name) / "traces" / "step_000001.parquet"
        df = pd.read_parquet(f)
        edit(df)
        df.to_parquet(f)

    edit_trace("strtrace", lambda df: df.__setitem__("delta_entropy", df["delta_entropy"].astype(str)))
    edit_trace("badprob", lambda df: df.__setitem__("prob", df["prob"].where(df.index > 0, 1.5)))
    edit_trace("stepmix", lambda df: df.__setitem__("step", 7))

    def edit_config(name, edit):
        f = run_copy(name) / "config.json"
        record = json.loads(f.read_text())
        f.write_text(edit(record))

    edit_config(
        "deepcfg", lambda r: json.dumps({**r, "warm_start": "@"}).replace('"@"', "[" * 5000 + "]" * 5000)
    )
    edit_config("unkcfg", lambda r: json.dumps({**r, "config": {**r["config"], "lrr": 1.0}}))
    edit_config("hugecfg", lambda r: json.dumps({**r, "notes": "x" * 5_000_000}))
    metrics = run_copy("strmetrics") / "metrics.parquet"
    pd.read_parquet(metrics).astype({"reward/mean": str}).to_parquet(metrics)
    metrics = run_copy("dupsteps") / "metrics.parquet"
    pd.read_parquet(metrics).assign(step=1).to_parquet(metrics)

    def edit_manifest(name, edit):
        f = run_copy(name) / "checkpoints" / "step_000002" / "checkpoint.json"
        manifest = json.loads(f.read_text())
        edit(manifest["files"])
        f.write_text(json.dumps(manifest))

    edit_manifest("escape", lambda files: files.__setitem__("../../outside", "0" * 64))
    edit_manifest("absolute", lambda files: files.__setitem__("/etc/passwd", "0" * 64))
    (run_copy("unlisted") / "checkpoints" / "step_000002" / "model" / "extra.bin").write_bytes(b"\0")
    ckpt = run_copy("badweights") / "checkpoints" / "step_000002"
    (ckpt / "checkpoint.json").unlink()  # a checkpoint from before manifests: loaded as it is
    weights = ckpt / "model" / "model.safetensors"
    weights.write_bytes(b"\xff" * 8 + weights.read_bytes()[8:])


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


def load_records_with_bad_metadata(paths):
    import pyarrow.parquet as pq

    from entropy_lab.records import METADATA_KEY, load_records

    path = Path(paths["run"]) / "traces" / "step_000001.parquet"
    table = pq.read_table(path)
    meta = {**(table.schema.metadata or {}), METADATA_KEY: b"__import__('os').system('true')"}
    pq.write_table(table.replace_schema_metadata(meta), path)
    load_records(path)


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


# --- the TRL integration (skipped without TRL) -----------------------------------------------------


def _trl_settings():
    pytest.importorskip("trl")
    from entropy_lab.integrations.trl.methods import TrlSettings

    return TrlSettings(
        loss_type="dapo", epsilon_low=0.2, epsilon_high=0.2, delta=None, beta=0.0, max_completion_length=6,
        temperature=1.0, seed=0, learning_rate=1e-3, num_generations=4,
    )  # fmt: skip


def trl_overwrite_run_on_a_model(paths):
    pytest.importorskip("trl")
    from entropy_lab.integrations.trl.run import TrlRunWriter

    TrlRunWriter(Path(paths["model"]), TrainConfig(), trl_args={}, overwrite=True, is_main=True).start(False)


def trl_run_in_a_foreign_dir(paths):
    pytest.importorskip("trl")
    from entropy_lab.integrations.trl.run import TrlRunWriter

    TrlRunWriter(Path(paths["foreign"]), TrainConfig(), trl_args={}, overwrite=False, is_main=True).start(
        False
    )


def trl_override_of_a_grpo_config_field(paths):
    from entropy_lab.integrations.trl.methods import resolve_trl_method

    resolve_trl_method("steer", {"lr": 0.1}, _trl_settings())


def trl_overrides_not_a_mapping(paths):
    from entropy_lab.integrations.trl.methods import resolve_trl_method

    resolve_trl_method("steer", ["steer_lambda_min=0.7"], _trl_settings())


def trl_trace_every_as_text(paths):
    pytest.importorskip("trl")
    from entropy_lab.integrations.trl.trainer import check_trace_arguments

    check_trace_arguments("5", None)


def trl_controller_method(paths):
    from entropy_lab.integrations.trl.methods import resolve_trl_method

    resolve_trl_method("adaptive-entropy", None, _trl_settings())


def load_records_with_a_string_column(paths):
    from entropy_lab.records import load_records

    load_records(Path(paths["strtrace"]) / "traces" / "step_000001.parquet")


def load_records_without_rows(paths):
    from entropy_lab.records import load_records

    path = Path(paths["run"]) / "traces" / "step_000001.parquet"
    pd.read_parquet(path).iloc[:0].to_parquet(path)
    load_records(path)


def parse_deeply_nested_json(paths):
    from entropy_lab.untrusted import parse_json

    parse_json("[" * 100_000 + "]" * 100_000, "a file", expect=list)


def check_safetensors_with_offsets_outside(paths):
    import struct

    from entropy_lab.untrusted import check_safetensors

    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    path = Path(paths["new"] + ".safetensors")
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)  # 8 of the 16 bytes it claims
    check_safetensors(path)


def read_manifest_with_an_unknown_entry(paths):
    from entropy_lab.checkpoints import read_manifest

    ckpt = Path(paths["run"]) / "checkpoints" / "step_000002"
    manifest = json.loads((ckpt / "checkpoint.json").read_text())
    (ckpt / "checkpoint.json").write_text(json.dumps({**manifest, "run": "__import__('os')"}))
    read_manifest(ckpt)


def read_manifest_of_another_step(paths):
    from entropy_lab.checkpoints import read_manifest

    ckpt = Path(paths["run"]) / "checkpoints" / "step_000002"
    manifest = json.loads((ckpt / "checkpoint.json").read_text())
    (ckpt / "checkpoint.json").write_text(json.dumps({**manifest, "step": 5}))
    read_manifest(ckpt)


def train_diverging(paths, **overrides):
    """Two steps on the tiny model whose first update diverges; the run goes to {run}/../diverged."""
    from entropy_lab.trainer import Trainer

    cfg = TrainConfig(
        task="arithmetic", model=paths["model"], steps=2, prompts_per_step=2, samples_per_prompt=2,
        max_new_tokens=3, eval_every=0, checkpoint_every=0, **overrides,
    )  # fmt: skip
    Trainer(cfg, Path(paths["run"]).parent / "diverged").train()


def train_with_absurd_weight_decay(paths):
    # AdamW multiplies theta by 1 - lr * weight_decay = -1e39: every parameter becomes infinite
    train_diverging(paths, lr=10.0, weight_decay=1e38, trace_every=1)


def train_with_weight_decay_overflowing_logits(paths):
    # theta * -1e20 stays finite in fp32, but the post-update logits overflow (theta * 1e31 would not:
    # RMSNorm's squares overflow first and its output is 0, a finite, degenerate policy)
    train_diverging(paths, lr=10.0, weight_decay=1e19, trace_every=1)


# --- the tracer ---------------------------------------------------------------------------------


def tracer_batch(seed: int = 0):
    """(model, input_ids (2, 6), response mask (2, 6), advantages (2,)) of a tiny causal LM."""
    from tiny_lm import make_tiny_lm

    torch.manual_seed(seed)
    ids = torch.randint(0, 64, (2, 6))
    resp = torch.zeros(2, 6)
    resp[:, 3:] = 1
    return make_tiny_lm(seed=seed), ids, resp, torch.tensor([1.0, -1.0])


def traced_update(tracer, model, ids, resp, adv, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with tracer.step(ids, None, resp, advantages=adv, optimizer=opt, **kw) as step:
        logits = model(input_ids=ids).logits  # (B, T, V)
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]  # (B, T-1)
        (-(lp * resp[:, 1:] * adv[:, None]).sum()).backward()
        opt.step()
    return step


def tracer_with_nan_advantage(paths):
    from entropy_lab.trace import EntropyTracer

    model, ids, resp, _ = tracer_batch()
    adv = torch.tensor([[0.0] * 6, [0.0, 0.0, 0.0, float("nan"), 0.0, 0.0]])  # (B, T)
    traced_update(EntropyTracer(model), model, ids, resp, adv)


def tracer_with_inf_old_logprob(paths):
    from entropy_lab.trace import EntropyTracer

    model, ids, resp, adv = tracer_batch()
    old = torch.zeros(2, 6)
    old[0, 4] = float("-inf")
    traced_update(EntropyTracer(model), model, ids, resp, adv, old_logprobs=old)


class HiddenStatesOnly(torch.nn.Module):
    """A causal LM wrapper whose forward returns a dict without logits."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def get_output_embeddings(self):
        return self.lm.get_output_embeddings()

    def forward(self, input_ids, **kw):
        return {"hidden_states": self.lm.model(input_ids=input_ids).last_hidden_state}


def tracer_on_a_model_without_logits(paths):
    from entropy_lab.trace import EntropyTracer

    lm, ids, resp, adv = tracer_batch()
    model = HiddenStatesOnly(lm)
    with EntropyTracer(model).step(ids, None, resp, advantages=adv):
        model(input_ids=ids)


def tracer_step_context_reused(paths):
    from entropy_lab.trace import EntropyTracer

    model, ids, resp, adv = tracer_batch()
    tracer = EntropyTracer(model)
    ctx = tracer.step(ids, None, resp, advantages=adv)
    with ctx:
        model(input_ids=ids)
    with ctx:
        pass


def tracer_step_nested_on_one_tracer(paths):
    from entropy_lab.trace import EntropyTracer

    model, ids, resp, adv = tracer_batch()
    tracer = EntropyTracer(model)
    with tracer.step(ids, None, resp, advantages=adv):
        with tracer.step(ids, None, resp, advantages=adv):
            pass


def tracer_with_zero_max_positions(paths):
    from entropy_lab.trace import EntropyTracer

    EntropyTracer(tracer_batch()[0], max_positions=0)


def tracer_with_negative_max_positions(paths):
    from entropy_lab.trace import EntropyTracer

    EntropyTracer(tracer_batch()[0], max_positions=-3)


def tracer_with_advantages_of_wrong_shape(paths):
    from entropy_lab.trace import EntropyTracer

    model, ids, resp, _ = tracer_batch()
    traced_update(EntropyTracer(model), model, ids, resp, torch.ones(3))


def tracer_with_response_mask_of_wrong_shape(paths):
    from entropy_lab.trace import EntropyTracer

    model, ids, resp, adv = tracer_batch()
    traced_update(EntropyTracer(model), model, ids, resp[:, :-1], adv)


def tracer_with_all_zero_response_mask(paths):
    from entropy_lab.trace import EntropyTracer

    model, ids, resp, adv = tracer_batch()
    traced_update(EntropyTracer(model), model, ids, torch.zeros_like(resp), adv)


def test_hooks_are_gone_after_every_refused_tracer_call():
    from torch.optim.optimizer import _global_optimizer_pre_hooks

    from entropy_lab.trace import EntropyTracer

    model, ids, resp, adv = tracer_batch()
    base = len(model._forward_hooks), len(_global_optimizer_pre_hooks)
    for fn in (tracer_step_context_reused, tracer_step_nested_on_one_tracer):
        with pytest.raises(EntropyLabError):
            fn({})
    lm = HiddenStatesOnly(model)
    with pytest.raises(EntropyLabError):
        with EntropyTracer(lm).step(ids, None, resp, advantages=adv):
            lm(input_ids=ids)
    assert (len(model._forward_hooks), len(_global_optimizer_pre_hooks)) == base
    assert len(lm._forward_hooks) == 0
    tracer = EntropyTracer(model)  # a tracer that refused a nested step still traces the next one
    with pytest.raises(EntropyLabError):
        with tracer.step(ids, None, resp, advantages=adv):
            with tracer.step(ids, None, resp, advantages=adv):
                pass
    assert len(traced_update(tracer, model, ids, resp, adv).records) == int(resp.sum())


def test_a_forward_on_another_batch_warns_that_logit_grad_is_missing():
    from entropy_lab.trace import EntropyTracer

    model, ids, resp, adv = tracer_batch()
    other = (ids + 1) % 64  # not the batch given to step()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match="no gradient reached 6 of 6 traced tokens"):
        with EntropyTracer(model).step(ids, None, resp, advantages=adv, optimizer=opt) as step:
            model(input_ids=other).logits.sum().backward()
            opt.step()
    assert step.records["omega_logit_grad"].isna().all()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the matching forward raises no such warning
        good = traced_update(EntropyTracer(model), model, ids, resp, adv)
    assert good.records["omega_logit_grad"].notna().all()


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
