"""STEER per-token weights (Hao et al. 2025, "Rethinking Entropy Interventions in RLVR").

STEER damps the tokens whose predicted entropy change is largest in magnitude. As the
release code (``compute_token_weights`` in zz-haooo/STEER) does it, per loss call:

    pi     = clamp(exp(logprob), 1e-8, 1 - 1e-8)      # current forward, no grad
    pi_old = clamp(exp(old_logprob), 1e-8, 1)
    m      = |A / pi_old * pi (1 - pi) (log pi + H)|  # H: entropy of the rollout policy
    m      = 0 where not finite
    exp map:    k = -ln(lambda_min) / max(max m, 0.02);  lambda = clamp(exp(-k m), lambda_min, 1)
    linear map: lambda = lambda_max - (m - min m) (lambda_max - lambda_min) / (max m - min m),
                clamped to [lambda_min, lambda_max]; (lambda_min + lambda_max) / 2 when max m == min m

with max / min over the valid tokens of the call. m is |omega_paper| of
``entropy_lab.theory`` at a unit step (eta = 1, N = 1, I_clip = 1, lambda = 1).

Extensions beyond the paper (all off in the release preset):
- ``steer_estimator``: any estimator of ``entropy_lab.theory`` gives omega (``softmax`` is the
  tight one in the tabular model). ``paper`` takes H from the rollout policy (as released);
  the others take the current entropy H and collision C, as their derivations assume.
  ``logit-grad`` is refused: it needs the gradient of the very loss being weighted.
- ``steer_norm = "batch"``: min / max m over the whole rollout batch, computed once by
  ``magnitude_range`` (the objective's ``prepare``) so that micro-batches share one map.
- ``steer_signed``: only tokens whose signed omega < 0 (entropy predicted to fall) are
  mapped; the others get weight 1. min / max m are then taken over those tokens only, so
  the most entropy-lowering token still reaches lambda_min.

Deliberate choices:
- Probabilities are clamped for every estimator (pi to [1e-8, 1 - 1e-8], pi_old to [1e-8, 1]
  as released; in fp32, 1 - 1e-8 rounds to 1, so the upper clamp is a no-op there as well).
- Weights are computed in at least fp32, without gradient.
- Positions outside the mask get weight 1 (a neutral multiplier; the mask already removes
  them). A call or batch with no valid (or no candidate) token gets weight 1 everywhere. The
  release returns 0 in both cases; neither value reaches the loss.

Reference: Hao et al. 2025, arXiv 2510.10150, and its release code (github.com/zz-haooo/STEER).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from entropy_lab.config import TrainConfig
from entropy_lab.errors import EntropyLabError
from entropy_lab.registry import Registry
from entropy_lab.theory import ESTIMATORS, TokenQuantities, get_estimator

PROB_MIN = 1e-8
PROB_MAX = 1.0 - 1e-8
EXP_MAP_FLOOR = 0.02
"""Floor on max m in the exponential map's k, as released (keeps k finite when all m are tiny)."""

ESTIMATOR_INPUTS: dict[str, frozenset[str]] = {
    "paper": frozenset({"old_entropy"}),
    "sampled-logit": frozenset({"entropy"}),
    "softmax": frozenset({"entropy", "collision"}),
    "covariance": frozenset(),
}
"""Optional ``LossInputs`` fields each estimator needs; unlisted estimators get entropy and collision."""

STEER_NORMS = ("call", "batch")
"""Where min / max m are taken: over one loss call (as released) or over the whole rollout batch."""

UNSUPPORTED_ESTIMATORS = {"logit-grad": "it needs dLoss/dz of the very loss STEER weights"}


def valid_estimators() -> list[str]:
    return [name for name in ESTIMATORS if name not in UNSUPPORTED_ESTIMATORS]


def check_estimator(name: str) -> None:
    if name in UNSUPPORTED_ESTIMATORS:
        raise EntropyLabError(
            f"steer_estimator {name!r} cannot drive STEER: {UNSUPPORTED_ESTIMATORS[name]}; valid: {', '.join(valid_estimators())}"
        )
    if name not in ESTIMATORS:
        raise EntropyLabError(f"unknown steer_estimator {name!r}; valid: {', '.join(valid_estimators())}")


def required_inputs(estimator: str) -> frozenset[str]:
    """Optional ``LossInputs`` fields (besides logprob, old_logprob, advantages, mask) the estimator needs."""
    return ESTIMATOR_INPUTS.get(estimator, frozenset({"entropy", "collision"}))


@torch.no_grad()
def steer_omega(
    logprob: torch.Tensor,
    old_logprob: torch.Tensor,
    advantage: torch.Tensor,
    valid: torch.Tensor,
    *,
    estimator: str = "paper",
    entropy: torch.Tensor | None = None,
    old_entropy: torch.Tensor | None = None,
    collision: torch.Tensor | None = None,
) -> torch.Tensor:
    """Signed omega per token at a unit step, (B, T); 0 outside ``valid`` and where not finite.

    All tensors are (B, T); ``valid`` is bool. The means of the ``covariance`` estimator are
    over the valid tokens given. Naive equivalent for ``paper`` at one token:
    ``-(A / pi_old) * pi * (1 - pi) * (log(pi) + H)`` with the clamps of the module docstring.
    """
    check_estimator(estimator)
    dtype = torch.promote_types(logprob.dtype, torch.float32)
    h_source = old_entropy if estimator == "paper" else entropy
    needed = required_inputs(estimator)
    missing = [
        n
        for n, v in (("entropy", entropy), ("old_entropy", old_entropy), ("collision", collision))
        if n in needed and v is None
    ]
    if missing:
        raise EntropyLabError(f"STEER with estimator {estimator!r} needs LossInputs.{', '.join(missing)}")

    def flat(x: torch.Tensor | None) -> torch.Tensor:
        if x is None:
            return torch.zeros(int(valid.sum()), dtype=dtype, device=logprob.device)
        return x.detach()[valid].to(dtype)  # (n,)

    prob = flat(logprob).exp().clamp(PROB_MIN, PROB_MAX)  # (n,)
    old_prob = flat(old_logprob).exp().clamp(PROB_MIN, 1.0)  # (n,)
    q = TokenQuantities(
        logprob=prob.log(),
        entropy=flat(h_source),
        collision=flat(collision),
        advantage=flat(advantage),
        old_logprob=old_prob.log(),
    )
    values = get_estimator(estimator)(q)  # (n,)
    values = torch.where(torch.isfinite(values), values, torch.zeros((), dtype=dtype, device=values.device))
    omega = torch.zeros(valid.shape, dtype=dtype, device=logprob.device)  # (B, T)
    omega[valid] = values
    return omega


def candidates(omega: torch.Tensor, valid: torch.Tensor, signed: bool) -> torch.Tensor:
    """Tokens the map applies to, (B, T) bool: all valid ones, or those with omega < 0 when signed."""
    return valid & (omega < 0) if signed else valid


@dataclass
class MagnitudeRange:
    """min and max of m = |omega| over the mapped tokens (count of them; min = max = 0 when none)."""

    count: int
    m_min: float
    m_max: float

    def to_context(self) -> dict:
        return {"steer/count": self.count, "steer/m_min": self.m_min, "steer/m_max": self.m_max}

    @classmethod
    def from_context(cls, context: dict) -> MagnitudeRange:
        try:
            return cls(
                int(context["steer/count"]), float(context["steer/m_min"]), float(context["steer/m_max"])
            )
        except KeyError:
            raise EntropyLabError(
                "steer_norm='batch' needs the context returned by the objective's prepare() for this rollout batch"
            ) from None


@torch.no_grad()
def magnitude_range(omega: torch.Tensor, valid: torch.Tensor, signed: bool = False) -> MagnitudeRange:
    m = omega.abs()[candidates(omega, valid, signed)]  # (n,)
    if m.numel() == 0:
        return MagnitudeRange(0, 0.0, 0.0)
    return MagnitudeRange(int(m.numel()), float(m.min()), float(m.max()))


# --- maps: m (n,), range, lambda_min, lambda_max -> lambda (n,) ------------------------------

WeightMap = Callable[[torch.Tensor, MagnitudeRange, float, float], torch.Tensor]
STEER_MAPS: Registry[WeightMap] = Registry("steer_map")
register_steer_map = STEER_MAPS.register
get_steer_map = STEER_MAPS.__getitem__


@register_steer_map("exp")
def exp_map(m: torch.Tensor, rng: MagnitudeRange, lambda_min: float, lambda_max: float) -> torch.Tensor:
    """clamp(exp(-k m), lambda_min, 1), k = -ln(lambda_min) / max(max m, 0.02): max m maps to lambda_min."""
    k = -math.log(lambda_min) / max(rng.m_max, EXP_MAP_FLOOR)
    return torch.exp(-k * m).clamp(lambda_min, 1.0)


@register_steer_map("linear")
def linear_map(m: torch.Tensor, rng: MagnitudeRange, lambda_min: float, lambda_max: float) -> torch.Tensor:
    """[min m, max m] onto [lambda_max, lambda_min] (largest m -> lambda_min); midpoint when max == min."""
    if rng.m_max > rng.m_min:
        scale = (lambda_max - lambda_min) / (rng.m_max - rng.m_min)
        return (lambda_max - (m - rng.m_min) * scale).clamp(lambda_min, lambda_max)
    return torch.full_like(m, (lambda_min + lambda_max) / 2)


@torch.no_grad()
def steer_weights(
    omega: torch.Tensor,
    valid: torch.Tensor,
    *,
    map_name: str = "exp",
    lambda_min: float = 0.8,
    lambda_max: float = 1.2,
    signed: bool = False,
    m_range: MagnitudeRange | None = None,
) -> torch.Tensor:
    """lambda per token, (B, T), no grad: the map of |omega| over the mapped tokens, 1 elsewhere.

    ``m_range`` fixes min / max m (per-batch normalisation); by default they come from the
    mapped tokens of this call.
    """
    weight_map = get_steer_map(map_name)
    if map_name == "exp" and not 0 < lambda_min <= 1:
        raise EntropyLabError(f"steer_lambda_min must lie in (0, 1] for the exp map, got {lambda_min}")
    mapped = candidates(omega, valid, signed)  # (B, T)
    rng = magnitude_range(omega, valid, signed) if m_range is None else m_range
    weights = torch.ones_like(omega)  # (B, T)
    if rng.count > 0 and bool(mapped.any()):
        weights[mapped] = weight_map(omega.abs()[mapped], rng, lambda_min, lambda_max).to(weights.dtype)
    return weights


def weights_from_config(
    omega: torch.Tensor, valid: torch.Tensor, cfg: TrainConfig, context: dict | None = None
) -> torch.Tensor:
    """``steer_weights`` with the ``steer_*`` fields of a TrainConfig; per-batch range from ``context``."""
    m_range = MagnitudeRange.from_context(context or {}) if cfg.steer_norm == "batch" else None
    return steer_weights(
        omega,
        valid,
        map_name=cfg.steer_map,
        lambda_min=cfg.steer_lambda_min,
        lambda_max=cfg.steer_lambda_max,
        signed=cfg.steer_signed,
        m_range=m_range,
    )
