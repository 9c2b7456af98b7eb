"""The estimators against the tabular ground truth and finite differences."""

import numpy as np
import pytest
import torch

from entropy_lab.errors import EntropyLabError
from entropy_lab.records import QUADRANTS, THEORY_SIGN
from entropy_lab.stats import entropy_from_logits, gather_logprobs, token_stats
from entropy_lab.tabular import TabularPolicy
from entropy_lab.theory import (
    ESTIMATORS,
    TokenQuantities,
    get_estimator,
    predict_all,
    register_estimator,
)
from entropy_lab.trace import EntropyTracer

V, B = 50, 2000


def gain(omega, dh):
    return float((omega * dh).sum() / (omega * omega).sum())


def pearson(x, y):
    return float(np.corrcoef(x, y)[0, 1])


def tabular_batch(seed=0):
    """B distinct two-token prompts and one sampled response token each: B independent states."""
    model = TabularPolicy(V, max_states=4 * B, init_scale=1.5, seed=seed)
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.arange(B) % V, torch.arange(B) // V, torch.zeros(B, dtype=torch.long)], 1)
    with torch.no_grad():
        ids[:, 2] = torch.multinomial(model(ids).logits[:, 1].softmax(-1), 1, generator=g)[:, 0]
    resp = torch.zeros(B, 3, dtype=torch.bool)
    resp[:, 2] = True
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    return model, ids, resp, adv


def traced_sgd(model, ids, resp, adv, lr, extra_loss=None, grad_filter=None):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    with EntropyTracer(model).step(ids, None, resp, advantages=adv) as step:
        logits = model(input_ids=ids).logits  # (B, 3, V)
        lp = gather_logprobs(logits[:, 1], ids[:, 2])  # (B,)
        loss = -(adv * lp).mean()  # token-mean, on-policy: w = A / B
        if extra_loss is not None:
            loss = loss + extra_loss(logits[:, 1])
        loss.backward()
        if grad_filter is not None:
            grad_filter(model)
        opt.step()
    return step.records


def test_softmax_and_logit_grad_match_exact_change_in_tabular_model():
    model, ids, resp, adv = tabular_batch()
    df = traced_sgd(model, ids, resp, adv, lr=0.02 * B)
    dh = df.delta_entropy.to_numpy()
    for col in ("omega_softmax", "omega_logit_grad"):
        om = df[col].to_numpy()
        assert pearson(om, dh) >= 0.999, col
        assert abs(gain(om, dh) - 1) <= 0.02, col
    np.testing.assert_allclose(df.omega_logit_grad, df.omega_softmax, rtol=1e-9, atol=1e-15)
    # the four-factor closed forms drop the collision term and are visibly worse here
    assert pearson(df.omega_sampled_logit.to_numpy(), dh) < 0.95


def test_sampled_logit_is_exact_when_only_the_sampled_logit_moves():
    model, ids, resp, adv = tabular_batch(seed=1)
    states = model.state_ids(ids)[:, 1]

    def keep_sampled_logit_only(m):
        grad = m.head.weight.grad
        mask = torch.zeros_like(grad, dtype=torch.bool)
        mask[states, ids[:, 2]] = True
        grad[~mask] = 0

    df = traced_sgd(model, ids, resp, adv, lr=0.02 * B, grad_filter=keep_sampled_logit_only)
    dh, om = df.delta_entropy.to_numpy(), df.omega_sampled_logit.to_numpy()
    assert pearson(om, dh) >= 0.999
    assert abs(gain(om, dh) - 1) <= 0.02
    # and the measured linear term equals it to first order in the actual logit change
    np.testing.assert_allclose(df.delta_logit_linear, om, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("extra", ["kl", "entropy_bonus"])
def test_logit_grad_covers_other_loss_terms(extra):
    model, ids, resp, adv = tabular_batch(seed=2)
    ref = model.head.weight.detach()[model.state_ids(ids)[:, 1]].clone() + torch.randn(
        B, V, dtype=torch.float64
    )

    def extra_loss(z):  # z: (B, V)
        if extra == "kl":  # full KL(pi || ref) per state
            logp, logr = z.log_softmax(-1), ref.log_softmax(-1)
            return 0.5 * (logp.exp() * (logp - logr)).sum(-1).mean()
        return -0.5 * entropy_from_logits(z).mean()

    df = traced_sgd(model, ids, resp, adv, lr=0.02 * B, extra_loss=extra_loss)
    dh = df.delta_entropy.to_numpy()
    lg, sm = df.omega_logit_grad.to_numpy(), df.omega_softmax.to_numpy()
    assert pearson(lg, dh) >= 0.999 and abs(gain(lg, dh) - 1) <= 0.02
    rms = lambda x: float(np.sqrt(np.mean(x**2)))  # noqa: E731
    assert rms(lg - sm) > 5 * rms(lg - dh)  # softmax misses the extra term; logit-grad does not


def test_logit_grad_against_finite_differences():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(40, 12, generator=g, dtype=torch.float64, requires_grad=True)
    a = torch.randint(0, 12, (40,), generator=g)
    w = torch.randn(40, generator=g, dtype=torch.float64)
    loss = -(w * gather_logprobs(z, a)).sum() - 0.3 * entropy_from_logits(z).sum()
    (grad,) = torch.autograd.grad(loss, z)
    s = token_stats(z.detach(), a)
    eta = 0.7
    # logit-grad: eta sum_k pi_k l_k g_k; compute it through the estimator interface
    p = z.detach().softmax(-1)
    dot = (p * (p.log() + s.entropy[:, None]) * grad).sum(-1)
    q = TokenQuantities(
        logprob=s.logprob,
        entropy=s.entropy,
        collision=s.collision,
        advantage=w,
        old_logprob=s.logprob,
        lr=eta,
        logit_grad_dot=dot,
    )
    omega = get_estimator("logit-grad")(q)
    h = 1e-6
    zd = z.detach()
    fd = (entropy_from_logits(zd - eta * h * grad) - entropy_from_logits(zd + eta * h * grad)) / (2 * h)
    torch.testing.assert_close(omega, fd, atol=1e-8, rtol=1e-6)
    # without the entropy term the same construction reproduces softmax exactly
    loss2 = -(w * gather_logprobs(z, a)).sum()
    (grad2,) = torch.autograd.grad(loss2, z)
    q.logit_grad_dot = (p * (p.log() + s.entropy[:, None]) * grad2).sum(-1)
    torch.testing.assert_close(
        get_estimator("logit-grad")(q), get_estimator("softmax")(q), atol=1e-12, rtol=1e-9
    )


def test_covariance_identity_and_relations_between_forms():
    g = torch.Generator().manual_seed(4)
    z = torch.randn(25, 9, generator=g, dtype=torch.float64) * 2
    a = torch.randint(0, 9, (25,), generator=g)
    s = token_stats(z, a)
    old = s.logprob + 0.1 * torch.randn(25, generator=g, dtype=torch.float64)
    q = TokenQuantities(
        logprob=s.logprob,
        entropy=s.entropy,
        collision=s.collision,
        advantage=torch.randn(25, generator=g, dtype=torch.float64),
        old_logprob=old,
        clip_indicator=torch.ones(25, dtype=torch.float64),
        intervention_weight=0.8,
        normalizer=25.0,
        lr=0.3,
    )
    om = predict_all(q)
    p = z.softmax(-1)
    logp = p.log()
    e_a = torch.nn.functional.one_hot(a, 9).double()
    y = e_a - p
    cov = (p * logp * y).sum(-1) - (p * logp).sum(-1) * (p * y).sum(-1)  # Cov_{k~pi}(log pi_k, e_a - pi)
    torch.testing.assert_close(om["softmax"], -q.lr * q.weight * cov)
    # softmax = sampled-logit + eta w sum_{k != a} pi_k^2 l_k
    l = logp + s.entropy[:, None]
    rest = (p * p * l * (1 - e_a)).sum(-1)
    torch.testing.assert_close(om["softmax"], om["sampled-logit"] + q.lr * q.weight * rest)
    # paper = -eta w (1 - pi_a) l_a, one factor pi_a fewer than sampled-logit
    torch.testing.assert_close(om["paper"] * q.prob, om["sampled-logit"])
    # covariance: hand-computed means
    lp, A = q.logprob, q.advantage
    torch.testing.assert_close(om["covariance"], -0.3 * (lp - lp.mean()) * (A - A.mean()) / 25.0)
    assert torch.isnan(om["logit-grad"]).all()  # no gradient captured -> NaN, not a fake number


def test_registry():
    # the built-ins first, in order; entropy_lab.jvp adds its estimators after them once imported
    builtins = ["paper", "sampled-logit", "softmax", "logit-grad", "covariance", "paper-appendix"]
    assert list(ESTIMATORS)[: len(builtins)] == builtins
    with pytest.raises(EntropyLabError, match="valid: paper, sampled-logit"):
        get_estimator("nope")
    with pytest.raises(EntropyLabError, match="already registered"):
        register_estimator("softmax")(lambda q: q.logprob)


def test_quadrant_signs_hold_for_softmax_in_tabular_model():
    model, ids, resp, adv = tabular_batch(seed=5)
    df = traced_sgd(model, ids, resp, adv, lr=0.02 * B)
    l = (df.logprob + df.entropy_before).to_numpy()
    falls = (np.sign(df.advantage) == np.sign(l)).to_numpy()
    # sampled-logit predicts a fall exactly in the "falls" quadrants, by construction of its sign
    assert ((df.omega_sampled_logit.to_numpy() < 0) == falls).all()
    # the record contract's quadrant table says the same: its direction is the sign of -w pi_a (1-pi_a) l_a
    direction = {(sign_a, sign_l): theory for _, sign_a, sign_l, theory in QUADRANTS}
    sign_a, sign_l = np.sign(df.advantage).astype(int), np.where(l >= 0, 1, -1)
    expected = [THEORY_SIGN[direction[a, s]] for a, s in zip(sign_a, sign_l, strict=True)]
    np.testing.assert_array_equal(np.sign(df.omega_sampled_logit.to_numpy()), expected)
    assert direction[0, 0] == "flat" and "flat" not in THEORY_SIGN  # zero advantage: no first-order change
