"""Readers of one micro-batch as TRL's ``_prepare_inputs`` returns it.

The traced batch, the annotations and the project's loss all read TRL's tensors through these,
so they read the same tensors the same way.

TRL's prepared micro-batch holds prompt and completion separately (``prompt_ids`` (b, P),
``completion_ids`` (b, C), their masks, ``advantages`` (b,) or (b, C), optionally
``old_per_token_logps`` (b, C), ``tool_mask`` (b, C) and ``num_items_in_batch``).

Deliberate simplification: multimodal keys are passed through by the caller, not read here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from entropy_lab.errors import EntropyLabError
from entropy_lab.integrations.trl.losses import StepCounts

if TYPE_CHECKING:
    from entropy_lab.integrations.trl.trainer import TracedGRPOTrainer

OLD_ENTROPY_KEY = "old_per_token_entropy"
"""Key under which the trainer adds the rollout policy's per-token entropies (b, C) to TRL's batch."""

SELECTED_KEY = "entropy_lab_cov_selected"
"""Key under which the trainer adds the Clip-Cov / KL-Cov tokens chosen over the whole step (b, C) bool."""


def _loss_mask(batch: dict) -> torch.Tensor:
    """The completion tokens TRL's loss counts (b, C): the completion mask, times the tool mask if any."""
    mask = batch["completion_mask"]
    return mask if "tool_mask" not in batch else mask * batch["tool_mask"]


def _token_advantages(batch: dict, like: torch.Tensor) -> torch.Tensor:
    """The batch's advantages per completion token (b, C), broadcast from (b,) when TRL gives one per row.

    Args:
        batch: TRL's prepared micro-batch.
        like: a (b, C) tensor whose shape a per-row advantage is expanded to.

    Returns:
        A (b, C) view of ``batch["advantages"]``.
    """
    adv = batch["advantages"]
    return adv[:, None].expand_as(like) if adv.dim() == 1 else adv


def _full_sequence(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt then completion: (input_ids (b, P + C), attention_mask (b, P + C))."""
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)  # (b, P + C)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)  # (b, P + C)
    return input_ids, attention_mask


def _step_counts(trainer: TracedGRPOTrainer, inputs: dict) -> StepCounts:
    """The counts of the current optimizer step that TRL's normalisers use (``losses.StepCounts``).

    Args:
        trainer: the ``TracedGRPOTrainer`` computing the loss.
        inputs: TRL's prepared micro-batch.

    Returns:
        The step's counts; one EntropyLabError when TRL's ``max_completion_length`` is unset.
    """
    items = inputs.get("num_items_in_batch")
    if trainer.max_completion_length is None:  # dr_grpo's normaliser needs it
        raise EntropyLabError("TRL's max_completion_length is unset; set GRPOConfig(max_completion_length=N)")
    return StepCounts(
        ga=int(trainer.current_gradient_accumulation_steps),
        world=int(trainer.accelerator.num_processes),
        steps_per_generation=int(trainer.args.steps_per_generation),
        max_completion_length=int(trainer.max_completion_length),
        num_items_in_batch=None if items is None else float(items),
    )
