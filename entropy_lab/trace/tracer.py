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
    df = step.records        # one row per traced response token, docs/theory.md section 10

How it measures, and what it costs:

- Pre-update logits of the traced tokens are copied out of the training forward itself
  (a forward hook on the model), when that forward is deterministic. With active dropout
  the tracer instead runs its own no-grad forward in eval mode on entry, and measures
  the post-update side in eval mode too, so both sides share one deterministic mode.
- dLoss/dlogits is never stored: a tensor hook on the logits reduces it during backward
  to sum_k pi_k l_k g_k per traced token (the ``logit-grad`` estimator), chunked over rows.
- An optimizer pre-step hook marks the moment the parameters change: rows the
  training loop never forwarded get their pre-update logits then, and the learning
  rate is read from the optimizer when not given. Pass the optimizer
  (``tracer.step(..., optimizer=opt)``) and the hook goes on that optimizer alone;
  without it the tracer falls back to torch's process-global pre-step hook, which
  fires for the first step of *any* optimizer inside the block.
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

The parts live in the sibling modules of ``entropy_lab.trace`` (its ``__init__`` lists them).
This module ties them into the context manager.

Simplifications: ``covariance`` takes its batch means over the traced tokens; with
several optimizer steps inside one context, the records cover their sum (a warning says so).
"""

from __future__ import annotations

import warnings

import pandas as pd
import torch
from torch import nn

from entropy_lab.errors import EntropyLabError
from entropy_lab.linear_regime import record_eta_sweep
from entropy_lab.records import save_records
from entropy_lab.stats import TokenStats
from entropy_lab.trace.build import build_records
from entropy_lab.trace.capture import PreUpdateCapture
from entropy_lab.trace.distributed import DistInfo, detect, global_records
from entropy_lab.trace.forward import (
    OwnForward,
    accepts_logits_to_keep,
    autocast_state,
    has_active_dropout,
    post_update_pass,
)
from entropy_lab.trace.hooks import StepHooks
from entropy_lab.trace.probes import record_jvp
from entropy_lab.trace.rows import Annotations, TracedTokens, take_rows

__all__ = ["EntropyTracer", "TraceStep", "accepts_logits_to_keep", "has_active_dropout", "take_rows"]


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
        distributed: trace under torch.distributed data parallelism (``entropy_lab.trace.distributed``):
            None detects it (an initialised process group of more than one rank), True requires it.
        jvp: also record the ``jvp`` and ``jvp-entropy`` estimators (``entropy_lab.trace.probes``): one
            forward-mode pass over the traced rows at the optimizer pre-step hook.
        eta_grid: multiples eta of the step at which to also measure the traced tokens' entropy,
            theta + eta dtheta (``entropy_lab.linear_regime``); the records gain ``regime@`` columns.
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
        distributed: bool | None = None,
        jvp: bool = False,
        eta_grid: tuple[float, ...] | None = None,
    ):
        get_emb = getattr(model, "get_output_embeddings", None)
        if get_emb is None or get_emb() is None:
            raise EntropyLabError(
                f"EntropyTracer needs a causal LM with output embeddings; {type(model).__name__} has none "
                "(get_output_embeddings() is missing or None): load it with AutoModelForCausalLM"
            )
        if isinstance(max_positions, float) and not 0 < max_positions <= 1:
            raise EntropyLabError(f"max_positions as a fraction must be in (0, 1], got {max_positions}")
        if isinstance(max_positions, int) and (isinstance(max_positions, bool) or max_positions < 1):
            raise EntropyLabError(
                f"max_positions must be a count >= 1, a fraction in (0, 1] or None (all tokens), got {max_positions!r}"
            )
        self.model = model
        self.max_positions = max_positions
        self.forward_batch_size = forward_batch_size
        self.chunk_bytes = chunk_bytes
        self.seed = seed
        self.config = dict(config or {})
        self.distributed = distributed
        self._open: TraceStep | None = None  # the step whose block is running, if any
        self.jvp = jvp
        self.eta_grid = eta_grid

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
        optimizer: torch.optim.Optimizer | None = None,
    ) -> StepContext:
        """Trace the optimizer step taken inside the ``with`` block; the block gets a ``TraceStep``.

        ``optimizer``: the optimizer whose step is traced. Given, its own pre-step hook is used;
        None falls back to the process-global pre-step hook (any optimizer's step counts).
        The context is entered once; one tracer traces one block at a time (nesting two
        tracers' steps is fine).
        """
        traced = TraceStep(
            self,
            input_ids,
            attention_mask,
            response_mask,
            advantages=advantages,
            old_logprobs=old_logprobs,
            lr=lr,
            step=step,
            update=update,
            forward_kwargs=forward_kwargs or {},
        )
        return StepContext(self, traced, optimizer)


class StepContext:
    """The ``with`` block of one traced step: hooks on entry, removed on any exit, records after."""

    def __init__(self, tracer: EntropyTracer, traced: TraceStep, optimizer: torch.optim.Optimizer | None):
        self.tracer, self.traced, self.optimizer = tracer, traced, optimizer
        self.used = False

    def __enter__(self) -> TraceStep:
        if self.used:
            raise EntropyLabError(
                "this tracer.step(...) context was already used; call tracer.step(...) again for each update"
            )
        if self.tracer._open is not None:
            raise EntropyLabError(
                "this tracer is already tracing a step; finish that with-block first "
                "(nested steps need a second EntropyTracer)"
            )
        self.used = True
        self.traced._attach(self.optimizer)
        self.tracer._open = self.traced
        return self.traced

    def __exit__(self, exc_type, exc, tb) -> None:  # never swallows the exception
        self.tracer._open = None
        self.traced._detach()
        if exc_type is None:
            self.traced._finish()


class TraceStep:
    """The state of one traced step; ``records`` holds the result after the ``with`` block."""

    def __init__(
        self,
        tracer: EntropyTracer,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        response_mask: torch.Tensor | None,
        *,
        advantages: torch.Tensor | None,
        old_logprobs: torch.Tensor | None,
        lr: float | None,
        step: int,
        update: int,
        forward_kwargs: dict,
    ):
        self.tracer, self.model = tracer, tracer.model
        self.step_index, self.update_index = int(step), int(update)
        self.tokens = TracedTokens(
            input_ids,
            attention_mask,
            response_mask,
            advantages,
            old_logprobs,
            max_positions=tracer.max_positions,
            seed=tracer.seed * 1_000_003 + self.step_index * 1009 + self.update_index,
        )
        self.n = self.tokens.n
        self.dist: DistInfo | None = detect(tracer.distributed)
        self.n_response_tokens = float(self.tokens.n_response_tokens)
        if self.dist is not None:  # token-mean over the global batch
            (self.n_response_tokens,) = self.dist.sum([self.n_response_tokens], self.tokens.device)
        self.annotations = Annotations(self.tokens)
        self.capture = PreUpdateCapture(self.tokens, tracer.chunk_bytes)
        self.forward = OwnForward(
            self.model,
            self.tokens,
            forward_kwargs,
            deterministic=not has_active_dropout(self.model),
            batch_size=tracer.forward_batch_size,
            dist=self.dist,
        )
        self.hooks = StepHooks()
        self.lr = lr
        self.records: pd.DataFrame | None = None
        self.n_optimizer_steps = 0
        self.token_inputs: dict[str, torch.Tensor] = {}
        self._pre_stats: TokenStats | None = None
        self.extra_columns: dict[str, torch.Tensor] = {}  # (n,) each, appended to the records as they are

    def annotate(self, rows: torch.Tensor | list[int] | None = None, **values: torch.Tensor) -> None:
        """Record objective terms for rows of the batch.

        Keys: ``clip_indicator``, ``intervention_weight``, ``normalizer``, ``advantage`` (the
        advantage actually used, e.g. after shaping). Values are (b, T) tensors for the
        batch rows ``rows`` (default: all B rows), or scalars.
        """
        self.annotations.set(rows, **values)

    def add_token_input(self, name: str, values: torch.Tensor) -> None:
        """Give estimators that require input ``name`` its (n,) values, in traced-token order.

        Traced-token order is that of ``self.tokens.b_idx`` / ``t_idx`` (the records' row order).
        Estimators whose required inputs are never given are left out of the records.
        """
        values = torch.as_tensor(values)
        if tuple(values.shape) != (self.n,):
            raise EntropyLabError(
                f"token input {name!r} must have shape (n,) = ({self.n},), one value per traced token; "
                f"got {tuple(values.shape)}"
            )
        self.token_inputs[name] = values.detach().double()

    # --- hooks -------------------------------------------------------------------------
    def _attach(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        try:
            self.hooks.attach(self.model, self._on_forward, self._on_optimizer_step, optimizer)
            if not self.forward.deterministic:
                # Dropout is active: the training forward is stochastic, so the pre-update
                # side is measured by our own forward in eval mode, parameters still untouched.
                self._fill_before(torch.ones(self.n, dtype=torch.bool, device=self.tokens.device))
        except BaseException:
            self._detach()
            raise

    def _detach(self) -> None:
        self.hooks.remove()

    def _on_forward(self, ids: torch.Tensor, logits: torch.Tensor) -> None:
        if self.forward.running:
            return
        rows = self.tokens.match_rows(ids)
        self.forward.largest_micro = max(self.forward.largest_micro, len(rows))
        self.forward.autocast = autocast_state(logits.device.type)
        located = self.tokens.locate(rows)
        if located is None:
            return
        local_rows, token_idx = located  # (k,), (k,)
        pos = self.tokens.t_idx[token_idx] - 1  # logits at t-1 predict token t
        if self.forward.deterministic and self.n_optimizer_steps == 0:
            self.capture.store_forward(token_idx, logits.detach()[local_rows, pos])  # (k, V), a copy
        if logits.requires_grad and torch.is_grad_enabled():
            self.hooks.watch_grad(logits, self.capture.grad_hook(local_rows, pos, token_idx))

    def _on_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.n_optimizer_steps += 1
        if self.n_optimizer_steps > 1:
            return
        if self.lr is None:
            self.lr = float(optimizer.param_groups[0]["lr"])
        missing = ~self.capture.have_before
        if bool(missing.any()) or self.dist is not None:  # distributed: every rank joins the forwards
            self._fill_before(missing)
        self._pre_stats = self.capture.stats()  # checks the logits before the parameters move
        if self.tracer.jvp:
            record_jvp(self, optimizer)
        if self.tracer.eta_grid:
            self.extra_columns.update(record_eta_sweep(self, optimizer, self.tracer.eta_grid))

    def _fill_before(self, token_mask: torch.Tensor) -> None:
        for idx, z in self.forward.traced_logits(token_mask):
            self.capture.store(idx, z)

    # --- results -----------------------------------------------------------------------
    def _finish(self) -> None:
        if self.n_optimizer_steps == 0:
            warnings.warn("no optimizer step ran inside the traced block: deltas are zero", stacklevel=3)
            if not bool(self.capture.have_before.all()) or self.dist is not None:
                self._fill_before(~self.capture.have_before)
        elif self.n_optimizer_steps > 1:
            warnings.warn(
                f"{self.n_optimizer_steps} optimizer steps ran inside one traced block; "
                "the records cover their sum",
                stacklevel=3,
            )
        reached = int(self.capture.have_grad.sum())
        if self.n_optimizer_steps > 0 and reached < self.n:
            warnings.warn(
                f"no gradient reached {self.n - reached} of {self.n} traced tokens: the forward inside the "
                "block did not use the input_ids given to step() (rows must match by content and length), "
                "so omega_logit_grad is NaN for them; forward the traced batch itself",
                stacklevel=3,
            )
        pre = self._pre_stats or self.capture.stats()
        z_before = self.capture.z_before
        assert z_before is not None
        entropy_after, linear, changed = post_update_pass(
            self.forward, z_before, self.tracer.chunk_bytes, pre
        )
        if not changed and self.n_optimizer_steps > 0:
            warnings.warn(
                "the optimizer step left every traced logit unchanged (all advantages zero?): "
                "records hold zero deltas",
                stacklevel=3,
            )
        grad_dot = self.capture.logit_grad_dot()
        if self.dist is not None:  # the update follows the ranks' mean loss (DDP and FSDP average gradients)
            grad_dot = grad_dot / self.dist.world_size
        self.records = build_records(
            self.tokens,
            self.annotations,
            pre,
            grad_dot,
            entropy_after,
            linear,
            lr=self.lr,
            step=self.step_index,
            update=self.update_index,
            inputs=self.token_inputs,
            default_normalizer=self.n_response_tokens,
        )
        if self.extra_columns:
            self.records = self.records.assign(**{k: v.cpu().numpy() for k, v in self.extra_columns.items()})
        if self.dist is not None:
            self.records = global_records(self.records, self.dist, self.tokens.device)

    def save(self, path) -> None:
        """Write ``records`` to Parquet with the tracer's config in the metadata."""
        if self.records is None:
            raise EntropyLabError("no records yet: save after the traced block has finished")
        save_records(self.records, path, self.tracer.config)
