"""The PPO-clip core and the per-token helpers every objective shares.

The core (Schulman et al. 2017) per token, r = exp(logp - old_logp):

    loss_t = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))
    dual clip (Ye et al. 2020), for A < 0 only:  loss_t = min(loss_t, -A c)

I_clip = 0 where that loss is constant in logp: A > 0 and r > 1 + eps_high (clip/frac_high),
A < 0 and r < 1 - eps_low (clip/frac_low), A < 0 and r > c (clip/frac_dual).

Deliberate simplification: log(r) is clamped to [-20, 20] (as verl and the STEER release);
a token at that clamp has no gradient, so it is counted as clipped (I_clip = 0).

References: Schulman et al. 2017 (PPO); Ye et al. 2020 (dual clip, arXiv 1912.09729).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from entropy_lab.config import TrainConfig
from entropy_lab.errors import EntropyLabError
from entropy_lab.objectives.types import LossInputs, ObjectiveTerms
from entropy_lab.stats import compute_dtype

LOG_RATIO_CLAMP = 20.0


@dataclass
class ClippedSurrogate:
    """The PPO-clip core per token; every tensor is (B, T)."""

    loss: torch.Tensor  # with grad
    ratio: torch.Tensor  # detached
    clip_indicator: torch.Tensor  # float
    clipped_high: torch.Tensor  # bool
    clipped_low: torch.Tensor  # bool
    clipped_dual: torch.Tensor  # bool
    saturated: torch.Tensor  # bool: |logp - old_logp| beyond the clamp


def clamped_ratio(logprob: torch.Tensor, old_logprob: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """r = exp(clamp(logp - old_logp, -20, 20)) and where the clamp bites.

    Args:
        logprob: (B, T) current log-probs, with or without grad.
        old_logprob: (B, T) rollout log-probs.

    Returns:
        (r (B, T), with grad when ``logprob`` has it; saturated (B, T) bool).
    """
    log_ratio = logprob - old_logprob  # (B, T)
    saturated = log_ratio.detach().abs() > LOG_RATIO_CLAMP
    return log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp(), saturated


def ppo_clip(
    logprob: torch.Tensor, old_logprob: torch.Tensor, advantage: torch.Tensor, cfg: TrainConfig
) -> ClippedSurrogate:
    """max(-A r, -A clip(r, 1-eps_low, 1+eps_high)), then min(., -A c) where A < 0 if dual clip is on.

    Naive equivalent at one token (A > 0): ``-A * min(r, 1 + eps_high)``; (A < 0, dual clip c):
    ``min(-A * max(r, 1 - eps_low), -A * c)``.
    """
    ratio, saturated = clamped_ratio(logprob, old_logprob)  # (B, T)
    surrogate = -advantage * ratio
    clipped = -advantage * ratio.clamp(1 - cfg.clip_eps_low, 1 + cfg.clip_eps_high)
    loss = torch.maximum(surrogate, clipped)  # (B, T)
    r = ratio.detach()
    high = (advantage > 0) & (r > 1 + cfg.clip_eps_high)
    low = (advantage < 0) & (r < 1 - cfg.clip_eps_low)
    dual = torch.zeros_like(high)
    c = cfg.dual_clip_c
    if c is not None:  # c > 1 is the config's rule (TrainConfig.validate), checked once there
        loss = torch.where(advantage < 0, torch.minimum(loss, -advantage * c), loss)
        dual = (advantage < 0) & (r > c)
    indicator = (~(high | low | dual | saturated)).to(loss.dtype)
    return ClippedSurrogate(loss, r, indicator, high, low, dual, saturated)


def weighted_terms(
    core: ClippedSurrogate, advantage: torch.Tensor, weight: torch.Tensor | None = None, metrics=None
) -> ObjectiveTerms:
    """ObjectiveTerms for the core loss times ``weight`` (a no-grad lambda; None means 1)."""
    if weight is None:
        weight = torch.ones_like(core.loss)
    weight = weight.detach().to(core.loss.dtype)
    parts = {"high": core.clipped_high, "low": core.clipped_low, "dual": core.clipped_dual}
    return ObjectiveTerms(
        core.loss * weight, core.clip_indicator, weight, advantage, dict(metrics or {}), clip_parts=parts
    )


def masked_mean(x: torch.Tensor, valid: torch.Tensor) -> float:
    """Mean of ``x`` (B, T) over ``valid`` (B, T) bool, summed in fp64; 0.0 when nothing is valid."""
    n = int(valid.sum())
    return float(x.detach()[valid].double().sum() / n) if n else 0.0


def token_covariance(logprob: torch.Tensor, advantage: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """cov_t = (logp_t - mean logp)(A_t - mean A), means over valid tokens; (B, T), 0 outside ``valid``.

    Naive equivalent: ``lp, a = logp[valid], A[valid]; (lp - lp.mean()) * (a - a.mean())``.
    """
    logprob = logprob.detach()
    dtype = compute_dtype(logprob.dtype)
    cov = torch.zeros(valid.shape, dtype=dtype, device=logprob.device)
    if bool(valid.any()):
        lp = logprob[valid].to(dtype)  # (n,)
        a = advantage.detach()[valid].to(dtype)  # (n,)
        cov[valid] = (lp - lp.mean()) * (a - a.mean())
    return cov


def require_input(inputs: LossInputs, name: str, objective: str) -> torch.Tensor:
    """``inputs.<name>``, or one error naming the objective that needs it."""
    value = getattr(inputs, name)
    if value is None:
        raise EntropyLabError(f"objective {objective!r} needs LossInputs.{name}, which was not given")
    return value
