"""What each traced token's loss used: the annotations of a traced micro-batch.

- ``annotate_trl_loss``: with TRL's own loss, mirror its per-token terms (clip indicator,
  multiplier, the ``loss_type``'s normaliser; ``losses``) on the log-probs and entropies TRL's
  forward gave, with TRL's own helpers for its extra multipliers (VESPO's gamma weights, the
  top-entropy mask, the off-policy mask, vLLM importance weights).
- ``annotate_project_loss``: with a catalogue method, the per-token terms the project's
  ``compute_loss`` returned.

Either way the trace's ``weight`` is the loss's gradient per token, -d loss / d log pi_a.

Deliberate simplification: the mirror recomputes TRL's terms from its inputs instead of reading
them out of TRL's ``_compute_loss``; the trace tests hold it to TRL's actual gradients.

Reference: TRL 1.16.0 ``trl/trainer/grpo_trainer.py`` (``_compute_loss``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from entropy_lab.integrations.trl._inputs import _loss_mask, _step_counts, _token_advantages
from entropy_lab.integrations.trl.losses import SurrogateSettings, get_loss_type, surrogate_terms
from entropy_lab.integrations.trl.window import TracedStepBatch
from entropy_lab.objectives import LossOutput

if TYPE_CHECKING:
    from entropy_lab.integrations.trl.trainer import TracedGRPOTrainer


@torch.no_grad()
def annotate_trl_loss(
    trainer: TracedGRPOTrainer, window: TracedStepBatch, inputs: dict, captured: dict
) -> None:
    """Annotate the micro-batch with the per-token terms of TRL's own loss (``losses``).

    Args:
        trainer: the trainer whose TRL loss was just computed (its settings and TRL's helpers).
        window: the open traced step.
        inputs: TRL's prepared micro-batch.
        captured: what TRL's forward gave: ``logps`` (b, C) and ``entropies`` (b, C) or None.
    """
    logps = captured["logps"]  # (b, C)
    mask = _loss_mask(inputs)  # (b, C)
    adv = _token_advantages(inputs, logps)  # (b, C)
    old = inputs.get("old_per_token_logps")
    old = logps if old is None else old  # (b, C)
    s = trainer._el_settings
    args = trainer.args
    phi = None
    if s.loss_type == "vespo":
        phi = trainer.get_gamma_weights(
            advantages=adv[:, :1],
            log_ratio_per_token=logps - old,
            mask=mask,
            importance_sampling_ratio=inputs.get("importance_sampling_ratio"),
            k_pos=args.vespo_k_pos,
            lambda_pos=args.vespo_lambda_pos,
            k_neg=args.vespo_k_neg,
            lambda_neg=args.vespo_lambda_neg,
        )  # (b, 1)
    settings = SurrogateSettings(
        epsilon_low=trainer.epsilon_low,
        epsilon_high=trainer.epsilon_high,
        delta=args.delta,
        sapo_temperature_pos=getattr(args, "sapo_temperature_pos", 1.0),
        sapo_temperature_neg=getattr(args, "sapo_temperature_neg", 1.05),
        sequence_level=trainer.importance_sampling_level == "sequence",
    )
    indicator, weight = surrogate_terms(s.loss_type, logps, old, adv, mask, settings, phi)  # (b, C) each
    # TRL's multipliers on top of the surrogate, computed by TRL's own helpers.
    if trainer.top_entropy_quantile < 1.0:
        weight = weight * trainer.get_high_entropy_mask(
            captured["entropies"], mask, 1 - trainer.top_entropy_quantile
        )
    if trainer.off_policy_mask_threshold is not None:
        sampling = inputs.get("sampling_per_token_logps", old)
        weight = weight * trainer.get_off_policy_mask(
            adv[:, :1], logps, sampling, mask, trainer.off_policy_mask_threshold
        )
    if trainer.use_vllm and trainer.vllm_importance_sampling_correction and s.loss_type != "vespo":
        weight = weight * inputs["importance_sampling_ratio"]
    normalizer = get_loss_type(s.loss_type).normalizer(mask.bool(), _step_counts(trainer, inputs))  # (b, C)
    window.annotate(
        clip_indicator=indicator, intervention_weight=weight, normalizer=normalizer, advantage=adv
    )


def annotate_project_loss(window: TracedStepBatch, out: LossOutput, world: int) -> None:
    """Annotate the micro-batch with the per-token terms the project's ``compute_loss`` used.

    Args:
        window: the open traced step.
        out: ``compute_loss``'s output for the micro-batch (per-token tensors (b, C)).
        world: data-parallel ranks; the project normalises per rank, TRL's gradient over all of them.
    """
    window.annotate(
        clip_indicator=out.clip_indicator,
        intervention_weight=out.intervention_weight,
        normalizer=out.normalizer.double() * world,
        advantage=out.advantage,
    )
