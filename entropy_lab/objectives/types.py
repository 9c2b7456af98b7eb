"""The data of one loss call: ``LossInputs`` in, ``ObjectiveTerms`` from an objective, ``LossOutput`` out.

Every per-token tensor is (B, T), aligned with response positions; ``LossInputs`` marks its
per-token fields with ``PER_TOKEN`` metadata, so that slicing batch rows needs no list of names.

Deliberate simplification: the types hold tensors as given; shapes, dtypes and the finite
advantages are checked once, by ``compute_loss``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch

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
    # (B, T) bool tokens chosen over the whole update (Clip-Cov / KL-Cov, ``cov_select``); None: per call
    selected: torch.Tensor | None = field(default=None, metadata=PER_TOKEN)
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
