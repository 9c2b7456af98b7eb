"""Exact per-token entropy tracing around one optimizer step.

``EntropyTracer(model).step(...)`` is a context manager around one optimizer step of
any causal LM whose forward returns ``.logits`` (a Hugging Face model or the tabular
policy) and any ``torch.optim`` optimizer::

    tracer = EntropyTracer(model)
    with tracer.step(input_ids, attention_mask, response_mask, advantages=adv, old_logprobs=old) as step:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        loss = my_objective(logits, ...)
        loss.backward()
        optimizer.step()
    df = step.records        # one row per traced response token, DESIGN.md section 2

How it measures, and what it costs:

- Pre-update logits of the traced tokens are copied out of the training forward itself
  (a forward hook on the model), when that forward is deterministic. With active dropout
  the tracer instead runs its own no-grad forward in eval mode on entry, and measures
  the post-update side in eval mode too, so both sides share one deterministic mode.
- dLoss/dlogits is never stored: a tensor hook on the logits reduces it during backward
  to sum_k pi_k l_k g_k per traced token (the ``logit-grad`` estimator), chunked over rows.
- A global optimizer pre-step hook marks the moment the parameters change: rows the
  training loop never forwarded get their pre-update logits then, and the learning
  rate is read from the optimizer when not given.
- After the step, one no-grad forward over the traced rows gives ``entropy_after`` and
  ``delta_logit_linear``. That forward is the floor of exact tracing.

Memory: the pre-update logits of traced tokens, (n_traced, V) in the logits' dtype.
Bound it with ``max_positions`` (a count or a fraction of response tokens, sampled
uniformly; exact on the sampled ones).

Conventions: every per-token tensor passed in is (B, T), aligned with ``input_ids``;
``response_mask[b, t] = 1`` marks token t of row b as a response token, predicted by
the logits at t - 1. Micro-batches of gradient accumulation are recognised by content:
each forward's rows must be rows of the step's ``input_ids`` with the same length.

Defaults for a loop that does not annotate its objective (``step.annotate``): clip
indicator 1, intervention weight 1, normaliser = response tokens in the batch
(token-mean), advantage NaN when not given, old log-prob = the pre-update log-prob
(ratio 1) when not given.

Simplifications: ``covariance`` takes its batch means over the traced tokens; with
several optimizer steps inside one context, the records cover their sum (a warning says so).
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections import defaultdict
from collections.abc import Iterator

import pandas as pd
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from entropy_lab.errors import EntropyLabError
from entropy_lab.records import COLUMNS, INT_COLUMNS, save_records
from entropy_lab.stats import (
    TokenStats,
    entropy_change_stats,
    first_nonfinite,
    resolve_chunk_bytes,
    rows_per_chunk,
    token_stats,
)
from entropy_lab.theory import TokenQuantities, column_name, predict_all


def _logits_of(output) -> torch.Tensor | None:
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


def take_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x[idx]``, as a view (no copy) when ``idx`` is an ascending run of consecutive rows."""
    n = len(idx)
    if n and int(idx[-1]) - int(idx[0]) == n - 1 and (n == 1 or bool((idx.diff() == 1).all())):
        return x[int(idx[0]) : int(idx[0]) + n]
    return x[idx]


def accepts_logits_to_keep(model: nn.Module) -> bool:
    """Whether ``model.forward`` takes HF's ``logits_to_keep`` (positions whose logits to compute)."""
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype | None]:
    try:
        enabled = torch.is_autocast_enabled(device_type)
        return enabled, torch.get_autocast_dtype(device_type) if enabled else None
    except TypeError:  # torch < 2.4 has no per-device query
        return False, None


class EntropyTracer:
    """Wraps optimizer steps of ``model`` and records every traced token's exact entropy change.

    Args:
        model: a causal LM: ``model(input_ids=..., attention_mask=...)`` returns logits (B, T, V)
            as ``.logits`` (or the first element), and ``get_output_embeddings()`` is not None.
        max_positions: trace all response tokens (None), at most this many (int), or this
            fraction (float in (0, 1]), sampled uniformly with ``seed``.
        forward_batch_size: rows per no-grad forward of the tracer (default: the largest
            micro-batch the training loop used).
        chunk_bytes: bound on one fp32 (chunk, V) temporary in the statistics (None: the device's
            default, see ``entropy_lab.stats.resolve_chunk_bytes``).
        config: stored in the metadata of saved trace files.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        max_positions: int | float | None = None,
        forward_batch_size: int | None = None,
        chunk_bytes: int | None = None,
        seed: int = 0,
        config: dict | None = None,
    ):
        get_emb = getattr(model, "get_output_embeddings", None)
        if get_emb is None or get_emb() is None:
            raise EntropyLabError(
                f"EntropyTracer needs a causal LM with output embeddings; {type(model).__name__} has none "
                "(get_output_embeddings() is missing or None): load it with AutoModelForCausalLM"
            )
        if isinstance(max_positions, float) and not 0 < max_positions <= 1:
            raise EntropyLabError(f"max_positions as a fraction must be in (0, 1], got {max_positions}")
        self.model = model
        self.max_positions = max_positions
        self.forward_batch_size = forward_batch_size
        self.chunk_bytes = chunk_bytes
        self.seed = seed
        self.config = dict(config or {})

    @contextlib.contextmanager
    def step(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        response_mask: torch.Tensor | None = None,
        *,
        advantages: torch.Tensor | None = None,
        old_logprobs: torch.Tensor | None = None,
        lr: float | None = None,
        step: int = 0,
        update: int = 0,
        forward_kwargs: dict | None = None,
    ) -> Iterator[TraceStep]:
        """Trace the optimizer step taken inside the ``with`` block; yields a ``TraceStep``."""
        traced = TraceStep(
            self,
            input_ids,
            attention_mask,
            response_mask,
            advantages,
            old_logprobs,
            lr,
            step,
            update,
            forward_kwargs or {},
        )
        traced._attach()
        try:
            yield traced
        finally:
            traced._detach()
        traced._finish()


class TraceStep:
    """The state of one traced step; ``records`` holds the result after the ``with`` block."""

    def __init__(
        self,
        tracer,
        input_ids,
        attention_mask,
        response_mask,
        advantages,
        old_logprobs,
        lr,
        step,
        update,
        forward_kwargs,
    ):
        self.tracer, self.model = tracer, tracer.model
        self.step_index, self.update_index = int(step), int(update)
        self.forward_kwargs = forward_kwargs
        self._validate_and_select(input_ids, attention_mask, response_mask, advantages, old_logprobs)
        self.lr = lr
        self.records: pd.DataFrame | None = None
        self.n_optimizer_steps = 0
        self._handles: list = []
        self._tensor_handles: list = []
        self._in_own_forward = False
        self._largest_micro = 0
        self._deterministic = not has_active_dropout(self.model)
        self._keeps_logits = accepts_logits_to_keep(self.model)
        self._autocast: tuple[bool, torch.dtype | None] = (False, None)

    # --- inputs ------------------------------------------------------------------------
    def _validate_and_select(self, input_ids, attention_mask, response_mask, advantages, old_logprobs):
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise EntropyLabError(
                f"input_ids must be a (B, T) tensor, got {getattr(input_ids, 'shape', type(input_ids))}"
            )
        B, T = input_ids.shape
        dev = input_ids.device

        def per_token(name, x, allow_row=False):
            if x is None:
                return None
            x = torch.as_tensor(x, device=dev)
            if allow_row and tuple(x.shape) == (B,):
                return x[:, None].expand(B, T)
            if tuple(x.shape) != (B, T):
                want = "(B,) or (B, T)" if allow_row else "(B, T)"
                raise EntropyLabError(f"{name} must have shape {want} = {(B, T)}, got {tuple(x.shape)}")
            return x

        self.input_ids = input_ids
        self.attention_mask = per_token("attention_mask", attention_mask)
        if response_mask is None:
            raise EntropyLabError("response_mask is required: (B, T), 1 at the response tokens to trace")
        rmask = per_token("response_mask", response_mask).bool()
        if self.attention_mask is not None:
            rmask = rmask & self.attention_mask.bool()
        if bool(rmask[:, 0].any()):
            raise EntropyLabError("response_mask marks position 0, which no logits predict")
        if not bool(rmask.any()):
            raise EntropyLabError("response_mask selects no tokens: there is nothing to trace")
        self.n_response_tokens = int(rmask.sum())
        b_idx, t_idx = rmask.nonzero(as_tuple=True)  # (n,), (n,)
        n_keep = self._n_sampled(len(b_idx))
        if n_keep < len(b_idx):
            gen = torch.Generator().manual_seed(
                self.tracer.seed * 1_000_003 + self.step_index * 1009 + self.update_index
            )
            keep = torch.randperm(len(b_idx), generator=gen)[:n_keep].sort().values.to(dev)
            b_idx, t_idx = b_idx[keep], t_idx[keep]
        self.b_idx, self.t_idx = b_idx, t_idx
        self.n = len(b_idx)
        self.targets = input_ids[b_idx, t_idx]  # (n,)
        adv = per_token("advantages", advantages, allow_row=True)
        self.advantage = None if adv is None else adv[b_idx, t_idx].double()
        old = per_token("old_logprobs", old_logprobs)
        self.old_logprob = None if old is None else old[b_idx, t_idx].double()
        # Row -> traced-token indices, for matching micro-batches and filling annotations.
        self._tokens_of_row: dict[int, torch.Tensor] = {}
        for b in b_idx.unique().tolist():
            self._tokens_of_row[b] = (b_idx == b).nonzero(as_tuple=True)[0]
        self._rows_of_content: dict[tuple, list[int]] = defaultdict(list)
        for b, row in enumerate(input_ids.tolist()):
            self._rows_of_content[tuple(row)].append(b)
        self.annotations: dict[str, torch.Tensor] = {}
        self.z_before: torch.Tensor | None = None  # (n, V)
        self.have_before = torch.zeros(self.n, dtype=torch.bool, device=dev)
        self.grad_dot = torch.zeros(self.n, dtype=torch.float64, device=dev)
        self.have_grad = torch.zeros(self.n, dtype=torch.bool, device=dev)
        # Pre-update statistics, filled by the gradient hook as a by-product (same pass over V);
        # tokens no gradient reached are computed at the optimizer step.
        self._pre_parts: dict[str, torch.Tensor] = {}
        self.have_pre = torch.zeros(self.n, dtype=torch.bool, device=dev)
        self._pre_stats = None

    def _n_sampled(self, n_total: int) -> int:
        m = self.tracer.max_positions
        if m is None:
            return n_total
        if isinstance(m, float):
            return max(1, min(n_total, round(m * n_total)))
        return max(1, min(n_total, int(m)))

    def annotate(self, rows: torch.Tensor | list[int] | None = None, **values: torch.Tensor) -> None:
        """Record objective terms for rows of the batch.

        Keys: ``clip_indicator``, ``intervention_weight``, ``normalizer``, ``advantage`` (the
        advantage actually used, e.g. after shaping). Values are (b, T) tensors for the
        batch rows ``rows`` (default: all B rows), or scalars.
        """
        valid = ("clip_indicator", "intervention_weight", "normalizer", "advantage")
        for key, value in values.items():
            if key not in valid:
                raise EntropyLabError(f"unknown annotation {key!r}; valid: {', '.join(valid)}")
            buf = self.annotations.get(key)
            if buf is None:
                buf = self.annotations[key] = torch.full(
                    (self.n,), float("nan"), dtype=torch.float64, device=self.b_idx.device
                )
            value = torch.as_tensor(value, device=buf.device).detach().double()
            row_list = (
                list(range(self.input_ids.shape[0])) if rows is None else torch.as_tensor(rows).tolist()
            )
            if value.dim() == 0:  # one value for every token of those rows
                value = value.expand(len(row_list), self.input_ids.shape[1])
            if value.dim() != 2 or tuple(value.shape) != (len(row_list), self.input_ids.shape[1]):
                raise EntropyLabError(
                    f"annotation {key!r} must be (rows, T) = ({len(row_list)}, {self.input_ids.shape[1]}) "
                    f"or a scalar, got {tuple(value.shape)}"
                )
            for i, b in enumerate(row_list):
                idx = self._tokens_of_row.get(b)
                if idx is not None:
                    buf[idx] = value[i, self.t_idx[idx]]

    # --- hooks -------------------------------------------------------------------------
    def _attach(self) -> None:
        try:
            self._handles.append(self.model.register_forward_hook(self._on_forward, with_kwargs=True))
            self._handles.append(register_optimizer_step_pre_hook(self._on_optimizer_step))
            if not self._deterministic:
                # Dropout is active: the training forward is stochastic, so the pre-update
                # side is measured by our own forward in eval mode, parameters still untouched.
                self._fill_before(torch.ones(self.n, dtype=torch.bool, device=self.b_idx.device))
        except BaseException:
            self._detach()
            raise

    def _detach(self) -> None:
        for h in self._handles + self._tensor_handles:
            h.remove()
        self._handles.clear()
        self._tensor_handles.clear()

    def _match_rows(self, ids: torch.Tensor) -> list[int | None]:
        """Full-batch row index of each row of a forward's input_ids (None when unknown)."""
        if ids.dim() != 2 or ids.shape[1] != self.input_ids.shape[1]:
            return [None] * (ids.shape[0] if ids.dim() else 0)
        taken: dict[tuple, int] = defaultdict(int)
        out = []
        for row in ids.tolist():
            key = tuple(row)
            cands = self._rows_of_content.get(key, [])
            # Identical rows (two equal samples of a group) are assigned in order.
            out.append(cands[taken[key]] if taken[key] < len(cands) else None)
            taken[key] += 1
        return out

    def _on_forward(self, module, args, kwargs, output):
        if self._in_own_forward:
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        logits = _logits_of(output)
        if not isinstance(ids, torch.Tensor) or logits is None or logits.dim() != 3:
            return None
        rows = self._match_rows(ids)
        self._largest_micro = max(self._largest_micro, len(rows))
        self._autocast = _autocast_state(logits.device.type)
        local, token = [], []
        for i, b in enumerate(rows):
            if b is not None and b in self._tokens_of_row:
                idx = self._tokens_of_row[b]
                local.append(torch.full_like(idx, i))
                token.append(idx)
        if not token:
            return None
        local_rows, token_idx = torch.cat(local), torch.cat(token)  # (k,), (k,)
        pos = self.t_idx[token_idx] - 1  # logits at t-1 predict token t
        if self._deterministic and self.n_optimizer_steps == 0:
            z = logits.detach()[local_rows, pos]  # (k, V), a copy
            if (
                self.z_before is None
                and len(token_idx) == self.n
                and bool((token_idx == torch.arange(self.n, device=token_idx.device)).all())
            ):
                self.z_before = z  # one forward over the whole batch: keep the copy, no second one
                self.have_before[:] = True
            else:
                self._store_before(token_idx, z)
        if logits.requires_grad and torch.is_grad_enabled():
            self._tensor_handles.append(logits.register_hook(self._grad_hook(local_rows, pos, token_idx)))
        return None

    def _grad_hook(self, local_rows, pos, token_idx):
        def hook(grad: torch.Tensor):
            if self.z_before is None or not bool(self.have_before[token_idx].all()):
                return None
            chunk_bytes = resolve_chunk_bytes(self.tracer.chunk_bytes, grad.device)
            step = rows_per_chunk(grad.shape[-1], chunk_bytes)
            # Chunked gathers: never a (k, V) copy of the gradient or of z_before. One pass over
            # the vocabulary gives sum_k pi_k l_k g_k and the pre-update statistics of the tokens.
            for s in range(0, len(token_idx), step):
                rows, at, tok = local_rows[s : s + step], pos[s : s + step], token_idx[s : s + step]
                g = grad[rows, at]  # (c, V) dLoss/dz at the traced tokens
                st = token_stats(
                    take_rows(self.z_before, tok),
                    self.targets[tok],
                    direction=g,
                    chunk_bytes=chunk_bytes,
                    check_finite=False,
                )
                self.grad_dot.index_add_(0, tok, st.direction_dot.double())
                self._store_pre(tok, st)
            self.have_grad[token_idx] = True
            return None

        return hook

    def _store_before(self, token_idx: torch.Tensor, z: torch.Tensor) -> None:
        if self.z_before is None:
            self.z_before = torch.empty(self.n, z.shape[-1], dtype=z.dtype, device=z.device)  # (n, V)
        self.z_before[token_idx] = z.to(self.z_before.dtype)
        self.have_before[token_idx] = True

    def _on_optimizer_step(self, optimizer, args, kwargs):
        self.n_optimizer_steps += 1
        if self.n_optimizer_steps > 1:
            return None
        if self.lr is None:
            self.lr = float(optimizer.param_groups[0]["lr"])
        missing = ~self.have_before
        if bool(missing.any()):
            self._fill_before(missing)
        self._pre_stats = self._before_stats()  # checks the logits before the parameters move
        return None

    # --- the tracer's own forwards -----------------------------------------------------
    @torch.no_grad()
    def _forward_traced_rows(self, token_mask: torch.Tensor):
        """Yield (token_idx, logits at the tokens) from no-grad forwards over the rows holding them."""
        rows = self.b_idx[token_mask].unique()
        bs = self.tracer.forward_batch_size or self._largest_micro or len(rows)
        was_training = self.model.training
        self._in_own_forward = True
        enabled, dtype = self._autocast
        dev_type = self.input_ids.device.type
        try:
            if not self._deterministic:
                self.model.eval()
            T = self.input_ids.shape[1]
            for s in range(0, len(rows), bs):
                chunk = rows[s : s + bs]  # (r,)
                # Only the positions that predict traced tokens need the LM head (HF's logits_to_keep).
                keep = (self.t_idx[torch.cat([self._tokens_of_row[b] for b in chunk.tolist()])] - 1).unique()
                column = torch.arange(T, device=keep.device)  # position -> column of the logits
                if self._keeps_logits and len(keep) < T:
                    column[keep] = torch.arange(len(keep), device=keep.device)
                else:
                    keep = None
                kw = {
                    k: v[chunk]
                    if isinstance(v, torch.Tensor) and v.shape[:1] == self.input_ids.shape[:1]
                    else v
                    for k, v in self.forward_kwargs.items()
                }
                if self.attention_mask is not None:
                    kw["attention_mask"] = self.attention_mask[chunk]
                if keep is not None:
                    kw["logits_to_keep"] = keep
                ctx = torch.autocast(dev_type, dtype=dtype) if enabled else contextlib.nullcontext()
                with ctx:
                    logits = _logits_of(self.model(input_ids=self.input_ids[chunk], **kw))  # (r, T or K, V)
                # One gather for the whole forward: (k,) token indices and their (k, V) logits.
                parts = [self._tokens_of_row[b] for b in chunk.tolist()]
                local = torch.cat([torch.full_like(p, i) for i, p in enumerate(parts)])
                idx = torch.cat(parts)
                keep_tok = token_mask[idx]
                idx, local = idx[keep_tok], local[keep_tok]
                yield idx, logits[local, column[self.t_idx[idx] - 1]]
        finally:
            self._in_own_forward = False
            self.model.train(was_training)

    def _fill_before(self, token_mask: torch.Tensor) -> None:
        for idx, z in self._forward_traced_rows(token_mask):
            self._store_before(idx, z)

    def _check_finite(self, z: torch.Tensor, what: str, token_idx: torch.Tensor | None = None) -> None:
        """One error naming the first traced token whose logits ``z`` (rows = ``token_idx``) are bad."""
        bad = first_nonfinite(z)
        if bad is not None:
            i = bad[0] if token_idx is None else int(token_idx[bad[0]])
            raise EntropyLabError(
                f"{what} logits are NaN/+inf (or all -inf) at sample {int(self.b_idx[i])}, position {int(self.t_idx[i])}"
            )

    def _store_pre(self, token_idx: torch.Tensor, st) -> None:
        for key in ("entropy", "logprob", "collision", "logsumexp"):
            value = getattr(st, key)
            if key not in self._pre_parts:
                self._pre_parts[key] = torch.empty(self.n, dtype=value.dtype, device=value.device)
            self._pre_parts[key][token_idx] = value
        self.have_pre[token_idx] = True

    def _before_stats(self) -> TokenStats:
        self._check_finite(self.z_before, "pre-update")
        missing = (~self.have_pre).nonzero(as_tuple=True)[0]
        if len(missing):
            st = token_stats(
                self.z_before[missing],
                self.targets[missing],
                chunk_bytes=self.tracer.chunk_bytes,
                check_finite=False,
            )
            self._store_pre(missing, st)
        return TokenStats(**self._pre_parts)

    # --- results -----------------------------------------------------------------------
    def _finish(self) -> None:
        if self.n_optimizer_steps == 0:
            warnings.warn("no optimizer step ran inside the traced block: deltas are zero", stacklevel=4)
            if not bool(self.have_before.all()):
                self._fill_before(~self.have_before)
        elif self.n_optimizer_steps > 1:
            warnings.warn(
                f"{self.n_optimizer_steps} optimizer steps ran inside one traced block; "
                "the records cover their sum",
                stacklevel=4,
            )
        pre = self._pre_stats or self._before_stats()
        z_b = self.z_before
        n = z_b.shape[0]
        entropy_after = torch.empty(n, dtype=torch.float64, device=z_b.device)
        linear = torch.empty(n, dtype=torch.float64, device=z_b.device)
        unchanged = True
        for idx, z_a in self._forward_traced_rows(torch.ones(n, dtype=torch.bool, device=z_b.device)):
            self._check_finite(z_a, "post-update", idx)
            # One pass per chunk: entropy after, and the first-order change along dz = z_a - z_b
            # (-inf - -inf is NaN where a masked vocabulary stays masked: no change there).
            # The pre-update pass's log-sum-exp and entropy spare a log-softmax of z_b here.
            h_after, lin, changed = entropy_change_stats(
                take_rows(z_b, idx),
                z_a,
                before_logsumexp=take_rows(pre.logsumexp, idx),
                before_entropy=take_rows(pre.entropy, idx),
                chunk_bytes=self.tracer.chunk_bytes,
            )
            entropy_after[idx], linear[idx] = h_after.double(), lin.double()
            unchanged = unchanged and not changed
        if unchanged and self.n_optimizer_steps > 0:
            warnings.warn(
                "the optimizer step left every traced logit unchanged (all advantages zero?): "
                "records hold zero deltas",
                stacklevel=4,
            )
        self.records = self._build_records(pre, entropy_after, linear)

    def _build_records(self, pre, entropy_after, linear) -> pd.DataFrame:
        dev = self.b_idx.device
        logprob = pre.logprob.double()
        nan = torch.full((self.n,), float("nan"), dtype=torch.float64, device=dev)

        def annotation(key, default):
            buf = self.annotations.get(key)
            fill = torch.full((self.n,), float(default), dtype=torch.float64, device=dev)
            return fill if buf is None else torch.where(torch.isnan(buf), fill, buf)

        advantage = self.advantage if self.advantage is not None else nan
        if "advantage" in self.annotations:
            advantage = torch.where(
                torch.isnan(self.annotations["advantage"]), advantage, self.annotations["advantage"]
            )
        q = TokenQuantities(
            logprob=logprob,
            entropy=pre.entropy.double(),
            collision=pre.collision.double(),
            advantage=advantage,
            old_logprob=self.old_logprob if self.old_logprob is not None else logprob,
            clip_indicator=annotation("clip_indicator", 1.0),
            intervention_weight=annotation("intervention_weight", 1.0),
            normalizer=annotation("normalizer", self.n_response_tokens),
            lr=float("nan") if self.lr is None else float(self.lr),
            logit_grad_dot=torch.where(self.have_grad, self.grad_dot, nan),
        )
        omegas = predict_all(q)
        cols = {
            "step": torch.full((self.n,), self.step_index),
            "update": torch.full((self.n,), self.update_index),
            "sample": self.b_idx,
            "position": self.t_idx,
            "token_id": self.targets,
            "advantage": q.advantage,
            "ratio": q.ratio,
            "clip_indicator": q.clip_indicator,
            "intervention_weight": q.intervention_weight,
            "normalizer": q.normalizer,
            "weight": q.weight,
            "lr": torch.full((self.n,), q.lr, dtype=torch.float64),
            "prob": q.prob,
            "logprob": logprob,
            "surprisal": -logprob,
            "entropy_before": q.entropy,
            "entropy_after": entropy_after,
            "collision": q.collision,
            "delta_entropy": entropy_after - q.entropy,
            "delta_logit_linear": linear,
        }
        cols.update({column_name(name): omega for name, omega in omegas.items()})
        df = pd.DataFrame({k: cols[k].detach().cpu().numpy() for k in COLUMNS})
        return df.astype({k: "int64" for k in INT_COLUMNS})

    def save(self, path) -> None:
        """Write ``records`` to Parquet with the tracer's config in the metadata."""
        if self.records is None:
            raise EntropyLabError("no records yet: save after the traced block has finished")
        save_records(self.records, path, self.tracer.config)
