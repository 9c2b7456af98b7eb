"""token_stats and friends against the naive full-softmax computation."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from entropy_lab.errors import EntropyLabError
from entropy_lab.stats import (
    entropy_change_stats,
    entropy_from_logits,
    entropy_gradient_dot,
    gather_logprobs,
    token_stats,
)


def naive(logits, targets):
    logp = logits.double().log_softmax(-1)
    p = logp.exp()
    plogp = torch.where(p > 0, p * logp, torch.zeros((), dtype=torch.float64))
    H = -plogp.sum(-1)
    C = torch.where(p > 0, p * p * (logp + H[..., None]), torch.zeros((), dtype=torch.float64)).sum(-1)
    return H, logp.gather(-1, targets[..., None])[..., 0], C


@pytest.mark.parametrize(
    "dtype,atol",
    [(torch.float32, 2e-5), (torch.bfloat16, 2e-5), (torch.float16, 2e-5), (torch.float64, 1e-12)],
)
@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4)])
@pytest.mark.parametrize("chunk_bytes", [1, 200, 2**20])
def test_chunked_matches_naive(dtype, atol, shape, chunk_bytes):
    g = torch.Generator().manual_seed(0)
    V = 33
    logits = (torch.randn(*shape, V, generator=g) * 3).to(dtype)
    targets = torch.randint(0, V, shape, generator=g)
    s = token_stats(logits, targets, chunk_bytes=chunk_bytes)
    H, lp, C = naive(logits, targets)  # naive on the same (rounded) logits
    assert s.entropy.shape == shape
    torch.testing.assert_close(s.entropy.double(), H, atol=atol, rtol=0)
    torch.testing.assert_close(s.logprob.double(), lp, atol=atol, rtol=0)
    torch.testing.assert_close(s.collision.double(), C, atol=atol, rtol=0)
    assert s.entropy.dtype == torch.promote_types(dtype, torch.float32)


def test_extreme_and_masked_logits():
    V = 10
    logits = torch.zeros(5, V)
    logits[0, 3] = 1e4  # one-hot in effect
    logits[1] = torch.linspace(-1e4, 1e4, V)
    logits[2, :5] = -float("inf")  # masked vocabulary: uniform over the other 5
    logits[3] = 0.0  # uniform
    logits[4, 7] = -1e4
    targets = torch.tensor([3, 9, 6, 0, 7])
    s = token_stats(logits, targets)
    assert s.entropy[0] == pytest.approx(0.0, abs=1e-6) and s.logprob[0] == pytest.approx(0.0, abs=1e-6)
    assert s.collision[0] == pytest.approx(0.0, abs=1e-6)
    assert s.entropy[2] == pytest.approx(math.log(5), abs=1e-6)
    assert s.logprob[2] == pytest.approx(-math.log(5), abs=1e-6)
    assert s.collision[2] == pytest.approx(0.0, abs=1e-6)  # uniform: l_k = 0 everywhere
    assert s.entropy[3] == pytest.approx(math.log(V), abs=1e-6)
    assert s.logprob[4] == pytest.approx(-1e4 - math.log(V - 1), abs=1e-2)
    assert torch.isfinite(s.entropy).all() and torch.isfinite(s.collision).all()
    H, lp, C = naive(logits, targets)
    torch.testing.assert_close(s.entropy.double(), H, atol=1e-5, rtol=0)
    torch.testing.assert_close(s.collision.double(), C, atol=1e-5, rtol=0)


@pytest.mark.parametrize("bad,where", [(float("nan"), (1, 2)), (float("inf"), (0, 1))])
def test_nonfinite_names_position(bad, where):
    logits = torch.randn(2, 3, 4)
    logits[where + (2,)] = bad
    with pytest.raises(EntropyLabError, match=rf"position \({where[0]}, {where[1]}\)"):
        token_stats(logits)


def test_all_masked_row_is_an_error_and_shape_mismatch():
    logits = torch.randn(3, 4)
    logits[1] = -float("inf")
    with pytest.raises(EntropyLabError, match=r"position \(1,\)"):
        token_stats(logits)
    with pytest.raises(EntropyLabError, match="targets shape"):
        token_stats(torch.randn(3, 4), torch.zeros(4, dtype=torch.long))


@settings(max_examples=60, deadline=None)
@given(
    V=st.integers(1, 40),
    n=st.integers(1, 6),
    scale=st.floats(0.0, 50.0),
    seed=st.integers(0, 2**16),
)
def test_properties(V, n, scale, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, V, generator=g, dtype=torch.float64) * scale
    targets = torch.randint(0, V, (n,), generator=g)
    s = token_stats(logits, targets, chunk_bytes=64)
    assert (s.entropy >= -1e-9).all() and (s.entropy <= math.log(V) + 1e-9).all()
    assert (s.logprob <= 1e-12).all()
    p = logits.softmax(-1)
    l = p.log() + s.entropy[:, None]
    # identities of docs/theory.md section 1: sum_k pi_k l_k = 0, and C = sum_k pi_k^2 l_k = Cov_pi(log pi, pi)
    assert torch.allclose((p * l).sum(-1), torch.zeros(n, dtype=torch.float64), atol=1e-9)
    cov = (p * p.log() * p).sum(-1) - (p * p.log()).sum(-1) * (p * p).sum(-1)
    torch.testing.assert_close(s.collision, cov, atol=1e-9, rtol=1e-7)


def test_entropy_gradient_dot_is_directional_derivative():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(6, 9, generator=g, dtype=torch.float64)
    d = torch.randn(6, 9, generator=g, dtype=torch.float64)
    eps = 1e-6
    fd = (entropy_from_logits(z + eps * d) - entropy_from_logits(z - eps * d)) / (2 * eps)
    torch.testing.assert_close(-entropy_gradient_dot(z, d, chunk_bytes=8), fd, atol=1e-8, rtol=1e-6)


def test_differentiable_helpers_match_naive():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(4, 5, 11, generator=g, requires_grad=True)
    t = torch.randint(0, 11, (4, 5), generator=g)
    lp = gather_logprobs(z, t)
    torch.testing.assert_close(lp, z.log_softmax(-1).gather(-1, t[..., None])[..., 0])
    H = entropy_from_logits(z)
    p = z.softmax(-1)
    torch.testing.assert_close(H, -(p * p.log()).sum(-1))
    (lp.sum() + H.sum()).backward()
    assert torch.isfinite(z.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("masked", [False, True])
def test_entropy_change_stats_matches_naive(dtype, masked):
    g = torch.Generator().manual_seed(5)
    before = (torch.randn(9, 17, generator=g) * 2).to(dtype)
    after = (before.double() + 0.1 * torch.randn(9, 17, generator=g, dtype=torch.float64)).to(dtype)
    if masked:  # the same entries masked on both sides: no change there
        before[:, :3] = -float("inf")
        after[:, :3] = -float("inf")
    h_after, linear, changed = entropy_change_stats(before, after, chunk_bytes=100)
    dz = torch.nan_to_num(after.double() - before.double(), nan=0.0)
    torch.testing.assert_close(
        h_after.double(), naive(after, torch.zeros(9, dtype=torch.long))[0], atol=2e-5, rtol=0
    )
    torch.testing.assert_close(linear.double(), -entropy_gradient_dot(before.double(), dz), atol=2e-5, rtol=0)
    assert changed
    assert not entropy_change_stats(before, before.clone())[2]


def test_direction_dot_equals_entropy_gradient_dot():
    g = torch.Generator().manual_seed(6)
    z = torch.randn(2, 5, 13, generator=g, dtype=torch.float64)
    d = torch.randn(2, 5, 13, generator=g, dtype=torch.float64)
    s = token_stats(z, direction=d, chunk_bytes=64)
    torch.testing.assert_close(
        s.direction_dot, entropy_gradient_dot(z.reshape(10, 13), d.reshape(10, 13)).reshape(2, 5)
    )


def test_unchanged_warning_fires_with_a_masked_vocabulary():
    from entropy_lab.tabular import TabularPolicy
    from entropy_lab.trace import EntropyTracer

    model = TabularPolicy(6, max_states=16)
    with torch.no_grad():
        model.head.weight[:, :2] = -float("inf")
    ids = torch.tensor([[0, 3, 4], [1, 5, 3]])
    resp = torch.tensor([[0, 1, 1], [0, 1, 1]])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match="unchanged"):
        with EntropyTracer(model).step(ids, None, resp, advantages=torch.zeros(2)):
            model(input_ids=ids)
            opt.step()


def naive_direction_dot(logits, direction):
    """sum_k p_k (log p_k + H) d_k in float64, 0 where p_k = 0 (docs/theory.md: -dH/dz . d)."""
    logp = logits.double().log_softmax(-1)
    p = logp.exp()
    H = -torch.where(p > 0, p * logp, torch.zeros((), dtype=torch.float64)).sum(-1, keepdim=True)
    terms = torch.where(p > 0, p * (logp + H) * direction.double(), torch.zeros((), dtype=torch.float64))
    return terms.sum(-1)


def mixed_logits(n=12, V=23, seed=7, dtype=torch.float32):
    """Rows of every kind the fast path must handle or hand to the exact one: plain, peaked,
    masked vocabulary (-inf), one-hot in effect."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, V, generator=g, dtype=torch.float64) * 3
    z[1] *= 30  # peaked
    z[2, :5] = -float("inf")  # masked vocabulary
    z[3, 4] = 1e4  # one-hot in effect
    z[5, ::2] = -float("inf")
    return z.to(dtype)


@pytest.mark.parametrize(
    "dtype,atol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-5), (torch.float64, 1e-12)]
)
@pytest.mark.parametrize("chunk_bytes", [1, 300, 2**20])
def test_fused_statistics_match_naive_on_mixed_rows(dtype, atol, chunk_bytes):
    """The fast path (finite rows) and the exact fallback (masked rows) give the naive values,
    logsumexp and direction dot included, whichever rows share a chunk."""
    z = mixed_logits(dtype=dtype)
    g = torch.Generator().manual_seed(8)
    d = torch.randn(z.shape, generator=g, dtype=torch.float64).to(dtype)
    targets = torch.randint(0, z.shape[1], (z.shape[0],), generator=g)
    targets[2] = 7  # not masked
    s = token_stats(z, targets, direction=d, chunk_bytes=chunk_bytes)
    H, lp, C = naive(z, targets)
    torch.testing.assert_close(s.entropy.double(), H, atol=atol, rtol=0)
    torch.testing.assert_close(s.logprob.double(), lp, atol=atol, rtol=1e-6)  # row 3: log p ~ -1e4
    torch.testing.assert_close(s.collision.double(), C, atol=atol, rtol=0)
    torch.testing.assert_close(s.direction_dot.double(), naive_direction_dot(z, d), atol=10 * atol, rtol=0)
    torch.testing.assert_close(s.logsumexp.double(), z.double().logsumexp(-1), atol=atol, rtol=1e-6)


def test_direction_with_inf_where_probability_is_zero():
    """A direction that is infinite only at masked entries (p = 0) contributes nothing there."""
    z = mixed_logits(dtype=torch.float64)
    d = torch.randn(z.shape, dtype=torch.float64)
    d[2, :5] = float("inf")
    d[5, ::2] = -float("inf")
    s = token_stats(z, direction=d, chunk_bytes=64)
    assert torch.isfinite(s.direction_dot).all()
    torch.testing.assert_close(
        s.direction_dot, naive_direction_dot(z, torch.nan_to_num(d, posinf=0.0, neginf=0.0))
    )


@pytest.mark.parametrize(
    "dtype,atol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-5), (torch.float64, 1e-12)]
)
@pytest.mark.parametrize("chunk_bytes", [1, 300, 2**20])
def test_entropy_change_stats_with_pre_update_statistics(dtype, atol, chunk_bytes):
    """Given token_stats' logsumexp and entropy of ``before``, the result equals the naive one
    and the result computed without them, masked rows included."""
    before = mixed_logits(dtype=dtype)
    g = torch.Generator().manual_seed(9)
    after = (before.double() + 0.05 * torch.randn(before.shape, generator=g, dtype=torch.float64)).to(dtype)
    pre = token_stats(before)
    h_after, linear, changed = entropy_change_stats(
        before, after, before_logsumexp=pre.logsumexp, before_entropy=pre.entropy, chunk_bytes=chunk_bytes
    )
    dz = torch.nan_to_num(after.double() - before.double(), nan=0.0)
    assert changed
    torch.testing.assert_close(
        h_after.double(), naive(after, torch.zeros(12, dtype=torch.long))[0], atol=atol, rtol=0
    )
    torch.testing.assert_close(linear.double(), -naive_direction_dot(before, dz), atol=atol, rtol=0)
    h2, lin2, _ = entropy_change_stats(before, after, chunk_bytes=chunk_bytes)
    torch.testing.assert_close(h_after, h2, atol=atol, rtol=0)
    torch.testing.assert_close(linear, lin2, atol=atol, rtol=0)
    assert not entropy_change_stats(
        before, before.clone(), before_logsumexp=pre.logsumexp, before_entropy=pre.entropy
    )[2]


def test_entropy_change_stats_rejects_partial_or_misshaped_pre_statistics():
    z = torch.randn(4, 6)
    pre = token_stats(z)
    with pytest.raises(EntropyLabError, match="together"):
        entropy_change_stats(z, z, before_logsumexp=pre.logsumexp)
    with pytest.raises(EntropyLabError, match="before_entropy must have shape"):
        entropy_change_stats(z, z, before_logsumexp=pre.logsumexp, before_entropy=pre.entropy[:3])
