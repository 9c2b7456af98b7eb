"""A rollout batch used once (one epoch, one mini-batch, one micro-batch) needs no separate forward.

The trainer then takes the rollout policy's log-probs, entropy and collision from the
training forward itself (old = current, detached; ratio 1). These tests hold that path to
the one with the separate no-grad forward (``single_use`` forced off): the same metrics and
trace records to fp32 rounding, for methods that read every kind of rollout statistic.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import entropy_lab.trainer.loop as trainer_module
from entropy_lab.records import load_records
from entropy_lab.runs import RunDir
from entropy_lab.trainer import Trainer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# Methods whose loss or batch preparation reads the rollout statistics in different ways:
# plain ratio (grpo), old entropy and the per-batch context (steer), batch covariance and a
# random choice (clip-cov), current entropy with grad (entropy-bonus), sequence log-probs in the
# advantage (unlikeliness), a reference model (kl). KL-Cov is the exception, tested below.
CASES = {
    "grpo": {},
    "steer": {},
    "clip-cov": {"clip_cov_ratio": 0.2},
    "entropy-bonus": {},
    "unlikeliness": {"unlikeliness_beta": 0.5},
    "kl": {},
}


def run(cfg, out, monkeypatch, separate: bool):
    """Train ``cfg`` into ``out``; ``separate`` forces the extra no-grad forward. Returns
    (metrics, records, number of policy forwards made by response_stats)."""
    calls = []
    real = trainer_module.response_stats

    def counting(model, rollout, micro_batch_size=0):
        calls.append(model)
        return real(model, rollout, micro_batch_size)

    with monkeypatch.context() as m:
        m.setattr(trainer_module, "response_stats", counting)
        if separate:
            m.setattr(Trainer, "single_use", lambda self: False)
        trainer = Trainer(cfg, out)
        metrics = trainer.train()
    policy_calls = sum(c is trainer.model for c in calls)
    records = pd.concat([load_records(f)[0] for f in RunDir(out).trace_files()], ignore_index=True)
    return metrics, records, policy_calls


@pytest.mark.parametrize("method", sorted(CASES))
def test_dropped_forward_gives_the_same_metrics_and_records(
    method, tiny_policy_dir, tmp_path, isolated_cache, dense_reward, monkeypatch, small_config
):
    cfg = small_config(method, tiny_policy_dir, steps=2, eval_every=0, checkpoint_every=0, **CASES[method])
    m_once, r_once, calls_once = run(cfg, tmp_path / "once", monkeypatch, separate=False)
    m_sep, r_sep, calls_sep = run(cfg, tmp_path / "separate", monkeypatch, separate=True)

    assert calls_once == 0, "a batch used once must not get a separate forward of the policy"
    assert calls_sep == cfg.steps
    assert list(m_once.columns) == list(m_sep.columns)
    numeric = [c for c in m_once.columns if c != "time/step_s"]
    np.testing.assert_allclose(m_once[numeric], m_sep[numeric], rtol=1e-5, atol=1e-7)

    assert len(r_once) == len(r_sep) > 0
    pd.testing.assert_frame_equal(
        r_once[["step", "sample", "position", "token_id"]], r_sep[["step", "sample", "position", "token_id"]]
    )
    # old log-prob = the training forward's, detached: ratio exactly 1 on this path
    assert (r_once["ratio"] == 1.0).all()
    # fp32 rounding: an entropy near 2 nats is resolved to ~2.4e-7, so differences of two of them
    # (delta_entropy) may differ by a few of those steps.
    for col in r_once.columns:
        if r_once[col].dtype.kind == "f":
            np.testing.assert_allclose(r_once[col], r_sep[col], rtol=1e-5, atol=1e-6, err_msg=col)


@pytest.mark.parametrize(
    "overrides,expected",
    [
        ({}, True),
        ({"micro_batch_size": 16}, True),  # 4 prompts x 4 samples: one micro-batch
        ({"micro_batch_size": 8}, False),
        ({"mini_batches": 2}, False),
        ({"ppo_epochs": 2}, False),
    ],
)
def test_single_use_only_when_the_batch_feeds_one_forward(
    overrides, expected, tiny_policy_dir, tmp_path, small_config
):
    cfg = small_config("grpo", tiny_policy_dir, **overrides)
    assert Trainer(cfg, tmp_path / "run").single_use() is expected


def test_kl_cov_penalty_is_exactly_zero_on_a_batch_used_once(
    tiny_policy_dir, tmp_path, isolated_cache, dense_reward, small_config
):
    """KL-Cov's |logp - logp_old| is 0 with old = current: its (sub)gradient is 0, so the update is
    the unpenalised one. (With a separate forward the difference was rounding noise, and the
    penalty's gradient took the sign of that noise.)"""
    base = dict(steps=2, eval_every=0, checkpoint_every=0, trace_every=0, kl_cov_ratio=0.2)
    m_pen = Trainer(small_config("kl-cov", tiny_policy_dir, **base), tmp_path / "pen").train()
    m_off = Trainer(
        small_config("kl-cov", tiny_policy_dir, kl_cov_coef=0.0, **base), tmp_path / "off"
    ).train()
    assert (m_pen["kl_cov/frac_penalised"] > 0).all()
    numeric = [c for c in m_pen.columns if c != "time/step_s"]
    pd.testing.assert_frame_equal(m_pen[numeric], m_off[numeric])
