"""Per-position statistics of a categorical distribution given by logits.

``token_stats`` computes, for every position and in one pass over the vocabulary,
the entropy H, the log-probability of a target token and the collision term
C = sum_k pi_k^2 (log pi_k + H) (DESIGN.md section 1). Positions are processed in
chunks so the extra memory is bounded by chunk x V in fp32, never a second full
(B, T, V) fp32 copy.

Simplifications: statistics are computed without gradient (they are measurements);
the differentiable log-probabilities and entropies a loss needs come from
``gather_logprobs`` and ``entropy_from_logits``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from entropy_lab.errors import EntropyLabError

# fp32 bytes per chunk of one temporary; a handful of temporaries live at once.
DEFAULT_CHUNK_BYTES = 32 * 2**20


@dataclass
class TokenStats:
    """Statistics per position; every field has shape ``logits.shape[:-1]``, fp32 (fp64 for fp64 input)."""

    entropy: torch.Tensor
    logprob: torch.Tensor | None
    collision: torch.Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulate in at least fp32 (bf16 and fp16 logits), keep fp64 as fp64."""
    return torch.promote_types(dtype, torch.float32)


def rows_per_chunk(vocab_size: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    return max(1, chunk_bytes // (4 * max(vocab_size, 1)))


def _chunk_stats(z: torch.Tensor, targets: torch.Tensor | None):
    """z: (n, V) logits in compute dtype -> (H, logprob, C), each (n,)."""
    logp = torch.log_softmax(z, dim=-1)  # (n, V)
    p = logp.exp()  # (n, V)
    # -inf logits give p = 0 and logp = -inf; their terms are 0, not NaN.
    plogp = torch.where(p > 0, p * logp, torch.zeros((), dtype=z.dtype, device=z.device))
    entropy = -plogp.sum(-1)  # (n,)
    # C = sum p^2 logp + H sum p^2, reusing p*logp to avoid another (n, V) temporary.
    collision = (p * plogp).sum(-1) + entropy * (p * p).sum(-1)  # (n,)
    logprob = None if targets is None else logp.gather(-1, targets[:, None]).squeeze(-1)
    return entropy, logprob, collision


def first_nonfinite(logits: torch.Tensor) -> tuple[int, ...] | None:
    """Index (leading dims) of the first position with NaN or +inf logits, or all -inf; None if clean."""
    bad = torch.isnan(logits).any(-1) | torch.isposinf(logits).any(-1) | torch.isneginf(logits).all(-1)
    if not bool(bad.any()):
        return None
    flat = int(bad.flatten().nonzero()[0])
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), bad.shape))


@torch.no_grad()
def token_stats(
    logits: torch.Tensor,
    targets: torch.Tensor | None = None,
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    check_finite: bool = True,
) -> TokenStats:
    """Entropy, target log-prob and collision term per position, chunked over positions.

    Args:
        logits: (..., V) any float dtype; -inf entries (masked vocabulary) are allowed.
        targets: (...) token ids, or None to skip the log-prob.
        chunk_bytes: fp32 bytes of one (chunk, V) temporary; bounds the extra memory.
        check_finite: raise ``EntropyLabError`` naming the first position whose logits hold
            NaN or +inf, or are all -inf.

    Naive equivalent (one full fp32 copy per line)::

        logp = logits.float().log_softmax(-1)                       # (..., V)
        H = -(logp.exp() * logp).sum(-1)
        C = (logp.exp() ** 2 * (logp + H[..., None])).sum(-1)
        logprob = logp.gather(-1, targets[..., None])[..., 0]
    """
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise EntropyLabError(
            f"token_stats needs logits of shape (..., V) with V > 0, got {tuple(logits.shape)}"
        )
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    if targets is not None and tuple(targets.shape) != tuple(lead):
        raise EntropyLabError(
            f"targets shape {tuple(targets.shape)} does not match logits shape {tuple(logits.shape)} without its last dim"
        )
    if check_finite and (bad := first_nonfinite(logits)) is not None:
        raise EntropyLabError(f"logits are NaN/+inf (or all -inf) at position {bad}")
    cdtype = compute_dtype(logits.dtype)
    flat = logits.reshape(-1, vocab)  # (N, V) view, no copy
    flat_t = None if targets is None else targets.reshape(-1).long()
    n = flat.shape[0]
    entropy = torch.empty(n, dtype=cdtype, device=logits.device)
    collision = torch.empty(n, dtype=cdtype, device=logits.device)
    logprob = None if targets is None else torch.empty(n, dtype=cdtype, device=logits.device)
    step = rows_per_chunk(vocab, chunk_bytes)
    for s in range(0, n, step):
        z = flat[s : s + step].to(cdtype)  # (n_c, V)
        h, lp, c = _chunk_stats(z, None if flat_t is None else flat_t[s : s + step])
        entropy[s : s + step], collision[s : s + step] = h, c
        if logprob is not None:
            logprob[s : s + step] = lp
    return TokenStats(
        entropy=entropy.reshape(lead),
        logprob=None if logprob is None else logprob.reshape(lead),
        collision=collision.reshape(lead),
    )


@torch.no_grad()
def entropy_gradient_dot(
    logits: torch.Tensor, direction: torch.Tensor, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> torch.Tensor:
    """sum_k pi_k (log pi_k + H) d_k per row: minus the directional derivative of H along ``d``.

    Args:
        logits: (n, V) the distribution pi = softmax(logits).
        direction: (n, V) any vector in logit space (a gradient dLoss/dz, or a logit change).
    Returns:
        (n,) in compute dtype. Since dH/dz_k = -pi_k l_k, ``-entropy_gradient_dot(z, dz)`` is
        the first-order entropy change for a logit change dz.

    Naive equivalent::

        logp = logits.float().log_softmax(-1); p = logp.exp()
        H = -(p * logp).sum(-1, keepdim=True)
        out = (p * (logp + H) * direction.float()).sum(-1)
    """
    if logits.shape != direction.shape or logits.dim() != 2:
        raise EntropyLabError(
            f"entropy_gradient_dot needs two (n, V) tensors of one shape, got {tuple(logits.shape)} and {tuple(direction.shape)}"
        )
    cdtype = compute_dtype(logits.dtype)
    n, vocab = logits.shape
    out = torch.empty(n, dtype=cdtype, device=logits.device)
    step = rows_per_chunk(vocab, chunk_bytes)
    zero = torch.zeros((), dtype=cdtype, device=logits.device)
    for s in range(0, n, step):
        logp = torch.log_softmax(logits[s : s + step].to(cdtype), -1)  # (n_c, V)
        p = logp.exp()
        plogp = torch.where(p > 0, p * logp, zero)
        h = -plogp.sum(-1, keepdim=True)  # (n_c, 1)
        d = direction[s : s + step].to(cdtype)
        # p*(logp + H)*d with p = 0 entries contributing 0 even where d or logp is infinite.
        terms = torch.where(p > 0, (plogp + p * h) * d, zero)
        out[s : s + step] = terms.sum(-1)
    return out


def gather_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Differentiable log pi(target): (..., V), (...) -> (...), fp32 or wider.

    Naive equivalent: ``logits.float().log_softmax(-1).gather(-1, targets[..., None])[..., 0]``;
    this form avoids materialising the full log-softmax.
    """
    z = logits.to(compute_dtype(logits.dtype))
    return z.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Differentiable entropy: (..., V) -> (...). Naive: ``-(p * p.log()).sum(-1)`` with p = softmax."""
    z = logits.to(compute_dtype(logits.dtype))
    logp = torch.log_softmax(z, dim=-1)
    p = logp.exp()
    return -torch.where(p > 0, p * logp, torch.zeros((), dtype=z.dtype, device=z.device)).sum(-1)
