"""Objectives against hand-computed losses and gradients on tiny (2, 4) examples.

Convention of the helpers: old_logprob = log 0.5 unless stated, logprob = old + log r as a
float64 leaf, so d(-A r)/d logprob = -A r and the expected gradients are written by hand.
"""

from __future__ import annotations

import math

import pytest
import torch

from entropy_lab.config import TrainConfig
from entropy_lab.errors import EntropyLabError
from entropy_lab.objectives import (
    KL_ESTIMATORS,
    OBJECTIVES,
    LossInputs,
    compute_loss,
    get_kl_estimator,
    get_objective,
    register_objective,
    required_inputs,
    token_covariance,
)

D = torch.float64


def make(ratios, advantages, mask=None, old=None, **extra) -> tuple[LossInputs, torch.Tensor]:
    """LossInputs with logprob = old + log(ratio) as a leaf; returns (inputs, logprob leaf)."""
    r = torch.tensor(ratios, dtype=D)
    old_lp = torch.full_like(r, math.log(0.5)) if old is None else torch.tensor(old, dtype=D)
    lp = (old_lp + r.log()).clone().requires_grad_(True)
    m = torch.ones_like(r) if mask is None else torch.tensor(mask, dtype=D)
    adv = torch.tensor(advantages, dtype=D)
    return LossInputs(logprob=lp, old_logprob=old_lp, advantages=adv, mask=m, **extra), lp


def grad_of(out, lp):
    (g,) = torch.autograd.grad(out.loss, lp, retain_graph=True)
    return g


def close(actual, expected, atol=1e-9):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=1e-7)


# --- PPO-clip core ------------------------------------------------------------------------

PPO_RATIOS = [[1.3, 0.9, 0.7, 1.5], [1.1, 0.5, 1.0, 5.0]]
PPO_ADV = [[1.0, 1.0, -1.0, -1.0], [2.0, 2.0, 0.0, 3.0]]
PPO_MASK = [[1, 1, 1, 1], [1, 1, 1, 0]]


def test_ppo_per_token_loss_gradient_and_clip_indicator():
    inputs, lp = make(PPO_RATIOS, PPO_ADV, PPO_MASK)
    out = compute_loss(inputs, TrainConfig())  # eps 0.2 / 0.2, token-mean
    # r=1.3,A=1: clipped high -> -1.2 | r=0.9,A=1 -> -0.9 | r=0.7,A=-1: clipped low -> 0.8 | r=1.5,A=-1 -> 1.5
    # r=1.1,A=2 -> -2.2 | r=0.5,A=2 (pessimistic branch, unclipped) -> -1.0 | A=0 -> 0 | masked -> 0
    close(out.per_token, [[-1.2, -0.9, 0.8, 1.5], [-2.2, -1.0, 0.0, 0.0]])
    close(out.clip_indicator, [[0, 1, 0, 1], [1, 1, 1, 0]])
    close(out.intervention_weight, torch.ones(2, 4))
    close(out.normalizer, torch.full((2, 4), 7.0), atol=0)
    close(out.loss, -3.0 / 7)
    # d loss/d logp = -A r / N where unclipped
    close(grad_of(out, lp), [[0.0, -0.9 / 7, 0.0, 1.5 / 7], [-2.2 / 7, -1.0 / 7, 0.0, 0.0]])
    assert out.metrics["clip/frac_high"] == pytest.approx(1 / 7)
    assert out.metrics["clip/frac_low"] == pytest.approx(1 / 7)
    assert out.metrics["clip/frac"] == pytest.approx(2 / 7)
    assert out.metrics["loss/pg"] == pytest.approx(-3.0 / 7)


def test_ratio_and_approx_kl_metrics_over_valid_tokens():
    inputs, lp = make(PPO_RATIOS, PPO_ADV, PPO_MASK)
    with torch.no_grad():
        lp[0, 3] += 25.0 - math.log(1.5)  # log r = 25: the ratio is clamped to exp(20)
        lp[1, 3] = float("nan")  # padding: must not reach either metric
    out = compute_loss(inputs, TrainConfig())
    ratios = [1.3, 0.9, 0.7, math.exp(20.0), 1.1, 0.5, 1.0]
    log_ratios = [math.log(1.3), math.log(0.9), math.log(0.7), 25.0, math.log(1.1), math.log(0.5), 0.0]
    assert out.metrics["policy/ratio_mean"] == pytest.approx(sum(ratios) / 7, rel=1e-12)
    assert out.metrics["policy/approx_kl"] == pytest.approx(-sum(log_ratios) / 7, rel=1e-12)


def test_clip_higher_keeps_gradient_up_to_eps_high():
    inputs, lp = make([[1.25, 1.3, 1.0, 1.0]] * 2, [[1.0, 1.0, 0.0, 0.0]] * 2)
    out = compute_loss(inputs, TrainConfig(clip_eps_high=0.28))
    # r=1.25 < 1.28: -1.25 with gradient; r=1.3 > 1.28: -1.28 constant
    close(out.per_token[0], [-1.25, -1.28, 0.0, 0.0])
    close(out.clip_indicator[0], [1, 0, 1, 1])
    close(grad_of(out, lp)[0], [-1.25 / 8, 0.0, 0.0, 0.0])


def test_dual_clip():
    ratios = [[12.0, 5.0, 4.0, 1.0], [0.5, 1.0, 1.0, 1.0]]
    adv = [[-1.0, -1.0, -2.0, 0.0], [-1.0, 0.0, 0.0, 0.0]]
    inputs, lp = make(ratios, adv)
    out = compute_loss(inputs, TrainConfig(dual_clip_c=10.0))
    # r=12,A=-1,c=10 -> min(12, 10) = 10, no gradient | r=5 -> 5 with gradient | r=4,A=-2 -> 8 (< 20)
    # r=0.5,A=-1 -> clipped low: 0.8, no gradient
    close(out.per_token, [[10.0, 5.0, 8.0, 0.0], [0.8, 0.0, 0.0, 0.0]])
    close(out.clip_indicator, [[0, 1, 1, 1], [0, 1, 1, 1]])
    close(grad_of(out, lp), [[0.0, 5.0 / 8, 8.0 / 8, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert out.metrics["clip/frac_dual"] == pytest.approx(1 / 8)
    # the dual-clip preset's c = 3: r=4, A=-2 -> min(8, 6) = 6
    out3 = compute_loss(make(ratios, adv)[0], TrainConfig(dual_clip_c=3.0))
    assert float(out3.per_token[0, 2].detach()) == pytest.approx(6.0)
    # c must exceed 1: the config's validation refuses c = 1 before any loss is computed
    with pytest.raises(EntropyLabError, match="^config key 'dual_clip_c' must be > 1, got 1.0;"):
        compute_loss(make(ratios, adv)[0], TrainConfig(dual_clip_c=1.0).validate())


def test_saturated_log_ratio_counts_as_clipped():
    inputs, lp = make([[1.0, 1.0, 1.0, 1.0]] * 2, [[-1.0, 1.0, 1.0, 1.0]] * 2)
    with torch.no_grad():
        lp[0, 0] += 25.0  # log r = 25 > 20: clamped, no gradient
    out = compute_loss(inputs, TrainConfig())
    assert float(out.clip_indicator[0, 0]) == 0.0
    assert float(grad_of(out, lp)[0, 0]) == 0.0
    assert math.isfinite(out.loss.item())


# --- Clip-Cov and KL-Cov ----------------------------------------------------------------------

# mean logp = -2, mean A = 0: cov row 0 = (lp + 2) = [1, -1, 0, 0]; row 1 = -(lp + 2) = [0, 0, -1.5, 1.5]
COV_LP = [[-1.0, -3.0, -2.0, -2.0], [-2.0, -2.0, -0.5, -3.5]]
COV_ADV = [[1.0] * 4, [-1.0] * 4]


def test_token_covariance_by_hand():
    cov = token_covariance(
        torch.tensor(COV_LP, dtype=D), torch.tensor(COV_ADV, dtype=D), torch.ones(2, 4, dtype=torch.bool)
    )
    close(cov, [[1.0, -1.0, 0.0, 0.0], [0.0, 0.0, -1.5, 1.5]])


def test_clip_cov_detaches_the_band_tokens():
    inputs, lp = make([[1.0] * 4] * 2, COV_ADV, old=COV_LP)
    cfg = TrainConfig(objective="clip-cov", clip_cov_ratio=0.25, clip_cov_lb=0.5, clip_cov_ub=5.0)
    out = compute_loss(inputs, cfg)
    # band (0.5, 5): tokens (0,0) cov 1 and (1,3) cov 1.5; max(1, int(0.25 * 8)) = 2 -> both detached
    close(out.intervention_weight, [[0, 1, 1, 1], [1, 1, 1, 0]])
    close(out.per_token, [[0.0, -1.0, -1.0, -1.0], [1.0, 1.0, 1.0, 0.0]])
    close(grad_of(out, lp), [[0.0, -1 / 8, -1 / 8, -1 / 8], [1 / 8, 1 / 8, 1 / 8, 0.0]])
    assert out.metrics["clip_cov/frac_detached"] == pytest.approx(2 / 8)


def test_clip_cov_random_pick_and_skips_clipped_tokens():
    cfg = TrainConfig(objective="clip-cov", clip_cov_ratio=0.125, clip_cov_lb=0.5, clip_cov_ub=5.0)
    picked = set()
    for seed in range(20):
        inputs, _ = make([[1.0] * 4] * 2, COV_ADV, old=COV_LP, generator=torch.Generator().manual_seed(seed))
        w = compute_loss(inputs, cfg).intervention_weight
        zeros = {tuple(i) for i in (w == 0).nonzero().tolist()}
        assert len(zeros) == 1 and zeros <= {(0, 0), (1, 3)}  # int(0.125 * 8) = 1 of the two band tokens
        picked |= zeros
    assert picked == {(0, 0), (1, 3)}
    # token (1,3) clipped by PPO (A = -1, r = 0.5): no longer a candidate, even with room for two
    ratios = [[1.0] * 4, [1.0, 1.0, 1.0, 0.5]]
    old = [row[:] for row in COV_LP]
    old[1][3] = COV_LP[1][3] - math.log(0.5)  # keeps current logp (and so cov) as in COV_LP
    inputs, _ = make(ratios, COV_ADV, old=old)
    out = compute_loss(inputs, cfg.replace(clip_cov_ratio=0.25))
    close(out.intervention_weight, [[0, 1, 1, 1], [1, 1, 1, 1]])


def test_kl_cov_penalises_top_covariance_token_without_clipping():
    old = [row[:] for row in COV_LP]
    old[1][3] = COV_LP[1][3] - 0.1  # logp - old = 0.1 at the top-cov token (1,3)
    old[0][1] = COV_LP[0][1] - math.log(1.5)  # r = 1.5 with A = 1: PPO would clip, KL-Cov does not
    ratios = [[1.0, 1.5, 1.0, 1.0], [1.0, 1.0, 1.0, math.exp(0.1)]]
    inputs, lp = make(ratios, COV_ADV, old=old)
    cfg = TrainConfig(objective="kl-cov", kl_cov_ratio=0.125, kl_cov_coef=1.0)
    out = compute_loss(inputs, cfg)
    e = math.exp(0.1)
    # k = max(1, int(0.125 * 8)) = 1 -> token (1,3): -A r + |0.1| = e^0.1 + 0.1
    close(out.per_token, [[-1.0, -1.5, -1.0, -1.0], [1.0, 1.0, 1.0, e + 0.1]])
    # gradients: -A r, and -A r + coef * sign(logp - old) at the penalised token
    close(grad_of(out, lp), [[-1 / 8, -1.5 / 8, -1 / 8, -1 / 8], [1 / 8, 1 / 8, 1 / 8, (e + 1) / 8]])
    close(out.clip_indicator, torch.ones(2, 4))
    close(out.intervention_weight, torch.ones(2, 4))
    assert out.metrics["kl_cov/frac_penalised"] == pytest.approx(1 / 8)


def test_kl_cov_uses_at_least_one_token():
    inputs, _ = make([[1.0] * 4] * 2, COV_ADV, old=COV_LP)
    out = compute_loss(inputs, TrainConfig(objective="kl-cov", kl_cov_ratio=2e-3))
    assert out.metrics["kl_cov/frac_penalised"] == pytest.approx(1 / 8)


# --- Fork tokens, W-REINFORCE, entropy advantage -------------------------------------------------


def test_fork_tokens_keep_top_entropy_tokens_only():
    entropy = torch.tensor([[0.1, 2.0, 0.3, 0.4], [1.5, 0.2, 0.6, 9.0]], dtype=D)
    inputs, lp = make(
        [[1.0] * 4] * 2, [[1.0] * 4, [-1.0] * 4], mask=[[1, 1, 1, 1], [1, 1, 1, 0]], entropy=entropy
    )
    out = compute_loss(inputs, TrainConfig(objective="fork-tokens", fork_rho=0.25))
    # 7 valid tokens, ceil(0.25 * 7) = 2 kept: entropies 2.0 and 1.5 (9.0 is masked)
    close(out.intervention_weight, [[0, 1, 0, 0], [1, 0, 0, 1]])
    close(out.per_token, [[0.0, -1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    close(grad_of(out, lp), [[0.0, -1 / 7, 0.0, 0.0], [1 / 7, 0.0, 0.0, 0.0]])
    # exact fractions: 0.2 * 10 tokens keeps 2, not 3
    inputs10, _ = make([[1.0] * 5] * 2, [[1.0] * 5] * 2, entropy=torch.rand(2, 5, dtype=D))
    out10 = compute_loss(inputs10, TrainConfig(objective="fork-tokens", fork_rho=0.2))
    assert int((out10.intervention_weight > 0).sum()) == 2


def test_w_reinforce_scales_positive_advantages():
    inputs, lp = make([[1.1, 0.9, 1.0, 1.0]] * 2, [[1.0, -1.0, 0.0, 2.0]] * 2)
    out = compute_loss(inputs, TrainConfig(objective="w-reinforce", w_reinforce_lambda=0.1))
    close(out.per_token[0], [-0.11, 0.9, 0.0, -0.2])
    close(out.intervention_weight[0], [0.1, 1.0, 1.0, 0.1])
    close(grad_of(out, lp)[0], [-0.11 / 8, 0.9 / 8, 0.0, -0.2 / 8])


def test_entropy_advantage_shaping():
    entropy = torch.tensor([[1.0, 2.0, 1.0, 3.0]] * 2, dtype=D, requires_grad=True)
    inputs, lp = make([[1.0] * 4] * 2, [[1.0, 1.0, -1.0, 0.0]] * 2, entropy=entropy)
    out = compute_loss(
        inputs, TrainConfig(objective="entropy-adv", entropy_adv_alpha=0.4, entropy_adv_kappa=2.0)
    )
    # A' = A + min(0.4 H, |A| / 2): 1 + 0.4 | 1 + 0.5 | -1 + 0.4 | 0 + 0
    close(out.advantage[0], [1.4, 1.5, -0.6, 0.0])
    close(out.per_token[0], [-1.4, -1.5, 0.6, 0.0])
    close(grad_of(out, lp)[0], [-1.4 / 8, -1.5 / 8, 0.6 / 8, 0.0])
    # H is detached in the shaping and there is no entropy bonus: no path from the loss to H
    assert torch.autograd.grad(out.loss, entropy, allow_unused=True) == (None,)


def test_steer_objective_is_weight_times_ppo_without_weight_gradient():
    torch.manual_seed(0)
    old = torch.rand(2, 4, dtype=D).log()
    ratios = torch.exp(0.2 * torch.randn(2, 4, dtype=D)).tolist()
    adv = [[1.0] * 4, [-1.0] * 4]
    H = torch.rand(2, 4, dtype=D) * 2
    base, lp0 = make(ratios, adv, old=old.tolist())
    ppo = compute_loss(base, TrainConfig(dual_clip_c=10.0, clip_eps_high=0.28))
    inputs, lp = make(ratios, adv, old=old.tolist(), old_entropy=H)
    out = compute_loss(inputs, TrainConfig(objective="steer", dual_clip_c=10.0, clip_eps_high=0.28))
    w = out.intervention_weight
    assert float(w.min()) == pytest.approx(0.8)  # the largest |omega| reaches lambda_min
    close(out.per_token, w * ppo.per_token)
    close(grad_of(out, lp), w * grad_of(ppo, lp0))
    close(out.clip_indicator, ppo.clip_indicator)


# --- KL and entropy terms ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "estimator, value, grad",
    [
        # logp = log 0.5, ref = log 0.25, d = ref - logp = -log 2
        ("k1", math.log(2), 1.0),  # logp - ref; d/dlogp = 1
        ("k2", 0.5 * math.log(2) ** 2, math.log(2)),  # (logp - ref)^2 / 2; d/dlogp = logp - ref
        ("k3", 0.5 + math.log(2) - 1, 1 - 0.5),  # e^d - d - 1; d/dlogp = 1 - e^d
    ],
)
def test_kl_estimators_values_and_gradients(estimator, value, grad):
    ref = torch.full((2, 4), math.log(0.25), dtype=D)
    inputs, lp = make([[1.0] * 4] * 2, [[0.0] * 4] * 2, ref_logprob=ref)
    out = compute_loss(inputs, TrainConfig(kl_coef=1.0, kl_estimator=estimator))
    assert out.loss.item() == pytest.approx(value)
    assert out.metrics["loss/kl"] == pytest.approx(value)
    close(grad_of(out, lp), torch.full((2, 4), grad / 8))
    # coefficient scales the term
    out2 = compute_loss(
        make([[1.0] * 4] * 2, [[0.0] * 4] * 2, ref_logprob=ref)[0],
        TrainConfig(kl_coef=0.001, kl_estimator=estimator),
    )
    assert out2.loss.item() == pytest.approx(0.001 * value)


def test_k3_is_non_negative_and_zero_at_reference():
    lp = torch.linspace(-5, 0, 11, dtype=D)
    ref = torch.linspace(-3, -0.1, 11, dtype=D)
    assert bool((get_kl_estimator("k3")(lp, ref) >= 0).all())
    assert float(get_kl_estimator("k3")(lp, lp).abs().max()) == 0.0
    assert set(KL_ESTIMATORS) == {"k1", "k2", "k3"}


def test_entropy_bonus_gradient_increases_entropy():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 6, dtype=D, requires_grad=True)
    targets = torch.randint(0, 6, (2, 4))

    def forward(z):
        logp_all = z.log_softmax(-1)
        ent = -(logp_all.exp() * logp_all).sum(-1)  # (B, T)
        return logp_all.gather(-1, targets[..., None]).squeeze(-1), ent

    lp, ent = forward(logits)
    inputs = LossInputs(lp, lp.detach(), torch.zeros(2, 4, dtype=D), torch.ones(2, 4), entropy=ent)
    out = compute_loss(inputs, TrainConfig(entropy_coef=0.1))
    assert out.loss.item() == pytest.approx(-0.1 * ent.mean().item())
    # d loss / d H_t = -coef / N
    (g,) = torch.autograd.grad(out.loss, ent, retain_graph=True)
    close(g, torch.full((2, 4), -0.1 / 8))
    out.loss.backward()
    with torch.no_grad():
        _, ent_after = forward(logits - 0.5 * logits.grad)
    assert ent_after.mean().item() > ent.mean().item()


# --- compute_loss plumbing ---------------------------------------------------------------------


def _random_inputs(seed, b=6, t=5, **extra):
    g = torch.Generator().manual_seed(seed)
    old = torch.rand(b, t, generator=g, dtype=D).clamp(min=0.05).log()
    lp = (old + 0.3 * torch.randn(b, t, generator=g, dtype=D)).requires_grad_(True)
    adv = torch.randn(b, 1, generator=g, dtype=D).expand(b, t).contiguous()
    lengths = torch.tensor([5, 3, 1, 4, 2, 5][:b])
    mask = (torch.arange(t)[None, :] < lengths[:, None]).to(D)
    ent = (torch.rand(b, t, generator=g, dtype=D) * 2).requires_grad_(True)
    ref = old + 0.1 * torch.randn(b, t, generator=g, dtype=D)
    return (
        LossInputs(lp, old, adv, mask, entropy=ent, ref_logprob=ref, old_entropy=ent.detach(), **extra),
        lp,
        ent,
    )


def _rows(inputs: LossInputs, rows: slice, **kw) -> LossInputs:
    def cut(x):
        return None if x is None else x[rows]

    return LossInputs(
        logprob=inputs.logprob[rows],
        old_logprob=inputs.old_logprob[rows],
        advantages=inputs.advantages[rows],
        mask=inputs.mask[rows],
        entropy=cut(inputs.entropy),
        old_entropy=cut(inputs.old_entropy),
        collision=cut(inputs.collision),
        ref_logprob=cut(inputs.ref_logprob),
        context=inputs.context,
        **kw,
    )


@pytest.mark.parametrize(
    "mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
)
@pytest.mark.parametrize("objective", ["ppo", "w-reinforce", "entropy-adv", "steer"])
def test_gradient_accumulation_equivalence(mode, objective):
    cfg = TrainConfig(
        objective=objective,
        loss_agg=mode,
        kl_coef=0.01,
        entropy_coef=0.01,
        dual_clip_c=3.0,
        max_new_tokens=7,
        steer_norm="batch",
    )
    full, lp, ent = _random_inputs(1)
    from entropy_lab.objectives import prepare_context

    full.context = prepare_context(full, cfg)
    whole = compute_loss(full, cfg)
    g_lp, g_ent = torch.autograd.grad(whole.loss, (lp, ent))
    n_tok, n_seq = float(full.mask.sum()), float(full.mask.shape[0])
    total = 0
    for rows in (slice(0, 2), slice(2, 4), slice(4, 6)):
        total = total + compute_loss(_rows(full, rows, num_tokens=n_tok, num_seqs=n_seq), cfg).loss
    m_lp, m_ent = torch.autograd.grad(total, (lp, ent))
    torch.testing.assert_close(total, whole.loss)
    torch.testing.assert_close(m_lp, g_lp)
    torch.testing.assert_close(m_ent, g_ent)


def test_outputs_outside_mask_and_metrics_are_clean():
    inputs, _, _ = _random_inputs(2)
    out = compute_loss(inputs, TrainConfig(objective="steer", dual_clip_c=10.0))
    outside = inputs.mask == 0
    assert bool((out.per_token[outside] == 0).all())
    assert bool((out.clip_indicator[outside] == 0).all())
    assert bool((out.intervention_weight[outside] == 1).all())
    assert bool((out.advantage[outside] == 0).all())
    assert all(math.isfinite(v) for v in out.metrics.values())
    for key in (
        "loss/pg",
        "loss/kl",
        "loss/entropy",
        "clip/frac",
        "clip/frac_high",
        "clip/frac_low",
        "clip/frac_dual",
        "steer/weight_mean",
        "steer/weight_min",
    ):
        assert key in out.metrics


def test_all_masked_call_gives_zero_loss_and_finite_metrics():
    inputs, lp = make(
        [[1.2] * 4] * 2, [[1.0] * 4] * 2, mask=[[0] * 4] * 2, old_entropy=torch.ones(2, 4, dtype=D)
    )
    for objective in OBJECTIVES:
        inputs.entropy = torch.ones(2, 4, dtype=D)
        inputs.collision = torch.zeros(2, 4, dtype=D)
        out = compute_loss(inputs, TrainConfig(objective=objective))
        assert out.loss.item() == 0.0
        assert all(math.isfinite(v) for v in out.metrics.values()), objective


def test_nan_outside_mask_does_not_leak():
    inputs, lp = make([[1.0] * 4] * 2, [[1.0, 1.0, 1.0, float("nan")]] * 2, mask=[[1, 1, 1, 0]] * 2)
    out = compute_loss(inputs, TrainConfig())
    assert math.isfinite(out.loss.item())
    assert bool(torch.isfinite(grad_of(out, lp)).all())


def test_required_inputs_and_errors():
    assert required_inputs(TrainConfig()) == set()
    assert required_inputs(TrainConfig(objective="fork-tokens")) == {"entropy"}
    assert required_inputs(TrainConfig(objective="entropy-adv")) == {"entropy"}
    assert required_inputs(TrainConfig(entropy_coef=0.001)) == {"entropy"}
    assert required_inputs(TrainConfig(kl_coef=0.001)) == {"ref_logprob"}
    # the paper estimator reads the rollout policy's entropy, not the current one
    assert required_inputs(TrainConfig(objective="steer")) == {"old_entropy"}
    assert required_inputs(TrainConfig(objective="steer", steer_estimator="softmax")) == {
        "entropy",
        "collision",
    }
    assert required_inputs(TrainConfig(objective="fork-tokens", entropy_coef=0.001, kl_coef=0.1)) == {
        "entropy",
        "ref_logprob",
    }
    inputs, _ = make([[1.0] * 4] * 2, [[1.0] * 4] * 2)
    with pytest.raises(EntropyLabError, match="LossInputs.entropy"):
        compute_loss(inputs, TrainConfig(objective="fork-tokens"))
    with pytest.raises(EntropyLabError, match="LossInputs.old_entropy"):
        compute_loss(inputs, TrainConfig(objective="steer"))
    with pytest.raises(EntropyLabError, match="LossInputs.ref_logprob"):
        compute_loss(inputs, TrainConfig(kl_coef=0.1))
    inputs.advantages = inputs.advantages[:, :1]
    with pytest.raises(EntropyLabError, match="advantages has shape"):
        compute_loss(inputs, TrainConfig())


def test_registry_lists_names_and_refuses_duplicates():
    assert {"ppo", "clip-cov", "kl-cov", "fork-tokens", "w-reinforce", "entropy-adv", "steer"} <= set(
        OBJECTIVES
    )
    with pytest.raises(EntropyLabError, match="valid: .*ppo.*steer"):
        get_objective("nope")
    ppo = get_objective("ppo")
    with pytest.raises(EntropyLabError, match="^objective 'ppo' is already registered$"):
        register_objective("ppo")(lambda inputs, cfg: None)
    assert get_objective("ppo") is ppo  # the refused duplicate replaced nothing
    with pytest.raises(EntropyLabError, match="valid: k1, k2, k3"):
        get_kl_estimator("k4")
    assert get_objective("ppo").prepare(None, TrainConfig()) == {}


def test_bf16_logprobs_are_computed_in_fp32():
    inputs, _ = make(PPO_RATIOS, PPO_ADV, PPO_MASK)
    inputs.logprob = inputs.logprob.detach().to(torch.bfloat16).requires_grad_(True)
    out = compute_loss(inputs, TrainConfig())
    assert out.per_token.dtype == torch.float32 and out.loss.dtype == torch.float32
    out.loss.backward()
    assert inputs.logprob.grad is not None
