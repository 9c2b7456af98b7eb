"""The pre-update side of one traced step: the traced tokens' logits and statistics before the update.

``PreUpdateCapture`` keeps what gives the pre-update logits of the traced tokens back, chunk
by chunk (``before_rows``): their last hidden states (n, d) and a copy of the LM head taken
before the optimizer moves it (the hidden path, ``entropy_lab.trace.head``), or the logits
themselves, (n, V) in the logits' dtype, for models the hidden path cannot take. It also
keeps the per-token statistics the estimators need: entropy, log-prob and collision at
the old logits, and sum_k pi_k l_k g_k with g = dLoss/dz. The gradient is never stored: a
tensor hook reduces it during backward, in chunks over the tokens, and the same pass over
the vocabulary yields the statistics.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from entropy_lab.errors import EntropyLabError
from entropy_lab.stats import TokenStats, resolve_chunk_bytes, rows_per_chunk, token_stats
from entropy_lab.trace.rows import TracedTokens, take_rows

Head = Callable[[torch.Tensor], torch.Tensor]
"""Hidden states (c, d) -> logits (c, V)."""


class PreUpdateCapture:
    """Pre-update logits and statistics of the traced tokens, filled as the step's passes reach them."""

    def __init__(self, tokens: TracedTokens, chunk_bytes: int | None):
        self.tokens = tokens
        self.chunk_bytes = chunk_bytes
        n, dev = tokens.n, tokens.device
        self.z_before: torch.Tensor | None = None  # (n, V), tokens stored as logits
        self.h_before: torch.Tensor | None = None  # (n, d), tokens stored as hidden states
        self.as_hidden = torch.zeros(n, dtype=torch.bool, device=dev)  # (n,) which of the two holds a token
        self.head_before: Head | None = None  # the head before the update (set by the step)
        # The training forward's autocast state, so that the head forms logits as the model did.
        self.autocast_ctx: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
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
        self.as_hidden[token_idx] = False

    def store_hidden(self, token_idx: torch.Tensor, h: torch.Tensor) -> None:
        """Keep the last hidden states ``h`` (k, d) of the traced tokens ``token_idx`` (k,)."""
        if self.h_before is None:
            self.h_before = torch.empty(self.tokens.n, h.shape[-1], dtype=h.dtype, device=h.device)  # (n, d)
        self.h_before[token_idx] = h.to(self.h_before.dtype)
        self.have_before[token_idx] = True
        self.as_hidden[token_idx] = True

    def before_rows(self, token_idx: torch.Tensor) -> torch.Tensor:
        """Pre-update logits (c, V) of the traced tokens ``token_idx`` (c,): read, or formed by the head."""
        hid = self.as_hidden[token_idx]  # (c,)
        if bool(hid.all()):
            assert self.h_before is not None and self.head_before is not None
            with self.autocast_ctx():
                return self.head_before(take_rows(self.h_before, token_idx))
        assert self.z_before is not None, "pre-update logits are stored before they are read"
        z = take_rows(self.z_before, token_idx)  # (c, V)
        if bool(hid.any()):
            assert self.h_before is not None and self.head_before is not None
            z = z.clone()
            with self.autocast_ctx():
                z[hid] = self.head_before(self.h_before[token_idx[hid]]).to(z.dtype)
        return z

    def materialize(self) -> torch.Tensor:
        """All pre-update logits, (n, V): one full copy (a probe that asks for ``PreStep.z_before``)."""
        if not bool(self.as_hidden.any()):
            assert self.z_before is not None
            return self.z_before
        return self.before_rows(torch.arange(self.tokens.n, device=self.tokens.device))

    def grad_hook(
        self,
        local_rows: torch.Tensor,
        pos: torch.Tensor,
        token_idx: torch.Tensor,
        logits: torch.Tensor | None = None,
    ):
        """A tensor hook for logits (b, T, V) whose rows ``local_rows`` at ``pos`` hold tokens ``token_idx``.

        ``logits``: those logits (detached) when they are the pre-update logits of the tokens
        (a deterministic training forward): the statistics read them in place, no copy kept.
        Otherwise the stored pre-update side (``before_rows``) is read.
        """

        def hook(grad: torch.Tensor):
            if not bool(self.have_before[token_idx].all()) and logits is None:
                return None
            chunk_bytes = resolve_chunk_bytes(self.chunk_bytes, grad.device)
            step = rows_per_chunk(grad.shape[-1], chunk_bytes)
            # Chunked gathers: never a (k, V) copy of the gradient or of z_before. One pass over
            # the vocabulary gives sum_k pi_k l_k g_k and the pre-update statistics of the tokens.
            for s in range(0, len(token_idx), step):
                rows, at, tok = local_rows[s : s + step], pos[s : s + step], token_idx[s : s + step]
                g = grad[rows, at]  # (c, V) dLoss/dz at the traced tokens
                z = logits[rows, at] if logits is not None else self.before_rows(tok)  # (c, V)
                st = token_stats(
                    z,
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
        assert bool(self.have_before.all()), "pre-update logits are filled before statistics are asked for"
        if not bool(self.as_hidden.any()):
            assert self.z_before is not None
            self.tokens.check_finite(self.z_before, "pre-update")
        missing = (~self.have_pre).nonzero(as_tuple=True)[0]
        if len(missing):
            chunk_bytes = resolve_chunk_bytes(self.chunk_bytes, self.tokens.device)
            step = self._rows_per_chunk(chunk_bytes)
            for s in range(0, len(missing), step):
                tok = missing[s : s + step]
                z = self.before_rows(tok)  # (c, V)
                if bool(self.as_hidden.any()):
                    self.tokens.check_finite(z, "pre-update", tok)
                st = token_stats(z, self.tokens.targets[tok], chunk_bytes=chunk_bytes, check_finite=False)
                self._store_pre(tok, st)
        if bool(self.as_hidden.any()):
            self._check_finite_stats()
        return TokenStats(**self._pre_parts)

    def _rows_per_chunk(self, chunk_bytes: int) -> int:
        if self.z_before is not None:
            return rows_per_chunk(self.z_before.shape[-1], chunk_bytes)
        z = self.before_rows(torch.zeros(1, dtype=torch.long, device=self.tokens.device))  # (1, V)
        return rows_per_chunk(z.shape[-1], chunk_bytes)

    def _check_finite_stats(self) -> None:
        """Hidden path: the statistics, not a stored (n, V) copy, show NaN/+inf or all -inf logits."""
        lse, h = self._pre_parts["logsumexp"], self._pre_parts["entropy"]
        bad = (~torch.isfinite(lse) | ~torch.isfinite(h)).nonzero(as_tuple=True)[0]
        if len(bad):
            i = int(bad[0])
            raise EntropyLabError(
                f"pre-update logits are NaN/+inf (or all -inf) at sample {int(self.tokens.b_idx[i])}, "
                f"position {int(self.tokens.t_idx[i])}"
            )

    def logit_grad_dot(self) -> torch.Tensor:
        """(n,) float64 sum_k pi_k l_k g_k; NaN where no gradient was captured."""
        nan = torch.full((self.tokens.n,), float("nan"), dtype=torch.float64, device=self.tokens.device)
        return torch.where(self.have_grad, self.grad_dot, nan)
