"""The pre-update side of one traced step: the traced tokens' logits and statistics before the update.

``PreUpdateCapture`` keeps the pre-update logits of the traced tokens, (n, V) in the
logits' dtype (the tracer's memory cost), and the per-token statistics the estimators
need: entropy, log-prob and collision at the old logits, and sum_k pi_k l_k g_k with g =
dLoss/dz. The gradient is never stored: a tensor hook reduces it during backward, in
chunks over the tokens, and the same pass over the vocabulary yields the statistics.
"""

from __future__ import annotations

import torch

from entropy_lab.stats import TokenStats, resolve_chunk_bytes, rows_per_chunk, token_stats
from entropy_lab.trace.rows import TracedTokens, take_rows


class PreUpdateCapture:
    """Pre-update logits and statistics of the traced tokens, filled as the step's passes reach them."""

    def __init__(self, tokens: TracedTokens, chunk_bytes: int | None):
        self.tokens = tokens
        self.chunk_bytes = chunk_bytes
        n, dev = tokens.n, tokens.device
        self.z_before: torch.Tensor | None = None  # (n, V)
        self.have_before = torch.zeros(n, dtype=torch.bool, device=dev)  # (n,)
        self.grad_dot = torch.zeros(n, dtype=torch.float64, device=dev)  # (n,) sum_k pi_k l_k g_k
        self.have_grad = torch.zeros(n, dtype=torch.bool, device=dev)  # (n,)
        # Pre-update statistics, filled by the gradient hook as a by-product (same pass over V);
        # tokens no gradient reached are computed when the statistics are asked for.
        self._pre_parts: dict[str, torch.Tensor] = {}
        self.have_pre = torch.zeros(n, dtype=torch.bool, device=dev)  # (n,)

    def store_forward(self, token_idx: torch.Tensor, z: torch.Tensor) -> None:
        """Keep ``z`` (k, V), a copy of the logits at traced tokens ``token_idx`` (k,)."""
        n = self.tokens.n
        if (
            self.z_before is None
            and len(token_idx) == n
            and bool((token_idx == torch.arange(n, device=token_idx.device)).all())
        ):
            self.z_before = z  # one forward over the whole batch: keep the copy, no second one
            self.have_before[:] = True
        else:
            self.store(token_idx, z)

    def store(self, token_idx: torch.Tensor, z: torch.Tensor) -> None:
        """Write ``z`` (k, V) into the rows ``token_idx`` (k,) of the pre-update logits."""
        if self.z_before is None:
            self.z_before = torch.empty(self.tokens.n, z.shape[-1], dtype=z.dtype, device=z.device)  # (n, V)
        self.z_before[token_idx] = z.to(self.z_before.dtype)
        self.have_before[token_idx] = True

    def grad_hook(self, local_rows: torch.Tensor, pos: torch.Tensor, token_idx: torch.Tensor):
        """A tensor hook for logits (b, T, V) whose rows ``local_rows`` at ``pos`` hold tokens ``token_idx``."""

        def hook(grad: torch.Tensor):
            if self.z_before is None or not bool(self.have_before[token_idx].all()):
                return None
            assert self.z_before is not None
            chunk_bytes = resolve_chunk_bytes(self.chunk_bytes, grad.device)
            step = rows_per_chunk(grad.shape[-1], chunk_bytes)
            # Chunked gathers: never a (k, V) copy of the gradient or of z_before. One pass over
            # the vocabulary gives sum_k pi_k l_k g_k and the pre-update statistics of the tokens.
            for s in range(0, len(token_idx), step):
                rows, at, tok = local_rows[s : s + step], pos[s : s + step], token_idx[s : s + step]
                g = grad[rows, at]  # (c, V) dLoss/dz at the traced tokens
                st = token_stats(
                    take_rows(self.z_before, tok),
                    self.tokens.targets[tok],
                    direction=g,
                    chunk_bytes=chunk_bytes,
                    check_finite=False,
                )
                assert st.direction_dot is not None  # a direction was given
                self.grad_dot.index_add_(0, tok, st.direction_dot.double())
                self._store_pre(tok, st)
            self.have_grad[token_idx] = True
            return None

        return hook

    def add_grad_dot(
        self, token_idx: torch.Tensor, dot: torch.Tensor, stats: TokenStats | None = None
    ) -> None:
        """Add ``dot`` (k,) to sum_k pi_k l_k g_k of tokens ``token_idx`` (k,), reduced by the caller.

        For a training forward that never builds dLoss/dz (a fused LM head: the caller derives the
        sum from the gradient of the head's outputs). ``stats``: the tokens' pre-update statistics
        when the caller's pass over ``z_before`` produced them, so they are not computed again.
        """
        self.grad_dot.index_add_(0, token_idx, dot.double())
        self.have_grad[token_idx] = True
        if stats is not None:
            self._store_pre(token_idx, stats)

    def _store_pre(self, token_idx: torch.Tensor, st: TokenStats) -> None:
        for key in ("entropy", "logprob", "collision", "logsumexp"):  # logsumexp: for the post-update pass
            value = getattr(st, key)
            if key not in self._pre_parts:
                self._pre_parts[key] = torch.empty(self.tokens.n, dtype=value.dtype, device=value.device)
            self._pre_parts[key][token_idx] = value
        self.have_pre[token_idx] = True

    def stats(self) -> TokenStats:
        """Entropy, log-prob and collision at the pre-update logits of every traced token.

        Checks the logits first (one error naming the first bad token); computes the
        statistics of tokens the gradient hook did not reach.
        """
        assert self.z_before is not None, "pre-update logits are filled before statistics are asked for"
        self.tokens.check_finite(self.z_before, "pre-update")
        missing = (~self.have_pre).nonzero(as_tuple=True)[0]
        if len(missing):
            st = token_stats(
                self.z_before[missing],
                self.tokens.targets[missing],
                chunk_bytes=self.chunk_bytes,
                check_finite=False,
            )
            self._store_pre(missing, st)
        return TokenStats(**self._pre_parts)

    def logit_grad_dot(self) -> torch.Tensor:
        """(n,) float64 sum_k pi_k l_k g_k; NaN where no gradient was captured."""
        nan = torch.full((self.tokens.n,), float("nan"), dtype=torch.float64, device=self.tokens.device)
        return torch.where(self.have_grad, self.grad_dot, nan)
