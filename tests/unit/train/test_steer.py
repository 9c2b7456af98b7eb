"""STEER weights against an independent, plain re-derivation: a Python loop over tokens.

The reference below is written from the STEER release code's recipe (README, Methods),
not from entropy_lab.steer: per token m = |A / pi_old * pi (1 - pi) (log pi + H)| with the
clamps, non-finite -> 0, then the exp or linear map over the valid (or candidate) tokens.
"""

from __future__ import annotations

import math

import pytest
import torch

from entropy_lab.config import TrainConfig
from entropy_lab.errors import EntropyLabError
from entropy_lab.objectives import LossInputs, compute_loss, get_objective, prepare_context
from entropy_lab.steer import (
    MagnitudeRange,
    get_steer_map,
    magnitude_range,
    required_inputs,
    steer_omega,
    steer_weights,
)

D = torch.float64


def ref_signed_metric(lp, olp, a, h):
    """The release's signed metric A/pi_old * pi(1-pi)(log pi + H) = -omega_paper; 0 when not finite."""
    p = min(max(math.exp(lp), 1e-8), 1 - 1e-8)
    po = min(max(math.exp(olp), 1e-8), 1.0)
    value = a / po * p * (1 - p) * (math.log(p) + h)
    return value if math.isfinite(value) else 0.0


def ref_softmax_omega(lp, olp, a, h, c):
    """-w (pi l_a - C), w = r A, at unit step; pi clamped like the release."""
    p = min(max(math.exp(lp), 1e-8), 1 - 1e-8)
    po = min(max(math.exp(olp), 1e-8), 1.0)
    value = -(p / po) * a * (p * (math.log(p) + h) - c)
    return value if math.isfinite(value) else 0.0


def ref_map(ms, kind, lmin, lmax, lo=None, hi=None):
    """Map a list of magnitudes (lo/hi default to their min/max)."""
    lo = min(ms) if lo is None else lo
    hi = max(ms) if hi is None else hi
    out = []
    for m in ms:
        if kind == "exp":
            k = -math.log(lmin) / max(hi, 0.02)
            out.append(min(max(math.exp(-k * m), lmin), 1.0))
        elif hi > lo:
            w = lmax - (m - lo) * (lmax - lmin) / (hi - lo)
            out.append(min(max(w, lmin), lmax))
        else:
            out.append((lmin + lmax) / 2)
    return out


def ref_weights(
    lp, olp, adv, h, mask, kind="exp", lmin=0.8, lmax=1.2, signed=False, lo=None, hi=None, omega_fn=None
):
    """Weights as nested lists: 1 outside the mask and on non-candidates."""
    B, T = len(lp), len(lp[0])
    omegas = {}
    for i in range(B):
        for t in range(T):
            if mask[i][t]:
                if omega_fn is None:
                    omegas[i, t] = -ref_signed_metric(lp[i][t], olp[i][t], adv[i][t], h[i][t])
                else:
                    omegas[i, t] = omega_fn(i, t)
    cand = [k for k, o in omegas.items() if (o < 0 or not signed)]
    weights = [[1.0] * T for _ in range(B)]
    if cand:
        mapped = ref_map([abs(omegas[k]) for k in cand], kind, lmin, lmax, lo, hi)
        for k, w in zip(cand, mapped, strict=True):
            weights[k[0]][k[1]] = w
    return weights


def random_batch(seed, b=4, t=6, masked=True):
    g = torch.Generator().manual_seed(seed)
    old = (torch.rand(b, t, generator=g, dtype=D) * 0.98 + 0.01).log()
    lp = (old + 0.3 * torch.randn(b, t, generator=g, dtype=D)).clamp(max=-1e-3)  # valid log-probs
    adv = torch.randn(b, 1, generator=g, dtype=D).expand(b, t).contiguous()
    h = torch.rand(b, t, generator=g, dtype=D) * 3
    c = torch.rand(b, t, generator=g, dtype=D) * 0.2 - 0.05
    mask = torch.ones(b, t, dtype=torch.bool)
    if masked:
        lengths = torch.randint(1, t + 1, (b,), generator=g)
        mask = torch.arange(t)[None, :] < lengths[:, None]
    return lp, old, adv, h, c, mask


def weights_via_module(lp, old, adv, h, mask, **kw):
    omega = steer_omega(lp, old, adv, mask, estimator="paper", old_entropy=h)
    return steer_weights(omega, mask, **kw)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("kind", ["exp", "linear"])
@pytest.mark.parametrize("signed", [False, True])
def test_weights_match_plain_loop(seed, kind, signed):
    lp, old, adv, h, _, mask = random_batch(seed)
    lmin = 0.7 if kind == "exp" else 0.8
    got = weights_via_module(
        lp, old, adv, h, mask, map_name=kind, lambda_min=lmin, lambda_max=1.2, signed=signed
    )
    want = ref_weights(
        lp.tolist(), old.tolist(), adv.tolist(), h.tolist(), mask.tolist(), kind, lmin, 1.2, signed
    )
    torch.testing.assert_close(got, torch.tensor(want, dtype=D), rtol=1e-9, atol=1e-12)


def test_extremes_of_each_map():
    lp, old, adv, h, _, mask = random_batch(7, masked=False)
    w_exp = weights_via_module(lp, old, adv, h, mask, map_name="exp", lambda_min=0.8)
    w_lin = weights_via_module(lp, old, adv, h, mask, map_name="linear", lambda_min=0.8, lambda_max=1.2)
    m = steer_omega(lp, old, adv, mask, old_entropy=h).abs()
    top, bottom = m.argmax(), m.argmin()
    assert float(w_exp.flatten()[top]) == pytest.approx(0.8)  # max m >= 0.02 here
    assert float(w_lin.flatten()[top]) == pytest.approx(0.8)
    assert float(w_lin.flatten()[bottom]) == pytest.approx(1.2)
    assert float(w_exp.max()) <= 1.0 and float(w_lin.max()) <= 1.2


def test_ties_give_midpoint_or_lambda_min():
    # identical tokens: max m == min m
    lp = torch.full((2, 3), math.log(0.3), dtype=D)
    old = lp.clone()
    adv = torch.ones(2, 3, dtype=D)
    h = torch.full((2, 3), 2.0, dtype=D)
    mask = torch.ones(2, 3, dtype=torch.bool)
    w_lin = weights_via_module(lp, old, adv, h, mask, map_name="linear", lambda_min=0.8, lambda_max=1.2)
    torch.testing.assert_close(w_lin, torch.full((2, 3), 1.0, dtype=D))
    w_exp = weights_via_module(lp, old, adv, h, mask, map_name="exp", lambda_min=0.8)
    m = abs(ref_signed_metric(math.log(0.3), math.log(0.3), 1.0, 2.0))
    assert m > 0.02
    torch.testing.assert_close(w_exp, torch.full((2, 3), 0.8, dtype=D))


def test_small_magnitudes_use_the_floor():
    # all m below 0.02: k = -ln(0.8) / 0.02, so no token reaches lambda_min
    lp = torch.full((1, 4), math.log(0.999), dtype=D)
    old = lp.clone()
    adv = torch.tensor([[0.01, 0.02, 0.03, 0.04]], dtype=D)
    h = torch.full((1, 4), 0.5, dtype=D)
    mask = torch.ones(1, 4, dtype=torch.bool)
    got = weights_via_module(lp, old, adv, h, mask, map_name="exp", lambda_min=0.8)
    want = ref_weights(lp.tolist(), old.tolist(), adv.tolist(), h.tolist(), mask.tolist(), "exp", 0.8)
    torch.testing.assert_close(got, torch.tensor(want, dtype=D))
    assert float(got.min()) > 0.8


def test_all_masked_call_gives_ones():
    lp, old, adv, h, _, _ = random_batch(3)
    mask = torch.zeros_like(lp, dtype=torch.bool)
    for kind in ("exp", "linear"):
        w = weights_via_module(lp, old, adv, h, mask, map_name=kind)
        assert bool((w == 1).all())
    assert magnitude_range(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.bool)) == MagnitudeRange(
        0, 0.0, 0.0
    )
    # and through the objective: zero loss, finite metrics
    inputs = LossInputs(lp.clone().requires_grad_(True), old, adv, mask, old_entropy=h)
    out = compute_loss(inputs, TrainConfig(objective="steer", dual_clip_c=10.0))
    assert out.loss.item() == 0.0
    assert all(math.isfinite(v) for v in out.metrics.values())


def test_all_masked_row_is_clean():
    lp, old, adv, h, _, mask = random_batch(4, masked=False)
    mask[1] = False
    got = weights_via_module(lp, old, adv, h, mask, map_name="linear")
    want = ref_weights(lp.tolist(), old.tolist(), adv.tolist(), h.tolist(), mask.tolist(), "linear", 0.8, 1.2)
    torch.testing.assert_close(got, torch.tensor(want, dtype=D))
    assert bool((got[1] == 1).all())


def test_non_finite_inputs_give_zero_magnitude():
    lp, old, adv, h, _, mask = random_batch(5, masked=False)
    h[0, 0] = float("nan")
    h[0, 1] = float("inf")
    adv[1, 2] = float("inf")
    adv[2, 3] = float("nan")
    omega = steer_omega(lp, old, adv, mask, old_entropy=h)
    assert bool(torch.isfinite(omega).all())
    for i, t in [(0, 0), (0, 1), (1, 2), (2, 3)]:
        assert float(omega[i, t]) == 0.0
    for kind in ("exp", "linear"):
        got = steer_weights(omega, mask, map_name=kind)
        want = ref_weights(lp.tolist(), old.tolist(), adv.tolist(), h.tolist(), mask.tolist(), kind, 0.8, 1.2)
        torch.testing.assert_close(got, torch.tensor(want, dtype=D))
    assert float(steer_weights(omega, mask, map_name="exp")[0, 0]) == 1.0  # m = 0 -> exp(0)


def test_probability_clamps():
    # pi = 1 exactly (logprob 0) and pi_old underflowing: clamped, finite
    lp = torch.tensor([[0.0, -40.0, -1.0]], dtype=D)
    old = torch.tensor([[-50.0, -1.0, 0.0]], dtype=D)
    adv = torch.ones(1, 3, dtype=D)
    h = torch.ones(1, 3, dtype=D)
    mask = torch.ones(1, 3, dtype=torch.bool)
    omega = steer_omega(lp, old, adv, mask, old_entropy=h)
    want = [-ref_signed_metric(a, b, 1.0, 1.0) for a, b in zip(lp[0].tolist(), old[0].tolist(), strict=True)]
    torch.testing.assert_close(omega[0], torch.tensor(want, dtype=D), rtol=1e-9, atol=0)


@pytest.mark.parametrize("kind", ["exp", "linear"])
def test_per_batch_normalisation(kind):
    lp, old, adv, h, _, mask = random_batch(11, b=6)
    cfg = TrainConfig(objective="steer", dual_clip_c=10.0, steer_norm="batch", steer_map=kind)
    # prepare runs on the whole rollout batch with logprob == old_logprob
    full = LossInputs(old.clone(), old, adv, mask, old_entropy=h)
    context = prepare_context(full, cfg)
    ms = [
        abs(ref_signed_metric(a, a, c, d))
        for a, c, d, v in zip(
            old.flatten().tolist(),
            adv.flatten().tolist(),
            h.flatten().tolist(),
            mask.flatten().tolist(),
            strict=True,
        )
        if v
    ]
    assert context["steer/m_max"] == pytest.approx(max(ms)) and context["steer/m_min"] == pytest.approx(
        min(ms)
    )
    # a loss call on rows 0..2 with the current logprob maps with the batch's range, not its own
    rows = slice(0, 3)
    inputs = LossInputs(
        lp[rows].clone().requires_grad_(True),
        old[rows],
        adv[rows],
        mask[rows],
        old_entropy=h[rows],
        context=context,
    )
    out = compute_loss(inputs, cfg)
    want = ref_weights(
        lp[rows].tolist(),
        old[rows].tolist(),
        adv[rows].tolist(),
        h[rows].tolist(),
        mask[rows].tolist(),
        kind,
        0.8,
        1.2,
        lo=min(ms),
        hi=max(ms),
    )
    torch.testing.assert_close(out.intervention_weight, torch.tensor(want, dtype=D))
    # without the context the batch mode refuses to guess
    inputs.context = {}
    with pytest.raises(EntropyLabError, match="prepare"):
        compute_loss(inputs, cfg)


def test_per_call_normalisation_ignores_context():
    lp, old, adv, h, _, mask = random_batch(12)
    cfg = TrainConfig(objective="steer", dual_clip_c=10.0)
    inputs = LossInputs(
        lp.clone().requires_grad_(True),
        old,
        adv,
        mask,
        old_entropy=h,
        context={"steer/count": 1, "steer/m_min": 0.0, "steer/m_max": 1e6},
    )
    out = compute_loss(inputs, cfg)
    want = ref_weights(lp.tolist(), old.tolist(), adv.tolist(), h.tolist(), mask.tolist(), "exp", 0.8)
    torch.testing.assert_close(out.intervention_weight, torch.tensor(want, dtype=D))


def test_signed_variant_damps_only_entropy_lowering_tokens():
    lp, old, adv, h, _, mask = random_batch(13, masked=False)
    omega = steer_omega(lp, old, adv, mask, old_entropy=h)
    assert bool((omega > 0).any()) and bool((omega < 0).any())
    w = steer_weights(omega, mask, map_name="exp", signed=True)
    assert bool((w[omega >= 0] == 1).all())
    assert float(w[omega < 0].min()) == pytest.approx(0.8)


def test_softmax_estimator_matches_plain_loop():
    lp, old, adv, h, c, mask = random_batch(14)
    omega = steer_omega(lp, old, adv, mask, estimator="softmax", entropy=h, collision=c)
    L, O, A, H, C = (x.tolist() for x in (lp, old, adv, h, c))
    got = steer_weights(omega, mask, map_name="exp", lambda_min=0.8)
    want = ref_weights(
        L,
        O,
        A,
        H,
        mask.tolist(),
        "exp",
        0.8,
        omega_fn=lambda i, t: ref_softmax_omega(L[i][t], O[i][t], A[i][t], H[i][t], C[i][t]),
    )
    torch.testing.assert_close(got, torch.tensor(want, dtype=D), rtol=1e-9, atol=1e-12)
    # and the objective reads current entropy and collision for it
    cfg = TrainConfig(objective="steer", steer_estimator="softmax", dual_clip_c=10.0)
    assert get_objective("steer").inputs(cfg) == {"entropy", "collision"}
    inputs = LossInputs(lp.clone().requires_grad_(True), old, adv, mask, entropy=h, collision=c)
    torch.testing.assert_close(
        compute_loss(inputs, cfg).intervention_weight, torch.tensor(want, dtype=D), rtol=1e-9, atol=1e-12
    )


def test_estimator_requirements_and_refusals():
    assert required_inputs("paper") == {"old_entropy"}
    assert required_inputs("covariance") == frozenset()
    lp, old, adv, h, _, mask = random_batch(15)
    with pytest.raises(EntropyLabError, match="old_entropy"):
        steer_omega(lp, old, adv, mask, estimator="paper")
    with pytest.raises(EntropyLabError, match="logit-grad"):
        steer_omega(lp, old, adv, mask, estimator="logit-grad", entropy=h)
    with pytest.raises(EntropyLabError, match="valid: exp, linear"):
        get_steer_map("cosine")
    with pytest.raises(EntropyLabError, match="lambda_min"):
        steer_weights(torch.ones(1, 2), torch.ones(1, 2, dtype=torch.bool), map_name="exp", lambda_min=0.0)
    # covariance: means over the valid tokens of the call
    omega = steer_omega(lp, old, adv, mask, estimator="covariance")
    l, a = lp[mask], adv[mask]
    torch.testing.assert_close(omega[mask], -(l - l.mean()) * (a - a.mean()))
    assert bool((omega[~mask] == 0).all())
