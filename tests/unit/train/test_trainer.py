"""The bundled GRPO trainer on a tiny random policy loaded from disk (the arithmetic task).

Covers: every method of the catalogue trains and writes a complete run directory;
micro-batching, mini-batches and PPO epochs (and that gradient accumulation matches the
whole-batch gradient); overwrite protection; configuration errors; non-finite values stop
the run with one clear error and leave earlier checkpoints intact; trace records agree
with an independent recomputation from the saved weights.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

import entropy_lab.trainer.update as update_module
from entropy_lab.errors import EntropyLabError
from entropy_lab.methods import METHODS, resolve_config
from entropy_lab.models import load_policy
from entropy_lab.records import COLUMNS, load_records
from entropy_lab.runs import RunDir
from entropy_lab.tasks.arithmetic import ArithmeticTask
from entropy_lab.trainer import Trainer
from entropy_lab.trainer.resume import TrainerState

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def finite(x) -> bool:
    return bool(np.isfinite(np.asarray(x, dtype=float)).all())


def all_records(run: RunDir) -> pd.DataFrame:
    return pd.concat([load_records(f)[0] for f in run.trace_files()], ignore_index=True)


def state_of(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- every method ------------------------------------------------------------------------


@pytest.fixture(scope="module", params=sorted(METHODS))
def trained(request, tiny_policy_dir, tmp_path_factory, digit_reward, small_config):
    """Two steps of one catalogue method on the tiny policy: (cfg, run, returned metrics), trained once."""
    root = tmp_path_factory.mktemp(f"train-{request.param}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ENTROPY_LAB_CACHE", str(root / "cache"))
        mp.setattr(ArithmeticTask, "reward", digit_reward)
        cfg = small_config(request.param, tiny_policy_dir)
        returned = Trainer(cfg, root / "run").train()
    return cfg, RunDir(root / "run"), returned


def test_run_config_records_the_resolved_config(trained):
    cfg, run, _ = trained
    record = json.loads(run.config_path.read_text())
    assert record["config"] == cfg.to_dict()
    assert record["config"]["method"] == cfg.method
    assert record["seed"] == cfg.seed and "torch" in record["versions"]


def test_metrics_every_step_finite_and_returned(trained):
    _, run, returned = trained
    metrics = run.read_metrics()
    assert len(metrics) == 2 and metrics["step"].tolist() == [1, 2]
    pd.testing.assert_frame_equal(metrics, returned, check_dtype=False)
    for key in ("reward/mean", "entropy/mean", "loss/pg", "loss/total", "grad/norm", "lr"):
        assert key in metrics.columns, key
        assert finite(metrics[key]), key
    assert (metrics["advantage/zero_frac"] < 1).all(), "the dense reward should give non-zero advantages"


def test_evaluations_at_start_and_every_step(trained):
    _, run, _ = trained
    evals = run.read_eval()
    assert evals["step"].tolist() == [0, 1, 2]
    for key in ("eval/accuracy", "eval/pass@1", "eval/pass@2"):
        assert finite(evals[key]) and evals[key].between(0, 1).all(), key
    assert (evals["eval/pass@2"] >= evals["eval/pass@1"] - 1e-12).all()


def test_traces_every_step_hold_the_record_contract(trained):
    cfg, run, _ = trained
    files = run.trace_files()
    assert [f.name for f in files] == ["step_000001.parquet", "step_000002.parquet"]
    for step, f in enumerate(files, start=1):
        df, meta = load_records(f)
        assert set(COLUMNS) <= set(df.columns)
        assert len(df) > 0 and (df["step"] == step).all() and (df["update"] == 0).all()
        assert meta == cfg.to_dict()
        for col in ("delta_entropy", "entropy_before", "entropy_after", "logprob", "omega_paper"):
            assert finite(df[col]), col
        assert (df["delta_entropy"] != 0).any(), "the update changed nothing"
        assert (df["lr"] == cfg.lr).all()


def test_checkpoint_at_the_last_step(trained):
    _, run, _ = trained
    ckpt = run.checkpoint_path(2)
    assert (ckpt / "trainer_state.pt").is_file() and (ckpt / "model" / "config.json").is_file()
    assert sorted(run.checkpoints()) == [2]


@pytest.mark.parametrize("trained", ["grpo"], indirect=True)
def test_trainer_state_keeps_its_checkpoint_layout_and_old_checkpoints_load(trained, tmp_path):
    cfg, run, _ = trained
    state = torch.load(run.checkpoint_path(2) / "trainer_state.pt", weights_only=True)
    # the layout every checkpoint so far was written with
    assert list(state) == ["step", "optimizer", "scheduler", "rng", "config", "controller"]
    assert list(state["rng"])[:5] == ["torch", "numpy", "python", "shuffle", "loss"]
    assert state["step"] == 2 and state["config"] == cfg.to_dict()

    trainer = Trainer(cfg, tmp_path / "probe")
    assert "not set up" in repr(trainer)
    trainer.setup(create_run=False)
    # a checkpoint from before controllers: no "controller" entry
    old = {k: v for k, v in state.items() if k != "controller"}
    assert trainer._apply_state(TrainerState.from_dict(old)) == 2
    assert torch.equal(trainer.streams.shuffle_gen.get_state(), state["rng"]["shuffle"])
    assert torch.equal(trainer.streams.loss_gen.get_state(), state["rng"]["loss"])
    assert trainer.streams.np_rng.bit_generator.state == state["rng"]["numpy"]
    assert trainer.scheduler.state_dict() == state["scheduler"]
    # written back, it is the file's dict again (the controller's empty state filled in)
    again = trainer.trainer_state(2)
    assert list(again) == list(state) and again["controller"] == {} and again["config"] == state["config"]
    text = repr(trainer)
    for part in ("'grpo'", "'arithmetic'", "device=cpu", "step=2/2", str(tmp_path / "probe")):
        assert part in text, (part, text)


@pytest.mark.parametrize("trained", ["steer"], indirect=True)
def test_steer_weights_act_within_their_bounds(trained):
    cfg, run, _ = trained
    records = all_records(run)
    assert (records["intervention_weight"] != 1).any()
    assert records["intervention_weight"].between(cfg.steer_lambda_min - 1e-9, 1 + 1e-9).all()


@pytest.mark.parametrize("trained", ["kl"], indirect=True)
def test_kl_is_logged_and_grows_from_zero(trained):
    _, run, _ = trained
    metrics = run.read_metrics()
    assert "loss/kl" in metrics.columns and finite(metrics["loss/kl"])
    assert metrics["loss/kl"].iloc[1] > 0, "step 2's policy differs from the reference"


def test_kl_uses_a_frozen_reference_model(
    tiny_policy_dir, tmp_path, isolated_cache, dense_reward, small_config
):
    trainer = Trainer(small_config("kl", tiny_policy_dir), tmp_path / "run")
    trainer.train()
    assert trainer.ref_model is not None and trainer.ref_model is not trainer.model
    initial, _ = load_policy(tiny_policy_dir)
    for name, value in initial.state_dict().items():
        assert torch.equal(trainer.ref_model.state_dict()[name], value), name
    assert not all(torch.equal(trainer.model.state_dict()[n], v) for n, v in initial.state_dict().items())


def test_methods_without_kl_load_no_reference(
    tiny_policy_dir, tmp_path, isolated_cache, dense_reward, small_config
):
    trainer = Trainer(small_config("grpo", tiny_policy_dir, steps=1), tmp_path / "run")
    trainer.train()
    assert trainer.ref_model is None
    assert "loss/kl" not in trainer.run.read_metrics().columns


# --- batching ----------------------------------------------------------------------------


def test_micro_and_mini_batches_and_epochs_are_traced(
    tiny_policy_dir, tmp_path, isolated_cache, dense_reward, small_config
):
    cfg = small_config("grpo", tiny_policy_dir, micro_batch_size=4, mini_batches=2, ppo_epochs=2)
    assert cfg.prompts_per_step * cfg.samples_per_prompt == 16
    Trainer(cfg, tmp_path / "run").train()
    run = RunDir(tmp_path / "run")
    assert len(run.read_metrics()) == 2
    for f in run.trace_files():
        df, _ = load_records(f)
        assert sorted(df["update"].unique().tolist()) == [0, 1, 2, 3]
        for _, part in df.groupby("update"):
            # each update sees one mini-batch of 8 rows, indexed within the mini-batch
            assert part["sample"].between(0, 7).all()
            assert finite(part["delta_entropy"]) and (part["delta_entropy"] != 0).any()
    # 4 optimizer updates per step, each counted by the scheduler; lr stays constant without warm-up
    state = torch.load(run.checkpoint_path(2) / "trainer_state.pt", weights_only=False)
    assert state["scheduler"]["last_epoch"] == 8


@pytest.mark.parametrize(
    "method, overrides",
    [
        ("grpo", {}),
        ("grpo", {"loss_agg": "seq-mean-token-mean"}),
        ("dr-grpo", {}),
        ("kl", {}),
        ("entropy-bonus", {"entropy_coef": 0.01}),
        # tokens chosen over the whole update (cov_selection=global), the same with 4 micro-batches;
        # (KL-Cov's on-policy gradient, d|logp - old|/dlogp at 0, is the sign of rounding noise:
        # its selection is tested in test_cov_selection.py)
        ("clip-cov", {"clip_cov_ratio": 0.2, "clip_cov_lb": -1e9, "clip_cov_ub": 1e9}),
    ],
)
def test_gradient_accumulation_matches_whole_batch(
    method, overrides, tiny_policy_dir, tmp_path, isolated_cache, dense_reward, small_config
):
    """micro_batch_size only splits the work: the accumulated gradient is the whole batch's."""
    runs = {}
    for micro in (0, 4):
        cfg = small_config(
            method, tiny_policy_dir, steps=1, eval_every=0, micro_batch_size=micro, **overrides
        )
        out = tmp_path / f"micro{micro}"
        metrics = Trainer(cfg, out).train()
        records, _ = load_records(RunDir(out).trace_path(1))
        runs[micro] = metrics, records
    (m0, r0), (m4, r4) = runs[0], runs[4]
    assert m0["grad/norm"].iloc[0] == pytest.approx(m4["grad/norm"].iloc[0], rel=1e-5)
    key = ["sample", "position"]
    r0, r4 = r0.sort_values(key).reset_index(drop=True), r4.sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(r0[key + ["token_id"]], r4[key + ["token_id"]])
    for col in ("weight", "normalizer", "omega_paper", "omega_logit_grad"):
        np.testing.assert_allclose(r4[col], r0[col], rtol=1e-5, atol=1e-9, err_msg=col)


def test_per_call_cov_selection_differs_with_micro_batches(
    tiny_policy_dir, tmp_path, isolated_cache, dense_reward, small_config
):
    """The reference code's per-call selection picks per micro-batch: other tokens than the whole batch's."""
    weights = {}
    for micro in (0, 4):
        cfg = small_config(
            "clip-cov", tiny_policy_dir, steps=1, eval_every=0, micro_batch_size=micro, clip_cov_ratio=0.2,
            clip_cov_lb=-1e9, clip_cov_ub=1e9, cov_selection="per-call",
        )  # fmt: skip
        Trainer(cfg, tmp_path / f"m{micro}").train()
        records, _ = load_records(RunDir(tmp_path / f"m{micro}").trace_path(1))
        weights[micro] = records.sort_values(["sample", "position"])["weight"].to_numpy()
    assert np.abs(weights[0] - weights[4]).max() > 1e-6


# --- run directory protection ------------------------------------------------------------


def test_refuses_to_overwrite_a_run(tiny_policy_dir, tmp_path, isolated_cache, small_config):
    out = tmp_path / "run"
    cfg = small_config("grpo", tiny_policy_dir, steps=1, eval_every=0, trace_every=0)
    Trainer(cfg, out).train()
    before = (out / "metrics.parquet").read_bytes()
    (out / "marker.txt").write_text("keep me unless overwritten")

    with pytest.raises(EntropyLabError) as err:
        Trainer(cfg, out).train()
    message = str(err.value)
    assert "--overwrite" in message and "\n" not in message
    assert (out / "metrics.parquet").read_bytes() == before and (out / "marker.txt").exists()

    # a file the project did not write is never deleted: --overwrite refuses until it is moved
    with pytest.raises(EntropyLabError, match="marker.txt"):
        Trainer(cfg.replace(steps=2), out, overwrite=True).train()
    assert (out / "metrics.parquet").read_bytes() == before
    (out / "marker.txt").unlink()
    Trainer(cfg.replace(steps=2), out, overwrite=True).train()
    assert RunDir(out).read_metrics()["step"].tolist() == [1, 2]
    assert json.loads((out / "config.json").read_text())["config"]["steps"] == 2


def test_dataset_without_model_is_refused(tmp_path, isolated_cache):
    cfg = resolve_config("grpo", {"dataset": str(tmp_path / "train.parquet"), "device": "cpu"})
    with pytest.raises(EntropyLabError, match="--model"):
        Trainer(cfg, tmp_path / "run").train()
    assert not (tmp_path / "run" / "config.json").exists()
    assert not (isolated_cache / "warmstart").exists(), "no warm start may begin"


def test_unknown_method_lists_valid_names():
    with pytest.raises(EntropyLabError) as err:
        resolve_config("grpo-typo")
    assert "grpo-typo" in str(err.value)
    for name in METHODS:
        assert name in str(err.value)


def test_unknown_config_key_lists_valid_keys():
    with pytest.raises(EntropyLabError) as err:
        resolve_config("grpo", {"learning_rate": 1e-3})
    message = str(err.value)
    assert "learning_rate" in message and "lr" in message and "micro_batch_size" in message


# --- non-finite values -------------------------------------------------------------------


@pytest.mark.parametrize("eval_every", [0, 1])
def test_nan_policy_stops_with_one_clear_error(
    eval_every, tmp_path, isolated_cache, save_policy, small_config
):
    """A policy whose logits are all NaN: the run stops with an EntropyLabError, not a torch crash.

    Fails today: ``model.generate`` raises a RuntimeError ("probability tensor contains
    either inf, nan or element < 0") from the rollout (or from evaluation at step 0).
    """
    policy = save_policy(tmp_path / "nan_policy", poison=True)
    cfg = small_config("grpo", policy, eval_every=eval_every)
    with pytest.raises(EntropyLabError, match="non-finite"):
        Trainer(cfg, tmp_path / "run").train()
    assert RunDir(tmp_path / "run").checkpoints() == {}


def _inject_at(monkeypatch, step: int, inject) -> None:
    """Call ``inject(trainer)`` just before step ``step`` of any Trainer."""
    original = Trainer.train_step

    def train_step(self, s):
        if s == step:
            inject(self)
        return original(self, s)

    monkeypatch.setattr(Trainer, "train_step", train_step)


def _assert_checkpoint_intact(run: RunDir, step: int, expected: dict[str, torch.Tensor]) -> None:
    assert sorted(run.checkpoints()) == [step]
    assert not list(run.checkpoints_dir.glob("*.tmp"))
    model, _ = load_policy(run.checkpoint_path(step) / "model")
    for name, value in model.state_dict().items():
        assert torch.isfinite(value).all(), name
        assert torch.equal(value, expected[name]), name
    state = torch.load(run.checkpoint_path(step) / "trainer_state.pt", weights_only=False)
    assert state["step"] == step


def test_nan_loss_after_a_checkpoint_stops_and_keeps_it(
    monkeypatch, tiny_policy_dir, tmp_path, isolated_cache, dense_reward, small_config
):
    saved = {}
    original_forward = update_module.policy_stats

    def poison_forward(*args, **kwargs):
        stats = original_forward(*args, **kwargs)
        return dataclasses.replace(stats, logprob=stats.logprob * float("nan"))

    def inject(trainer):
        saved.update(state_of(trainer.model))
        monkeypatch.setattr(update_module, "policy_stats", poison_forward)

    _inject_at(monkeypatch, 3, inject)
    out = tmp_path / "run"
    with pytest.raises(EntropyLabError, match="non-finite") as err:
        Trainer(small_config("grpo", tiny_policy_dir, steps=4), out).train()
    assert "step 3" in str(err.value) and "step_000002" in str(err.value)
    run = RunDir(out)
    _assert_checkpoint_intact(run, 2, saved)
    assert run.read_metrics()["step"].tolist() == [1, 2]


def test_nan_gradient_stops_before_the_optimizer_step(
    monkeypatch, tiny_policy_dir, tmp_path, isolated_cache, dense_reward, small_config
):
    saved = {}

    def inject(trainer):
        saved.update(state_of(trainer.model))
        trainer.model.model.norm.weight.register_hook(lambda g: torch.full_like(g, float("nan")))

    _inject_at(monkeypatch, 3, inject)
    out = tmp_path / "run"
    trainer = Trainer(small_config("grpo", tiny_policy_dir, steps=4), out)
    with pytest.raises(EntropyLabError, match="non-finite gradient"):
        trainer.train()
    # the weights in memory were not touched by the failed step
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, saved[name]), name
    _assert_checkpoint_intact(RunDir(out), 2, saved)


# --- traces against an independent recomputation ----------------------------------------


def _naive_entropy(model, input_ids, attention_mask, position_ids, rows, positions) -> np.ndarray:
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    logp = logits.double()[rows, positions - 1].log_softmax(-1)
    return (-(logp.exp() * logp).sum(-1)).numpy(), logp


def test_trace_matches_recomputation_from_saved_weights(
    monkeypatch, tiny_policy_dir, tmp_path, isolated_cache, dense_reward, small_config
):
    captured = {}
    original = Trainer.rollout

    def rollout(self):
        result = original(self)
        captured["rollout"] = result[0]
        return result

    monkeypatch.setattr(Trainer, "rollout", rollout)
    out = tmp_path / "run"
    cfg = small_config("grpo", tiny_policy_dir, steps=1, eval_every=0)
    Trainer(cfg, out).train()
    ro = captured["rollout"]
    df, _ = load_records(RunDir(out).trace_path(1))

    # every response token is traced, once
    assert len(df) == int(ro.response_mask.sum())
    rows, positions = torch.as_tensor(df["sample"].values), torch.as_tensor(df["position"].values)
    assert ro.response_mask[rows, positions].all()
    assert torch.equal(ro.input_ids[rows, positions], torch.as_tensor(df["token_id"].values))

    before, _ = load_policy(tiny_policy_dir)
    after, _ = load_policy(RunDir(out).checkpoint_path(1) / "model")
    args = (ro.input_ids, ro.attention_mask, ro.position_ids, rows, positions)
    h_before, logp = _naive_entropy(before, *args)
    h_after, _ = _naive_entropy(after, *args)
    token_logp = logp.gather(-1, torch.as_tensor(df["token_id"].values)[:, None])[:, 0].numpy()
    np.testing.assert_allclose(df["entropy_before"], h_before, atol=1e-5)
    np.testing.assert_allclose(df["entropy_after"], h_after, atol=1e-5)
    np.testing.assert_allclose(df["delta_entropy"], h_after - h_before, atol=1e-5)
    np.testing.assert_allclose(df["logprob"], token_logp, atol=1e-5)
    # token-mean: the normaliser is the number of response tokens in the batch, the ratio is 1
    assert (df["normalizer"] == len(df)).all()
    np.testing.assert_allclose(df["ratio"], 1.0, atol=1e-6)
    assert math.isclose(float(df["lr"].iloc[0]), cfg.lr)


def test_optimizer_by_name(tmp_path, tiny_policy_dir, dense_reward, small_config):
    """optimizer=sgd takes exactly the step -lr * grad that the estimators model."""
    cfg = small_config("grpo", tiny_policy_dir, optimizer="sgd", lr=0.5, steps=1, grad_clip=0.0)
    trainer = Trainer(cfg, tmp_path / "sgd")
    trainer.setup()
    assert isinstance(trainer.optimizer, torch.optim.SGD)
    p = next(trainer.model.parameters())
    before = p.detach().clone()
    p.grad = torch.ones_like(p)
    trainer.optimizer.step()
    torch.testing.assert_close(p.detach(), before - 0.5)
    with pytest.raises(EntropyLabError, match="'optimizer' got 'adam'; valid: adamw, sgd"):
        resolve_config("grpo", {"optimizer": "adam"})
