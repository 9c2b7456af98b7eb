"""Aggregation of a per-token loss into the scalar that is back-propagated (verl's ``agg_loss``).

Every mode is a per-token normaliser N, and the aggregate is sum over valid tokens of
loss_t / N_t. Writing the modes this way makes gradient accumulation exact: when the
caller passes the *whole mini-batch's* token and sequence counts (``num_tokens``,
``num_seqs``), the micro-batch aggregates sum to the mini-batch aggregate, and the
normaliser per token is what the trace records as N (docs/theory.md sections 1-3).

| mode | N per token | naive equivalent on one batch |
| --- | --- | --- |
| token-mean | num_tokens | loss[mask].mean() |
| seq-mean-token-mean | num_seqs * len_i | mean_i(mean_t loss_it) |
| seq-mean-token-sum | num_seqs | mean_i(sum_t loss_it) |
| seq-mean-token-sum-norm | num_seqs * max_len | mean_i(sum_t loss_it) / max_len (Dr. GRPO) |

Deliberate choices:
- A sequence with no valid token counts in ``num_seqs`` (as in verl's seq-mean modes) and
  contributes 0; its per-token normaliser uses len_i = 1 so no NaN appears anywhere.
- token-mean over zero valid tokens gives 0, not NaN.
- seq-mean-token-sum-norm divides by num_seqs * max_len as Liu et al. (2025) write it; verl's
  version divides the token sum by the padded length only (no 1/num_seqs). With
  ``max_len=None`` the padded length ``mask.shape[-1]`` is used; the trainer passes
  ``cfg.max_new_tokens`` so the divisor is constant through training.

References: Sheng et al. 2024 (verl, ``agg_loss``); Liu et al. 2025 (Dr. GRPO, arXiv 2503.20783).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from entropy_lab.errors import EntropyLabError
from entropy_lab.registry import Registry

# (valid (B, T) bool, num_tokens, num_seqs, max_len) -> N (B, T)
Normalizer = Callable[[torch.Tensor, float, float, float], torch.Tensor]
AGG_MODES: Registry[Normalizer] = Registry("loss aggregation mode")
register_agg_mode = AGG_MODES.register
get_agg_mode = AGG_MODES.__getitem__


def _full(valid: torch.Tensor, value: float, dtype: torch.dtype) -> torch.Tensor:
    return torch.full(valid.shape, float(value), dtype=dtype, device=valid.device)


@register_agg_mode("token-mean")
def _token_mean(valid: torch.Tensor, num_tokens: float, num_seqs: float, max_len: float) -> torch.Tensor:
    return _full(valid, max(num_tokens, 1.0), torch.float32)


@register_agg_mode("seq-mean-token-mean")
def _seq_mean_token_mean(
    valid: torch.Tensor, num_tokens: float, num_seqs: float, max_len: float
) -> torch.Tensor:
    lengths = valid.sum(-1).clamp(min=1).to(torch.float32)  # (B,)
    return (max(num_seqs, 1.0) * lengths)[:, None].expand(valid.shape)  # (B, T)


@register_agg_mode("seq-mean-token-sum")
def _seq_mean_token_sum(
    valid: torch.Tensor, num_tokens: float, num_seqs: float, max_len: float
) -> torch.Tensor:
    return _full(valid, max(num_seqs, 1.0), torch.float32)


@register_agg_mode("seq-mean-token-sum-norm")
def _seq_mean_token_sum_norm(
    valid: torch.Tensor, num_tokens: float, num_seqs: float, max_len: float
) -> torch.Tensor:
    return _full(valid, max(num_seqs, 1.0) * max(max_len, 1.0), torch.float32)


def agg_loss(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    *,
    num_tokens: float | torch.Tensor | None = None,
    num_seqs: float | torch.Tensor | None = None,
    max_len: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Aggregate a per-token loss: returns (scalar, normaliser N (B, T)).

    Args:
        per_token: (B, T) loss per token; values outside ``mask`` are ignored (even NaN).
        mask: (B, T) bool or float response mask.
        mode: one of ``AGG_MODES`` (table in the module docstring).
        num_tokens: valid tokens in the whole mini-batch (default: this call's count).
        num_seqs: sequences in the whole mini-batch (default: this call's B).
        max_len: Dr. GRPO's constant length (default: ``mask.shape[-1]``).

    Naive equivalent for token-mean on a single call: ``per_token[mask.bool()].mean()``.
    """
    if per_token.shape != mask.shape or per_token.dim() != 2:
        raise EntropyLabError(
            f"agg_loss expects per_token and mask of one (B, T) shape, got {tuple(per_token.shape)} and {tuple(mask.shape)}"
        )
    normalizer_fn = get_agg_mode(mode)
    valid = mask > 0  # (B, T)
    n_tok = float(valid.sum()) if num_tokens is None else float(num_tokens)
    n_seq = float(valid.shape[0]) if num_seqs is None else float(num_seqs)
    length = float(mask.shape[-1]) if max_len is None else float(max_len)
    normalizer = normalizer_fn(valid, n_tok, n_seq, length).to(device=per_token.device)  # (B, T)
    dtype = torch.promote_types(per_token.dtype, torch.float32)
    contrib = torch.where(
        valid,
        per_token.to(dtype) / normalizer.to(dtype),
        torch.zeros((), dtype=dtype, device=per_token.device),
    )
    return contrib.sum(), normalizer
