"""The eta sweep along the actual update: exact on a logit-linear model, curvature vanishing on a network."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_jvp import LinearSoftmaxLM, _batch, _pg_loss
from typer.testing import CliRunner

from entropy_lab.analyses.regime import regime_table, sweep_long
from entropy_lab.cli.app import app
from entropy_lab.linear_regime import shifted_parameters
from entropy_lab.records import regime_column
from entropy_lab.runs import RunDir
from entropy_lab.trace import EntropyTracer
from entropy_lab.trainer import Trainer

ETAS = (1 / 64, 1 / 8, 1.0, 2.0)


def _swept(model, opt, ids, resp, adv, warm_steps=2, jvp=True):
    for _ in range(warm_steps):
        opt.zero_grad()
        _pg_loss(model(input_ids=ids).logits, ids, resp, adv).backward()
        opt.step()
    tracer = EntropyTracer(model, jvp=jvp, eta_grid=ETAS)
    with tracer.step(ids, None, resp, advantages=adv, optimizer=opt) as st:
        opt.zero_grad()
        _pg_loss(model(input_ids=ids).logits, ids, resp, adv).backward()
        opt.step()
    return st.records


def test_shifted_parameters_read_theta_plus_eta_dtheta_and_are_restored(make_tiny_lm):
    model = make_tiny_lm(vocab_size=32).double()
    ids = torch.randint(0, 32, (2, 6))
    update = {p: torch.randn_like(p) * 1e-2 for p in model.parameters()}
    params = dict(model.named_parameters())
    with shifted_parameters(model, update, 0.5):
        shifted = model(input_ids=ids).logits
    with torch.no_grad():
        for p, d in update.items():
            p.add_(0.5 * d)
        manual = model(input_ids=ids).logits
        for p, d in update.items():
            p.sub_(0.5 * d)
    torch.testing.assert_close(shifted, manual)
    with pytest.raises(RuntimeError, match="boom"), shifted_parameters(model, update, 1.0):
        raise RuntimeError("boom")
    assert all(p is params[n] for n, p in model.named_parameters())


def test_logit_linear_model_sweep_is_exact():
    model = LinearSoftmaxLM()
    ids, resp, adv = _batch(23)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    df = _swept(model, opt, ids, resp, adv)
    # eta = 1 is the step the optimizer then took
    np.testing.assert_allclose(
        df[regime_column(1.0, "delta_entropy")], df.delta_entropy, rtol=1e-8, atol=1e-12
    )
    for eta in ETAS:
        # logits linear in theta: the logit change at eta is eta J dtheta exactly
        np.testing.assert_allclose(
            df[regime_column(eta, "delta_logit_linear")], eta * df.omega_jvp, rtol=1e-8, atol=1e-13
        )
        np.testing.assert_allclose(
            df[regime_column(eta, "jvp_entropy")],
            df[regime_column(eta, "delta_entropy")],
            rtol=1e-8,
            atol=1e-13,
        )
    tight, _ = regime_table(df)
    jvp = tight[tight.estimator == "jvp-entropy"]
    assert (jvp.pearson > 0.999999).all() and np.allclose(jvp.gain, 1.0, atol=1e-6)


def test_transformer_curvature_vanishes_as_eta_shrinks_coupling_does_not(make_tiny_lm):
    model = make_tiny_lm(vocab_size=48, seed=3).double()
    ids, resp, adv = _batch(48, B=8, T=12, P=4, seed=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    df = _swept(model, opt, ids, resp, adv, warm_steps=0)
    tight, shares = regime_table(df)
    shares = shares.set_index("eta")
    assert shares.loc[1 / 64, "curvature"] < 0.05 * shares.loc[2.0, "curvature"]
    assert shares.loc[1 / 64, "coupling_raw"] > 0.5  # parameter sharing stays first order
    jvp = tight[tight.estimator == "jvp"].set_index("eta")
    softmax = tight[tight.estimator == "softmax"].set_index("eta")
    assert jvp.loc[1 / 64, "pearson"] > 0.995 and abs(jvp.loc[1 / 64, "gain"] - 1) < 0.05
    assert jvp.loc[1 / 64, "pearson"] > jvp.loc[2.0, "pearson"]
    assert softmax.loc[1 / 64, "pearson"] < 0.9  # the tabular form stays loose however small the step
    assert len(sweep_long(df)) == len(ETAS) * len(df)


def test_cli_eta_sweep_from_a_checkpoint(
    tiny_policy_dir, tmp_path, isolated_cache, dense_reward, small_config
):
    cfg = small_config("grpo", tiny_policy_dir, steps=2, trace_every=0, eval_every=0)
    Trainer(cfg, tmp_path / "run").train()
    result = CliRunner().invoke(app, ["trace", "--run", str(tmp_path / "run"), "--eta-sweep"])
    assert result.exit_code == 0, result.output
    assert "linear regime" in result.output and "jvp" in result.output
    swept = RunDir(tmp_path / "run" / "eta-sweep-step_000002")
    assert (swept.figures_dir / "linear_regime.png").stat().st_size > 0
    assert len(swept.trace_files()) == 1
