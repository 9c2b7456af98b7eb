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

Precedence (what the recorded config says is what runs): GRPOConfig's values that the user set
away from GRPOConfig's defaults (``epsilon``, ``epsilon_high``, ``delta``, ``beta``) win over the
method's preset, read as TRL reads them (``epsilon_high`` unset follows ``epsilon``), and each
preset value they displace is named in one ``EntropyLabWarning``. ``method_overrides`` set only
the method's own parameters: a key with a GRPOConfig field or trainer argument of its own
(``TRL_FIELDS``) is refused with one line naming that field, so each setting has one place.
Deliberate simplification: a GRPOConfig value set explicitly to its default counts as unset.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

from entropy_lab.config import TrainConfig
from entropy_lab.errors import EntropyLabError, EntropyLabWarning
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

TRL_FIELDS = {
    "lr": "learning_rate",
    "temperature": "temperature",
    "seed": "seed",
    "top_p": "top_p",
    "max_new_tokens": "max_completion_length",
    "samples_per_prompt": "num_generations",
    "prompts_per_step": "per_device_train_batch_size and num_generations",
    "steps": "max_steps",
    "optimizer": "optim",
    "weight_decay": "weight_decay",
    "warmup_steps": "warmup_steps",
    "grad_clip": "max_grad_norm",
    "ppo_epochs": "num_iterations",
    "mini_batches": "steps_per_generation",
    "micro_batch_size": "per_device_train_batch_size",
    "clip_eps_low": "epsilon",
    "clip_eps_high": "epsilon_high",
    "dual_clip_c": "delta",
    "kl_coef": "beta",
    "advantage": "scale_rewards",
    "loss_agg": "loss_type",
    "dtype": "bf16 / fp16",
    "device": "use_cpu",
    "eval_every": "eval_steps",
    "checkpoint_every": "save_steps",
}
"""TrainConfig key -> the GRPOConfig field that sets it on the TRL trainer."""

TRAINER_ARGS = {
    "task": "train_dataset",
    "dataset": "train_dataset",
    "model": "model",
    "trace_every": "trace_every",
    "trace_max_positions": "trace_max_positions",
}
"""TrainConfig key -> the TracedGRPOTrainer argument that sets it."""

NOT_ON_TRL = {
    "unlikeliness_beta": "it reshapes rewards, which TRL computes itself",
    "controller": "controllers act between the bundled trainer's updates; TRL has GRPOConfig(entropy_coef=..., "
    "use_adaptive_entropy=True) with method=None",
    "trace_jvp": "the TRL trainer's tracer runs without the jvp pass",
    "trace_eta_grid": "the TRL trainer's tracer runs without the step-size probe",
    "eval_prompts": "evaluation is TRL's (eval_dataset)",
    "eval_k": "evaluation is TRL's (eval_dataset)",
    "preset_applied": "it is internal",
}
"""TrainConfig keys that have no meaning on the TRL trainer: overriding them is an error."""

MAPPED_GRPO_FIELDS = {"epsilon": 0.2, "epsilon_high": None, "delta": None, "beta": 0.0}
"""GRPOConfig fields a method's preset also sets, with GRPOConfig's defaults (TRL 1.16)."""


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
    explicit: frozenset[str] = frozenset()
    """GRPOConfig fields of ``MAPPED_GRPO_FIELDS`` whose value differs from GRPOConfig's default."""

    @classmethod
    def from_args(cls, args) -> TrlSettings:
        eps = float(args.epsilon)
        return cls(
            explicit=_explicit_fields(args),
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


def _explicit_fields(args) -> frozenset[str]:
    """The ``MAPPED_GRPO_FIELDS`` of ``args`` set away from their dataclass defaults."""
    defaults = dict(MAPPED_GRPO_FIELDS)
    if dataclasses.is_dataclass(args):
        for f in dataclasses.fields(args):
            if f.name in defaults and f.default is not dataclasses.MISSING:
                defaults[f.name] = f.default
    return frozenset(k for k, d in defaults.items() if getattr(args, k, d) != d)


def user_pins(s: TrlSettings) -> dict:
    """TrainConfig values fixed by what the user set in GRPOConfig (``explicit``), read as TRL reads them."""
    pins: dict = {}
    if "epsilon" in s.explicit:
        pins["clip_eps_low"] = s.epsilon_low
    if "epsilon_high" in s.explicit or "epsilon" in s.explicit:
        pins["clip_eps_high"] = s.epsilon_high  # TRL: epsilon_high unset means epsilon
    if "delta" in s.explicit:
        pins["dual_clip_c"] = s.delta
    if "beta" in s.explicit:
        pins["kl_coef"] = s.beta
    return pins


def _pin_source(key: str, s: TrlSettings) -> str:
    """The GRPOConfig field a pinned TrainConfig key comes from, for the warning."""
    if key == "clip_eps_high" and "epsilon_high" not in s.explicit:
        return "epsilon_high (unset, so epsilon)"
    return {
        "clip_eps_low": "epsilon",
        "clip_eps_high": "epsilon_high",
        "dual_clip_c": "delta",
        "kl_coef": "beta",
    }[key]


def check_overrides(overrides) -> dict:
    """``method_overrides`` as a dict, or one EntropyLabError: not a mapping, a non-text key, or a key
    that a GRPOConfig field or trainer argument sets (named) or that means nothing on TRL.

    Value types and ranges are checked with the resolved config (``resolve_config``)."""
    if overrides is None:
        return {}
    if not isinstance(overrides, Mapping):
        raise EntropyLabError(
            f"method_overrides must be a mapping of config keys to values (e.g. {{'steer_lambda_min': 0.7}}), "
            f"got {type(overrides).__name__}"
        )
    bad = [k for k in overrides if not isinstance(k, str)]
    if bad:
        raise EntropyLabError(f"method_overrides keys must be config key names (text), got {bad[0]!r}")
    where = [
        f"{k} (GRPOConfig's {TRL_FIELDS[k]})"
        if k in TRL_FIELDS
        else f"{k} (TracedGRPOTrainer({TRAINER_ARGS[k]}=...))"
        for k in overrides
        if k in TRL_FIELDS or k in TRAINER_ARGS
    ]
    if where:
        raise EntropyLabError(
            f"method_overrides cannot set {', '.join(where)}: the TRL trainer takes these from there; set them there"
        )
    meaningless = [k for k in overrides if k in NOT_ON_TRL]
    if meaningless:
        k = meaningless[0]
        raise EntropyLabError(f"method_overrides key {k!r} has no effect on the TRL trainer: {NOT_ON_TRL[k]}")
    return dict(overrides)


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
    if not isinstance(method, str):
        raise EntropyLabError(f"method must be a catalogue method's name, got {method!r}")
    preset = get_method(method)  # unknown names list the valid ones
    if method in REWARD_SIDE:
        raise EntropyLabError(f"method {method!r} cannot run inside TRL's loss: {REWARD_SIDE[method]}")
    if preset.defaults.get("controller", "none") != "none":
        raise EntropyLabError(f"method {method!r} cannot run inside TRL's loss: {NOT_ON_TRL['controller']}")
    overrides = check_overrides(overrides)
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
    pins = user_pins(s)
    cfg = resolve_config(method, {**overrides, **pins}, base_config(s))
    displaced = [
        f"{_pin_source(k, s)}={v} (its preset: {k}={preset.defaults[k]})"
        for k, v in pins.items()
        if k in preset.defaults and preset.defaults[k] != v
    ]
    if displaced:
        warnings.warn(
            f"method {method!r} runs with GRPOConfig's {', '.join(displaced)}; the run's config.json "
            "records the values used",
            EntropyLabWarning,
            stacklevel=3,
        )
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
