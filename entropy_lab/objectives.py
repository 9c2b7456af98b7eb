"""Per-token policy objectives and ``compute_loss``, the one loss entry point of the trainer.

Every objective has one signature, ``fn(inputs: LossInputs, cfg: TrainConfig) -> ObjectiveTerms``,
and returns the per-token loss *before* aggregation with what the trace needs per token:
the clip indicator I_clip, the intervention weight lambda and the advantage actually used.
``compute_loss`` then does, in naive form:

    terms = get_objective(cfg.objective)(inputs, cfg)
    pg, N = agg_loss(terms.per_token, mask, cfg.loss_agg, num_tokens, num_seqs, cfg.max_new_tokens)
    loss  = pg + kl_coef * agg(kl_t) - entropy_coef * agg(H_t) + terms.extra_loss

The PPO-clip core (Schulman et al. 2017) per token, r = exp(logp - old_logp):

    loss_t = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))
    dual clip (Ye et al. 2020), for A < 0 only:  loss_t = min(loss_t, -A c)

I_clip = 0 where that loss is constant in logp: A > 0 and r > 1 + eps_high (clip/frac_high),
A < 0 and r < 1 - eps_low (clip/frac_low), A < 0 and r > c (clip/frac_dual).

Objectives (registry names):
- ``ppo``: the core above (GRPO, DAPO's clip-higher and dual-clip are settings of it).
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

Extra terms: KL to the reference with k1 = logp - ref, k2 = (logp - ref)^2 / 2,
k3 = exp(ref - logp) - (ref - logp) - 1 (Schulman 2020), aggregated like the policy loss;
entropy bonus -entropy_coef * agg(H).

Deliberate simplifications:
- Clip-Cov, KL-Cov and Fork tokens select over the valid tokens of *one call*: with gradient
  accumulation the selection is per micro-batch (as in verl). STEER can normalise per batch.
- log(r) and the k3 log-ratio are clamped to [-20, 20] (as verl and the STEER release);
  a token at that clamp has no gradient, so it is counted as clipped (I_clip = 0).
- Losses are computed in at least fp32 whatever the dtype of ``logprob``.
- Outside the mask the inputs are replaced by harmless values (A = 0, r = 1, H = 0) before the
  objective runs, so NaN or inf in padding cannot reach a gradient; in the output, per-token
  loss, I_clip and advantage are 0 there and lambda is 1.

References: Schulman et al. 2017 (PPO); Ye et al. 2020 (dual clip, arXiv 1912.09729); Shao et al.
2024 (GRPO); Yu et al. 2025 (DAPO); Cui et al. 2025 (arXiv 2505.22617); Wang et al. 2025
(arXiv 2506.01939); Zhu et al. 2025 (arXiv 2506.01347); Cheng et al. 2025 (arXiv 2506.14758);
Hao et al. 2025 (arXiv 2510.10150); Schulman 2020, "Approximating KL divergence".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields, replace

import torch

from entropy_lab import steer
from entropy_lab.aggregation import agg_loss
from entropy_lab.config import TrainConfig
from entropy_lab.errors import EntropyLabError
from entropy_lab.registry import Registry

LOG_RATIO_CLAMP = 20.0


PER_TOKEN = {"per_token": True}
"""Field metadata of ``LossInputs``: a (B, T) tensor, sliced with the batch rows."""


@dataclass
class LossInputs:
    """Inputs of one loss call; every per-token tensor is (B, T), aligned with response positions."""

    logprob: torch.Tensor = field(metadata=PER_TOKEN)  # (B, T) log pi(a_t), current parameters, with grad
    old_logprob: torch.Tensor = field(metadata=PER_TOKEN)  # (B, T) rollout policy, no grad
    advantages: torch.Tensor = field(
        metadata=PER_TOKEN
    )  # (B, T) sequence advantage broadcast over its tokens
    mask: torch.Tensor = field(metadata=PER_TOKEN)  # (B, T) float or bool response mask
    # (B, T) current entropy; with grad when entropy_coef > 0
    entropy: torch.Tensor | None = field(default=None, metadata=PER_TOKEN)
    # (B, T) rollout-policy entropy (STEER's H as released)
    old_entropy: torch.Tensor | None = field(default=None, metadata=PER_TOKEN)
    collision: torch.Tensor | None = field(default=None, metadata=PER_TOKEN)  # (B, T) current C, no grad
    ref_logprob: torch.Tensor | None = field(default=None, metadata=PER_TOKEN)  # (B, T) reference policy
    num_tokens: float | None = None  # valid tokens in the whole mini-batch (default: this call's)
    num_seqs: float | None = None  # sequences in the whole mini-batch (default: this call's B)
    context: dict = field(default_factory=dict)  # the objective's prepare() output for this rollout batch
    generator: torch.Generator | None = None  # random choices (Clip-Cov)

    @property
    def valid(self) -> torch.Tensor:
        """(B, T) bool response mask."""
        return self.mask > 0

    @classmethod
    def per_token_fields(cls) -> tuple[str, ...]:
        """Names of the (B, T) tensor fields, in declaration order."""
        return tuple(f.name for f in fields(cls) if f.metadata.get("per_token"))

    def select_rows(self, rows: torch.Tensor) -> LossInputs:
        """The inputs of batch rows ``rows`` (b,): per-token tensors sliced, everything else shared."""
        return replace(
            self,
            **{n: getattr(self, n)[rows] for n in self.per_token_fields() if getattr(self, n) is not None},
        )


@dataclass
class ObjectiveTerms:
    """What one objective returns; every tensor is (B, T)."""

    per_token: torch.Tensor  # policy-gradient loss per token, before aggregation
    clip_indicator: torch.Tensor  # I_clip: 1 where the token's PPO term carries gradient
    intervention_weight: torch.Tensor  # lambda: product of the objective's per-token multipliers
    advantage: torch.Tensor  # the advantage actually used
    metrics: dict[str, float] = field(default_factory=dict)
    extra_loss: torch.Tensor | None = None  # scalar added to the loss as is (none of the built-ins)
    clip_parts: dict[str, torch.Tensor] = field(default_factory=dict)  # 'high', 'low', 'dual': (B, T) bool


@dataclass
class LossOutput:
    """Result of ``compute_loss``. ``loss/kl`` and ``loss/entropy`` report the aggregated KL and
    entropy themselves; their contributions to ``loss`` are +kl_coef and -entropy_coef times them."""

    loss: torch.Tensor  # scalar to backward
    per_token: torch.Tensor  # (B, T) policy-gradient loss per token (0 outside mask)
    clip_indicator: torch.Tensor  # (B, T) I_clip (0 outside mask)
    intervention_weight: torch.Tensor  # (B, T) lambda (1 outside mask)
    advantage: torch.Tensor  # (B, T) advantage used (0 outside mask)
    normalizer: torch.Tensor  # (B, T) N of the aggregation mode
    metrics: dict[str, float]


# --- registry ------------------------------------------------------------------------------

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

    ``requires``: the optional ``LossInputs`` fields it reads (or a function of cfg giving them).
    """

    def deco(fn: ObjectiveFn) -> ObjectiveFn:
        if name in OBJECTIVES:
            raise EntropyLabError(f"objective {name!r} is already registered")
        if callable(requires):
            req = lambda cfg: frozenset(requires(cfg))  # noqa: E731
        else:
            fixed = frozenset(requires)
            req = lambda cfg: fixed  # noqa: E731
        OBJECTIVES[name] = Objective(name, fn, req, prepare)
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


# --- shared pieces -------------------------------------------------------------------------


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


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _ratio(logprob: torch.Tensor, old_logprob: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(r (B, T) with grad, saturated (B, T) bool)."""
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
    ratio, saturated = _ratio(logprob, old_logprob)  # (B, T)
    surrogate = -advantage * ratio
    clipped = -advantage * ratio.clamp(1 - cfg.clip_eps_low, 1 + cfg.clip_eps_high)
    loss = torch.maximum(surrogate, clipped)  # (B, T)
    r = ratio.detach()
    high = (advantage > 0) & (r > 1 + cfg.clip_eps_high)
    low = (advantage < 0) & (r < 1 - cfg.clip_eps_low)
    dual = torch.zeros_like(high)
    c = cfg.dual_clip_c
    if c is not None:
        if c <= 1:
            raise EntropyLabError(f"dual_clip_c must be greater than 1, got {c}")
        loss = torch.where(advantage < 0, torch.minimum(loss, -advantage * c), loss)
        dual = (advantage < 0) & (r > c)
    indicator = (~(high | low | dual | saturated)).to(loss.dtype)
    return ClippedSurrogate(loss, r, indicator, high, low, dual, saturated)


def _terms(
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


def _masked_mean(x: torch.Tensor, valid: torch.Tensor) -> float:
    n = int(valid.sum())
    return float(x.detach()[valid].double().sum() / n) if n else 0.0


def token_covariance(logprob: torch.Tensor, advantage: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """cov_t = (logp_t - mean logp)(A_t - mean A), means over valid tokens; (B, T), 0 outside ``valid``.

    Naive equivalent: ``lp, a = logp[valid], A[valid]; (lp - lp.mean()) * (a - a.mean())``.
    """
    logprob = logprob.detach()
    dtype = _compute_dtype(logprob)
    cov = torch.zeros(valid.shape, dtype=dtype, device=logprob.device)
    if bool(valid.any()):
        lp = logprob[valid].to(dtype)  # (n,)
        a = advantage.detach()[valid].to(dtype)  # (n,)
        cov[valid] = (lp - lp.mean()) * (a - a.mean())
    return cov


def _require(inputs: LossInputs, name: str, objective: str) -> torch.Tensor:
    value = getattr(inputs, name)
    if value is None:
        raise EntropyLabError(f"objective {objective!r} needs LossInputs.{name}, which was not given")
    return value


# --- objectives ------------------------------------------------------------------------------


@register_objective("ppo")
def ppo_objective(inputs: LossInputs, cfg: TrainConfig) -> ObjectiveTerms:
    """The PPO-clip core, optionally dual-clipped; lambda = 1."""
    core = ppo_clip(inputs.logprob, inputs.old_logprob, inputs.advantages, cfg)
    return _terms(core, inputs.advantages)


@register_objective("clip-cov")
def clip_cov_objective(inputs: LossInputs, cfg: TrainConfig) -> ObjectiveTerms:
    """PPO core; a random max(1, int(ratio N)) of the unclipped tokens with lb < cov < ub get lambda = 0."""
    core = ppo_clip(inputs.logprob, inputs.old_logprob, inputs.advantages, cfg)
    valid = inputs.valid
    cov = token_covariance(inputs.logprob, inputs.advantages, valid)  # (B, T)
    band = valid & (core.clip_indicator > 0) & (cov > cfg.clip_cov_lb) & (cov < cfg.clip_cov_ub)
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
        "clip_cov/frac_in_band": _masked_mean(band.float(), valid),
    }
    return _terms(core, inputs.advantages, weight, metrics)


@register_objective("kl-cov")
def kl_cov_objective(inputs: LossInputs, cfg: TrainConfig) -> ObjectiveTerms:
    """-A r on every token (no clipping, as published) + coef |logp - old_logp| on the top-cov tokens."""
    valid = inputs.valid
    ratio, saturated = _ratio(inputs.logprob, inputs.old_logprob)  # (B, T)
    loss = -inputs.advantages * ratio
    cov = token_covariance(inputs.logprob, inputs.advantages, valid)  # (B, T)
    n_valid = int(valid.sum())
    penalised = torch.zeros(valid.numel(), dtype=torch.bool, device=valid.device)
    if n_valid > 0:
        k = max(1, int(cfg.kl_cov_ratio * n_valid))
        scores = torch.where(valid, cov, torch.full_like(cov, -math.inf)).flatten()
        penalised[torch.topk(scores, k).indices] = True
    penalised = penalised.view(valid.shape)  # (B, T)
    penalty = cfg.kl_cov_coef * (inputs.logprob - inputs.old_logprob).abs()
    loss = loss + torch.where(penalised, penalty, torch.zeros_like(penalty))
    indicator = (~saturated).to(loss.dtype)
    metrics = {"kl_cov/frac_penalised": _masked_mean(penalised.float(), valid)}
    return ObjectiveTerms(loss, indicator, torch.ones_like(loss), inputs.advantages, metrics)


@register_objective("fork-tokens", requires=("entropy",))
def fork_tokens_objective(inputs: LossInputs, cfg: TrainConfig) -> ObjectiveTerms:
    """PPO core on the top ceil(rho N) tokens by current entropy (detached); lambda = 0 on the rest."""
    entropy = _require(inputs, "entropy", "fork-tokens").detach()
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
    return _terms(core, inputs.advantages, weight, {"fork/frac_kept": n_keep / max(n_valid, 1)})


@register_objective("w-reinforce")
def w_reinforce_objective(inputs: LossInputs, cfg: TrainConfig) -> ObjectiveTerms:
    """PPO core with lambda = w_reinforce_lambda on positive-advantage tokens, 1 elsewhere."""
    core = ppo_clip(inputs.logprob, inputs.old_logprob, inputs.advantages, cfg)
    lam = torch.full_like(core.loss, cfg.w_reinforce_lambda)
    weight = torch.where(inputs.advantages > 0, lam, torch.ones_like(lam))
    return _terms(core, inputs.advantages, weight)


@register_objective("entropy-adv", requires=("entropy",))
def entropy_adv_objective(inputs: LossInputs, cfg: TrainConfig) -> ObjectiveTerms:
    """PPO core on A' = A + min(alpha H_detached, |A| / kappa) (the bonus never flips A's sign for kappa > 1)."""
    entropy = _require(inputs, "entropy", "entropy-adv").detach()
    advantage = inputs.advantages
    bonus = torch.minimum(cfg.entropy_adv_alpha * entropy, advantage.abs() / cfg.entropy_adv_kappa)  # (B, T)
    shaped = advantage + bonus
    core = ppo_clip(inputs.logprob, inputs.old_logprob, shaped, cfg)
    return _terms(core, shaped, metrics={"entropy_adv/bonus_mean": _masked_mean(bonus, inputs.valid)})


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
        "steer/frac_damped": _masked_mean((weight < 1).float(), valid),
        "steer/omega_abs_max": float(omega.abs().max()) if omega.numel() else 0.0,
    }
    return _terms(core, inputs.advantages, weight, metrics)


# --- the entry point -------------------------------------------------------------------------


def required_inputs(cfg: TrainConfig) -> frozenset[str]:
    """Optional ``LossInputs`` fields the trainer must fill for ``cfg`` (entropy, old_entropy, collision, ref_logprob)."""
    needed = set(get_objective(cfg.objective).inputs(cfg))
    if cfg.entropy_coef > 0:
        needed.add("entropy")
    if cfg.kl_coef > 0:
        needed.add("ref_logprob")
    return frozenset(needed)


def needs_entropy(cfg: TrainConfig) -> bool:
    """Whether the trainer must compute the current entropy (differentiable when entropy_coef > 0)."""
    return "entropy" in required_inputs(cfg)


def needs_reference(cfg: TrainConfig) -> bool:
    """Whether a reference policy must be loaded (kl_coef > 0)."""
    return "ref_logprob" in required_inputs(cfg)


def prepare_context(full_inputs: LossInputs, cfg: TrainConfig) -> dict:
    """The objective's per-rollout-batch context (call once per batch, put it in LossInputs.context)."""
    return get_objective(cfg.objective).prepare(full_inputs, cfg)


def _check_inputs(inputs: LossInputs, cfg: TrainConfig) -> None:
    shape = inputs.logprob.shape
    if len(shape) != 2:
        raise EntropyLabError(f"LossInputs tensors must be (B, T), got logprob of shape {tuple(shape)}")
    for name in inputs.per_token_fields():
        value = getattr(inputs, name)
        if value is not None and value.shape != shape:
            raise EntropyLabError(
                f"LossInputs.{name} has shape {tuple(value.shape)}, expected {tuple(shape)} like logprob"
            )
    # A NaN advantage would reach the gradient and, after the optimizer step, every weight.
    bad = ~torch.isfinite(inputs.advantages.detach()) & inputs.valid
    if bool(bad.any()):
        raise EntropyLabError(
            f"LossInputs.advantages holds {int(bad.sum())} non-finite value(s) at response positions; "
            "check the rewards and the advantage estimator (a group std of 0 divides by zero) before the loss"
        )
    missing = sorted(n for n in required_inputs(cfg) if getattr(inputs, n) is None)
    if missing:
        raise EntropyLabError(
            f"method settings (objective {cfg.objective!r}) need LossInputs.{', LossInputs.'.join(missing)}, which the caller did not give"
        )


def compute_loss(inputs: LossInputs, cfg: TrainConfig) -> LossOutput:
    """Objective per-token loss -> agg_loss -> + kl_coef agg(kl) - entropy_coef agg(H) + extra.

    With ``num_tokens`` / ``num_seqs`` set to the whole mini-batch's counts, the losses of its
    micro-batches sum to the mini-batch loss (for objectives without per-call selection).
    """
    _check_inputs(inputs, cfg)
    objective = get_objective(cfg.objective)
    dtype = _compute_dtype(inputs.logprob)
    valid = inputs.valid  # (B, T)
    logprob = inputs.logprob.to(dtype)  # (B, T) with grad
    zero = torch.zeros((), dtype=dtype, device=valid.device)

    def clean(x: torch.Tensor, fill: torch.Tensor, grad: bool = False) -> torch.Tensor:
        # Padding positions get harmless values, so that NaN or inf there cannot reach a gradient.
        return torch.where(valid, (x if grad else x.detach()).to(dtype), fill)

    def clean_optional(x: torch.Tensor | None, fill: torch.Tensor, grad: bool = False) -> torch.Tensor | None:
        return None if x is None else clean(x, fill, grad)

    cast = replace(
        inputs,
        logprob=logprob,
        old_logprob=clean(inputs.old_logprob, logprob.detach()),  # r = 1 on padding
        advantages=clean(inputs.advantages, zero),
        mask=valid,
        entropy=clean_optional(inputs.entropy, zero, grad=True),
        old_entropy=clean_optional(inputs.old_entropy, zero),
        collision=clean_optional(inputs.collision, zero),
        ref_logprob=clean_optional(inputs.ref_logprob, logprob.detach()),
    )
    terms = objective(cast, cfg)

    def aggregate(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return agg_loss(
            x,
            valid,
            cfg.loss_agg,
            num_tokens=inputs.num_tokens,
            num_seqs=inputs.num_seqs,
            max_len=cfg.max_new_tokens,
        )

    per_token = torch.where(valid, terms.per_token, zero)  # (B, T)
    pg, normalizer = aggregate(per_token)
    loss = pg
    metrics = {"loss/pg": float(pg.detach())}
    # The KL and entropy aggregates are reported whenever given; they enter the loss only with a coefficient.
    if cast.ref_logprob is not None:
        kl = get_kl_estimator(cfg.kl_estimator)(cast.logprob, cast.ref_logprob)  # (B, T)
        kl_agg, _ = aggregate(kl)
        metrics["loss/kl"] = float(kl_agg.detach())
        if cfg.kl_coef > 0:
            loss = loss + cfg.kl_coef * kl_agg
    if cast.entropy is not None:
        ent_agg, _ = aggregate(cast.entropy)
        metrics["loss/entropy"] = float(ent_agg.detach())
        if cfg.entropy_coef > 0:
            loss = loss - cfg.entropy_coef * ent_agg
    if terms.extra_loss is not None:
        loss = loss + terms.extra_loss
        metrics["loss/extra"] = float(terms.extra_loss.detach())
    metrics["loss/total"] = float(loss.detach())

    clip_indicator = torch.where(valid, terms.clip_indicator.to(dtype), zero)  # (B, T)
    ratio = (
        (cast.logprob.detach() - cast.old_logprob).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()
    )  # (B, T)
    metrics["clip/frac"] = _masked_mean(1 - clip_indicator, valid)
    for part in ("high", "low", "dual"):
        flags = terms.clip_parts.get(part)
        metrics[f"clip/frac_{part}"] = 0.0 if flags is None else _masked_mean(flags.float(), valid)
    metrics["policy/ratio_mean"] = _masked_mean(ratio, valid)
    metrics["policy/approx_kl"] = _masked_mean(cast.old_logprob - cast.logprob.detach(), valid)
    metrics.update(terms.metrics)
    return LossOutput(
        loss=loss,
        per_token=per_token,
        clip_indicator=clip_indicator,
        intervention_weight=torch.where(
            valid,
            terms.intervention_weight.detach().to(dtype),
            torch.ones((), dtype=dtype, device=valid.device),
        ),
        advantage=torch.where(valid, terms.advantage.detach().to(dtype), zero),
        normalizer=normalizer,
        metrics=metrics,
    )
