"""entropy-lab's objectives as verl policy losses (the ``verl.plugins`` entry point).

Importing this module (verl does it at ``import verl`` through the ``verl.plugins``
entry-point group, in the driver and in every worker process) registers, in verl's
policy-loss registry, one loss per objective of ``entropy_lab.objectives``::

    entropy_lab.ppo  entropy_lab.steer  entropy_lab.clip-cov  entropy_lab.kl-cov
    entropy_lab.fork-tokens  entropy_lab.w-reinforce  entropy_lab.entropy-adv

so a verl user switches with one config line,
``actor_rollout_ref.actor.policy_loss.loss_mode=entropy_lab.steer``. Every loss is the
project's ``compute_loss`` on verl's tensors; nothing is re-implemented here.

Where each setting comes from (one source of truth each):
- verl's actor config owns what verl has a key for, read exactly as verl's ``vanilla`` loss
  reads it: ``clip_ratio_low`` / ``clip_ratio_high`` (eps), ``clip_ratio_c`` (dual clip; always
  on in verl, default 3; not read by ``clip-cov`` and ``kl-cov``, as verl's ``clip_cov`` and
  ``kl_cov`` apply none), ``loss_agg_mode``, ``loss_scale_factor`` (Dr. GRPO's length),
  ``policy_loss.clip_cov_ratio / clip_cov_lb / clip_cov_ub``, ``policy_loss.kl_cov_ratio`` and
  ``policy_loss.ppo_kl_coef`` (KL-Cov's coefficient). The KL loss and the entropy bonus stay
  verl's (``use_kl_loss``, ``entropy_coeff``): the entropy-lab loss is the policy-gradient term only.
- The method's own parameters (STEER's map and lambda_min, fork rho, W-REINFORCE lambda,
  entropy-adv alpha / kappa) come from the method preset of ``entropy_lab.methods``, then from
  ``ENTROPY_LAB_VERL_SET="key=value,key=value"`` (TrainConfig keys) read in the process that
  computes the loss (pass it to Ray workers with ``runtime_env.env_vars``). It refuses, with one
  line naming verl's setting, a key verl decides (``VERL_OWNS``: the loss itself, eps, lr,
  steps, ...), a key no verl loss reads, and a key given twice.
- The normaliser: verl's global batch info (``dp_size``, ``batch_num_tokens``,
  ``global_batch_size``) maps to ``num_tokens = batch_num_tokens / dp_size`` and
  ``num_seqs = global_batch_size / dp_size``, which makes the aggregate equal to verl's
  ``agg_loss`` in every mode both have.

Per-token entropy. verl's registry calls a policy loss with (old_log_prob, log_prob,
advantages, response_mask, loss_agg_mode, config, rollout_is_weights): no entropy, no
logits. The supported way to reach the actor's per-token entropy in verl 0.9 is the
actor's loss *function* (``ppo_loss(config, model_output, data, dp_group)``, installed on
the worker by its ``set_loss_fn``), whose ``model_output`` holds ``entropy`` when
``actor.calculate_entropy=True``. ``actor_loss`` below is that function: it hands the
entropy to the registered entropy-lab loss and otherwise *is* verl's ``ppo_loss``.
``install_actor_loss(trainer)`` installs it on a ``RayPPOTrainer``'s actor workers.

Limitations (verl 0.9.1):
- ``steer`` with the ``paper`` estimator wants H from the rollout policy; verl drops the
  rollout entropy (``entropys``) before the update, so the actor loss uses the entropy of the
  current forward (equal to the rollout policy's at the first mini-batch of a step).
- The collision term C (``softmax`` and other estimators) is never computed by verl's actor:
  those STEER estimators are refused with one error line.
- ``rollout_is_weights`` (rollout correction) and ``loss_agg_mode=token-sum`` are refused.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from collections.abc import Iterator
from typing import Any

import torch

from entropy_lab.config import TrainConfig, parse_overrides
from entropy_lab.errors import EntropyLabError
from entropy_lab.methods import resolve_config
from entropy_lab.objectives import LossInputs, LossOutput, compute_loss, required_inputs

SUPPORTED_VERL = ((0, 9), (0, 10))
"""verl versions supported: >= 0.9, < 0.10."""

PREFIX = "entropy_lab."
OVERRIDES_ENV = "ENTROPY_LAB_VERL_SET"

OBJECTIVE_METHODS = {
    "ppo": "grpo",
    "steer": "steer",
    "clip-cov": "clip-cov",
    "kl-cov": "kl-cov",
    "fork-tokens": "fork-tokens",
    "w-reinforce": "w-reinforce",
    "entropy-adv": "entropy-adv",
}
"""verl loss name (after the prefix) -> the catalogue method whose preset gives its parameters."""

ACTOR_INPUTS = frozenset({"entropy", "old_entropy"})
"""Optional LossInputs fields the actor loss can supply (old_entropy: the current forward's H)."""

_extra_inputs: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "entropy_lab_verl_inputs", default=None
)


def verl_loss_names() -> list[str]:
    """The names this plugin registers in verl's policy-loss registry."""
    return [PREFIX + name for name in OBJECTIVE_METHODS]


def check_verl_version(version: str) -> None:
    """One error line when ``version`` is outside the supported range."""
    from packaging.version import Version

    v = Version(version)
    lo, hi = (Version(".".join(map(str, b))) for b in SUPPORTED_VERL)
    if not lo <= v < hi:
        raise EntropyLabError(
            f"verl {version} is outside the range entropy-lab supports (>={lo}, <{hi}); install verl 0.9.x"
        )


# --- configuration --------------------------------------------------------------------------------


NO_DUAL_CLIP = frozenset({"clip-cov", "kl-cov"})
"""Objectives whose verl counterparts (``clip_cov``, ``kl_cov``) apply no dual clip: ``clip_ratio_c``
is not read for them, so ``entropy_lab.clip-cov`` equals verl's ``clip_cov`` at verl's defaults."""

VERL_OWNS = {
    "objective": "policy_loss.loss_mode (the loss itself: loss_mode=entropy_lab.<name>)",
    "method": "policy_loss.loss_mode (the loss itself: loss_mode=entropy_lab.<name>)",
    "clip_eps_low": "actor.clip_ratio_low",
    "clip_eps_high": "actor.clip_ratio_high",
    "dual_clip_c": "actor.clip_ratio_c",
    "loss_agg": "actor.loss_agg_mode",
    "max_new_tokens": "data.max_response_length / actor.loss_scale_factor",
    "clip_cov_ratio": "actor.policy_loss.clip_cov_ratio",
    "clip_cov_lb": "actor.policy_loss.clip_cov_lb",
    "clip_cov_ub": "actor.policy_loss.clip_cov_ub",
    "kl_cov_ratio": "actor.policy_loss.kl_cov_ratio",
    "kl_cov_coef": "actor.policy_loss.ppo_kl_coef",
    "kl_coef": "actor.kl_loss_coef (use_kl_loss)",
    "kl_estimator": "actor.kl_loss_type",
    "entropy_coef": "actor.entropy_coeff",
    "lr": "actor.optim.lr",
    "weight_decay": "actor.optim.weight_decay",
    "warmup_steps": "actor.optim.lr_warmup_steps",
    "optimizer": "actor.optim",
    "grad_clip": "actor.grad_clip",
    "steps": "trainer.total_training_steps",
    "ppo_epochs": "actor.ppo_epochs",
    "mini_batches": "actor.ppo_mini_batch_size",
    "micro_batch_size": "actor.ppo_micro_batch_size_per_gpu",
    "prompts_per_step": "data.train_batch_size",
    "samples_per_prompt": "rollout.n",
    "temperature": "rollout.temperature",
    "top_p": "rollout.top_p",
    "seed": "data.seed / actor seeds",
    "advantage": "algorithm.adv_estimator",
    "device": "trainer.device",
    "dtype": "actor.fsdp_config / model dtype",
    "task": "data.train_files",
    "dataset": "data.train_files",
    "model": "actor_rollout_ref.model.path",
    "eval_every": "trainer.test_freq",
    "checkpoint_every": "trainer.save_freq",
    "cov_selection": "verl's call of the loss per micro-batch (only per-call selection is possible)",
}
"""TrainConfig key -> the verl setting that decides it; ``ENTROPY_LAB_VERL_SET`` refuses these keys."""

NOT_IN_VERL = frozenset(
    {"unlikeliness_beta", "controller", "trace_every", "trace_max_positions", "trace_jvp", "trace_eta_grid",
     "eval_prompts", "eval_k", "preset_applied"}
)  # fmt: skip
"""TrainConfig keys that no verl policy loss reads: refused rather than silently ignored."""


@functools.lru_cache(maxsize=32)
def _env_overrides(text: str) -> dict:
    pairs = [p.strip() for p in text.replace(";", ",").split(",") if p.strip()]
    keys = [p.split("=", 1)[0].strip() for p in pairs]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise EntropyLabError(f"{OVERRIDES_ENV} sets {', '.join(twice)} more than once; keep one value each")
    owned = [k for k in keys if k in VERL_OWNS]
    if owned:
        where = ", ".join(f"{k} ({VERL_OWNS[k]})" for k in owned)
        raise EntropyLabError(f"{OVERRIDES_ENV} sets {where}, which verl's config decides; set it there")
    unused = [k for k in keys if k in NOT_IN_VERL]
    if unused:
        raise EntropyLabError(
            f"{OVERRIDES_ENV} sets {', '.join(unused)}, which no verl policy loss reads; drop it"
        )
    try:
        return parse_overrides(pairs)
    except EntropyLabError as e:
        raise EntropyLabError(f"{OVERRIDES_ENV}: {e}") from None


def train_config(objective: str, config: Any, loss_agg_mode: str, response_length: int) -> TrainConfig:
    """The TrainConfig of ``entropy_lab.<objective>`` under verl's actor ``config`` (see module docstring).

    ``loss_agg_mode`` is the argument verl passes to the loss (``config.loss_agg_mode`` in verl's
    ``ppo_loss``); ``response_length`` is T, Dr. GRPO's length when ``loss_scale_factor`` is unset.
    """
    method = OBJECTIVE_METHODS[objective]
    agg = loss_agg_mode
    if agg == "token-sum":
        raise EntropyLabError(
            "loss_agg_mode=token-sum has no entropy-lab equivalent; use token-mean or a seq-mean mode"
        )
    # verl calls the loss once per micro-batch with no view of the others: selection is per call
    verl_keys: dict = {"loss_agg": agg, "kl_coef": 0.0, "entropy_coef": 0.0, "cov_selection": "per-call"}
    if config is not None:
        eps = config.clip_ratio
        verl_keys.update(
            clip_eps_low=config.clip_ratio_low if config.clip_ratio_low is not None else eps,
            clip_eps_high=config.clip_ratio_high if config.clip_ratio_high is not None else eps,
            dual_clip_c=None if objective in NO_DUAL_CLIP else float(config.get("clip_ratio_c", 3.0)),
        )
        pl = config.policy_loss
        verl_keys.update(
            clip_cov_ratio=pl.clip_cov_ratio,
            clip_cov_lb=pl.clip_cov_lb,
            clip_cov_ub=pl.clip_cov_ub,
            kl_cov_ratio=pl.kl_cov_ratio,
            kl_cov_coef=pl.ppo_kl_coef,
        )
        # as verl's agg_loss: the global batch info's copy (set by ppo_loss), else the actor config's
        scale = config.global_batch_info.get("loss_scale_factor") or config.get("loss_scale_factor", None)
        verl_keys["max_new_tokens"] = int(scale) if scale else response_length
    else:
        verl_keys["max_new_tokens"] = response_length
    user = _env_overrides(os.environ.get(OVERRIDES_ENV, ""))  # refuses every key of verl_keys
    return resolve_config(method, {**user, **verl_keys})


# --- the extra inputs the registry cannot pass ------------------------------------------------------


@contextlib.contextmanager
def extra_inputs(**tensors: torch.Tensor | None) -> Iterator[None]:
    """Hand (B, T) tensors (``entropy``, ``old_entropy``) to entropy-lab losses called inside."""
    token = _extra_inputs.set({k: v for k, v in tensors.items() if v is not None})
    try:
        yield
    finally:
        _extra_inputs.reset(token)


def _missing_input_error(name: str, cfg: TrainConfig, missing: list[str]) -> EntropyLabError:
    fields = ", ".join(missing)
    if set(missing) <= ACTOR_INPUTS:
        return EntropyLabError(
            f"{name} needs per-token {fields}, which verl's policy-loss registry does not pass; install "
            "entropy_lab.integrations.verl.actor_loss (install_actor_loss) and set actor.calculate_entropy=True"
        )
    return EntropyLabError(
        f"{name} (steer_estimator={cfg.steer_estimator!r}) needs {fields}, which verl's actor does not compute; "
        "use steer_estimator paper, sampled-logit or covariance"
    )


def compute_verl_loss(
    objective: str,
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[LossOutput, TrainConfig]:
    """``compute_loss`` on verl's (B, T) tensors under verl's config; returns the output and its config."""
    name = PREFIX + objective
    if rollout_is_weights is not None:
        raise EntropyLabError(
            f"{name} does not apply rollout correction weights; set algorithm.rollout_correction.rollout_is=null"
        )
    cfg = train_config(objective, config, loss_agg_mode, response_mask.shape[-1])
    extra = _extra_inputs.get() or {}
    if "old_entropy" not in extra and "entropy" in extra:
        extra = {
            **extra,
            "old_entropy": extra["entropy"],
        }  # verl drops the rollout entropy (module docstring)
    missing = sorted(n for n in required_inputs(cfg) if n not in extra)
    if missing:
        raise _missing_input_error(name, cfg, missing)
    info = dict(config.global_batch_info) if config is not None else {}
    dp = float(info.get("dp_size") or 1)
    n_tok, n_seq = info.get("batch_num_tokens"), info.get("global_batch_size")
    inputs = LossInputs(
        logprob=log_prob,
        old_logprob=old_log_prob,
        advantages=advantages,
        mask=response_mask,
        entropy=extra.get("entropy"),
        old_entropy=extra.get("old_entropy"),
        num_tokens=None if n_tok is None else float(n_tok) / dp,
        num_seqs=None if n_seq is None else float(n_seq) / dp,
    )
    return compute_loss(inputs, cfg), cfg


def _verl_metrics(out: LossOutput) -> dict[str, float]:
    m = out.metrics
    metrics = {
        "actor/pg_clipfrac": m["clip/frac_high"] + m["clip/frac_low"],
        "actor/pg_clipfrac_lower": m["clip/frac_dual"],
        "actor/ppo_kl": m["policy/approx_kl"],
    }
    metrics.update({f"entropy_lab/{k}": float(v) for k, v in m.items() if not k.startswith("loss/")})
    return metrics


def make_policy_loss(objective: str):
    """A verl ``PolicyLossFn`` for ``entropy_lab.<objective>`` (verl's registry signature)."""

    def policy_loss(
        old_log_prob: torch.Tensor,
        log_prob: torch.Tensor,
        advantages: torch.Tensor,
        response_mask: torch.Tensor,
        loss_agg_mode: str = "token-mean",
        config: Any = None,
        rollout_is_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        out, _ = compute_verl_loss(
            objective,
            old_log_prob,
            log_prob,
            advantages,
            response_mask,
            loss_agg_mode,
            config,
            rollout_is_weights,
        )
        return out.loss, _verl_metrics(out)

    policy_loss.__name__ = f"entropy_lab_{objective.replace('-', '_')}_loss"
    policy_loss.__doc__ = f"entropy-lab objective {objective!r} through ``compute_loss`` (verl PolicyLossFn)."
    return policy_loss


def _refusing_loss(message: str):
    def policy_loss(*args, **kwargs):
        raise EntropyLabError(message)

    return policy_loss


# --- the actor loss function (model output -> entropy) ------------------------------------------------


def actor_loss(config: Any, model_output: Any, data: Any, dp_group: Any = None):
    """verl's ``ppo_loss`` with the actor's per-token entropy handed to entropy-lab losses.

    Same signature and result as ``verl.workers.utils.losses.ppo_loss``; install it with the
    worker's ``set_loss_fn(functools.partial(actor_loss, config=actor_config))`` (see
    ``install_actor_loss``). ``model_output["entropy"]`` exists when ``actor.calculate_entropy=True``.
    """
    from verl.workers.utils.losses import ppo_loss
    from verl.workers.utils.padding import no_padding_2_padding

    entropy = model_output.get("entropy", None)
    padded = None if entropy is None else no_padding_2_padding(entropy, data)  # (B, T)
    with extra_inputs(entropy=padded):
        return ppo_loss(config, model_output, data, dp_group)


def install_actor_loss(trainer: Any) -> None:
    """Install ``actor_loss`` on the actor workers of a verl ``RayPPOTrainer`` (after ``init_workers``)."""
    from verl.utils.config import omega_conf_to_dataclass

    actor_cfg = trainer.config.actor_rollout_ref.actor
    if not (actor_cfg.get("calculate_entropy", False) or actor_cfg.get("entropy_coeff", 0.0)):
        raise EntropyLabError(
            "install_actor_loss needs actor_rollout_ref.actor.calculate_entropy=True, or the actor forward has no entropy"
        )
    config = omega_conf_to_dataclass(actor_cfg)
    trainer.actor_rollout_wg.set_loss_fn(functools.partial(actor_loss, config=config))


# --- registration -------------------------------------------------------------------------------------


def register(registry: dict | None = None, version: str | None = None) -> list[str]:
    """Register every ``entropy_lab.*`` loss in verl's policy-loss registry; returns the names.

    With an unsupported verl the names are still registered, as losses that raise the version
    error, because verl logs plugin import errors only at debug level.
    """
    if registry is None or version is None:
        try:
            import verl
        except ImportError as e:
            raise EntropyLabError(
                f"verl is not importable ({e}); install the extra: pip install 'entropy-lab[verl]'"
            ) from None
        from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY

        registry = POLICY_LOSS_REGISTRY if registry is None else registry
        version = verl.__version__ if version is None else version
    try:
        check_verl_version(version)
        refusal = None
    except EntropyLabError as e:
        refusal = str(e)
    for objective in OBJECTIVE_METHODS:
        fn = make_policy_loss(objective) if refusal is None else _refusing_loss(refusal)
        registry[PREFIX + objective] = fn
    return verl_loss_names()


register()
