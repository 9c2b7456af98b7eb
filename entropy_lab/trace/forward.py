"""The tracer's own no-grad forwards over traced rows, and the post-update pass built on them.

``OwnForward`` runs the model over the batch rows that hold traced tokens and yields the
logits at exactly those tokens. On the hidden-state path (``entropy_lab.trace.head``) the
model computes its LM head at one position only (``logits_to_keep=1``) while a hook keeps
its body's last hidden state, and the tokens' logits are formed from it chunk by chunk
(``traced_logit_chunks``); otherwise HF's ``logits_to_keep`` spares the LM head the
positions no traced token needs. It fills pre-update logits the training loop never
produced, and after the step ``post_update_pass`` gives ``entropy_after`` and
``delta_logit_linear`` from one more such forward: the floor of exact tracing.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from entropy_lab.errors import EntropyLabError
from entropy_lab.stats import (
    DEFAULT_CHUNK_BYTES,
    TokenStats,
    entropy_change_stats,
    rows_per_chunk,
)
from entropy_lab.trace.distributed import DistInfo
from entropy_lab.trace.head import HeadPath, tapped
from entropy_lab.trace.rows import TracedTokens, take_rows


def require_logits(output) -> torch.Tensor:
    """``logits_of(output)``, or one error naming what the model returned instead."""
    logits = logits_of(output)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise EntropyLabError(
            f"the model's forward returned {type(output).__name__} without a (B, T, V) .logits tensor; "
            "EntropyTracer needs a causal LM whose output has .logits (or is the logits tensor)"
        )
    return logits


def logits_of(output) -> torch.Tensor | None:
    """The logits in a model's output: the tensor itself, ``.logits``, or the first element."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if (
        logits is None
        and isinstance(output, (tuple, list))
        and output
        and isinstance(output[0], torch.Tensor)
    ):
        logits = output[0]
    return logits


def has_active_dropout(model: nn.Module) -> bool:
    """True when a forward in the model's current mode is stochastic."""
    if not model.training:
        return False
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules()) or any(
        float(getattr(getattr(model, "config", None), k, 0.0) or 0.0) > 0
        for k in ("attention_dropout", "hidden_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop", "dropout")
    )


def accepts_logits_to_keep(model: nn.Module) -> bool:
    """Whether ``model.forward`` takes HF's ``logits_to_keep`` (positions whose logits to compute)."""
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def autocast_state(device_type: str) -> tuple[bool, torch.dtype | None]:
    """(enabled, dtype) of autocast on ``device_type`` right now."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
        return enabled, torch.get_autocast_dtype(device_type) if enabled else None
    except TypeError:  # torch < 2.4 has no per-device query
        return False, None


class OwnForward:
    """No-grad forwards of ``model`` over the rows holding traced tokens.

    With active dropout (``deterministic=False``) the model runs in eval mode, so both sides
    of the update are measured in one deterministic mode. The autocast state of the
    training forward is replayed (``autocast``, set by the forward hook), and
    ``running`` tells the forward hook to ignore these forwards.

    With a ``HeadPath`` that is active (and ``use_hidden``), a forward computes the LM head at
    one position only (``logits_to_keep=1``) and keeps the body's last hidden state: the
    traced tokens' logits are then formed chunk by chunk (``traced_logit_chunks``), never
    (rows, T, V) at once.
    """

    def __init__(
        self,
        model: nn.Module,
        tokens: TracedTokens,
        forward_kwargs: dict,
        *,
        deterministic: bool,
        batch_size: int | None,
        dist: DistInfo | None = None,
        head: HeadPath | None = None,
    ):
        self.model = model
        self.tokens = tokens
        self.forward_kwargs = forward_kwargs
        self.deterministic = deterministic
        self.batch_size = batch_size
        self.dist = dist  # distributed: every rank runs the same number of forwards
        self.keeps_logits = accepts_logits_to_keep(model)
        self.head = head
        # The hidden path needs logits_to_keep (else the model builds all logits anyway) and one
        # process (under FSDP the head's weights are whole only inside the model's forward).
        self.use_hidden = head is not None and head.active and self.keeps_logits and dist is None
        self.largest_micro = 0  # largest micro-batch the training loop forwarded
        self.autocast: tuple[bool, torch.dtype | None] = (False, None)
        self.running = False

    @property
    def hidden(self) -> bool:
        """Whether the traced tokens' logits come from hidden states and the head (else full logits)."""
        return self.use_hidden and self.head is not None and self.head.active

    def autocast_ctx(self) -> contextlib.AbstractContextManager:
        """The training forward's autocast state, for the head applied outside the model."""
        enabled, dtype = self.autocast
        return (
            torch.autocast(self.tokens.input_ids.device.type, dtype=dtype)
            if enabled
            else contextlib.nullcontext()
        )

    @torch.no_grad()
    def traced_logits(self, token_mask: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (token_idx (k,), logits at those tokens (k, V)) for the traced tokens in ``token_mask`` (n,).

        One (k, V) block per forward; ``traced_logit_chunks`` bounds the block instead.
        """
        for block in self.traced_blocks(token_mask):
            if block.hidden is not None:
                with self.autocast_ctx():
                    yield block.idx, self.head_live(block.hidden)
            else:
                assert block.logits is not None
                yield block.idx, block.logits[block.local, block.column]

    @torch.no_grad()
    def traced_logit_chunks(
        self, token_mask: torch.Tensor, chunk_bytes: int | None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (token_idx (c,), logits (c, V)), chunks of one fp32 (c, V) within ``chunk_bytes``
        (None: ``entropy_lab.stats.DEFAULT_CHUNK_BYTES``, 32 MiB).

        On the hidden path each chunk is the head applied to (c, d) hidden states; otherwise
        it is read from the forward's logits (a view where the tokens are consecutive).
        """
        # The head's matmul wants larger chunks than the statistics' cache-sized ones (which the
        # statistics still use inside each chunk): without a setting, the GPU default on any device.
        limit = chunk_bytes if chunk_bytes is not None else DEFAULT_CHUNK_BYTES
        for block in self.traced_blocks(token_mask):
            vocab = block.logits.shape[-1] if block.logits is not None else self._head_rows()
            rows = rows_per_chunk(vocab, limit)
            for s in range(0, len(block.idx), rows):
                idx = block.idx[s : s + rows]  # (c,)
                if block.hidden is not None:
                    with self.autocast_ctx():
                        z = self.head_live(block.hidden[s : s + rows])  # (c, V)
                else:
                    assert block.logits is not None
                    z = take_tokens(block.logits, block.local[s : s + rows], block.column[s : s + rows])
                yield idx, z

    def _head_rows(self) -> int:
        assert self.head is not None and self.head.split is not None
        return int(self.head.split.head.weight.shape[0])

    def head_live(self, h: torch.Tensor) -> torch.Tensor:
        """The model's head (its current parameter slots) applied to hidden states (..., d) -> (..., V)."""
        assert self.head is not None and self.head.split is not None
        return self.head.split.live(h)

    @torch.no_grad()
    def traced_blocks(self, token_mask: torch.Tensor) -> Iterator[Block]:
        """One ``Block`` per forward over the rows that hold traced tokens in ``token_mask`` (n,)."""
        tok = self.tokens
        input_ids = tok.input_ids
        rows = tok.b_idx[token_mask].unique()
        bs = max(1, self.batch_size or self.largest_micro or len(rows))
        n_chunks = -(-len(rows) // bs)
        n_dummy = 0 if self.dist is None else self.dist.max(n_chunks, input_ids.device) - n_chunks
        was_training = self.model.training
        self.running = True
        try:
            if not self.deterministic:
                self.model.eval()
            for s in range(0, len(rows), bs):
                chunk = rows[s : s + bs]  # (r,)
                # (k,) token indices, their rows in the forward; grouped by row, in position order.
                parts = [tok.tokens_of_row[b] for b in chunk.tolist()]
                local = torch.cat([torch.full_like(p, i) for i, p in enumerate(parts)])
                idx = torch.cat(parts)
                keep_tok = token_mask[idx]
                idx, local = idx[keep_tok], local[keep_tok]
                pos = tok.t_idx[idx] - 1  # (k,) the positions whose logits predict the tokens
                block = self._hidden_block(chunk, idx, local, pos) if self.hidden else None
                yield block if block is not None else self._logits_block(chunk, idx, local, pos)
            for _ in range(n_dummy):  # FSDP all-gathers in every forward: match the other ranks' count
                self._dummy_forward()
        finally:
            self.running = False
            self.model.train(was_training)

    def _call(self, chunk: torch.Tensor, **extra):
        kw = {
            k: v[chunk]
            if isinstance(v, torch.Tensor) and v.shape[:1] == self.tokens.input_ids.shape[:1]
            else v
            for k, v in self.forward_kwargs.items()
        }
        if self.tokens.attention_mask is not None:
            kw["attention_mask"] = self.tokens.attention_mask[chunk]
        with self.autocast_ctx():
            return self.model(input_ids=self.tokens.input_ids[chunk], **kw, **extra)

    def _hidden_block(self, chunk, idx, local, pos) -> Block | None:
        """The block from the body's hidden states; None when the head check turns the path off."""
        assert self.head is not None and self.head.split is not None
        with tapped(self.head.split.body) as tap:
            logits = require_logits(
                self._call(chunk, logits_to_keep=1)
            )  # (r, 1, V): the head at one position
            h = tap.take()  # (r, T, d)
        if h is None or h.shape[:2] != self.tokens.input_ids[chunk].shape:
            self.head.split, self.head.reason = None, "its body's output holds no (B, T, d) last hidden state"
            return None
        with self.autocast_ctx():
            if not self.head.check(h[:1, -1], logits[:1, -1]):
                return None
        return Block(idx, local, pos, hidden=h[local, pos])  # (k, d)

    def _logits_block(self, chunk, idx, local, pos) -> Block:
        T = self.tokens.input_ids.shape[1]
        # Only the positions that predict traced tokens need the LM head (HF's logits_to_keep).
        needed = (
            self.tokens.t_idx[torch.cat([self.tokens.tokens_of_row[b] for b in chunk.tolist()])] - 1
        ).unique()
        column = torch.arange(T, device=needed.device)  # position -> column of the logits
        extra = {}
        if self.keeps_logits and len(needed) < T:
            column[needed] = torch.arange(len(needed), device=needed.device)
            extra["logits_to_keep"] = needed
        logits = require_logits(self._call(chunk, **extra))  # (r, T or K, V)
        return Block(idx, local, column[pos], logits=logits)

    def _dummy_forward(self) -> None:
        """A forward over row 0 whose output is dropped (only its collectives matter)."""
        kw = {
            k: v[:1] if isinstance(v, torch.Tensor) and v.shape[:1] == self.tokens.input_ids.shape[:1] else v
            for k, v in self.forward_kwargs.items()
        }
        if self.tokens.attention_mask is not None:
            kw["attention_mask"] = self.tokens.attention_mask[:1]
        if self.keeps_logits:
            kw["logits_to_keep"] = 1
        self.model(input_ids=self.tokens.input_ids[:1], **kw)


@dataclass
class Block:
    """The traced tokens of one forward: their indices (k,), and their hidden states (k, d) or the
    forward's logits (r, T or K, V) with each token's row ``local`` (k,) and ``column`` (k,) there."""

    idx: torch.Tensor
    local: torch.Tensor
    column: torch.Tensor
    hidden: torch.Tensor | None = None
    logits: torch.Tensor | None = None


def take_tokens(logits: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """``logits[rows, columns]``: (r, K, V), (c,), (c,) -> (c, V); a view (no copy) when the tokens are
    consecutive columns of one row, as a chunk of one response's tokens is."""
    c = len(rows)
    if c and bool((rows == rows[0]).all()) and (c == 1 or bool((columns.diff() == 1).all())):
        return logits[int(rows[0]), int(columns[0]) : int(columns[0]) + c]
    return logits[rows, columns]


def post_update_pass(
    forward: OwnForward,
    before_rows: Callable[[torch.Tensor], torch.Tensor],
    chunk_bytes: int | None,
    pre: TokenStats | None = None,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """One forward after the update: (entropy_after (n,), delta_logit_linear (n,), whether any logit moved).

    delta_logit_linear = -sum_k pi_k l_k (z_after - z_before)_k, first order in the actual logit change.
    ``before_rows(idx)`` gives the pre-update logits (c, V) of the traced tokens ``idx`` (c,).
    ``pre``: the pre-update statistics of the traced tokens; their log-sum-exp and entropy spare
    the pass a log-softmax and an entropy of ``z_before``. The post-update logits are formed
    (hidden path) or read (full logits) chunk by chunk, never copied out whole.
    """
    lse = pre.logsumexp if pre is not None else None  # (n,) or None
    h_before = pre.entropy if pre is not None else None  # (n,) or None
    use_pre = lse is not None and h_before is not None
    tokens = forward.tokens
    n, dev = tokens.n, tokens.device
    entropy_after = torch.empty(n, dtype=torch.float64, device=dev)
    linear = torch.empty(n, dtype=torch.float64, device=dev)
    changed_any = False
    everything = torch.ones(n, dtype=torch.bool, device=dev)
    for idx, z_a in forward.traced_logit_chunks(everything, chunk_bytes):
        tokens.check_finite(z_a, "post-update", idx)
        z_b = before_rows(idx)  # (c, V)
        # Entropy after, and the first-order change along dz = z_a - z_b (-inf - -inf is NaN where
        # a masked vocabulary stays masked: no change there).
        h_after, lin, changed = entropy_change_stats(
            z_b,
            z_a,
            before_logsumexp=take_rows(lse, idx) if lse is not None and use_pre else None,
            before_entropy=take_rows(h_before, idx) if h_before is not None and use_pre else None,
            chunk_bytes=chunk_bytes,
            check_changed=not changed_any,
        )
        entropy_after[idx], linear[idx] = h_after.double(), lin.double()
        changed_any = changed_any or changed
    return entropy_after, linear, changed_any
