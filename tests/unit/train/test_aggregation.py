"""agg_loss: every mode against a naive loop, micro-batch sums, and edge cases."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from entropy_lab.aggregation import AGG_MODES, agg_loss, register_agg_mode
from entropy_lab.errors import EntropyLabError

MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


def naive(per_token, mask, mode, max_len):
    """Plain Python loops over sequences and tokens."""
    rows = []
    for i in range(len(per_token)):
        vals = [per_token[i][t] for t in range(len(per_token[i])) if mask[i][t]]
        rows.append(vals)
    b = len(rows)
    if mode == "token-mean":
        flat = [v for r in rows for v in r]
        return sum(flat) / len(flat)
    if mode == "seq-mean-token-mean":
        return sum(sum(r) / len(r) for r in rows if r) / b
    if mode == "seq-mean-token-sum":
        return sum(sum(r) for r in rows) / b
    if mode == "seq-mean-token-sum-norm":
        return sum(sum(r) for r in rows) / (b * max_len)
    raise AssertionError(mode)


def batch(seed, b=5, t=7):
    g = torch.Generator().manual_seed(seed)
    per_token = torch.randn(b, t, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).to(torch.float64)
    return per_token, mask


def test_registry_has_exactly_the_four_modes():
    assert list(AGG_MODES) == MODES


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", range(3))
def test_modes_match_naive(mode, seed):
    per_token, mask = batch(seed)
    loss, normalizer = agg_loss(per_token, mask, mode, max_len=10)
    assert loss.item() == pytest.approx(naive(per_token.tolist(), mask.tolist(), mode, 10), rel=1e-12)
    assert normalizer.shape == per_token.shape
    # the normaliser is the N of docs/theory.md: loss = sum over valid tokens of loss_t / N_t
    manual = sum(per_token[i, t].item() / normalizer[i, t].item() for i, t in (mask > 0).nonzero().tolist())
    assert loss.item() == pytest.approx(manual, rel=1e-12)


def test_normaliser_values_by_hand():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    x = torch.ones(2, 4)
    assert agg_loss(x, mask, "token-mean")[1].unique().tolist() == [4.0]
    assert agg_loss(x, mask, "seq-mean-token-mean")[1][:, 0].tolist() == [6.0, 2.0]  # 2 seqs * len
    assert agg_loss(x, mask, "seq-mean-token-sum")[1].unique().tolist() == [2.0]
    assert agg_loss(x, mask, "seq-mean-token-sum-norm", max_len=24)[1].unique().tolist() == [48.0]
    # max_len defaults to the padded length
    assert agg_loss(x, mask, "seq-mean-token-sum-norm")[1].unique().tolist() == [8.0]


@pytest.mark.parametrize("mode", MODES)
def test_micro_batches_sum_to_the_whole(mode):
    per_token, mask = batch(5, b=6)
    per_token.requires_grad_(True)
    whole, _ = agg_loss(per_token, mask, mode, max_len=9)
    n_tok, n_seq = float(mask.sum()), float(mask.shape[0])
    parts = [
        agg_loss(per_token[s], mask[s], mode, num_tokens=n_tok, num_seqs=n_seq, max_len=9)[0]
        for s in (slice(0, 1), slice(1, 4), slice(4, 6))
    ]
    total = sum(parts)
    torch.testing.assert_close(total, whole)
    (g_whole,) = torch.autograd.grad(whole, per_token)
    (g_parts,) = torch.autograd.grad(total, per_token)
    torch.testing.assert_close(g_parts, g_whole)


@settings(max_examples=30, deadline=None)
@given(
    st.integers(min_value=1, max_value=6),
    st.integers(min_value=1, max_value=5),
    st.integers(0, 10_000),
    st.sampled_from(MODES),
)
def test_micro_batch_sum_property(b, t, seed, mode):
    g = torch.Generator().manual_seed(seed)
    per_token = torch.randn(b, t, generator=g, dtype=torch.float64)
    mask = torch.rand(b, t, generator=g) < 0.7
    whole, _ = agg_loss(per_token, mask, mode, max_len=t)
    n_tok, n_seq = float(mask.sum()), float(b)
    total = sum(
        agg_loss(per_token[i : i + 1], mask[i : i + 1], mode, num_tokens=n_tok, num_seqs=n_seq, max_len=t)[0]
        for i in range(b)
    )
    assert math.isfinite(whole.item())
    assert total.item() == pytest.approx(whole.item(), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_empty_rows_and_empty_batches_are_finite(mode):
    per_token = torch.tensor([[1.0, 2.0], [float("nan"), float("inf")]])
    mask = torch.tensor([[1, 1], [0, 0]])
    loss, normalizer = agg_loss(per_token, mask, mode)
    assert math.isfinite(loss.item()) and bool(torch.isfinite(normalizer).all())
    zero, _ = agg_loss(per_token, torch.zeros(2, 2), mode)
    assert zero.item() == 0.0


def test_errors():
    with pytest.raises(EntropyLabError, match="valid: token-mean, seq-mean-token-mean"):
        agg_loss(torch.ones(1, 2), torch.ones(1, 2), "mean")
    with pytest.raises(EntropyLabError, match="already registered"):
        register_agg_mode("token-mean")(lambda *a: None)
    with pytest.raises(EntropyLabError, match=r"\(B, T\)"):
        agg_loss(torch.ones(2), torch.ones(2), "token-mean")
