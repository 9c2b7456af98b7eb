"""The jvp estimators in the tracer's records and in the trainer: ground truths end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_jvp import LinearSoftmaxLM, _batch, _pg_loss

from entropy_lab.errors import EntropyLabError
from entropy_lab.records import load_records, predicted_columns
from entropy_lab.runs import RunDir
from entropy_lab.tabular import TabularPolicy
from entropy_lab.trace import EntropyTracer
from entropy_lab.trainer import Trainer


def _traced(model, opt, ids, resp, adv, *, warm_steps=0, micro=None, **tracer_kw):
    for _ in range(warm_steps):
        opt.zero_grad()
        _pg_loss(model(input_ids=ids).logits, ids, resp, adv).backward()
        opt.step()
    micro = micro or len(ids)
    with EntropyTracer(model, jvp=True, **tracer_kw).step(
        ids, None, resp, advantages=adv, optimizer=opt
    ) as st:
        opt.zero_grad()
        n = resp[:, 1:].sum()
        for s in range(0, len(ids), micro):
            rows = slice(s, s + micro)
            logits = model(input_ids=ids[rows]).logits
            (_pg_loss(logits, ids[rows], resp[rows], adv[rows]) * resp[rows, 1:].sum() / n).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
    return st.records


def test_records_gain_the_jvp_columns_only_when_asked():
    model = TabularPolicy(17, max_states=256, seed=1)
    ids, resp, adv = _batch(17)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    df = _traced(model, opt, ids, resp, adv)
    assert {"omega_jvp", "omega_jvp_entropy"} <= set(predicted_columns(df))
    with EntropyTracer(model).step(ids, None, resp, advantages=adv, optimizer=opt) as st:
        opt.zero_grad()
        _pg_loss(model(input_ids=ids).logits, ids, resp, adv).backward()
        opt.step()
    assert "omega_jvp" not in st.records.columns


def test_tabular_sgd_jvp_equals_softmax_and_logit_grad():
    model = TabularPolicy(17, max_states=256, seed=1)
    ids, resp, adv = _batch(17)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with EntropyTracer(model, jvp=True).step(ids, None, resp, advantages=adv, optimizer=opt) as st:
        opt.zero_grad()
        _pg_loss(model(input_ids=ids).logits, ids, resp, adv).backward()
        opt.step()
    df = st.records
    np.testing.assert_allclose(df.omega_jvp, df.omega_softmax, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(df.omega_jvp, df.omega_logit_grad, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("micro", [None, 2])
def test_logit_linear_model_under_adamw_with_clipping_and_sampling(micro):
    model = LinearSoftmaxLM()
    ids, resp, adv = _batch(23)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    df = _traced(model, opt, ids, resp, adv, warm_steps=3, micro=micro, max_positions=20)
    assert len(df) == 20
    # logits linear in the parameters: J dtheta is the actual logit change, whatever the optimizer
    np.testing.assert_allclose(df.omega_jvp, df.delta_logit_linear, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(df.omega_jvp_entropy, df.delta_entropy, rtol=1e-8, atol=1e-12)
    assert np.abs(df.delta_entropy - df.delta_logit_linear).max() > 1e-6  # curvature is present


def test_tiny_transformer_sgd_tiny_lr_is_tight(make_tiny_lm):
    model = make_tiny_lm(vocab_size=48, seed=3).double()
    ids, resp, adv = _batch(48, B=8, T=12, P=4, seed=2)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    df = _traced(model, opt, ids, resp, adv)
    for col in ("omega_jvp", "omega_jvp_entropy"):
        assert np.corrcoef(df[col], df.delta_entropy)[0, 1] >= 0.999
    # the tabular closed forms cannot see parameter sharing: strictly looser here
    assert np.corrcoef(df.omega_softmax, df.delta_entropy)[0, 1] < 0.999


def test_flash_attention_in_the_tracer_names_the_fix(make_tiny_lm):
    model = make_tiny_lm()
    model.config._attn_implementation = "flash_attention_2"
    ids, resp, adv = _batch(64)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with pytest.raises(EntropyLabError, match="eager"):
        with EntropyTracer(model, jvp=True).step(ids, None, resp, advantages=adv, optimizer=opt):
            model.config._attn_implementation = "eager"  # the training forward itself runs
            out = model(input_ids=ids).logits
            model.config._attn_implementation = "flash_attention_2"
            _pg_loss(out, ids, resp, adv).backward()
            opt.step()


def test_trainer_trace_jvp_writes_the_columns(
    tiny_policy_dir, tmp_path, isolated_cache, dense_reward, small_config
):
    cfg = small_config("grpo", tiny_policy_dir, steps=1, trace_jvp=True, micro_batch_size=8)
    Trainer(cfg, tmp_path / "run").train()
    (f,) = RunDir(tmp_path / "run").trace_files()
    df, meta = load_records(f)
    assert meta["trace_jvp"] is True
    assert np.isfinite(df.omega_jvp).all() and np.isfinite(df.omega_jvp_entropy).all()
    assert (df.omega_jvp != 0).any()
