"""The training batch of one step: a rollout and everything its updates read, in one type.

``RolloutBatch`` is built once per step, after sampling and scoring: the sampled
sequences, rewards, per-token advantages, the rollout policy's statistics, the
reference log-probs (when a KL term needs them) and the objective's per-batch
context. The updates slice it by rows; ``loss_inputs`` turns rows of it into the
``LossInputs`` of one loss call.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from entropy_lab.objectives import LossInputs
from entropy_lab.rollout import Rollout


@dataclass
class RolloutBatch:
    """One step's rollout batch; per-token tensors are (B, T), aligned with ``rollout.input_ids``."""

    rollout: Rollout
    rewards: torch.Tensor  # (B,) task reward per sequence
    advantages: torch.Tensor  # (B,) sequence advantage
    old_logprob: torch.Tensor  # (B, T) log pi_old(a_t), the rollout policy, no grad
    old_entropy: torch.Tensor  # (B, T) entropy of the rollout policy
    old_collision: torch.Tensor  # (B, T) collision term of the rollout policy
    ref_logprob: torch.Tensor | None = None  # (B, T) reference policy, when a KL term needs it
    context: dict = field(default_factory=dict)  # the objective's prepare() output for this batch

    @property
    def size(self) -> int:
        """B, the number of sequences."""
        return self.rollout.input_ids.shape[0]

    @property
    def mask(self) -> torch.Tensor:
        """(B, T) float response mask."""
        return self.rollout.response_mask.float()

    @property
    def token_advantages(self) -> torch.Tensor:
        """(B, T) the sequence advantage on its response tokens, 0 elsewhere."""
        return self.advantages[:, None] * self.mask

    def full_inputs(self) -> LossInputs:
        """The whole batch as ``LossInputs`` at the rollout policy (logprob = old_logprob, no grad).

        This is what an objective's per-batch ``prepare`` sees.
        """
        return LossInputs(
            logprob=self.old_logprob,
            old_logprob=self.old_logprob,
            advantages=self.token_advantages,
            mask=self.mask,
            entropy=self.old_entropy,
            old_entropy=self.old_entropy,
            collision=self.old_collision,
            ref_logprob=self.ref_logprob,
            context=self.context,
        )

    def loss_inputs(
        self,
        rows: torch.Tensor,
        logprob: torch.Tensor,
        entropy: torch.Tensor | None,
        collision: torch.Tensor | None,
        **extra,
    ) -> LossInputs:
        """``LossInputs`` of batch rows ``rows`` (b,) with the current forward's (b, T) statistics.

        ``extra`` sets the remaining fields (``num_tokens``, ``num_seqs``, ``generator``).
        """
        return replace(
            self.full_inputs().select_rows(rows),
            logprob=logprob,
            entropy=entropy,
            collision=collision,
            **extra,
        )
