"""Advantage estimators against naive loops; unlikeliness reward against a hand example."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from entropy_lab.advantages import (
    ADVANTAGES,
    advantages_for_config,
    compute_advantages,
    get_advantage,
    mean_token_logprob,
    register_advantage,
    unlikeliness_rewards,
)
from entropy_lab.config import TrainConfig
from entropy_lab.errors import EntropyLabError

REWARDS = torch.tensor(
    [[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.5, 0.2, 0.9, 0.0]],
    dtype=torch.float64,
)


def naive_grpo(r, eps=1e-6, std=True):
    out = []
    for group in r.tolist():
        mu = sum(group) / len(group)
        sd = statistics.stdev(group) if len(group) > 1 else 0.0  # unbiased, like torch.std
        if max(group) == min(group):
            out.append([0.0] * len(group))
        else:
            out.append([(x - mu) / (sd + eps) if std else x - mu for x in group])
    return torch.tensor(out, dtype=torch.float64)


def naive_rloo(r):
    out = []
    for group in r.tolist():
        g = len(group)
        out.append([x - (sum(group) - x) / (g - 1) for x in group])
    return torch.tensor(out, dtype=torch.float64)


def test_registry():
    assert list(ADVANTAGES) == ["grpo", "grpo-no-std", "rloo"]
    with pytest.raises(EntropyLabError, match="valid: grpo, grpo-no-std, rloo"):
        get_advantage("gae")
    with pytest.raises(EntropyLabError, match="already registered"):
        register_advantage("grpo")(lambda r, eps: r)


def test_grpo_matches_naive():
    torch.testing.assert_close(compute_advantages(REWARDS, "grpo"), naive_grpo(REWARDS))
    # by hand, group 0: mean 0.5, unbiased std sqrt(1/3)
    a = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    torch.testing.assert_close(
        compute_advantages(REWARDS, "grpo")[0], torch.tensor([a, -a, a, -a], dtype=torch.float64)
    )


def test_grpo_no_std_and_rloo_match_naive():
    torch.testing.assert_close(compute_advantages(REWARDS, "grpo-no-std"), naive_grpo(REWARDS, std=False))
    torch.testing.assert_close(compute_advantages(REWARDS, "rloo"), naive_rloo(REWARDS))
    # RLOO = G / (G - 1) times the mean-centred reward
    torch.testing.assert_close(
        compute_advantages(REWARDS, "rloo"), compute_advantages(REWARDS, "grpo-no-std") * 4 / 3
    )


@pytest.mark.parametrize("name", ["grpo", "grpo-no-std", "rloo"])
def test_identical_rewards_and_singletons_give_zero(name):
    same = torch.tensor([[0.1, 0.1, 0.1], [0.7, 0.7, 0.7]], dtype=torch.float32)
    assert bool((compute_advantages(same, name) == 0).all())
    single = torch.tensor([[1.0], [0.0]])
    assert bool((compute_advantages(single, name) == 0).all())


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.lists(st.sampled_from([0.0, 0.25, 1.0]), min_size=2, max_size=6), min_size=1, max_size=4
    ).filter(lambda rows: len({len(r) for r in rows}) == 1)
)
def test_advantages_are_centred_per_group(rows):
    r = torch.tensor(rows, dtype=torch.float64)
    for name in ADVANTAGES:
        a = compute_advantages(r, name)
        assert a.shape == r.shape and bool(torch.isfinite(a).all())
        torch.testing.assert_close(a.sum(-1), torch.zeros(len(rows), dtype=torch.float64), atol=1e-9, rtol=0)


def test_bad_rewards_are_errors():
    with pytest.raises(EntropyLabError, match="NaN"):
        compute_advantages(torch.tensor([[1.0, float("nan")]]), "grpo")
    with pytest.raises(EntropyLabError, match="prompts, samples_per_prompt"):
        compute_advantages(torch.ones(4), "grpo")


def test_unlikeliness_by_hand():
    rewards = torch.tensor([[1.0, 1.0, 0.0, 1.0], [-1.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    logp = torch.tensor([[-1.0, -3.0, -0.5, -2.0], [-9.0, -5.0, -0.1, -0.2]], dtype=torch.float64)
    out = unlikeliness_rewards(rewards, logp, beta=0.25)
    # group 0, correct by likelihood: idx0 (rank 0), idx3 (rank 1), idx1 (rank 2); G = 4
    # factors 1 - 0.25 (4 - rank) / 4: 0.75, 0.8125, 0.875; incorrect unchanged
    # group 1: idx1 is the only correct one (rank 0): 0.75; the -1 and 0 rewards are unchanged
    torch.testing.assert_close(
        out, torch.tensor([[0.75, 0.875, 0.0, 0.8125], [-1.0, 0.75, 0.0, 0.0]], dtype=torch.float64)
    )
    torch.testing.assert_close(unlikeliness_rewards(rewards, logp, beta=0.0), rewards)


def test_unlikeliness_ties_rank_earlier_first_and_keeps_scale():
    rewards = torch.tensor([[2.0, 2.0]])
    out = unlikeliness_rewards(rewards, torch.tensor([[-1.0, -1.0]]), beta=0.5)
    # idx0 rank 0: 2 (1 - 0.5 * 2/2) = 1; idx1 rank 1: 2 (1 - 0.5 * 1/2) = 1.5
    torch.testing.assert_close(out, torch.tensor([[1.0, 1.5]]))


def test_unlikeliness_errors():
    with pytest.raises(EntropyLabError, match="seq_logprob has shape"):
        unlikeliness_rewards(torch.ones(2, 3), torch.ones(2, 2), 0.25)
    with pytest.raises(EntropyLabError, match="seq_logprob contains"):
        unlikeliness_rewards(torch.ones(1, 2), torch.tensor([[0.0, float("nan")]]), 0.25)


def test_mean_token_logprob_and_config_entry_point():
    lp = torch.tensor([[-1.0, -3.0, -7.0], [-2.0, 5.0, 5.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    torch.testing.assert_close(mean_token_logprob(lp, mask), torch.tensor([-2.0, -2.0]))
    assert mean_token_logprob(lp, torch.zeros(2, 3)).tolist() == [0.0, 0.0]
    cfg = TrainConfig(advantage="rloo", unlikeliness_beta=0.25)
    rewards = torch.tensor([[1.0, 1.0, 0.0, 1.0]])
    seq = torch.tensor([[-1.0, -3.0, -0.5, -2.0]])
    want = compute_advantages(unlikeliness_rewards(rewards, seq, 0.25), "rloo")
    torch.testing.assert_close(advantages_for_config(rewards, cfg, seq), want)
    with pytest.raises(EntropyLabError, match="sequence log-probabilities"):
        advantages_for_config(rewards, cfg)
    torch.testing.assert_close(
        advantages_for_config(rewards, TrainConfig()), compute_advantages(rewards, "grpo")
    )
