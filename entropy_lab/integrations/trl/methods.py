"""Catalogue methods on TRL: which ones map, the resolved ``TrainConfig``, and the check of TRL's settings.

No TRL import here. ``resolve_trl_method`` starts from TRL's own settings (epsilons, delta as the
dual-clip bound, beta as the k3 KL coefficient, max_completion_length, temperature, seed, lr),
applies the method's preset and the user's overrides (``entropy_lab.methods.resolve_config``),
and refuses, with one line each, what the project's ``compute_loss`` cannot reproduce on TRL's
tensors:

- methods whose preset is about the advantage or the reward (``dr-grpo``, ``rloo``,
  ``unlikeliness``): TRL computes advantages itself (use its ``scale_rewards`` / ``loss_type``);
- a ``loss_type`` the project has no aggregation or surrogate for (cispo, sapo, vespo);
- TRL features that act inside its own loss (top_entropy_quantile, off-policy masking,
  sequence-level importance sampling, vLLM importance weights, TRL's entropy_coef, KL bias
  correction);
- inputs TRL's fused LM head does not give: the collision term sum_k pi_k^2 l_k (STEER with the
  ``softmax`` estimator, for instance).

The aggregation itself always follows TRL's ``loss_type`` (``losses``); the preset's
``loss_agg`` is replaced by it on every call.
"""

from __future__ import annotations

from dataclasses import dataclass

from entropy_lab.config import TrainConfig
from entropy_lab.errors import EntropyLabError
from entropy_lab.integrations.trl.losses import get_loss_type, mapped_loss_types
from entropy_lab.methods import get_method, resolve_config
from entropy_lab.objectives import required_inputs

REWARD_SIDE = {
    "dr-grpo": "set GRPOConfig(loss_type='dr_grpo', scale_rewards='none') instead",
    "rloo": "use TRL's RLOOTrainer instead",
    "unlikeliness": (
        "it reshapes rewards by each sample's likelihood rank, and TRL 1.16 hands reward functions neither "
        "the rollout log-probabilities nor the prompt token ids"
    ),
}
"""Catalogue methods that act on advantages or rewards, which TRL computes itself."""

TRL_OWNS = ("advantage", "loss_agg", "unlikeliness_beta")
"""TrainConfig keys that TRL's own settings decide; overriding them on the TRL trainer is an error."""


@dataclass(frozen=True)
class TrlSettings:
    """The GRPOConfig fields the method path depends on (copied from TRL's args)."""

    loss_type: str
    epsilon_low: float
    epsilon_high: float
    delta: float | None
    beta: float
    max_completion_length: int
    temperature: float
    seed: int
    learning_rate: float
    num_generations: int
    top_entropy_quantile: float = 1.0
    off_policy_mask_threshold: float | None = None
    importance_sampling_level: str = "token"
    vllm_importance_sampling_correction: bool = False
    use_vllm: bool = False
    entropy_coef: float = 0.0
    use_adaptive_entropy: bool = False
    use_bias_correction_kl: bool = False

    @classmethod
    def from_args(cls, args) -> TrlSettings:
        eps = float(args.epsilon)
        return cls(
            loss_type=str(args.loss_type),
            epsilon_low=eps,
            epsilon_high=float(args.epsilon_high if args.epsilon_high is not None else eps),
            delta=args.delta,
            beta=float(args.beta),
            max_completion_length=int(args.max_completion_length),
            temperature=float(args.temperature),
            seed=int(args.seed),
            learning_rate=float(args.learning_rate),
            num_generations=int(args.num_generations or 1),
            top_entropy_quantile=float(getattr(args, "top_entropy_quantile", 1.0)),
            off_policy_mask_threshold=getattr(args, "off_policy_mask_threshold", None),
            importance_sampling_level=str(getattr(args, "importance_sampling_level", "token")),
            vllm_importance_sampling_correction=bool(
                getattr(args, "vllm_importance_sampling_correction", False)
            ),
            use_vllm=bool(getattr(args, "use_vllm", False)),
            entropy_coef=float(getattr(args, "entropy_coef", 0.0) or 0.0),
            use_adaptive_entropy=bool(getattr(args, "use_adaptive_entropy", False)),
            use_bias_correction_kl=bool(getattr(args, "use_bias_correction_kl", False)),
        )


ENGINE_INPUTS = frozenset({"entropy", "old_entropy", "ref_logprob"})
"""Optional LossInputs fields the TRL integration fills (ref_logprob only when beta > 0)."""


def base_config(s: TrlSettings) -> TrainConfig:
    """A TrainConfig that states TRL's own settings in the project's terms (before any preset)."""
    return TrainConfig(
        task="trl",
        seed=s.seed,
        samples_per_prompt=s.num_generations,
        temperature=s.temperature,
        max_new_tokens=s.max_completion_length,
        lr=s.learning_rate,
        clip_eps_low=s.epsilon_low,
        clip_eps_high=s.epsilon_high,
        dual_clip_c=s.delta,
        kl_coef=s.beta,
        kl_estimator="k3",
    )


def resolve_trl_method(method: str, overrides: dict | None, s: TrlSettings) -> TrainConfig:
    """The method's TrainConfig on TRL, or one EntropyLabError naming what does not map and the fix."""
    get_method(method)  # unknown names list the valid ones
    if method in REWARD_SIDE:
        raise EntropyLabError(f"method {method!r} cannot run inside TRL's loss: {REWARD_SIDE[method]}")
    owned = sorted(set(overrides or {}) & set(TRL_OWNS))
    if owned:
        raise EntropyLabError(
            f"{', '.join(owned)} are decided by TRL's GRPOConfig on the TRL trainer; drop them"
        )
    lt = get_loss_type(s.loss_type)
    if lt.agg is None:
        raise EntropyLabError(
            f"loss_type {s.loss_type!r} has no counterpart in the project's compute_loss, so method "
            f"{method!r} cannot replace it; use one of {', '.join(mapped_loss_types())}"
        )
    refusals = [
        (s.top_entropy_quantile < 1.0, "top_entropy_quantile < 1 (use method 'fork-tokens' instead)"),
        (s.off_policy_mask_threshold is not None, "off_policy_mask_threshold"),
        (s.importance_sampling_level != "token", "importance_sampling_level='sequence'"),
        (s.use_vllm and s.vllm_importance_sampling_correction, "vLLM importance-sampling correction"),
        (
            s.entropy_coef != 0.0 or s.use_adaptive_entropy,
            "TRL's entropy_coef (set entropy_coef in the overrides)",
        ),
        (s.beta > 0 and s.use_bias_correction_kl, "use_bias_correction_kl=True (set it to False)"),
    ]
    for bad, what in refusals:
        if bad:
            raise EntropyLabError(f"method {method!r} replaces TRL's loss, which then cannot apply {what}")
    cfg = resolve_config(method, overrides, base_config(s))
    if cfg.kl_coef != s.beta:
        raise EntropyLabError(
            f"method {method!r} sets kl_coef={cfg.kl_coef} but TRL's beta is {s.beta}: set GRPOConfig(beta="
            f"{cfg.kl_coef}) so that TRL loads the reference model"
        )
    available = ENGINE_INPUTS if s.beta > 0 else ENGINE_INPUTS - {"ref_logprob"}
    missing = sorted(required_inputs(cfg) - available)
    if missing:
        hint = (
            "; STEER's 'paper', 'sampled-logit' and 'covariance' estimators need no collision term"
            if "collision" in missing
            else ""
        )
        raise EntropyLabError(
            f"method {method!r} with these settings needs {', '.join(missing)}, which TRL's fused LM head "
            f"does not compute{hint}"
        )
    return cfg
