"""Per-position statistics of a categorical distribution given by logits.

``token_stats`` computes, for every position and in one pass over the vocabulary,
the entropy H, the log-probability of a target token and the collision term
C = sum_k pi_k^2 (log pi_k + H) (docs/theory.md sections 1-3). Positions are processed in
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
    logsumexp: torch.Tensor | None = None  # log sum_k exp z_k, so that log pi = z - logsumexp


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
    """z: (n, V) logits in compute dtype -> (H, logprob, C, dot, logsumexp), each (n,); dot needs ``direction``.

    The fast path: every row with finite logits (and a finite direction) comes out finite and
    exact to rounding; a row with -inf logits (masked vocabulary) or a non-finite direction gives
    NaN or inf here and is recomputed by the caller with ``_chunk_stats_exact``.
    """
    logp = torch.log_softmax(z, dim=-1)  # (n, V)
    p = torch.softmax(z, dim=-1)  # (n, V); on CPU cheaper than logp.exp()
    w = p * logp  # (n, V) p log p, NaN where p = 0 and logp = -inf
    entropy = -w.sum(-1)  # (n,)
    w.addcmul_(p, entropy[:, None])  # (n, V) p (log p + H) = p l
    # C = sum p^2 l and dot = sum p l d: both reuse w, no further (n, V) temporaries.
    dot = None if direction is None else (direction.to(z.dtype) * w).sum(-1)
    collision = w.mul_(p).sum(-1)  # (n,)
    logprob = None if targets is None else logp.gather(-1, targets[:, None]).squeeze(-1)
    # log_softmax peaks where z does, at 0 - log sum exp(z - max): max z minus it is exact.
    logsumexp = z.amax(-1) - logp.amax(-1)
    return entropy, logprob, collision, dot, logsumexp


def _chunk_stats_exact(z: torch.Tensor, targets: torch.Tensor | None, direction: torch.Tensor | None = None):
    """``_chunk_stats`` that also holds for -inf logits (0 log 0 = 0) and non-finite directions."""
    logp = torch.log_softmax(z, dim=-1)  # (n, V)
    p = logp.exp()  # (n, V)
    plogp = _plogp(p, logp)  # (n, V)
    entropy = -plogp.sum(-1)  # (n,)
    # C = sum p^2 logp + H sum p^2, reusing p*logp to avoid another (n, V) temporary.
    collision = (p * plogp).sum(-1) + entropy * (p * p).sum(-1)  # (n,)
    logprob = None if targets is None else logp.gather(-1, targets[:, None]).squeeze(-1)
    dot = None if direction is None else _weighted_l_dot(p, plogp, entropy[:, None], direction.to(z.dtype))
    logsumexp = z.amax(-1) - logp.amax(-1)
    return entropy, logprob, collision, dot, logsumexp


def _nonfinite_rows(*values: torch.Tensor | None) -> torch.Tensor:
    """Indices of the rows where any of the (n,) ``values`` is NaN or infinite."""
    bad: torch.Tensor | None = None
    for v in values:
        if v is not None:
            b = ~torch.isfinite(v)
            bad = b if bad is None else bad | b
    assert bad is not None, "at least one of the values is given"
    return bad.nonzero(as_tuple=True)[0]


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

    Returns ``TokenStats`` with ``logsumexp`` always filled: with it and ``entropy``,
    ``entropy_change_stats`` skips one log-softmax and one entropy pass over the same logits.

    Naive equivalent (one full fp32 copy per line)::

        logp = logits.float().log_softmax(-1)                       # (..., V)
        H = -(logp.exp() * logp).sum(-1)
        C = (logp.exp() ** 2 * (logp + H[..., None])).sum(-1)
        logprob = logp.gather(-1, targets[..., None])[..., 0]
        logsumexp = logits.float().logsumexp(-1)
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
    lse = torch.empty(n, dtype=cdtype, device=logits.device)
    outputs = (entropy, logprob, collision, dot, lse)
    step = rows_per_chunk(vocab, resolve_chunk_bytes(chunk_bytes, logits.device))

    def fill(fn, rows: slice | torch.Tensor) -> None:
        values = fn(
            flat[rows].to(cdtype),  # (n_c, V)
            None if flat_t is None else flat_t[rows],
            None if flat_d is None else flat_d[rows],
        )
        for out, value in zip(outputs, values, strict=True):
            if out is not None:
                out[rows] = value

    for s in range(0, n, step):
        fill(_chunk_stats, slice(s, s + step))
    # Rows the fast path could not take (masked vocabulary, non-finite direction): one check
    # per call, not per chunk, so a GPU synchronises once.
    redo = _nonfinite_rows(entropy, collision, dot)
    for s in range(0, len(redo), step):
        fill(_chunk_stats_exact, redo[s : s + step])
    return TokenStats(
        entropy=entropy.reshape(lead),
        logprob=None if logprob is None else logprob.reshape(lead),
        collision=collision.reshape(lead),
        direction_dot=None if dot is None else dot.reshape(lead),
        logsumexp=lse.reshape(lead),
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
    before: torch.Tensor,
    after: torch.Tensor,
    *,
    before_logsumexp: torch.Tensor | None = None,
    before_entropy: torch.Tensor | None = None,
    chunk_bytes: int | None = None,
    check_changed: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Entropy after an update and the first-order change along the actual logit change, one pass.

    Args:
        before, after: (n, V) logits of the same positions before and after the update.
        before_logsumexp, before_entropy: (n,) each, or None: ``token_stats(before)``'s
            ``logsumexp`` and ``entropy``, when the caller has them from its pre-update pass.
            Given both, the pre-update side costs no log-softmax and no entropy pass here.
        check_changed: False skips the check behind ``changed`` (then False), for a caller that
            already knows some logit moved.
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
    n, vocab = before.shape
    if (before_logsumexp is None) != (before_entropy is None):
        raise EntropyLabError(
            "entropy_change_stats needs before_logsumexp and before_entropy together, or neither"
        )
    for name, v in (("before_logsumexp", before_logsumexp), ("before_entropy", before_entropy)):
        if v is not None and tuple(v.shape) != (n,):
            raise EntropyLabError(f"{name} must have shape ({n},) like before's rows, got {tuple(v.shape)}")
    cdtype = compute_dtype(torch.promote_types(before.dtype, after.dtype))
    entropy_after = torch.empty(n, dtype=cdtype, device=before.device)
    linear = torch.empty(n, dtype=cdtype, device=before.device)
    changed = False
    step = rows_per_chunk(vocab, resolve_chunk_bytes(chunk_bytes, before.device))
    for s in range(0, n, step):
        za, zb = after[s : s + step].to(cdtype), before[s : s + step].to(cdtype)  # (n_c, V)
        lse = None if before_logsumexp is None else before_logsumexp[s : s + step].to(cdtype)
        h = None if before_entropy is None else before_entropy[s : s + step].to(cdtype)
        h_a, lin, dz = _change_fast(za, zb, lse, h)
        entropy_after[s : s + step], linear[s : s + step] = h_a, lin
        # -inf - -inf is NaN where a masked entry stays masked: no change there. Checked only
        # until a change is found (the first chunk, in practice).
        changed = changed or (check_changed and bool(torch.nan_to_num(dz, nan=0.0).any()))
    # Rows with -inf logits come out NaN or inf on the fast path: redo them exactly, once per call.
    redo = _nonfinite_rows(entropy_after, linear)
    for s in range(0, len(redo), step):
        rows = redo[s : s + step]
        h_a, lin = _change_exact(after[rows].to(cdtype), before[rows].to(cdtype))
        entropy_after[rows], linear[rows] = h_a, lin
    return entropy_after, linear, changed


def _change_fast(za, zb, lse, h):
    """(H_after, linear, dz) of one chunk; exact to rounding where every logit is finite.

    za, zb: (n, V) after and before; lse, h: (n,) log-sum-exp and entropy of ``zb``, or None.
    """
    logp = torch.log_softmax(za, -1)  # (n, V)
    h_after = -torch.softmax(za, -1).mul_(logp).sum(-1)  # (n,); softmax: cheaper than exp on CPU
    dz = za - zb  # (n, V)
    if lse is None:
        logp_b = torch.log_softmax(zb, -1)  # (n, V)
        p_b = torch.softmax(zb, -1)
        h = -(p_b * logp_b).sum(-1)
    else:
        logp_b = zb - lse[:, None]  # (n, V) log pi before, from the pre-update pass's log-sum-exp
        p_b = torch.softmax(zb, -1)
    w = logp_b.add_(h[:, None]).mul_(p_b)  # (n, V) pi_k l_k
    return h_after, -w.mul_(dz).sum(-1), dz


def _change_exact(za, zb):
    """``_change_fast`` that also holds for -inf logits (0 log 0 = 0, masked-on-both-sides = no change)."""
    logp = torch.log_softmax(za, -1)
    h_after = -_plogp(logp.exp(), logp).sum(-1)
    dz = torch.nan_to_num_(za - zb, nan=0.0)
    logp = torch.log_softmax(zb, -1)
    p = logp.exp()
    plogp = _plogp(p, logp)
    return h_after, -_weighted_l_dot(p, plogp, -plogp.sum(-1, keepdim=True), dz)


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
