"""Traced TRL runs: the annotations are what TRL's loss used, the logged entropy is the tracer's, and the
run directory is read by the project's reports.

The annotation check is exact and independent of how the annotations were derived: for a loss
without KL or entropy terms, d loss / d log pi_a of a token is -w = -I_clip r A lambda / N, so the
``weight`` column must equal minus the gradient that autograd sends through TRL's own
``per_token_logps`` (captured with a tensor hook) during the traced step.
"""

from __future__ import annotations

import warnings

import pandas as pd
import pytest
import torch

pytest.importorskip("trl")

from trl_common import count_reward, dataset, grpo_args, tiny_model_dir  # noqa: E402

from entropy_lab.integrations.trl import TracedGRPOTrainer  # noqa: E402
from entropy_lab.records import load_records  # noqa: E402
from entropy_lab.runs import RunDir  # noqa: E402


class GradCapture(TracedGRPOTrainer):
    """Records -d loss / d log pi_a of every traced token, keyed like the trace (step, sample, position)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.neg_grads: dict[tuple[int, int, int], float] = {}
        self.logps: dict[tuple[int, int, int], float] = {}  # TRL's fused-head log-probs, same keys
        self.tracer_rows: dict[int, int] = {}  # rows the tracer's own forwards ran over, per step
        forward = self._traced_model.forward

        def counted(input_ids, *a, **kw):
            step = self.state.global_step + 1  # the optimizer step under way
            self.tracer_rows[step] = self.tracer_rows.get(step, 0) + input_ids.shape[0]
            return forward(input_ids, *a, **kw)

        self._traced_model.forward = counted

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *a, **kw):
        out = super()._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, logits_to_keep, *a, **kw
        )
        window = self._window
        if window is not None and torch.is_grad_enabled() and out[0].requires_grad:
            m, step = window.micro, window.step
            start, plen = window.offsets[m], window.prompt_len[m]

            for i in range(out[0].shape[0]):
                for j in range(out[0].shape[1]):
                    self.logps[(step, start + i, plen + j)] = float(out[0][i, j].detach())

            def hook(grad):
                for i in range(grad.shape[0]):
                    for j in range(grad.shape[1]):
                        self.neg_grads[(step, start + i, plen + j)] = -float(grad[i, j])

            out[0].register_hook(hook)
        return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny"))


def _train(model_dir, out, method=None, trace_every=1, cls=None, **settings):
    kw = dict(gradient_accumulation_steps=2, num_iterations=2, max_steps=2) | settings
    trainer = (cls or GradCapture)(
        model=str(model_dir), reward_funcs=count_reward, args=grpo_args(out, **kw), train_dataset=dataset(),
        method=method, trace_every=trace_every,
    )  # fmt: skip
    trainer.train()
    return trainer


LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo"]


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_weight_is_trls_gradient_per_token(model_dir, tmp_path, loss_type):
    """Every loss_type, gradient accumulation 2, num_iterations 2 (step 2 has ratios != 1 and clipping)."""
    extra = {"epsilon_high": 5.0} if loss_type == "cispo" else {}
    if loss_type in ("grpo", "dapo"):
        extra["delta"] = 1.5  # two-sided clipping on the negative side
    trainer = _train(model_dir, tmp_path, loss_type=loss_type, learning_rate=0.3, **extra)
    _check_weights(trainer, tmp_path)


@pytest.mark.parametrize(
    "method", ["steer", "clip-cov", "fork-tokens", "w-reinforce", "entropy-adv", "dual-clip"]
)
def test_weight_is_the_gradient_for_catalogue_methods(model_dir, tmp_path, method):
    trainer = _train(model_dir, tmp_path, method=method, loss_type="dapo", learning_rate=0.3)
    _check_weights(trainer, tmp_path)


def _check_weights(trainer, out, off_policy: bool = True):
    run = RunDir(out)
    files = run.trace_files()
    assert [f.name for f in files] == ["step_000001.parquet", "step_000002.parquet"]
    for f in files:
        df, meta = load_records(f)
        step = int(df["step"].iloc[0])
        keys = zip(df["sample"].astype(int), df["position"].astype(int), strict=True)
        expected = pd.Series([trainer.neg_grads[(step, s, p)] for s, p in keys], index=df.index)
        scale = float(expected.abs().max())
        assert scale > 0
        diff = float((df["weight"] - expected).abs().max())
        print(f"{f.name}: max |weight + dloss/dlogp| {diff:.2e} (max |weight| {scale:.2e})")
        assert diff <= 1e-5 * scale, (f.name, diff, scale)
        # The pre-update side came from TRL's own forward: its log-probs, and logit-grad, which for
        # a weighted log-prob loss (no KL, no entropy term) equals the softmax estimator.
        keys = list(zip(df["sample"].astype(int), df["position"].astype(int), strict=True))
        trl_logps = pd.Series([trainer.logps[(step, s, p)] for s, p in keys], index=df.index)
        assert float((df["logprob"] - trl_logps).abs().max()) <= 1e-5
        lg, sm = df["omega_logit_grad"], df["omega_softmax"]
        assert lg.notna().all() and float(sm.abs().max()) > 0
        assert float((lg - sm).abs().max()) <= 1e-5 * float(sm.abs().max()), f.name
        # One no-grad forward of the tracer per traced step: the post-update pass over the step's rows.
        assert trainer.tracer_rows[step] == df["sample"].nunique(), (step, trainer.tracer_rows)
    if off_policy:
        last, _ = load_records(files[-1])
        assert (last["ratio"] - 1).abs().max() > 1e-3  # the second update is off-policy: ratios moved


def test_without_the_fused_head_tap_the_tracer_forwards_twice_and_says_why_once(model_dir, tmp_path):
    """The fallback (a head the tap cannot recompute): the tracer's own pre-update forward, NaN logit-grad."""

    class TapOff(GradCapture):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self._head.off = "the reason this test gives"

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = _train(model_dir, tmp_path, cls=TapOff, learning_rate=0.3)
    messages = [str(w.message) for w in caught]
    assert sum("the reason this test gives" in m for m in messages) == 1
    assert not any("no gradient reached" in m for m in messages)  # the reason was given; no per-step blame
    for f in RunDir(tmp_path).trace_files():
        df, _ = load_records(f)
        step = int(df["step"].iloc[0])
        assert df["omega_logit_grad"].isna().all()
        assert trainer.tracer_rows[step] == 2 * df["sample"].nunique()  # pre- and post-update forwards
        keys = zip(df["sample"].astype(int), df["position"].astype(int), strict=True)
        trl_logps = pd.Series([trainer.logps[(step, s, p)] for s, p in keys], index=df.index)
        assert float((df["logprob"] - trl_logps).abs().max()) <= 1e-5


def test_logged_entropy_is_the_tracers_entropy_before(model_dir, tmp_path):
    """Without accumulation TRL logs the token mean of its fused-head entropy; the tracer measures the same."""
    trainer = _train(
        model_dir, tmp_path, gradient_accumulation_steps=1, num_iterations=1, max_steps=3, temperature=0.8
    )
    metrics = pd.read_parquet(tmp_path / "metrics.parquet")
    assert list(metrics["step"]) == [1, 2, 3]
    for step, logged in zip(metrics["step"], metrics["entropy/mean"], strict=True):
        df, _ = load_records(RunDir(tmp_path).trace_path(int(step)))
        measured = float(df["entropy_before"].mean())
        assert abs(measured - logged) <= 1e-5 * logged, (step, measured, logged)
    assert metrics["reward/mean"].notna().all()
    assert trainer.state.global_step == 3


def test_run_directory_layout(model_dir, tmp_path):
    _train(model_dir, tmp_path / "run", method="steer", trace_every=2, max_steps=4)
    run = RunDir(tmp_path / "run")
    assert run.read_config()["config"]["method"] == "steer"
    assert run.read_config()["trl"]["args"]["loss_type"] == "dapo"
    assert [f.name for f in run.trace_files()] == ["step_000002.parquet", "step_000004.parquet"]
    df, meta = load_records(run.trace_files()[0])
    assert (df["rank"] == 0).all() and meta["engine"] == "trl"
    assert (df["intervention_weight"] < 1).any()  # STEER damped some tokens
    metrics = run.read_metrics()
    assert list(metrics["step"]) == [1, 2, 3, 4] and {"entropy/mean", "reward/mean"} <= set(metrics.columns)


def test_no_warning_blames_the_loop_for_the_missing_logit_gradient(model_dir, tmp_path, recwarn):
    """No per-step warning about a missing logits gradient: TRL traces carry omega_logit_grad."""
    _train(model_dir, tmp_path / "run", trace_every=1, max_steps=1)
    messages = [str(w.message) for w in recwarn]
    assert not [m for m in messages if "no gradient reached" in m], messages
    df, _ = load_records(RunDir(tmp_path / "run").trace_files()[0])
    assert df["omega_logit_grad"].notna().all()  # read from TRL's own training forward (fused)


@pytest.mark.slow  # about 60 s: the CLI builds every figure
def test_cli_reads_a_trl_run_like_a_bundled_run(model_dir, tmp_path):
    from typer.testing import CliRunner

    from entropy_lab.cli.app import app

    _train(model_dir, tmp_path / "run", method="steer", trace_every=2, max_steps=4)
    runner = CliRunner()
    result = runner.invoke(app, ["trace", "--run", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "tightness" in result.output
    result = runner.invoke(app, ["figures", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "cmp")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cmp" / "report.md").is_file()


def test_existing_run_is_not_overwritten(model_dir, tmp_path):
    from entropy_lab.errors import EntropyLabError

    _train(model_dir, tmp_path, max_steps=1)
    with pytest.raises(EntropyLabError, match="already holds a run; pass resume_from_checkpoint"):
        _train(model_dir, tmp_path, max_steps=1)


def test_step_spanning_two_generations(model_dir, tmp_path):
    """steps_per_generation < gradient accumulation: one optimizer step holds two generation batches,
    each padded to its own width, generated one after the other inside the step."""
    trainer = _train(
        model_dir, tmp_path, gradient_accumulation_steps=2, steps_per_generation=1, num_iterations=1,
        learning_rate=0.3,
    )  # fmt: skip
    _check_weights(trainer, tmp_path, off_policy=False)


def test_tracer_hooks_are_removed_when_a_traced_step_fails(model_dir, tmp_path):
    from torch.optim.optimizer import _global_optimizer_pre_hooks

    class Failing(GradCapture):
        def _compute_loss(self, model, inputs):
            if self.state.global_step == 1:
                raise RuntimeError("boom")
            return super()._compute_loss(model, inputs)

    before = len(_global_optimizer_pre_hooks)
    with pytest.raises(RuntimeError, match="boom"):
        _train(model_dir, tmp_path, cls=Failing, max_steps=3)
    assert len(_global_optimizer_pre_hooks) == before


def test_core_import_does_not_import_trl():
    import subprocess
    import sys

    code = "import sys, entropy_lab, entropy_lab.integrations, entropy_lab.trace; print('trl' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
    )
