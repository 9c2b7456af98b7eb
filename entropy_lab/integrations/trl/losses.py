"""TRL's GRPO ``loss_type`` s as entropy-lab sees them: per-token normaliser, weight terms, aggregation.

No TRL import here: these are functions of tensors and TRL's settings, so the core can test them.
For each ``loss_type`` of TRL 1.16's ``GRPOTrainer._compute_loss`` a ``LossType`` entry gives

- ``normalizer``: N per token of the loss the optimizer actually follows. With gradient
  accumulation over ``ga`` micro-batches and data parallelism over ``world`` ranks (DDP averages
  the ranks' gradients), TRL's micro-batch loss is sum_t loss_t / N_t with

  | loss_type | N per token |
  | --- | --- |
  | grpo, sapo | B * len_i * ga * world |
  | bnpo | tokens in the micro-batch * ga * world |
  | dr_grpo | B * max_completion_length * ga * world |
  | dapo, cispo, vespo | num_items_in_batch * ga / steps_per_generation |
  | luspo | B * ga * world |

  (B = rows of the micro-batch, len_i = response tokens of row i, num_items_in_batch = response
  tokens of the whole generation batch over all ranks).
- ``surrogate``: the per-token terms (clip indicator I_clip, multiplier lambda) such that the
  token's weight in the gradient, d loss / d log pi_a = -I_clip r A lambda / N, is TRL's:

  | surrogate | loss_t | I_clip, lambda |
  | --- | --- | --- |
  | ppo (grpo, bnpo, dr_grpo, dapo, luspo) | -min(c1 A, c2 A), c1 = min(r, delta), c2 = clip(r, 1-eps_low, 1+eps_high) | I_clip = whether the chosen term depends on r; lambda = 1 |
  | cispo | -min(r, eps_high).detach() A log pi | 1; min(r, eps_high) / r |
  | sapo | -4 sigmoid(tau (r - 1)) / tau A | 1; 4 s (1 - s), s = sigmoid(tau (r - 1)) |
  | vespo | -phi_seq A log pi | 1; phi_seq / r |

  With ``importance_sampling_level="sequence"`` r is the sequence ratio c1 = exp(mean_t log r_t);
  the token's gradient weight is then I_clip c1 A / N, recorded as lambda = c1 / r_t.
- ``agg``: the project's aggregation mode that reproduces TRL's, with the counts to pass to
  ``compute_loss`` (``ProjectAgg``); None for the surrogates the project has no objective for.

Multipliers TRL applies on top (the top-entropy mask, the off-policy mask, vLLM importance
weights) are products into lambda; the caller passes them in ``extra_weight``.

Reference: TRL 1.16.0, ``trl/trainer/grpo_trainer.py`` (``_compute_loss``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from entropy_lab.errors import EntropyLabError
from entropy_lab.registry import Registry


@dataclass(frozen=True)
class StepCounts:
    """Counts of one optimizer step that TRL's normalisers use."""

    ga: int
    """Micro-batches accumulated into this optimizer step (``current_gradient_accumulation_steps``)."""
    world: int
    """Data-parallel ranks whose gradients are averaged."""
    steps_per_generation: int
    """Micro-batches one generation batch is split into (TRL's ``steps_per_generation``)."""
    max_completion_length: int
    """TRL's ``max_completion_length`` (Dr. GRPO's constant)."""
    num_items_in_batch: float | None = None
    """Response tokens of the generation batch over all ranks (TRL's ``num_items_in_batch``)."""


@dataclass(frozen=True)
class ProjectAgg:
    """Arguments of ``entropy_lab.objectives.compute_loss`` that give TRL's aggregation on one rank."""

    mode: str
    num_tokens: float | None = None
    num_seqs: float | None = None
    max_len: int | None = None


NormalizerFn = Callable[[torch.Tensor, StepCounts], torch.Tensor]
AggFn = Callable[[torch.Tensor, StepCounts], ProjectAgg]


@dataclass(frozen=True)
class LossType:
    name: str
    surrogate: str
    """ppo, cispo, sapo or vespo (the per-token terms of the table above)."""
    normalizer: NormalizerFn
    """(mask (B, T) bool, counts) -> N (B, T) of the loss the optimizer follows (all ranks)."""
    agg: AggFn | None
    """(mask, counts) -> the project's aggregation on one rank; None when the project cannot map it."""


LOSS_TYPES: Registry[LossType] = Registry("TRL loss_type")


def _full(mask: torch.Tensor, value: float) -> torch.Tensor:
    return torch.full(mask.shape, float(value), dtype=torch.float64, device=mask.device)


def _items(w: StepCounts) -> float:
    if w.num_items_in_batch is None:
        raise EntropyLabError("this loss_type needs TRL's num_items_in_batch, which the batch does not carry")
    return max(float(w.num_items_in_batch), 1.0)


def _seq_len(mask: torch.Tensor) -> torch.Tensor:
    return mask.sum(-1, keepdim=True).clamp(min=1).double().expand(mask.shape)  # (B, T)


def _register(name, surrogate, normalizer, agg=None):
    LOSS_TYPES.add(name, LossType(name, surrogate, normalizer, agg))


_register(
    "grpo",
    "ppo",
    lambda m, w: _seq_len(m) * m.shape[0] * w.ga * w.world,
    lambda m, w: ProjectAgg("seq-mean-token-mean", num_seqs=m.shape[0] * w.ga),
)
_register("sapo", "sapo", lambda m, w: _seq_len(m) * m.shape[0] * w.ga * w.world)
_register(
    "bnpo",
    "ppo",
    lambda m, w: _full(m, max(float(m.sum()), 1.0) * w.ga * w.world),
    lambda m, w: ProjectAgg("token-mean", num_tokens=max(float(m.sum()), 1.0) * w.ga),
)
_register(
    "dr_grpo",
    "ppo",
    lambda m, w: _full(m, m.shape[0] * w.max_completion_length * w.ga * w.world),
    lambda m, w: ProjectAgg(
        "seq-mean-token-sum-norm", num_seqs=m.shape[0] * w.ga, max_len=w.max_completion_length
    ),
)
_register(
    "dapo",
    "ppo",
    lambda m, w: _full(m, _items(w) * w.ga / w.steps_per_generation),
    lambda m, w: ProjectAgg("token-mean", num_tokens=_items(w) / w.world * w.ga / w.steps_per_generation),
)
_register("cispo", "cispo", lambda m, w: _full(m, _items(w) * w.ga / w.steps_per_generation))
_register("vespo", "vespo", lambda m, w: _full(m, _items(w) * w.ga / w.steps_per_generation))
_register(
    "luspo",
    "ppo",
    lambda m, w: _full(m, m.shape[0] * w.ga * w.world),
    lambda m, w: ProjectAgg("seq-mean-token-sum", num_seqs=m.shape[0] * w.ga),
)


def get_loss_type(name: str) -> LossType:
    return LOSS_TYPES[name]


def mapped_loss_types() -> list[str]:
    """TRL loss_types whose aggregation and surrogate the project's ``compute_loss`` reproduces."""
    return [name for name, lt in LOSS_TYPES.items() if lt.agg is not None]


@dataclass(frozen=True)
class SurrogateSettings:
    """TRL's settings that the per-token terms depend on."""

    epsilon_low: float
    epsilon_high: float
    delta: float | None = None
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    sequence_level: bool = False


@torch.no_grad()
def surrogate_terms(
    loss_type: str,
    logprob: torch.Tensor,
    old_logprob: torch.Tensor,
    advantage: torch.Tensor,
    mask: torch.Tensor,
    s: SurrogateSettings,
    phi_seq: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(I_clip (B, T), lambda (B, T)) of TRL's per-token loss; inputs (B, T), ``advantage`` (B, T).

    ``phi_seq`` (B, 1): VESPO's gamma weights (TRL's ``get_gamma_weights``), needed for vespo only.
    Naive equivalent for ppo at one token with A > 0 and no delta: I_clip = float(r <= 1 + eps_high).
    """
    lt = get_loss_type(loss_type)
    dtype = torch.promote_types(logprob.dtype, torch.float32)
    log_r = (logprob - old_logprob).to(dtype)  # (B, T)
    r_tok = log_r.exp()  # (B, T)
    a = advantage.to(dtype)
    m = mask.to(dtype)
    if s.sequence_level:
        seq = (log_r * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)  # (B, 1)
        r = seq.exp().expand_as(log_r)  # (B, T)
    else:
        r = r_tok
    ones = torch.ones_like(r)
    if lt.surrogate == "ppo":
        lo, hi = 1 - s.epsilon_low, 1 + s.epsilon_high
        c1 = r if s.delta is None else r.clamp(max=s.delta)
        c2 = r.clamp(lo, hi)
        grad1 = torch.ones_like(r, dtype=torch.bool) if s.delta is None else r < s.delta
        grad2 = (r > lo) & (r < hi)
        x1, x2 = c1 * a, c2 * a  # the loss is -min(x1, x2): the smaller term carries the gradient
        indicator = torch.where(x1 < x2, grad1, torch.where(x2 < x1, grad2, grad1 | grad2)).to(dtype)
        weight = ones
    elif lt.surrogate == "cispo":
        indicator, weight = ones, r.clamp(max=s.epsilon_high) / r
    elif lt.surrogate == "sapo":
        tau = torch.where(a > 0, s.sapo_temperature_pos, s.sapo_temperature_neg)
        sig = torch.sigmoid(tau * (r - 1))
        indicator, weight = ones, 4 * sig * (1 - sig)
    elif lt.surrogate == "vespo":
        if phi_seq is None:
            raise EntropyLabError("loss_type 'vespo' needs TRL's gamma weights phi_seq")
        indicator, weight = ones, phi_seq.to(dtype).expand_as(r) / r
    else:  # pragma: no cover - the registry holds only the four above
        raise EntropyLabError(f"unknown surrogate {lt.surrogate!r}")
    if s.sequence_level:
        # d exp(mean log r)/d log pi_t = c1 / len_i; the sequence loss is counted len_i times by
        # TRL's (loss * mask).sum(-1), so the token's weight is c1 A / N: lambda = c1 / r_t.
        weight = weight * r / r_tok
    return indicator, weight
