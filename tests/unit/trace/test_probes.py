"""Pre-step probes: the eta sweep exact on a logit-linear model, curvature vanishing on a network, and
the ``PreStepProbe`` protocol (what a probe is given, what reaches the records)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_jvp import LinearSoftmaxLM, _at_tokens, _batch, _pg_loss
from typer.testing import CliRunner

from entropy_lab.analyses.regime import regime_table, sweep_long
from entropy_lab.cli.app import app
from entropy_lab.config import TrainConfig
from entropy_lab.errors import EntropyLabError
from entropy_lab.records import load_records, regime_column
from entropy_lab.runs import RunDir
from entropy_lab.stats import entropy_from_logits
from entropy_lab.theory import register_estimator, unregister_estimator
from entropy_lab.trace import EntropyTracer, EtaSweepProbe, JvpProbe, PreStep, ProbeResult
from entropy_lab.trace.probes import DEFAULT_ETAS, format_eta_grid, parse_eta_grid, shifted_parameters
from entropy_lab.trainer import Trainer

ETAS = (1 / 64, 1 / 8, 1.0, 2.0)


def _swept(model, opt, ids, resp, adv, warm_steps=2, jvp=True, **tracer_kw):
    for _ in range(warm_steps):
        opt.zero_grad()
        _pg_loss(model(input_ids=ids).logits, ids, resp, adv).backward()
        opt.step()
    tracer = EntropyTracer(model, jvp=jvp, eta_grid=ETAS, **tracer_kw)
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


def test_the_sweep_as_config_text_gives_the_same_records():
    """``eta_grid`` as the comma-separated text of ``TrainConfig.trace_eta_grid`` is the same sweep."""
    ids, resp, adv = _batch(23)
    frames = []
    for grid in (ETAS, format_eta_grid(ETAS)):
        torch.manual_seed(0)  # the same head initialisation for both models
        model = LinearSoftmaxLM()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        tracer = EntropyTracer(model, eta_grid=grid)
        with tracer.step(ids, None, resp, advantages=adv, optimizer=opt) as st:
            _pg_loss(model(input_ids=ids).logits, ids, resp, adv).backward()
            opt.step()
        frames.append(st.records)
    assert list(frames[0].columns) == list(frames[1].columns)
    assert frames[0].equals(frames[1])
    assert parse_eta_grid(format_eta_grid(DEFAULT_ETAS)) == DEFAULT_ETAS  # exact round trip


@pytest.mark.parametrize("grid", [(), "", None])
def test_an_empty_grid_is_no_sweep(grid):
    tracer = EntropyTracer(LinearSoftmaxLM(), eta_grid=grid)
    assert tracer.probes == () and tracer.eta_grid is None and not tracer.jvp


@pytest.mark.parametrize("grid", [(0.5, 0.0), (-1.0,), (float("nan"),), "1,x", "0", ("a",)])
def test_a_bad_eta_grid_is_one_error_at_construction(grid):
    with pytest.raises(EntropyLabError, match="eta grid must"):
        EntropyTracer(LinearSoftmaxLM(), eta_grid=grid)


def test_config_field_trace_eta_grid_is_validated_and_reaches_the_tracer_form():
    assert TrainConfig(trace_eta_grid="0.25,0.5,1").validate().trace_eta_grid == "0.25,0.5,1"
    assert TrainConfig().trace_eta_grid is None
    with pytest.raises(EntropyLabError, match="trace_eta_grid"):
        TrainConfig(trace_eta_grid="0.25, half").validate()
    assert parse_eta_grid(TrainConfig(trace_eta_grid="0.25,0.5,1").trace_eta_grid) == (0.25, 0.5, 1.0)


class _EchoProbe:
    """A user probe: records what it was given, as a column and as an estimator input."""

    def __init__(self):
        self.seen: PreStep | None = None

    def __call__(self, pre: PreStep) -> ProbeResult:
        self.seen = pre
        with torch.no_grad():  # the parameters must be untouched here: this forward is the pre-update one
            z = _at_tokens(pre.model(input_ids=self.ids).logits, self.resp)  # (n, V)
        return ProbeResult(
            token_inputs={"echo_entropy": pre.stats.entropy},
            columns={"probe_max_logit": z.max(-1).values.double(), "probe_rows": pre.every_token().double()},
        )

    def __repr__(self) -> str:
        return "_EchoProbe()"


def test_a_user_probe_gets_the_pre_step_and_its_results_reach_the_records():
    model = LinearSoftmaxLM()
    ids, resp, adv = _batch(23)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with torch.no_grad():
        z_ref = _at_tokens(model(input_ids=ids).logits, resp)  # (n, V) before the update, independently
    probe = _EchoProbe()
    probe.ids, probe.resp = ids, resp
    register_estimator("echo-entropy", requires=("echo_entropy",))(lambda q: q.inputs["echo_entropy"])
    try:
        tracer = EntropyTracer(model, jvp=True, probes=[probe])
        assert isinstance(tracer.probes[0], JvpProbe) and tracer.probes[-1] is probe
        with tracer.step(ids, None, resp, advantages=adv, optimizer=opt) as st:
            with pytest.raises(EntropyLabError, match="pre-step hook"):
                st.pre_stats  # noqa: B018  # not before the optimizer step
            _pg_loss(model(input_ids=ids).logits, ids, resp, adv).backward()
            opt.step()
            entropy_at_hook = st.pre_stats.entropy.double()
    finally:
        unregister_estimator("echo-entropy")
    df = st.records
    assert probe.seen is not None and probe.seen.optimizer is opt and probe.seen.n == len(df)
    torch.testing.assert_close(probe.seen.z_before, z_ref.to(probe.seen.z_before.dtype))
    np.testing.assert_allclose(df.probe_max_logit, z_ref.max(-1).values.numpy(), rtol=1e-12)
    assert (df.probe_rows == 1).all()
    np.testing.assert_allclose(entropy_at_hook.numpy(), entropy_from_logits(z_ref).numpy(), rtol=1e-10)
    np.testing.assert_allclose(df.omega_echo_entropy, df.entropy_before, rtol=0, atol=0)
    assert list(df.columns[-2:]) == ["probe_max_logit", "probe_rows"]  # after the estimators
    assert "omega_jvp" in df.columns


class _BadProbe:
    def __init__(self, columns):
        self.columns = columns

    def __call__(self, pre: PreStep) -> ProbeResult:
        return ProbeResult(columns={k: v(pre.n) for k, v in self.columns.items()})


@pytest.mark.parametrize(
    ("columns", "match"),
    [
        ({"mine": lambda n: torch.zeros(n + 1)}, r"shape \(\d+,\); it must be"),
        ({"delta_entropy": lambda n: torch.zeros(n)}, "already have"),
        ({"omega_mine": lambda n: torch.zeros(n)}, "already have"),
    ],
)
def test_a_probe_column_of_the_wrong_shape_or_a_taken_name_is_one_error(columns, match):
    model = LinearSoftmaxLM()
    ids, resp, adv = _batch(23)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    tracer = EntropyTracer(model, probes=[_BadProbe(columns)])
    with pytest.raises(EntropyLabError, match=match):
        with tracer.step(ids, None, resp, advantages=adv, optimizer=opt):
            _pg_loss(model(input_ids=ids).logits, ids, resp, adv).backward()
            opt.step()


def test_two_probes_may_not_write_one_column():
    model = LinearSoftmaxLM()
    ids, resp, adv = _batch(23)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    twice = [_BadProbe({"mine": torch.zeros}), _BadProbe({"mine": torch.ones})]
    with pytest.raises(EntropyLabError, match="'mine', which the records already have"):
        with EntropyTracer(model, probes=twice).step(ids, None, resp, advantages=adv, optimizer=opt):
            _pg_loss(model(input_ids=ids).logits, ids, resp, adv).backward()
            opt.step()


def test_tracer_and_step_reprs_name_model_options_probes_and_state():
    model = LinearSoftmaxLM()
    ids, resp, adv = _batch(23)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    tracer = EntropyTracer(model, max_positions=5, jvp=True, eta_grid=(0.5, 1.0))
    text = repr(tracer)
    assert text.startswith("EntropyTracer(model=LinearSoftmaxLM, max_positions=5")
    assert "probes=[JvpProbe(), EtaSweepProbe(etas=(0.5, 1.0))]" in text and "open=none" in text
    context = tracer.step(ids, None, resp, advantages=adv, optimizer=opt, step=7)
    assert "state=pending" in repr(context.traced) and "step=7" in repr(context.traced)
    with context as st:
        assert "state=open" in repr(st) and "open=step 7" in repr(tracer)
        _pg_loss(model(input_ids=ids).logits, ids, resp, adv).backward()
        opt.step()
        assert "optimizer_steps=1" in repr(st)
    assert "state=done, 5 records" in repr(st) and "traced_tokens=5" in repr(st)
    assert "open=none" in repr(tracer)
    failing = tracer.step(ids, None, resp, advantages=adv, optimizer=opt)
    with pytest.raises(RuntimeError), failing:
        raise RuntimeError("the loop failed")
    assert "state=failed" in repr(failing.traced)
    assert tracer.probes[1] == EtaSweepProbe((0.5, 1.0))


def test_trainer_trace_eta_grid_sweeps_the_traced_step(
    tiny_policy_dir, tmp_path, isolated_cache, dense_reward, small_config
):
    cfg = small_config("grpo", tiny_policy_dir, steps=1, trace_eta_grid="0.5,1.0", micro_batch_size=8)
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.train()
    assert trainer.tracer.eta_grid == (0.5, 1.0) and not trainer.tracer.jvp
    (f,) = RunDir(tmp_path / "run").trace_files()
    df, meta = load_records(f)
    assert meta["trace_eta_grid"] == "0.5,1.0"
    # eta = 1 is the step AdamW took (its update predicted exactly, up to float32 rounding)
    np.testing.assert_allclose(df[regime_column(1.0, "delta_entropy")], df.delta_entropy, atol=2e-5)
    assert set(sweep_long(df).eta) == {0.5, 1.0}


def test_cli_eta_sweep_from_a_checkpoint(
    tiny_policy_dir, tmp_path, isolated_cache, dense_reward, small_config
):
    cfg = small_config("grpo", tiny_policy_dir, steps=2, trace_every=0, eval_every=0)
    Trainer(cfg, tmp_path / "run").train()
    result = CliRunner().invoke(app, ["trace", "--run", str(tmp_path / "run"), "--eta-sweep"])
    assert result.exit_code == 0, result.output
    assert "linear regime" in result.output and "jvp" in result.output
    swept = RunDir(tmp_path / "run" / "retrace" / "step_000002-eta-sweep")
    assert (swept.figures_dir / "linear_regime.png").stat().st_size > 0
    assert len(swept.trace_files()) == 1
    assert swept.train_config().trace_eta_grid == format_eta_grid(DEFAULT_ETAS)
    assert swept.train_config().trace_jvp
    assert not RunDir(tmp_path / "run").trace_files()  # the run itself is untouched
    as_json = CliRunner().invoke(
        app,
        [
            "trace",
            "--run",
            str(tmp_path / "run" / "checkpoints" / "step_2"),
            "--eta-sweep",
            "--format",
            "json",
        ],
    )
    assert as_json.exit_code == 0, as_json.output
    payload = json.loads(as_json.output[as_json.output.index("{") :])
    assert set(payload) == {"tightness", "shares", "figure", "report"}
    assert json.loads((swept.path / "report.json").read_text())  # the sweep's own report
    assert {row["eta"] for row in payload["shares"]} == set(DEFAULT_ETAS)
    # the sweep directory is a run: analysing it reaches the linear regime through the report registry
    analysed = CliRunner().invoke(app, ["trace", "--run", str(swept.path)])
    assert analysed.exit_code == 0, analysed.output
    assert "coupling_calibrated" in analysed.output  # the shares' terminal view
    assert "## The linear regime" in swept.report_path.read_text()
