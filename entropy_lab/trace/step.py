"""One traced step: what the hooks collect during the ``with`` block, the probes at the pre-step hook, the records after.

``TraceStep`` is what ``with tracer.step(...) as step`` yields (``entropy_lab.trace.tracer``).
Its forward hook copies the pre-update logits of the traced tokens out of the training
forward and watches their gradient; its optimizer pre-step hook completes the pre-update
side, takes the statistics and runs the tracer's probes (``entropy_lab.trace.probes``);
after the block, one more forward measures the post-update side and the records are built
(``entropy_lab.trace.build``).

It reads its tracer's options through ``TracerOptions``, the attributes ``EntropyTracer``
has, so that this module does not import ``entropy_lab.trace.tracer`` (which imports it).

Simplifications: only the first optimizer step of the block is measured before the update;
with several, the records cover their sum (a warning says so).
"""

from __future__ import annotations

import warnings
from typing import Protocol

import pandas as pd
import torch
from torch import nn

from entropy_lab.errors import EntropyLabError
from entropy_lab.records import save_records
from entropy_lab.stats import TokenStats
from entropy_lab.trace.build import build_records
from entropy_lab.trace.capture import PreUpdateCapture
from entropy_lab.trace.distributed import DistInfo, detect, global_records
from entropy_lab.trace.forward import OwnForward, autocast_state, has_active_dropout, post_update_pass
from entropy_lab.trace.head import HeadPath, HiddenTap
from entropy_lab.trace.hooks import StepHooks
from entropy_lab.trace.probes import PreStep, PreStepProbe, run_probes
from entropy_lab.trace.rows import Annotations, TracedTokens


class TracerOptions(Protocol):
    """What a traced step reads from its tracer (``EntropyTracer`` documents each)."""

    model: nn.Module
    max_positions: int | float | None
    forward_batch_size: int | None
    chunk_bytes: int | None
    seed: int
    config: dict
    distributed: bool | None
    probes: tuple[PreStepProbe, ...]
    head_path: HeadPath


class TraceStep:
    """The state of one traced step; ``records`` holds the result after the ``with`` block."""

    def __init__(
        self,
        tracer: TracerOptions,
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
            # reduced mod 2**64 (torch's seed range): unchanged for every seed that fitted before
            seed=(tracer.seed * 1_000_003 + self.step_index * 1009 + self.update_index) % 2**64,
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
            head=tracer.head_path,
        )
        self.capture.autocast_ctx = self.forward.autocast_ctx
        split = tracer.head_path.split
        if self.forward.hidden and split is not None:
            self.capture.head_before = split.live  # until the optimizer step: the head as it is
        self.tap: HiddenTap | None = None  # the body's hidden state in each training forward
        self.hooks = StepHooks()
        self.lr = lr
        self.records: pd.DataFrame | None = None
        self.n_optimizer_steps = 0
        self.token_inputs: dict[str, torch.Tensor] = {}
        self._pre_stats: TokenStats | None = None  # set at the optimizer pre-step hook
        self.state = "pending"  # -> "open" inside the block -> "done" (records built) or "failed"
        self.extra_columns: dict[str, torch.Tensor] = {}  # (n,) each, appended to the records as they are

    def __repr__(self) -> str:
        state = f"done, {len(self.records)} records" if self.records is not None else self.state
        return (
            f"TraceStep(step={self.step_index}, update={self.update_index}, model={type(self.model).__name__}, "
            f"traced_tokens={self.n}, lr={self.lr!r}, optimizer_steps={self.n_optimizer_steps}, "
            f"probes={list(self.tracer.probes)!r}, state={state})"
        )

    @property
    def logits_path(self) -> str:
        """How this step's own passes get the traced tokens' logits (the tracer's choice, or full
        logits where this step cannot take the hidden-state path)."""
        if self.forward.hidden:
            return self.tracer.head_path.describe()
        if self.tracer.head_path.active:
            why = "torch.distributed" if self.dist is not None else "the model takes no logits_to_keep"
            return f"full logits ({why})"
        return self.tracer.head_path.describe()

    @property
    def pre_stats(self) -> TokenStats:
        """Pre-update entropy, log-prob and collision of the traced tokens, (n,) each.

        Available from the optimizer pre-step hook on (when the pre-update logits are complete).
        """
        if self._pre_stats is None:
            raise EntropyLabError(
                "the pre-update statistics are taken at the optimizer pre-step hook; no optimizer step ran yet"
            )
        return self._pre_stats

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
            split = self.tracer.head_path.split
            if self.forward.hidden and split is not None:
                self.tap = HiddenTap(split.body).attach()
            self.state = "open"
            if not self.forward.deterministic:
                # Dropout is active: the training forward is stochastic, so the pre-update
                # side is measured by our own forward in eval mode, parameters still untouched.
                self._fill_before(torch.ones(self.n, dtype=torch.bool, device=self.tokens.device))
        except BaseException:
            self._detach()
            raise

    def _detach(self) -> None:
        self.hooks.remove()
        if self.tap is not None:
            self.tap.remove()
            self.tap = None
        if self.state == "open":
            self.state = "failed"  # until _finish builds the records

    def _on_forward(self, ids: torch.Tensor, logits: torch.Tensor) -> None:
        hidden = self.tap.take() if self.tap is not None else None  # (b, T, d) or None
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
        pre_update = self.forward.deterministic and self.n_optimizer_steps == 0
        if pre_update:
            if self._hidden_usable(hidden, logits, local_rows, pos):
                assert hidden is not None
                self.capture.store_hidden(token_idx, hidden.detach()[local_rows, pos])  # (k, d), a copy
            else:
                self.capture.store_forward(token_idx, logits.detach()[local_rows, pos])  # (k, V), a copy
        if logits.requires_grad and torch.is_grad_enabled():
            in_place = logits.detach() if pre_update else None  # the pre-update logits, read during backward
            self.hooks.watch_grad(logits, self.capture.grad_hook(local_rows, pos, token_idx, in_place))

    def _hidden_usable(
        self, hidden: torch.Tensor | None, logits: torch.Tensor, local_rows: torch.Tensor, pos: torch.Tensor
    ) -> bool:
        """Whether this forward's hidden states give its logits (checked at one token, once per tracer)."""
        if not self.forward.hidden or hidden is None or hidden.shape[:2] != logits.shape[:2]:
            return False
        i, t = local_rows[:1], pos[:1]
        with torch.no_grad(), self.forward.autocast_ctx():
            return self.tracer.head_path.check(hidden[i, t], logits[i, t].detach())

    def _on_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.n_optimizer_steps += 1
        if self.n_optimizer_steps > 1:
            return
        if self.lr is None:
            self.lr = float(optimizer.param_groups[0]["lr"])
        missing = ~self.capture.have_before
        if bool(missing.any()) or self.dist is not None:  # distributed: every rank joins the forwards
            self._fill_before(missing)
        split = self.tracer.head_path.split
        if split is not None and bool(self.capture.as_hidden.any()):
            self.capture.head_before = split.snapshot()  # the optimizer is about to move the head
        self._pre_stats = self.capture.stats()  # checks the logits before the parameters move
        if not self.tracer.probes:
            return
        pre = PreStep(
            self.model,
            optimizer,
            self.capture.before_rows,
            self._pre_stats,
            self.forward,
            self.tracer.chunk_bytes,
        )
        found = run_probes(self.tracer.probes, pre)
        for name, values in found.token_inputs.items():
            self.add_token_input(name, values)
        self.extra_columns.update(found.columns)

    def _fill_before(self, token_mask: torch.Tensor) -> None:
        for block in self.forward.traced_blocks(token_mask):
            if block.hidden is not None:
                self.capture.store_hidden(block.idx, block.hidden)
            else:
                assert block.logits is not None
                self.capture.store(block.idx, block.logits[block.local, block.column])

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
        entropy_after, linear, changed = post_update_pass(
            self.forward, self.capture.before_rows, self.tracer.chunk_bytes, pre
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
        self.state = "done"

    def save(self, path) -> None:
        """Write ``records`` to Parquet with the tracer's config in the metadata."""
        if self.records is None:
            raise EntropyLabError("no records yet: save after the traced block has finished")
        save_records(self.records, path, self.tracer.config)
