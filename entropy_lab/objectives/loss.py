"""``compute_loss``, the one loss entry point of the trainer, and what a caller must give it.

``compute_loss`` does, in naive form:

    terms = get_objective(cfg.objective)(inputs, cfg)
    pg, N = agg_loss(terms.per_token, mask, cfg.loss_agg, num_tokens, num_seqs, cfg.max_new_tokens)
    loss  = pg + kl_coef * agg(kl_t) - entropy_coef * agg(H_t) + terms.extra_loss

The KL estimator is ``cfg.kl_estimator`` of the registry; the KL and the entropy are aggregated
like the policy loss.

Deliberate simplifications:
- Losses are computed in at least fp32 whatever the dtype of ``logprob``.
- Outside the mask the inputs are replaced by harmless values (A = 0, r = 1, H = 0) before the
  objective runs, so NaN or inf in padding cannot reach a gradient; in the output, per-token
  loss, I_clip and advantage are 0 there and lambda is 1.
- ``cfg`` is taken as validated (``TrainConfig.validate``, which ``resolve_config`` and the
  trainer run): the loss checks its inputs, not the config's ranges (e.g. dual_clip_c > 1).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from entropy_lab.aggregation import agg_loss
from entropy_lab.config import TrainConfig
from entropy_lab.errors import EntropyLabError
from entropy_lab.objectives.core import clamped_ratio, masked_mean
from entropy_lab.objectives.registry import get_kl_estimator, get_objective
from entropy_lab.objectives.types import LossInputs, LossOutput
from entropy_lab.stats import compute_dtype


def required_inputs(cfg: TrainConfig) -> frozenset[str]:
    """Optional ``LossInputs`` fields the trainer must fill for ``cfg``.

    Args:
        cfg: the training configuration (objective, entropy_coef, kl_coef).

    Returns:
        A subset of {entropy, old_entropy, collision, ref_logprob}: the objective's own needs,
        entropy when entropy_coef > 0, ref_logprob when kl_coef > 0.
    """
    needed = set(get_objective(cfg.objective).inputs(cfg))
    if cfg.entropy_coef > 0:
        needed.add("entropy")
    if cfg.kl_coef > 0:
        needed.add("ref_logprob")
    return frozenset(needed)


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

    Args:
        inputs: the (B, T) tensors of one loss call, with the fields ``required_inputs(cfg)`` names.
        cfg: a validated training configuration.

    Returns:
        ``LossOutput``: the scalar loss, its (B, T) per-token terms and the metrics.
    """
    _check_inputs(inputs, cfg)
    objective = get_objective(cfg.objective)
    dtype = compute_dtype(inputs.logprob.dtype)
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
    ratio, _ = clamped_ratio(cast.logprob.detach(), cast.old_logprob)  # (B, T)
    metrics["clip/frac"] = masked_mean(1 - clip_indicator, valid)
    for part in ("high", "low", "dual"):
        flags = terms.clip_parts.get(part)
        metrics[f"clip/frac_{part}"] = 0.0 if flags is None else masked_mean(flags.float(), valid)
    metrics["policy/ratio_mean"] = masked_mean(ratio, valid)
    metrics["policy/approx_kl"] = masked_mean(cast.old_logprob - cast.logprob.detach(), valid)
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
