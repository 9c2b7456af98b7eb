"""The tracer's own no-grad forwards over traced rows, and the post-update pass built on them.

``OwnForward`` runs the model over the batch rows that hold traced tokens and yields
their logits at exactly those tokens (HF's ``logits_to_keep`` spares the LM head the
other positions). It fills pre-update logits the training loop never produced, and
after the step ``post_update_pass`` gives ``entropy_after`` and ``delta_logit_linear``
from one more such forward: the floor of exact tracing.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator

import torch
from torch import nn

from entropy_lab.errors import EntropyLabError
from entropy_lab.stats import TokenStats, entropy_change_stats, resolve_chunk_bytes, rows_per_chunk
from entropy_lab.trace.distributed import DistInfo
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
    ):
        self.model = model
        self.tokens = tokens
        self.forward_kwargs = forward_kwargs
        self.deterministic = deterministic
        self.batch_size = batch_size
        self.dist = dist  # distributed: every rank runs the same number of forwards
        self.keeps_logits = accepts_logits_to_keep(model)
        self.largest_micro = 0  # largest micro-batch the training loop forwarded
        self.autocast: tuple[bool, torch.dtype | None] = (False, None)
        self.running = False

    @torch.no_grad()
    def traced_logits(self, token_mask: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (token_idx (k,), logits at those tokens (k, V)) for the traced tokens in ``token_mask`` (n,)."""
        for idx, logits, local, column in self.traced_logit_blocks(token_mask):
            yield idx, logits[local, column]

    @torch.no_grad()
    def traced_logit_blocks(
        self, token_mask: torch.Tensor
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Like ``traced_logits``, without gathering: yield (token_idx (k,), the forward's logits
        (r, T or K, V), and the row (k,) and column (k,) in them of each token)."""
        tok = self.tokens
        input_ids = tok.input_ids
        rows = tok.b_idx[token_mask].unique()
        bs = max(1, self.batch_size or self.largest_micro or len(rows))
        n_chunks = -(-len(rows) // bs)
        n_dummy = 0 if self.dist is None else self.dist.max(n_chunks, input_ids.device) - n_chunks
        was_training = self.model.training
        self.running = True
        enabled, dtype = self.autocast
        dev_type = input_ids.device.type
        try:
            if not self.deterministic:
                self.model.eval()
            T = input_ids.shape[1]
            for s in range(0, len(rows), bs):
                chunk = rows[s : s + bs]  # (r,)
                # Only the positions that predict traced tokens need the LM head (HF's logits_to_keep).
                needed = (tok.t_idx[torch.cat([tok.tokens_of_row[b] for b in chunk.tolist()])] - 1).unique()
                column = torch.arange(T, device=needed.device)  # position -> column of the logits
                keep: torch.Tensor | None = None
                if self.keeps_logits and len(needed) < T:
                    column[needed] = torch.arange(len(needed), device=needed.device)
                    keep = needed
                kw = {
                    k: v[chunk] if isinstance(v, torch.Tensor) and v.shape[:1] == input_ids.shape[:1] else v
                    for k, v in self.forward_kwargs.items()
                }
                if tok.attention_mask is not None:
                    kw["attention_mask"] = tok.attention_mask[chunk]
                if keep is not None:
                    kw["logits_to_keep"] = keep
                ctx = torch.autocast(dev_type, dtype=dtype) if enabled else contextlib.nullcontext()
                with ctx:
                    logits = require_logits(self.model(input_ids=input_ids[chunk], **kw))  # (r, T or K, V)
                # (k,) token indices, their rows and columns in the logits; grouped by row, in position order.
                parts = [tok.tokens_of_row[b] for b in chunk.tolist()]
                local = torch.cat([torch.full_like(p, i) for i, p in enumerate(parts)])
                idx = torch.cat(parts)
                keep_tok = token_mask[idx]
                idx, local = idx[keep_tok], local[keep_tok]
                yield idx, logits, local, column[tok.t_idx[idx] - 1]
            for _ in range(n_dummy):  # FSDP all-gathers in every forward: match the other ranks' count
                self._dummy_forward()
        finally:
            self.running = False
            self.model.train(was_training)

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


def take_tokens(logits: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """``logits[rows, columns]``: (r, K, V), (c,), (c,) -> (c, V); a view (no copy) when the tokens are
    consecutive columns of one row, as a chunk of one response's tokens is."""
    c = len(rows)
    if c and bool((rows == rows[0]).all()) and (c == 1 or bool((columns.diff() == 1).all())):
        return logits[int(rows[0]), int(columns[0]) : int(columns[0]) + c]
    return logits[rows, columns]


def post_update_pass(
    forward: OwnForward, z_before: torch.Tensor, chunk_bytes: int | None, pre: TokenStats | None = None
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """One forward after the update: (entropy_after (n,), delta_logit_linear (n,), whether any logit moved).

    delta_logit_linear = -sum_k pi_k l_k (z_after - z_before)_k, first order in the actual logit change.
    ``pre``: the pre-update statistics of the traced tokens; their log-sum-exp and entropy spare
    the pass a log-softmax and an entropy of ``z_before``. The post-update logits are read chunk
    by chunk straight from the forward's output, never copied out whole.
    """
    lse = pre.logsumexp if pre is not None else None  # (n,) or None
    h_before = pre.entropy if pre is not None else None  # (n,) or None
    use_pre = lse is not None and h_before is not None
    tokens = forward.tokens
    n, vocab = z_before.shape
    entropy_after = torch.empty(n, dtype=torch.float64, device=z_before.device)
    linear = torch.empty(n, dtype=torch.float64, device=z_before.device)
    changed_any = False
    step = rows_per_chunk(vocab, resolve_chunk_bytes(chunk_bytes, z_before.device))
    everything = torch.ones(n, dtype=torch.bool, device=z_before.device)
    for idx_all, logits, local, column in forward.traced_logit_blocks(everything):
        for s in range(0, len(idx_all), step):
            idx = idx_all[s : s + step]  # (c,)
            z_a = take_tokens(logits, local[s : s + step], column[s : s + step])  # (c, V)
            tokens.check_finite(z_a, "post-update", idx)
            # Entropy after, and the first-order change along dz = z_a - z_b (-inf - -inf is NaN where
            # a masked vocabulary stays masked: no change there).
            h_after, lin, changed = entropy_change_stats(
                take_rows(z_before, idx),
                z_a,
                before_logsumexp=take_rows(lse, idx) if lse is not None and use_pre else None,
                before_entropy=take_rows(h_before, idx) if h_before is not None and use_pre else None,
                chunk_bytes=chunk_bytes,
                check_changed=not changed_any,
            )
            entropy_after[idx], linear[idx] = h_after.double(), lin.double()
            changed_any = changed_any or changed
    return entropy_after, linear, changed_any
