"""The built-in objectives: the PPO core and the entropy interventions, one registry entry each.

Registry names:
- ``ppo``: the PPO-clip core (GRPO, DAPO's clip-higher and dual-clip are settings of it).
- ``clip-cov`` (Cui et al. 2025): cov_t = (logp_t - mean logp)(A_t - mean A) over the call's valid
  tokens; among unclipped tokens with lb < cov < ub, max(1, int(ratio N_valid)) are drawn uniformly
  (``LossInputs.generator``) and get lambda = 0 (loss and gradient removed, as verl multiplies
  the loss by 0; the paper says "detach", same gradient).
- ``kl-cov`` (Cui et al. 2025): as in the paper and verl's implementation, *no* ratio clipping: every
  token has -A r, and the top max(1, int(ratio N_valid)) tokens by cov get + coef |logp - old_logp|.
  I_clip = 1 and lambda = 1 everywhere; the penalty's gradient is visible to ``logit-grad``.
- ``fork-tokens`` (Wang et al. 2025): only the top ceil(rho N_valid) tokens by current entropy
  (detached) keep their loss; the others get lambda = 0. The normaliser still counts all tokens.
- ``w-reinforce`` (Zhu et al. 2025): lambda = w_reinforce_lambda on tokens with A > 0.
- ``entropy-adv`` (Cheng et al. 2025): A' = A + min(alpha H_detached, |A| / kappa) per token, with
  H the current entropy; the PPO core runs on A'.
- ``steer`` (Hao et al. 2025): lambda from ``entropy_lab.steer`` multiplies the core's loss without
  gradient; the release runs it with dual clip c = 10 and eps_high 0.28 (the ``steer`` preset).

Clip-Cov and KL-Cov select over the valid tokens of one call unless ``LossInputs.selected``
holds the tokens chosen over the whole update (``cov_select``, ``cov_selection='global'``).
Deliberate simplification: Fork tokens select per call (per micro-batch); STEER can normalise
per batch.

References: Shao et al. 2024 (GRPO); Yu et al. 2025 (DAPO); Cui et al. 2025 (arXiv 2505.22617);
Wang et al. 2025 (arXiv 2506.01939); Zhu et al. 2025 (arXiv 2506.01347); Cheng et al. 2025
(arXiv 2506.14758); Hao et al. 2025 (arXiv 2510.10150).
"""

from __future__ import annotations

import math

import torch

from entropy_lab import steer
from entropy_lab.config import TrainConfig
from entropy_lab.objectives.core import (
    clamped_ratio,
    masked_mean,
    ppo_clip,
    require_input,
    token_covariance,
    weighted_terms,
)
from entropy_lab.objectives.registry import register_objective
from entropy_lab.objectives.types import LossInputs, ObjectiveTerms


@register_objective("ppo")
def ppo_objective(inputs: LossInputs, cfg: TrainConfig) -> ObjectiveTerms:
    """The PPO-clip core, optionally dual-clipped; lambda = 1."""
    core = ppo_clip(inputs.logprob, inputs.old_logprob, inputs.advantages, cfg)
    return weighted_terms(core, inputs.advantages)


@register_objective("clip-cov")
def clip_cov_objective(inputs: LossInputs, cfg: TrainConfig) -> ObjectiveTerms:
    """PPO core; a random max(1, int(ratio N)) of the unclipped tokens with lb < cov < ub get lambda = 0."""
    core = ppo_clip(inputs.logprob, inputs.old_logprob, inputs.advantages, cfg)
    valid = inputs.valid
    cov = token_covariance(inputs.logprob, inputs.advantages, valid)  # (B, T)
    band = valid & (core.clip_indicator > 0) & (cov > cfg.clip_cov_lb) & (cov < cfg.clip_cov_ub)
    if inputs.selected is not None:  # chosen over the whole update (cov_select)
        chosen = (inputs.selected & valid).flatten().nonzero().squeeze(-1)
    else:
        n_pick = max(1, int(cfg.clip_cov_ratio * int(valid.sum())))
        idx = band.flatten().nonzero().squeeze(-1)  # (n_band,)
        gen = inputs.generator
        perm = torch.randperm(idx.numel(), generator=gen, device=gen.device if gen is not None else "cpu")
        chosen = idx[perm[:n_pick].to(idx.device)]
    weight = torch.ones(valid.numel(), dtype=core.loss.dtype, device=valid.device)
    weight[chosen] = 0.0
    weight = weight.view(valid.shape)  # (B, T)
    metrics = {
        "clip_cov/frac_detached": chosen.numel() / max(int(valid.sum()), 1),
        "clip_cov/frac_in_band": masked_mean(band.float(), valid),
    }
    return weighted_terms(core, inputs.advantages, weight, metrics)


@register_objective("kl-cov")
def kl_cov_objective(inputs: LossInputs, cfg: TrainConfig) -> ObjectiveTerms:
    """-A r on every token (no clipping, as published) + coef |logp - old_logp| on the top-cov tokens."""
    valid = inputs.valid
    ratio, saturated = clamped_ratio(inputs.logprob, inputs.old_logprob)  # (B, T)
    loss = -inputs.advantages * ratio
    cov = token_covariance(inputs.logprob, inputs.advantages, valid)  # (B, T)
    n_valid = int(valid.sum())
    penalised = torch.zeros(valid.numel(), dtype=torch.bool, device=valid.device)
    if inputs.selected is not None:  # chosen over the whole update (cov_select)
        penalised = (inputs.selected & valid).flatten()
    elif n_valid > 0:
        k = max(1, int(cfg.kl_cov_ratio * n_valid))
        scores = torch.where(valid, cov, torch.full_like(cov, -math.inf)).flatten()
        penalised[torch.topk(scores, k).indices] = True
    penalised = penalised.view(valid.shape)  # (B, T)
    penalty = cfg.kl_cov_coef * (inputs.logprob - inputs.old_logprob).abs()
    loss = loss + torch.where(penalised, penalty, torch.zeros_like(penalty))
    indicator = (~saturated).to(loss.dtype)
    metrics = {"kl_cov/frac_penalised": masked_mean(penalised.float(), valid)}
    return ObjectiveTerms(loss, indicator, torch.ones_like(loss), inputs.advantages, metrics)


@register_objective("fork-tokens", requires=("entropy",))
def fork_tokens_objective(inputs: LossInputs, cfg: TrainConfig) -> ObjectiveTerms:
    """PPO core on the top ceil(rho N) tokens by current entropy (detached); lambda = 0 on the rest."""
    entropy = require_input(inputs, "entropy", "fork-tokens").detach()
    core = ppo_clip(inputs.logprob, inputs.old_logprob, inputs.advantages, cfg)
    valid = inputs.valid
    n_valid = int(valid.sum())
    # The 1e-9 keeps float noise (0.2 * 10 = 2.0000000000000004) from adding a token.
    n_keep = min(n_valid, max(0, math.ceil(cfg.fork_rho * n_valid - 1e-9)))
    keep = torch.zeros(valid.numel(), dtype=torch.bool, device=valid.device)
    if n_keep > 0:
        scores = torch.where(
            valid, entropy.to(core.loss.dtype), torch.full_like(core.loss, -math.inf)
        ).flatten()
        keep[torch.topk(scores, n_keep).indices] = True
    weight = keep.view(valid.shape).to(core.loss.dtype)  # (B, T)
    return weighted_terms(core, inputs.advantages, weight, {"fork/frac_kept": n_keep / max(n_valid, 1)})


@register_objective("w-reinforce")
def w_reinforce_objective(inputs: LossInputs, cfg: TrainConfig) -> ObjectiveTerms:
    """PPO core with lambda = w_reinforce_lambda on positive-advantage tokens, 1 elsewhere."""
    core = ppo_clip(inputs.logprob, inputs.old_logprob, inputs.advantages, cfg)
    lam = torch.full_like(core.loss, cfg.w_reinforce_lambda)
    weight = torch.where(inputs.advantages > 0, lam, torch.ones_like(lam))
    return weighted_terms(core, inputs.advantages, weight)


@register_objective("entropy-adv", requires=("entropy",))
def entropy_adv_objective(inputs: LossInputs, cfg: TrainConfig) -> ObjectiveTerms:
    """PPO core on A' = A + min(alpha H_detached, |A| / kappa) (the bonus never flips A's sign for kappa > 1)."""
    entropy = require_input(inputs, "entropy", "entropy-adv").detach()
    advantage = inputs.advantages
    bonus = torch.minimum(cfg.entropy_adv_alpha * entropy, advantage.abs() / cfg.entropy_adv_kappa)  # (B, T)
    shaped = advantage + bonus
    core = ppo_clip(inputs.logprob, inputs.old_logprob, shaped, cfg)
    return weighted_terms(core, shaped, metrics={"entropy_adv/bonus_mean": masked_mean(bonus, inputs.valid)})


def _steer_omega(inputs: LossInputs, cfg: TrainConfig) -> torch.Tensor:
    return steer.steer_omega(
        inputs.logprob,
        inputs.old_logprob,
        inputs.advantages,
        inputs.valid,
        estimator=cfg.steer_estimator,
        entropy=inputs.entropy,
        old_entropy=inputs.old_entropy,
        collision=inputs.collision,
    )


def _steer_prepare(full_inputs: LossInputs, cfg: TrainConfig) -> dict:
    """Range of m over the whole rollout batch (used when steer_norm == 'batch')."""
    omega = _steer_omega(full_inputs, cfg)
    return steer.magnitude_range(omega, full_inputs.valid, cfg.steer_signed).to_context()


@register_objective(
    "steer", requires=lambda cfg: steer.required_inputs(cfg.steer_estimator), prepare=_steer_prepare
)
def steer_objective(inputs: LossInputs, cfg: TrainConfig) -> ObjectiveTerms:
    """PPO core (dual clip as configured) times the STEER weight lambda (no grad)."""
    valid = inputs.valid
    omega = _steer_omega(inputs, cfg)  # (B, T)
    weight = steer.weights_from_config(omega, valid, cfg, inputs.context)  # (B, T)
    core = ppo_clip(inputs.logprob, inputs.old_logprob, inputs.advantages, cfg)
    w = weight[valid]
    metrics = {
        "steer/weight_mean": float(w.double().mean()) if w.numel() else 1.0,
        "steer/weight_min": float(w.min()) if w.numel() else 1.0,
        "steer/weight_max": float(w.max()) if w.numel() else 1.0,
        "steer/frac_damped": masked_mean((weight < 1).float(), valid),
        "steer/omega_abs_max": float(omega.abs().max()) if omega.numel() else 0.0,
    }
    return weighted_terms(core, inputs.advantages, weight, metrics)
