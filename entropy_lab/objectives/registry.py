"""The two registries of the loss: objectives by name, and KL estimators with the three built-ins.

Every objective has one signature, ``fn(inputs: LossInputs, cfg: TrainConfig) -> ObjectiveTerms``,
and may declare the optional ``LossInputs`` fields it reads and a once-per-rollout-batch
``prepare``. The KL estimators (Schulman 2020, "Approximating KL divergence") per token:
k1 = logp - ref, k2 = (logp - ref)^2 / 2, k3 = exp(ref - logp) - (ref - logp) - 1.

Deliberate simplification: the k3 log-ratio is clamped to [-20, 20], as verl does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from entropy_lab.config import TrainConfig
from entropy_lab.objectives.core import LOG_RATIO_CLAMP
from entropy_lab.objectives.types import LossInputs, ObjectiveTerms
from entropy_lab.registry import Registry

# --- objectives ------------------------------------------------------------------------------

ObjectiveFn = Callable[[LossInputs, TrainConfig], ObjectiveTerms]
PrepareFn = Callable[[LossInputs, TrainConfig], dict]


@dataclass(frozen=True)
class Objective:
    """A registered objective: call it on a loss call; ``prepare`` once per rollout batch."""

    name: str
    fn: ObjectiveFn
    requires: Callable[[TrainConfig], frozenset[str]]
    prepare_fn: PrepareFn | None = None

    def __call__(self, inputs: LossInputs, cfg: TrainConfig) -> ObjectiveTerms:
        return self.fn(inputs, cfg)

    def prepare(self, full_inputs: LossInputs, cfg: TrainConfig) -> dict:
        """Per-rollout-batch statistics (no grad; logprob == old_logprob); {} for most objectives."""
        if self.prepare_fn is None:
            return {}
        with torch.no_grad():
            return self.prepare_fn(full_inputs, cfg)

    def inputs(self, cfg: TrainConfig) -> frozenset[str]:
        """Optional ``LossInputs`` fields this objective needs under ``cfg``."""
        return self.requires(cfg)


OBJECTIVES: Registry[Objective] = Registry("objective")


def register_objective(
    name: str,
    *,
    requires: Iterable[str] | Callable[[TrainConfig], Iterable[str]] = (),
    prepare: PrepareFn | None = None,
) -> Callable[[ObjectiveFn], ObjectiveFn]:
    """Register ``fn(inputs, cfg) -> ObjectiveTerms`` under ``name``; duplicates are refused.

    Args:
        name: the registry name (``TrainConfig.objective``).
        requires: the optional ``LossInputs`` fields it reads, or a function of cfg giving them.
        prepare: ``prepare(full_inputs, cfg) -> dict`` run once per rollout batch, or None.

    Returns:
        A decorator that registers ``fn`` and returns it unchanged.
    """

    def deco(fn: ObjectiveFn) -> ObjectiveFn:
        if callable(requires):
            req = lambda cfg: frozenset(requires(cfg))  # noqa: E731
        else:
            fixed = frozenset(requires)
            req = lambda cfg: fixed  # noqa: E731
        OBJECTIVES.add(name, Objective(name, fn, req, prepare))
        return fn

    return deco


get_objective = OBJECTIVES.__getitem__


# --- KL estimators -------------------------------------------------------------------------

KLEstimator = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
KL_ESTIMATORS: Registry[KLEstimator] = Registry("kl_estimator")
register_kl_estimator = KL_ESTIMATORS.register
get_kl_estimator = KL_ESTIMATORS.__getitem__


@register_kl_estimator("k1")
def kl_k1(logprob: torch.Tensor, ref_logprob: torch.Tensor) -> torch.Tensor:
    """logp - ref: unbiased for KL(pi || ref) under samples of pi, high variance, can be negative."""
    return logprob - ref_logprob


@register_kl_estimator("k2")
def kl_k2(logprob: torch.Tensor, ref_logprob: torch.Tensor) -> torch.Tensor:
    """(logp - ref)^2 / 2: biased, low variance, non-negative."""
    return 0.5 * (logprob - ref_logprob).square()


@register_kl_estimator("k3")
def kl_k3(logprob: torch.Tensor, ref_logprob: torch.Tensor) -> torch.Tensor:
    """exp(ref - logp) - (ref - logp) - 1: unbiased, low variance, non-negative (GRPO's choice).

    The log-ratio is clamped to [-20, 20] as in verl.
    """
    d = (ref_logprob - logprob).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return d.exp() - d - 1
