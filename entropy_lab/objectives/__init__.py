"""Per-token policy objectives and ``compute_loss``, the one loss entry point of the trainer.

Every objective has one signature, ``fn(inputs: LossInputs, cfg: TrainConfig) -> ObjectiveTerms``,
and returns the per-token loss *before* aggregation with what the trace needs per token:
the clip indicator I_clip, the intervention weight lambda and the advantage actually used.
``compute_loss`` aggregates it (``entropy_lab.aggregation``) and adds the KL and entropy terms.

The package is cut at its registry seams:
- ``types``: ``LossInputs``, ``ObjectiveTerms``, ``LossOutput``.
- ``core``: the PPO-clip core and the helpers the objectives share.
- ``registry``: the objective registry and the KL estimators.
- ``interventions``: the built-in objectives (``ppo``, ``clip-cov``, ``kl-cov``, ``fork-tokens``,
  ``w-reinforce``, ``entropy-adv``, ``steer``); importing the package registers them.
- ``loss``: ``compute_loss``, ``prepare_context``, ``required_inputs``.
"""

from entropy_lab.objectives.core import (
    LOG_RATIO_CLAMP,
    ClippedSurrogate,
    ppo_clip,
    token_covariance,
)
from entropy_lab.objectives.interventions import (
    clip_cov_objective,
    entropy_adv_objective,
    fork_tokens_objective,
    kl_cov_objective,
    ppo_objective,
    steer_objective,
    w_reinforce_objective,
)
from entropy_lab.objectives.loss import (
    compute_loss,
    prepare_context,
    required_inputs,
)
from entropy_lab.objectives.registry import (
    KL_ESTIMATORS,
    OBJECTIVES,
    KLEstimator,
    Objective,
    ObjectiveFn,
    PrepareFn,
    get_kl_estimator,
    get_objective,
    kl_k1,
    kl_k2,
    kl_k3,
    register_kl_estimator,
    register_objective,
)
from entropy_lab.objectives.types import PER_TOKEN, LossInputs, LossOutput, ObjectiveTerms

__all__ = [
    "KL_ESTIMATORS",
    "LOG_RATIO_CLAMP",
    "OBJECTIVES",
    "PER_TOKEN",
    "ClippedSurrogate",
    "KLEstimator",
    "LossInputs",
    "LossOutput",
    "Objective",
    "ObjectiveFn",
    "ObjectiveTerms",
    "PrepareFn",
    "clip_cov_objective",
    "compute_loss",
    "entropy_adv_objective",
    "fork_tokens_objective",
    "get_kl_estimator",
    "get_objective",
    "kl_cov_objective",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "ppo_clip",
    "ppo_objective",
    "prepare_context",
    "register_kl_estimator",
    "register_objective",
    "required_inputs",
    "steer_objective",
    "token_covariance",
    "w_reinforce_objective",
]
