"""Controllers: the scale arithmetic, the split of the step, and closed-form checks on the tabular policy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_jvp import _batch, _pg_loss

from entropy_lab.batch import RolloutBatch
from entropy_lab.config import TrainConfig
from entropy_lab.controllers import (
    AdaptiveEntropy,
    ControlContext,
    EntropyTarget,
    choose_scales,
    control_context,
    predicted_mean_change,
    update_parts,
)
from entropy_lab.methods import METHODS, resolve_config
from entropy_lab.rollout import Rollout
from entropy_lab.runs import RunDir
from entropy_lab.stats import entropy_from_logits, token_stats
from entropy_lab.tabular import TabularPolicy
from entropy_lab.trainer import Trainer
from entropy_lab.update_predict import predict_update


def test_choose_scales_hits_the_wanted_change_closest_to_one():
    a_p, a_m = choose_scales(0.1, 2.0, -1.0, dh_star=0.5, lo=-10, hi=10)
    assert 0.1 + a_p * 2.0 + a_m * -1.0 == pytest.approx(0.5)
    # closest to (1, 1): the move is along (h+, h-)
    assert (a_p - 1) / 2.0 == pytest.approx((a_m - 1) / -1.0)
    assert choose_scales(0.0, 1.0, 1.0, dh_star=100.0, lo=0.0, hi=2.0) == (2.0, 2.0)  # bounded
    assert choose_scales(0.3, 0.0, 0.0, dh_star=-1.0, lo=0.0, hi=2.0) == (1.0, 1.0)  # nothing to steer


def test_choose_scales_under_an_active_clip_steers_by_direction():
    gram, clip = (1.0, 0.0, 1.0), 0.5  # |g+| = |g-| = 1, orthogonal; the mix is clipped to norm 0.5

    def predicted(a_p, a_m):
        c = min(1.0, clip / (a_p**2 * gram[0] + 2 * a_p * a_m * gram[1] + a_m**2 * gram[2]) ** 0.5)
        return c * (a_p * 1.0 + a_m * -1.0)

    a_p, a_m = choose_scales(0.0, 1.0, -1.0, dh_star=0.2, lo=0.0, hi=2.0, gram=gram, clip=clip)
    assert predicted(a_p, a_m) == pytest.approx(0.2, abs=0.01)
    # a common scale alone cannot do it: (1, 1) and (2, 2) both predict 0
    assert predicted(2.0, 2.0) == predicted(1.0, 1.0) == 0.0


def _ctx(model, opt, ids, resp, adv, cfg):
    return ControlContext(
        model=model,
        optimizer=opt,
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        response_mask=resp,
        advantages=adv[:, None] * resp,
        forward_kwargs={},
        cfg=cfg,
    )


def test_control_context_holds_the_rows_of_the_update():
    ids, resp, adv = _batch(11)  # (6, 10), (6, 10), (6,)
    B, T = ids.shape
    position_ids = torch.arange(T).repeat(B, 1) + 100 * torch.arange(B)[:, None]  # row-tagged
    ro = Rollout(ids, torch.ones_like(ids), position_ids, resp, torch.arange(B), [""] * B)
    zeros = torch.zeros(B, T)
    batch = RolloutBatch(ro, torch.zeros(B), adv, zeros, zeros, zeros)
    model = TabularPolicy(11, max_states=128, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = TrainConfig(controller="entropy-target")
    rows = torch.tensor([4, 1])
    ctx = control_context(batch, rows, model=model, optimizer=opt, cfg=cfg)
    assert ctx.model is model and ctx.optimizer is opt and ctx.cfg is cfg
    for i, r in enumerate((4, 1)):
        assert torch.equal(ctx.input_ids[i], ids[r]) and torch.equal(ctx.response_mask[i], resp[r])
        assert torch.equal(ctx.forward_kwargs["position_ids"][i], position_ids[r])
        # the sequence advantage on its response tokens, 0 on the prompt
        expected = torch.where(resp[r] > 0, adv[r], torch.zeros((), dtype=adv.dtype))
        assert torch.equal(ctx.advantages[i], expected.to(ctx.advantages.dtype))


def _grads(model, ids, resp, adv):
    model.zero_grad()
    _pg_loss(model(input_ids=ids).logits, ids, resp, adv).backward()


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, dampening=0.2),
        lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1),
        lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=0.1),
    ],
)
def test_update_parts_sum_to_the_predicted_step(make):
    model = TabularPolicy(11, max_states=128, seed=0)
    ids, resp, adv = _batch(11)
    opt = make(model.parameters())
    for _ in range(2):
        _grads(model, ids, resp, adv)
        opt.step()
    _grads(model, ids, resp, adv)
    (p,) = list(model.parameters())
    g = p.grad.clone()
    part = {p: 0.3 * g}
    c0, (c1, c2) = update_parts(opt, [part, {p: g - part[p]}])
    torch.testing.assert_close(c0[p] + c1[p] + c2[p], predict_update(opt)[p])
    if isinstance(opt, torch.optim.SGD):  # affine in the gradient: any mix is exact
        p.grad = 2.0 * part[p] + 0.5 * (g - part[p])
        torch.testing.assert_close(c0[p] + 2.0 * c1[p] + 0.5 * c2[p], predict_update(opt)[p])


def test_tabular_sgd_predicted_parts_equal_the_softmax_closed_form():
    vocab, lr = 13, 0.02
    model = TabularPolicy(vocab, max_states=256, seed=2)
    ids, resp, adv = _batch(vocab, B=8)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    _grads(model, ids, resp, adv)
    ctx = _ctx(model, opt, ids, resp, adv, TrainConfig())
    (p,) = list(model.parameters())
    # g+ of the A>0 tokens by hand: the pg loss restricted to rows with A > 0
    model.zero_grad()
    keep = (adv > 0).double()
    n = resp[:, 1:].sum()
    _pg_loss(model(input_ids=ids).logits, ids, resp, adv * keep).backward()
    g_plus = p.grad.clone()
    _grads(model, ids, resp, adv)
    c0, (c_plus,) = update_parts(opt, [{p: g_plus}])
    h_plus = predicted_mean_change(ctx, c_plus)
    # closed form: with one free row per state, dH_j = -lr w_j (pi_a l_a - C)_j on the A>0 tokens, 0 elsewhere
    b, t = resp.bool().nonzero(as_tuple=True)
    with torch.no_grad():
        z = model(input_ids=ids).logits[b, t - 1]
    st = token_stats(z, ids[b, t])
    w = adv[b] / n
    softmax = -lr * w * (st.logprob.exp() * (st.logprob + st.entropy) - st.collision)
    assert h_plus == pytest.approx(float((softmax * (adv[b] > 0)).mean()), rel=1e-9)
    assert predicted_mean_change(ctx, c0) == 0.0  # plain SGD carries nothing over


def test_entropy_target_moves_entropy_by_the_wanted_amount_on_the_tabular_policy():
    vocab = 13
    model = TabularPolicy(vocab, max_states=256, seed=3)
    ids, resp, adv = _batch(vocab, B=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    b, t = resp.bool().nonzero(as_tuple=True)

    def mean_entropy():
        with torch.no_grad():
            return float(entropy_from_logits(model(input_ids=ids).logits[b, t - 1]).mean())

    h = mean_entropy()
    cfg = TrainConfig(
        entropy_target=h + 2e-4,
        entropy_target_kappa=1.0,
        entropy_target_scale_min=-50,
        entropy_target_scale_max=50,
        grad_clip=0.0,  # no clip: the closed-form choice
    )
    _grads(model, ids, resp, adv)
    metrics = EntropyTarget(cfg).before_step(_ctx(model, opt, ids, resp, adv, cfg))
    assert metrics["control/predicted_dH"] == pytest.approx(2e-4, rel=1e-9)
    assert (metrics["control/alpha_plus"], metrics["control/alpha_minus"]) != (1.0, 1.0)
    opt.step()
    assert mean_entropy() - h == pytest.approx(2e-4, rel=0.05)  # first order holds at this step size


def test_adaptive_entropy_coefficient_and_gradient():
    model = TabularPolicy(11, max_states=128, seed=0)
    ids, resp, adv = _batch(11)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = TrainConfig(entropy_target=10.0, adaptive_entropy_delta=0.01)  # entropy always below target
    ctl = AdaptiveEntropy(cfg)
    ctx = _ctx(model, opt, ids, resp, adv, cfg)
    (p,) = list(model.parameters())
    _grads(model, ids, resp, adv)
    g0 = p.grad.clone()
    m = ctl.before_step(ctx)
    assert m["control/entropy_coef"] == 0.0 and torch.equal(p.grad, g0)  # c_0 = 0
    assert ctl.coef == pytest.approx(0.01)
    ctl.before_step(ctx)  # now c = 0.01 is applied: grad += 0.01 * grad(-mean H)
    applied = p.grad.clone()
    b, t = resp.bool().nonzero(as_tuple=True)
    model.zero_grad()
    (-0.01 * entropy_from_logits(model(input_ids=ids).logits[b, t - 1]).mean()).backward()
    bonus = p.grad.clone()
    assert bonus.abs().max() > 0
    torch.testing.assert_close(applied, g0 + bonus)
    p.grad = g0.clone()
    ctl2 = AdaptiveEntropy(cfg)
    ctl2.load_state_dict({"coef": 0.01})
    ctl2.before_step(ctx)
    torch.testing.assert_close(p.grad, g0 + bonus)
    assert ctl2.state_dict() == {"coef": pytest.approx(0.02)}
    high = AdaptiveEntropy(TrainConfig(entropy_target=0.0, adaptive_entropy_delta=0.01))
    high.load_state_dict({"coef": 0.015})
    high.before_step(ctx)
    high.before_step(ctx)
    assert high.coef == 0.0  # lowered, never below 0


def test_methods_are_registered_with_their_controllers():
    assert METHODS["adaptive-entropy"].defaults["controller"] == "adaptive-entropy"
    assert resolve_config("entropy-target").controller == "entropy-target"


@pytest.mark.parametrize("method", ["adaptive-entropy", "entropy-target"])
def test_controller_methods_train_and_checkpoint(
    method, tiny_policy_dir, tmp_path, isolated_cache, dense_reward, small_config
):
    cfg = small_config(method, tiny_policy_dir, entropy_target=5.0)
    Trainer(cfg, tmp_path / "run").train()
    run = RunDir(tmp_path / "run")
    metrics = run.read_metrics()
    assert np.isfinite(metrics["control/entropy"]).all()
    state = torch.load(run.checkpoint_path(2) / "trainer_state.pt", weights_only=False)
    assert isinstance(state["controller"], dict)
    if method == "adaptive-entropy":
        assert state["controller"]["coef"] == pytest.approx(2 * 0.005)
