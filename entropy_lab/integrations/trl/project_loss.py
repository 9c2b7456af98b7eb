"""TRL's loss replaced by the project's: a catalogue method's ``compute_loss`` on TRL's tensors.

- ``project_loss``: one micro-batch's loss from TRL's own log-probs and entropies, aggregated as
  TRL's ``loss_type`` does (``losses.LossType.agg``), plus TRL's router auxiliary loss.
- ``batch_context``: STEER's min / max |omega| over the generation batch of all ranks
  (``steer_norm='batch'``).
- ``log_project_metrics``: TRL's entropy metric and the method's metrics, averaged over ranks.
- ``select_over_step``: Clip-Cov's / KL-Cov's tokens over an optimizer step's micro-batches and
  ranks (``cov_selection='global'``), from one no-grad forward per micro-batch.

Deliberate simplifications: evaluation uses TRL's normalisers without accumulation; the
method's metrics are the plain mean of the ranks' values.

Reference: TRL 1.16.0 ``trl/trainer/grpo_trainer.py`` (``_compute_loss``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from trl import GRPOTrainer

from entropy_lab.integrations.trl._inputs import (
    OLD_ENTROPY_KEY,
    SELECTED_KEY,
    _full_sequence,
    _loss_mask,
    _step_counts,
    _token_advantages,
)
from entropy_lab.integrations.trl.losses import StepCounts, get_loss_type
from entropy_lab.objectives import LossInputs, LossOutput, compute_loss, get_objective
from entropy_lab.objectives.cov_select import select_tokens
from entropy_lab.steer import MagnitudeRange

if TYPE_CHECKING:
    from entropy_lab.integrations.trl.trainer import TracedGRPOTrainer

MULTIMODAL_KEYS = (
    "pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
    "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids",
)  # fmt: skip
"""Keys of TRL's batch its forward takes as keyword arguments (None when the batch lacks them)."""


def project_loss(
    trainer: TracedGRPOTrainer, model: torch.nn.Module, inputs: dict
) -> tuple[torch.Tensor, LossOutput]:
    """The method's loss by the project's ``compute_loss`` on TRL's log-probs and entropies.

    Args:
        trainer: the trainer with a resolved method (``trainer._el_cfg``).
        model: the model TRL's ``_compute_loss`` was given (possibly wrapped).
        inputs: TRL's prepared micro-batch.

    Returns:
        (the loss to backpropagate, ``compute_loss``'s output with its per-token terms (b, C)).
    """
    input_ids, attention_mask = _full_sequence(inputs)  # (b, P + C) each
    extra = {k: inputs.get(k) for k in MULTIMODAL_KEYS}
    logps, entropies, aux_loss = trainer._get_per_token_logps_and_entropies(
        model,
        input_ids,
        attention_mask,
        inputs["completion_ids"].size(1),
        compute_entropy=True,
        compute_aux_loss=trainer.aux_loss_enabled,
        **extra,
    )  # (b, C), (b, C)
    mask = _loss_mask(inputs)  # (b, C)
    adv = _token_advantages(inputs, logps)  # (b, C)
    old = inputs.get("old_per_token_logps")
    old_entropy = inputs.get(OLD_ENTROPY_KEY)
    training = trainer.model.training
    counts = _step_counts(trainer, inputs)
    agg_of = get_loss_type(trainer._el_settings.loss_type).agg
    assert agg_of is not None and trainer._el_cfg is not None  # checked when the trainer was built
    agg = agg_of(mask.bool(), counts if training else _no_accum(counts))
    cfg = trainer._el_cfg.replace(loss_agg=agg.mode)
    if agg.max_len is not None:
        cfg = cfg.replace(max_new_tokens=agg.max_len)
    li = LossInputs(
        logprob=logps,
        old_logprob=logps.detach() if old is None else old,
        advantages=adv,
        mask=mask,
        entropy=entropies,
        old_entropy=entropies.detach() if old_entropy is None else old_entropy,
        ref_logprob=inputs.get("ref_per_token_logps") if trainer.beta != 0.0 else None,
        num_tokens=agg.num_tokens,
        num_seqs=agg.num_seqs,
        context=trainer._steer_context,
        generator=trainer._generator,
        selected=inputs.get(SELECTED_KEY) if training else None,
    )
    out = compute_loss(li, cfg)
    loss = out.loss
    mode = "train" if training else "eval"
    if trainer.aux_loss_enabled:
        loss = loss + trainer.router_aux_loss_coef * aux_loss / (counts.ga if training else 1.0)
    log_project_metrics(trainer, mode, entropies, mask, out.metrics)
    return loss, out


@torch.no_grad()
def select_over_step(trainer: TracedGRPOTrainer, prepared: list[dict]) -> None:
    """Add to each prepared micro-batch of one optimizer step the (b, C) tokens Clip-Cov / KL-Cov
    choose over the whole step, all ranks included (``SELECTED_KEY``).

    The log-probs come from one no-grad forward per micro-batch of the unwrapped model (no DDP
    collective) at the step's parameters; the ranks join inside ``select_tokens`` (every rank
    prepares the same number of steps), drawing with the trainer's generator, seeded alike.
    """
    parts = []
    for inputs in prepared:
        input_ids, attention_mask = _full_sequence(inputs)  # (b, P + C) each
        extra = {k: inputs.get(k) for k in MULTIMODAL_KEYS}
        logps = GRPOTrainer._get_per_token_logps_and_entropies(
            trainer, trainer.model, input_ids, attention_mask, inputs["completion_ids"].size(1), **extra
        )[0]  # (b, C)
        old = inputs.get("old_per_token_logps")
        parts.append(
            {
                "logprob": logps,
                "old_logprob": logps if old is None else old,
                "advantages": _token_advantages(inputs, logps),
                "mask": _loss_mask(inputs),
            }
        )
    assert trainer._el_cfg is not None  # only a method selects
    for inputs, chosen in zip(
        prepared, select_tokens(parts, trainer._el_cfg, trainer._generator), strict=True
    ):
        inputs[SELECTED_KEY] = chosen


@torch.no_grad()
def batch_context(trainer: TracedGRPOTrainer, out: dict) -> dict:
    """STEER's min / max |omega| over the generation batch of all ranks (steer_norm='batch').

    Args:
        trainer: the trainer running STEER.
        out: TRL's generation batch as ``_generate_and_score_completions`` returned it.

    Returns:
        The objective's context (``MagnitudeRange.to_context``) for every micro-batch of the batch.
    """
    old, ent = out.get("old_per_token_logps"), out.get(OLD_ENTROPY_KEY)
    if old is None:  # aligned generation: the rollout policy is the current one; one no-grad forward
        ids, attn = _full_sequence(out)  # (b, P + C) each
        old, ent, _ = GRPOTrainer._get_per_token_logps_and_entropies(
            trainer, trainer.model, ids, attn, out["completion_ids"].shape[1], compute_entropy=True
        )  # (b, C), (b, C)
    mask = _loss_mask(out)  # (b, C)
    adv = _token_advantages(out, old)  # (b, C)
    full = LossInputs(logprob=old, old_logprob=old, advantages=adv, mask=mask, entropy=ent, old_entropy=ent)
    assert trainer._el_cfg is not None  # only STEER runs ask for a batch context
    rng = MagnitudeRange.from_context(get_objective("steer").prepare(full, trainer._el_cfg))
    big = torch.finfo(torch.float64).max
    # One gather of (count, min, -max) per rank; an empty rank contributes the neutral +-big.
    local = torch.tensor(
        [rng.count, rng.m_min if rng.count else big, -(rng.m_max if rng.count else -big)],
        dtype=torch.float64,
        device=old.device,
    )  # (3,)
    allr = trainer.accelerator.gather(local[None]).view(-1, 3)  # (world, 3)
    count = int(allr[:, 0].sum())
    m_min = float(allr[:, 1].min()) if count else 0.0
    m_max = float(-allr[:, 2].min()) if count else 0.0
    return MagnitudeRange(count, m_min, m_max).to_context()


def log_project_metrics(
    trainer: TracedGRPOTrainer, mode: str, entropies: torch.Tensor, mask: torch.Tensor, metrics: dict
) -> None:
    """TRL's entropy metric (its formula: token mean over all ranks) and the method's metrics.

    Args:
        trainer: the trainer whose ``_metrics[mode]`` receive the values.
        mode: ``"train"`` or ``"eval"``.
        entropies: (b, C) TRL's per-token entropies of the micro-batch.
        mask: (b, C) the tokens TRL's loss counts.
        metrics: ``compute_loss``'s scalar metrics.
    """
    local = torch.stack([(entropies.detach() * mask).sum(), mask.sum().to(entropies.dtype)])  # (2,)
    totals = trainer.accelerator.reduce(local, reduction="sum")
    trainer._metrics[mode]["entropy"].append(float(totals[0] / totals[1].clamp(min=1.0)))
    keys = sorted(metrics)
    values = torch.tensor([float(metrics[k]) for k in keys], device=entropies.device)  # (K,)
    values = trainer.accelerator.gather(values[None]).view(-1, len(keys)).mean(0)  # (K,)
    for k, v in zip(keys, values.tolist(), strict=True):
        trainer._metrics[mode][k].append(v)


def _no_accum(c: StepCounts) -> StepCounts:
    """TRL's evaluation normalisers: no accumulation (and dapo's window rescaling off)."""
    return StepCounts(1, c.world, 1, c.max_completion_length, c.num_items_in_batch)
