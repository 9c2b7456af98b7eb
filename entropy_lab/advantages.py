"""Sequence advantages from group rewards, and reward shaping before them.

Rewards arrive as a (P, G) tensor: P prompts, G sampled responses each. Every estimator maps
it to a (P, G) advantage, one value per response, which the trainer broadcasts over the
response's tokens.

| name | advantage of response i in its group | reference |
| --- | --- | --- |
| grpo | (R_i - mean R) / (std R + eps), std unbiased (torch.std, as verl) | Shao et al. 2024 |
| grpo-no-std | R_i - mean R | Liu et al. 2025 (Dr. GRPO) |
| rloo | R_i - mean_{j != i} R_j = G / (G - 1) (R_i - mean R) | Ahmadian et al. 2024 |

Deliberate choices:
- A group whose rewards are all equal (including any group of size G = 1) gets advantage 0
  exactly, for every estimator. (verl gives a singleton group mean 0 and std 1, i.e. A = R.)
- Non-finite rewards are an error, not a silent NaN.

Reward shaping, ``unlikeliness_rewards`` (He et al. 2025, "Rewarding the Unlikely"):
among the correct responses (R > 0) of a group, sorted from most to least likely,
rank = 0, 1, ..., K - 1, and R' = R (1 - beta (G - rank) / G); incorrect responses keep R.
The likeliest correct response is penalised most (factor 1 - beta), the least likely
correct one least (1 - beta (G - K + 1) / G). This is the paper's formula with rank 0 for the
likeliest correct sample. The release code (AndreHe02/rewarding-unlikely-release,
``_compute_advantages``) differs slightly: it ranks all G responses in ascending likelihood
(rank 0 = least likely) and uses R (1 - beta rank / G), i.e. one step beta / G less penalty,
with correct and incorrect responses ranked together; it measures likelihood by the mean
token log-probability (``mean_token_logprob`` here). Its default beta is 0.25 (release
script ``examples/lean/grpo.sh``: ``rank_penalty=0.25``).

References: Shao et al. 2024 (arXiv 2402.03300); Liu et al. 2025 (arXiv 2503.20783);
Ahmadian et al. 2024 (arXiv 2402.14740); He et al. 2025 (arXiv 2506.02355).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from entropy_lab.errors import EntropyLabError
from entropy_lab.registry import Registry

AdvantageFn = Callable[[torch.Tensor, float], torch.Tensor]
ADVANTAGES: Registry[AdvantageFn] = Registry("advantage estimator")
register_advantage = ADVANTAGES.register
get_advantage = ADVANTAGES.__getitem__


def _check_rewards(rewards: torch.Tensor) -> None:
    if rewards.dim() != 2:
        raise EntropyLabError(
            f"rewards must be (prompts, samples_per_prompt), got shape {tuple(rewards.shape)}"
        )
    if not bool(torch.isfinite(rewards).all()):
        raise EntropyLabError("rewards contain NaN or infinite values")


def _flat_groups(rewards: torch.Tensor) -> torch.Tensor:
    """(P, 1) bool: groups whose rewards are all equal (their advantage is 0 exactly)."""
    return (rewards.amax(-1, keepdim=True) - rewards.amin(-1, keepdim=True)) == 0


@register_advantage("grpo")
def grpo_advantage(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(R - mean) / (std + eps) per group, std unbiased.

    Naive: ``for p: a[p] = (r[p] - r[p].mean()) / (r[p].std() + eps)``.
    """
    centred = rewards - rewards.mean(-1, keepdim=True)  # (P, G)
    std = rewards.std(-1, keepdim=True) if rewards.shape[-1] > 1 else torch.ones_like(rewards[:, :1])
    adv = centred / (std + eps)
    return torch.where(_flat_groups(rewards), torch.zeros_like(adv), adv)


@register_advantage("grpo-no-std")
def grpo_no_std_advantage(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """R - mean per group (Dr. GRPO drops the std normalisation). ``eps`` is unused."""
    adv = rewards - rewards.mean(-1, keepdim=True)  # (P, G)
    return torch.where(_flat_groups(rewards), torch.zeros_like(adv), adv)


@register_advantage("rloo")
def rloo_advantage(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """R_i minus the mean of the other G - 1 rewards of the group. ``eps`` is unused.

    Naive: ``a[p, i] = r[p, i] - (r[p].sum() - r[p, i]) / (G - 1)``.
    """
    g = rewards.shape[-1]
    if g < 2:
        return torch.zeros_like(rewards)
    baseline = (rewards.sum(-1, keepdim=True) - rewards) / (g - 1)  # (P, G)
    adv = rewards - baseline
    return torch.where(_flat_groups(rewards), torch.zeros_like(adv), adv)


def compute_advantages(rewards: torch.Tensor, name: str, eps: float = 1e-6) -> torch.Tensor:
    """(P, G) rewards -> (P, G) advantages with the registered estimator ``name``."""
    fn = get_advantage(name)
    _check_rewards(rewards)
    dtype = torch.promote_types(rewards.dtype, torch.float32)
    return fn(rewards.to(dtype), eps)


def unlikeliness_rewards(rewards: torch.Tensor, seq_logprob: torch.Tensor, beta: float) -> torch.Tensor:
    """R' = R (1 - beta (G - rank) / G) on correct responses (R > 0), rank 0 = likeliest correct one.

    Args:
        rewards: (P, G) rewards.
        seq_logprob: (P, G) likelihood score of each response (the release uses the mean token
            log-probability under the rollout policy; see ``mean_token_logprob``).
        beta: penalty strength (He et al. 2025 release: 0.25); 0 returns the rewards unchanged.

    Ties in ``seq_logprob`` are ranked by position in the group (earlier = likelier).
    Naive: ``for p: for i in correct[p] sorted by -logp: R'[p, i] = R[p, i] * (1 - beta * (G - k) / G)``
    with k the position of i in that order.
    """
    _check_rewards(rewards)
    if seq_logprob.shape != rewards.shape:
        raise EntropyLabError(
            f"seq_logprob has shape {tuple(seq_logprob.shape)}, expected {tuple(rewards.shape)} like rewards"
        )
    if not bool(torch.isfinite(seq_logprob).all()):
        raise EntropyLabError("seq_logprob contains NaN or infinite values")
    dtype = torch.promote_types(rewards.dtype, torch.float32)
    rewards = rewards.to(dtype)
    g = rewards.shape[-1]
    correct = rewards > 0  # (P, G)
    order = torch.argsort(-seq_logprob.to(torch.float64), dim=-1, stable=True)  # (P, G) likeliest first
    correct_sorted = correct.gather(-1, order)  # (P, G)
    rank_sorted = correct_sorted.long().cumsum(-1) - 1  # rank among correct responses, in sorted order
    rank = torch.empty_like(rank_sorted).scatter_(-1, order, rank_sorted)  # (P, G) back in place
    factor = 1 - beta * (g - rank.to(dtype)) / g
    return torch.where(correct, rewards * factor, rewards)


def mean_token_logprob(logprob: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N, T) token log-probs, (N, T) mask -> (N,) mean over each response's valid tokens (0 if none)."""
    valid = mask > 0
    total = torch.where(valid, logprob, torch.zeros_like(logprob)).sum(-1)
    return total / valid.sum(-1).clamp(min=1)


def advantages_for_config(
    rewards: torch.Tensor, cfg, seq_logprob: torch.Tensor | None = None
) -> torch.Tensor:
    """(P, G) rewards -> (P, G) advantages as ``cfg`` says: unlikeliness shaping when
    ``cfg.unlikeliness_beta > 0`` (needs ``seq_logprob``), then ``cfg.advantage``."""
    if cfg.unlikeliness_beta > 0:
        if seq_logprob is None:
            raise EntropyLabError(
                "unlikeliness_beta > 0 needs the sequence log-probabilities of the responses"
            )
        rewards = unlikeliness_rewards(rewards, seq_logprob, cfg.unlikeliness_beta)
    return compute_advantages(rewards, cfg.advantage)
