"""The ``paper-appendix`` estimator: hand-derived values and what it predicts in a tabular policy."""

import math

import numpy as np
import torch

from entropy_lab.theory import TokenQuantities, get_estimator

LN2 = math.log(2.0)


def quantities(logits, tokens, **kw):
    """TokenQuantities of ``tokens`` (n,) under free ``logits`` (n, V), fp64."""
    logp = logits.log_softmax(-1)  # (n, V)
    p = logp.exp()
    entropy = -(p * logp).sum(-1)  # (n,)
    collision = (p * p * (logp + entropy[:, None])).sum(-1)  # (n,)
    logprob = logp.gather(1, tokens[:, None])[:, 0]  # (n,)
    kw.setdefault("old_logprob", logprob)
    return TokenQuantities(logprob=logprob, entropy=entropy, collision=collision, **kw)


def test_hand_derived_values():
    # pi = softmax(ln 2, 0, 0) = (1/2, 1/4, 1/4), so H = 1.5 ln 2, l_0 = 0.5 ln 2, l_1 = -0.5 ln 2.
    logits = torch.tensor([[LN2, 0.0, 0.0]] * 4, dtype=torch.float64)
    tokens = torch.tensor([0, 1, 0, 0])
    old = torch.log(torch.tensor([0.5, 0.25, 0.25, 0.5], dtype=torch.float64))  # r = 1, 1, 2, 1
    q = quantities(
        logits,
        tokens,
        advantage=torch.tensor([2.0, 2.0, -1.0, 2.0], dtype=torch.float64),
        old_logprob=old,
        clip_indicator=torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64),
        intervention_weight=torch.tensor([1.0, 1.0, 0.8, 1.0], dtype=torch.float64),
        normalizer=4.0,
        lr=0.1,
    )
    omega = get_estimator("paper-appendix")(q)
    expected = torch.tensor(
        [
            -0.1 * (2 / 4) * 0.5**2 * (0.5 * LN2),  # w = 1/2, (1 - pi_a)^2 = 1/4: -0.00625 ln 2
            -0.1 * (2 / 4) * 0.75**2 * (-0.5 * LN2),  # a unlikely token: +0.0140625 ln 2
            -0.1 * (2 * -1 * 0.8 / 4) * 0.5**2 * (0.5 * LN2),  # r = 2, lambda = 0.8: +0.005 ln 2
            0.0,  # clipped: no gradient, no change
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(omega, expected)
    torch.testing.assert_close(
        omega[:3] / LN2, torch.tensor([-0.00625, 0.0140625, 0.005], dtype=torch.float64)
    )


def test_relation_to_the_other_closed_forms():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(200, 12, generator=g, dtype=torch.float64) * 2
    tokens = torch.randint(0, 12, (200,), generator=g)
    old = logits.log_softmax(-1).gather(1, tokens[:, None])[:, 0] + 0.1 * torch.randn(200, generator=g)
    q = quantities(
        logits,
        tokens,
        advantage=torch.randn(200, generator=g, dtype=torch.float64),
        old_logprob=old.double(),
        normalizer=200.0,
        lr=0.5,
    )
    appendix = get_estimator("paper-appendix")(q)
    p = q.prob
    torch.testing.assert_close(appendix, get_estimator("paper")(q) * (1 - p))
    torch.testing.assert_close(appendix * p, get_estimator("sampled-logit")(q) * (1 - p))
    # Same sign as the quadrant rule -sign(A l_a) wherever it is nonzero.
    assert torch.equal(torch.sign(appendix), -torch.sign(q.advantage * q.l_a))


def entropy(logits):
    logp = logits.log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def tabular_states(n=2000, vocab=50, seed=0):
    """n independent states with free logits, one token sampled from each, a random advantage."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, vocab, generator=g, dtype=torch.float64) * 1.5  # (n, V)
    a = torch.multinomial(z.softmax(-1), 1, generator=g)[:, 0]  # (n,)
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    return z, a, adv


def sampled_logit_step(z, a, w, eta):
    """One SGD step on -sum w log pi_a moving only the sampled logit: dz_a = eta w (1 - pi_a)."""
    pa = z.softmax(-1).gather(1, a[:, None])[:, 0]
    return z + (eta * w * (1 - pa))[:, None] * torch.nn.functional.one_hot(a, z.shape[1]).double()


def test_tabular_sampled_logit_step_it_is_the_drawn_tokens_own_term():
    """Under the paper's assumption (only the sampled logit moves) the estimator equals
    -l_a * (change of log pi_a) to first order, while the exact entropy change is
    pi_a / (1 - pi_a) times it: the residual of both is second order (halves with eta)."""
    z, a, adv = tabular_states()
    n = len(a)
    q = quantities(z, a, advantage=adv, normalizer=float(n), lr=1.0)
    omega_unit = get_estimator("paper-appendix")(q)  # at eta = 1: linear in eta
    w = adv / n
    errors = []
    for eta in (0.4, 0.2):
        z_after = sampled_logit_step(z, a, w, eta)
        dlogp = (z_after.log_softmax(-1) - z.log_softmax(-1)).gather(1, a[:, None])[:, 0]
        d_entropy = entropy(z_after) - entropy(z)
        omega = eta * omega_unit
        own = -q.l_a * dlogp
        exact_from_omega = omega * q.prob / (1 - q.prob)
        errors.append(
            (
                float((omega - own).abs().max() / own.abs().max()),
                float((exact_from_omega - d_entropy).abs().max() / d_entropy.abs().max()),
            )
        )
    (e_own, e_exact), (h_own, h_exact) = errors
    assert e_own < 1e-3 and e_exact < 1e-3
    assert 0.4 < h_own / e_own < 0.6  # the residual halves with the step: first-order agreement
    assert 0.4 < h_exact / e_exact < 0.6


def test_tabular_full_softmax_step_it_is_loose_where_softmax_is_exact():
    z, a, adv = tabular_states(seed=3)
    n = len(a)
    eta = 0.02 * n
    q = quantities(z, a, advantage=adv, normalizer=float(n), lr=eta)
    w = adv / n
    pi = z.softmax(-1)
    z_after = z + eta * w[:, None] * (torch.nn.functional.one_hot(a, z.shape[1]).double() - pi)
    d_entropy = (entropy(z_after) - entropy(z)).numpy()
    pearson = {
        name: float(np.corrcoef(get_estimator(name)(q).numpy(), d_entropy)[0, 1])
        for name in ("softmax", "paper-appendix")
    }
    assert pearson["softmax"] > 0.999
    assert pearson["paper-appendix"] < 0.8  # about 0.6: the collision term and a factor pi_a missing
