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

# fp32 bytes per chunk of one temporary; a handful of temporaries live at once. The default depends
# on the device: on CPU, chunks that stay in cache (and below glibc's 32 MiB mmap threshold, so no
# temporary is page-faulted in afresh) run ~4x faster than 32 MiB ones; on GPU, large chunks
# amortise kernel launches. ``chunk_bytes=None`` picks the one for the logits' device.
DEFAULT_CHUNK_BYTES = 32 * 2**20
CPU_CHUNK_BYTES = 2**20


@dataclass
class TokenStats:
    """Statistics per position; every field has shape ``logits.shape[:-1]``, fp32 (fp64 for fp64 input)."""

    entropy: torch.Tensor
    logprob: torch.Tensor | None
    collision: torch.Tensor
    direction_dot: torch.Tensor | None = None  # sum_k pi_k l_k d_k when a direction d was given


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulate in at least fp32 (bf16 and fp16 logits), keep fp64 as fp64."""
    return torch.promote_types(dtype, torch.float32)


def resolve_chunk_bytes(chunk_bytes: int | None, device: torch.device | str) -> int:
    """``chunk_bytes`` if given, else the default for ``device`` (CPU: 1 MiB, others: 32 MiB)."""
    if chunk_bytes is not None:
        return chunk_bytes
    return CPU_CHUNK_BYTES if torch.device(device).type == "cpu" else DEFAULT_CHUNK_BYTES


def rows_per_chunk(vocab_size: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    return max(1, chunk_bytes // (4 * max(vocab_size, 1)))


def _chunk_stats(z: torch.Tensor, targets: torch.Tensor | None, direction: torch.Tensor | None = None):
    """z: (n, V) logits in compute dtype -> (H, logprob, C, dot), each (n,); dot needs ``direction``."""
    logp = torch.log_softmax(z, dim=-1)  # (n, V)
    p = logp.exp()  # (n, V)
    plogp = _plogp(p, logp)  # (n, V)
    entropy = -plogp.sum(-1)  # (n,)
    # C = sum p^2 logp + H sum p^2, reusing p*logp to avoid another (n, V) temporary.
    collision = (p * plogp).sum(-1) + entropy * (p * p).sum(-1)  # (n,)
    logprob = None if targets is None else logp.gather(-1, targets[:, None]).squeeze(-1)
    dot = None if direction is None else _weighted_l_dot(p, plogp, entropy[:, None], direction.to(z.dtype))
    return entropy, logprob, collision, dot


def _plogp(p: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """p * logp with 0 where p = 0: a -inf logit gives 0 * -inf = NaN, the only NaN possible here
    (p > 0 implies a finite logp). One in-place pass instead of ``torch.where(p > 0, p * logp, 0)``,
    which costs a bool temporary and two more passes (1.7x slower on CPU)."""
    return (p * logp).nan_to_num_(nan=0.0)


def first_nonfinite(logits: torch.Tensor) -> tuple[int, ...] | None:
    """Index (leading dims) of the first position with NaN or +inf logits, or all -inf; None if clean."""
    # One reduction, no (..., V) temporaries: amax propagates NaN, and its max is +inf for a row
    # holding +inf and -inf for a row that is all -inf; a finite max means a clean row.
    bad = ~torch.isfinite(logits.amax(-1))
    if not bool(bad.any()):
        return None
    flat = int(bad.flatten().nonzero()[0])
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), bad.shape))


@torch.no_grad()
def token_stats(
    logits: torch.Tensor,
    targets: torch.Tensor | None = None,
    *,
    chunk_bytes: int | None = None,
    check_finite: bool = True,
    direction: torch.Tensor | None = None,
) -> TokenStats:
    """Entropy, target log-prob and collision term per position, chunked over positions.

    Args:
        logits: (..., V) any float dtype; -inf entries (masked vocabulary) are allowed.
        targets: (...) token ids, or None to skip the log-prob.
        chunk_bytes: fp32 bytes of one (chunk, V) temporary; bounds the extra memory. None: the
            default for the logits' device (``resolve_chunk_bytes``).
        check_finite: raise ``EntropyLabError`` naming the first position whose logits hold
            NaN or +inf, or are all -inf.
        direction: (..., V) or None; when given, ``direction_dot`` is ``entropy_gradient_dot``
            of the logits along it, from the same pass over the vocabulary.

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
    if direction is not None and direction.shape != logits.shape:
        raise EntropyLabError(
            f"direction shape {tuple(direction.shape)} does not match logits shape {tuple(logits.shape)}"
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
    flat_d = None if direction is None else direction.reshape(-1, vocab)  # (N, V)
    dot = None if direction is None else torch.empty(n, dtype=cdtype, device=logits.device)
    step = rows_per_chunk(vocab, resolve_chunk_bytes(chunk_bytes, logits.device))
    for s in range(0, n, step):
        z = flat[s : s + step].to(cdtype)  # (n_c, V)
        h, lp, c, d = _chunk_stats(
            z,
            None if flat_t is None else flat_t[s : s + step],
            None if flat_d is None else flat_d[s : s + step],
        )
        entropy[s : s + step], collision[s : s + step] = h, c
        if logprob is not None:
            logprob[s : s + step] = lp
        if dot is not None:
            dot[s : s + step] = d
    return TokenStats(
        entropy=entropy.reshape(lead),
        logprob=None if logprob is None else logprob.reshape(lead),
        collision=collision.reshape(lead),
        direction_dot=None if dot is None else dot.reshape(lead),
    )


@torch.no_grad()
def entropy_gradient_dot(
    logits: torch.Tensor, direction: torch.Tensor, *, chunk_bytes: int | None = None
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
    step = rows_per_chunk(vocab, resolve_chunk_bytes(chunk_bytes, logits.device))
    for s in range(0, n, step):
        logp = torch.log_softmax(logits[s : s + step].to(cdtype), -1)  # (n_c, V)
        p = logp.exp()
        plogp = _plogp(p, logp)
        out[s : s + step] = _weighted_l_dot(
            p, plogp, -plogp.sum(-1, keepdim=True), direction[s : s + step].to(cdtype)
        )
    return out


def _weighted_l_dot(p: torch.Tensor, plogp: torch.Tensor, h: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """sum_k p_k (logp_k + H) d_k per row: p, plogp, d (n, V), h = H (n, 1) -> (n,); p = 0 entries give 0."""
    terms = (plogp + p * h).mul_(d)  # (n, V); finite wherever d is
    if not (bool(torch.isfinite(d.amax())) and bool(torch.isfinite(d.amin()))):
        # d holds inf or NaN: keep them where p > 0, drop them where p = 0 (0 * inf).
        terms = torch.where(p > 0, terms, torch.zeros((), dtype=terms.dtype, device=terms.device))
    return terms.sum(-1)


@torch.no_grad()
def entropy_change_stats(
    before: torch.Tensor, after: torch.Tensor, *, chunk_bytes: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Entropy after an update and the first-order change along the actual logit change, one pass.

    Args:
        before, after: (n, V) logits of the same positions before and after the update.
    Returns:
        (entropy_after (n,), linear (n,), changed): ``linear = -sum_k pi_k l_k (after - before)_k``
        at the ``before`` distribution, with NaN logit differences (an entry masked with -inf on
        both sides) counted as no change; ``changed`` is False when every logit is unchanged.

    Naive equivalent::

        H_after = token_stats(after).entropy
        dz = torch.nan_to_num(after.float() - before.float(), nan=0.0)
        linear = -entropy_gradient_dot(before, dz)
    """
    if before.shape != after.shape or before.dim() != 2:
        raise EntropyLabError(
            f"entropy_change_stats needs two (n, V) tensors of one shape, got {tuple(before.shape)} and {tuple(after.shape)}"
        )
    cdtype = compute_dtype(torch.promote_types(before.dtype, after.dtype))
    n, vocab = before.shape
    entropy_after = torch.empty(n, dtype=cdtype, device=before.device)
    linear = torch.empty(n, dtype=cdtype, device=before.device)
    changed = False
    step = rows_per_chunk(vocab, resolve_chunk_bytes(chunk_bytes, before.device))
    for s in range(0, n, step):
        za, zb = after[s : s + step].to(cdtype), before[s : s + step].to(cdtype)  # (n_c, V)
        logp = torch.log_softmax(za, -1)
        entropy_after[s : s + step] = -_plogp(logp.exp(), logp).sum(-1)
        dz = torch.nan_to_num_(za - zb, nan=0.0)  # -inf - -inf: an entry masked on both sides, no change
        changed = changed or bool(dz.ne(0).any())  # one pass, only until a change is found
        logp = torch.log_softmax(zb, -1)
        p = logp.exp()
        plogp = _plogp(p, logp)
        linear[s : s + step] = -_weighted_l_dot(p, plogp, -plogp.sum(-1, keepdim=True), dz)
    return entropy_after, linear, changed


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
