"""The policy update of one step: the rollout batch -> micro-batch losses -> one traced optimizer step per mini-batch.

Every optimizer update takes one path (``Updater._optimizer_update``): zero the gradients,
run each micro-batch's forward, loss and backward (gradients summed), let the controller
change the gradient, then clip, check and step. Two callers feed it:

- ``Updater.ppo``: PPO epochs over (shuffled) mini-batches of a batch whose rollout-policy
  statistics came from a separate no-grad forward (``response_stats``).
- ``Updater.once``: a batch used once (one epoch, one mini-batch, one micro-batch). Its one
  forward gives both the loss and the rollout policy's statistics (old = current, detached;
  ratio 1), so the batch itself is built inside the update, after ``zero_grad``.

A traced update (``trace_due``) runs inside ``EntropyTracer.step``; its records go to the
run's ``traces/`` file of the step.

Simplifications: the micro-batches of a mini-batch are contiguous slices of its rows; the
loss of each is normalised by the whole mini-batch's token and sequence counts, so their
gradients sum to the mini-batch's. Clip-Cov / KL-Cov with ``cov_selection='global'`` and more
than one micro-batch choose their tokens over the whole mini-batch first, from one extra no-grad
forward per micro-batch (``objectives.cov_select``); the tracer sees that forward at the
update's parameters, so it records the same pre-update values.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from entropy_lab.advantages import advantages_for_config, mean_token_logprob
from entropy_lab.batch import RolloutBatch
from entropy_lab.config import TrainConfig
from entropy_lab.controllers import Controller, control_context
from entropy_lab.errors import EntropyLabError
from entropy_lab.objectives import compute_loss, prepare_context, required_inputs
from entropy_lab.objectives.cov_select import select_tokens, uses_global_selection
from entropy_lab.records import save_records
from entropy_lab.rollout import Rollout, mean_response_entropy
from entropy_lab.runs import RunDir
from entropy_lab.stats import entropy_from_logits, gather_logprobs, token_stats
from entropy_lab.trace.rows import NonFiniteLogits
from entropy_lab.trace.tracer import EntropyTracer, TraceStep
from entropy_lab.trainer.guards import diverged_message, divergence_cause, nan_message
from entropy_lab.trainer.resume import RandomStreams

Sums = dict[str, list[float]]
"""Each loss and optimizer metric of a step, one value per micro-batch or update."""


def trace_due(cfg: TrainConfig, step: int) -> bool:
    """Whether step ``step``'s updates are traced: every ``trace_every``-th step (0: never)."""
    return cfg.trace_every > 0 and step % cfg.trace_every == 0


@dataclass
class PolicyStats:
    """One forward's statistics of batch rows ``rows`` (b,), aligned with ``input_ids``: position 0 holds 0."""

    logprob: torch.Tensor  # (b, T) log pi(token) at the current parameters, with grad
    entropy: torch.Tensor | None  # (b, T) with grad when the loss needs entropy; else no grad or None
    collision: torch.Tensor | None  # (b, T) collision term, no grad; None unless the loss needs it
    old: dict[str, torch.Tensor] | None = None
    """The rollout policy's ``logprob``, ``entropy``, ``collision`` ((b, T) each, no grad) from this
    same forward, for a batch used once; None otherwise."""


def policy_stats(
    model: nn.Module,
    ro: Rollout,
    rows: torch.Tensor,
    need: frozenset[str],
    *,
    with_old: bool = False,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> PolicyStats:
    """Differentiable statistics of rollout rows ``rows`` (b,) under ``model``.

    Args:
        model: the policy (a causal LM returning ``.logits``).
        ro: the step's rollout.
        rows: (b,) its rows to run.
        need: the loss's optional inputs (``objectives.required_inputs``): ``entropy``, ``collision``.
        with_old: also return the rollout policy's statistics (``PolicyStats.old``).
        autocast: the run's autocast context.

    Returns:
        ``PolicyStats`` of (b, T) tensors.
    """
    with autocast():
        logits = model(**ro.rows(rows)).logits  # (b, T, V)
    ids = ro.input_ids[rows]  # (b, T)
    pad = torch.zeros(len(rows), 1, device=ids.device)  # (b, 1)
    logprob = torch.cat([pad, gather_logprobs(logits[:, :-1], ids[:, 1:])], 1)  # (b, T)
    entropy = collision = old = None
    if "entropy" in need:
        entropy = torch.cat([pad, entropy_from_logits(logits[:, :-1])], 1)  # (b, T)
    if "collision" in need or with_old:
        # With with_old the trainer checks the values and names the step (as for the rollout's).
        st = token_stats(logits[:, :-1].detach(), ids[:, 1:], check_finite=not with_old)
        st_entropy = torch.cat([pad, st.entropy.float()], 1)  # (b, T)
        st_collision = torch.cat([pad, st.collision.float()], 1)  # (b, T)
        if "collision" in need:
            collision = st_collision
            if entropy is None:
                entropy = st_entropy
        if with_old:
            old = {"logprob": logprob.detach(), "entropy": st_entropy, "collision": st_collision}
    return PolicyStats(logprob, entropy, collision, old)


@dataclass
class MicroBatch:
    """One forward/backward of an optimizer update: rows of the batch and their forward's statistics."""

    batch: RolloutBatch
    rows: torch.Tensor  # (m,) batch rows
    offset: int  # where ``rows`` start within the update's (traced) rows
    num_tokens: float  # the update's valid response tokens: the loss normaliser
    num_seqs: float  # the update's sequences
    stats: PolicyStats  # (m, T) each
    selected: torch.Tensor | None = None
    """(m, T) bool Clip-Cov / KL-Cov tokens chosen over the whole update; None: chosen per call."""


def make_batch(
    cfg: TrainConfig,
    run: RunDir,
    step: int,
    ro: Rollout,
    rewards: torch.Tensor,
    old: dict[str, torch.Tensor],
    ref_lp: torch.Tensor | None,
) -> RolloutBatch:
    """The step's batch from the rollout policy's statistics ``old`` ((B, T) logprob, entropy, collision).

    Args:
        cfg: the run's configuration (advantage and objective).
        run: the run directory (named in the error of a non-finite statistic).
        step: the step (named in that error).
        ro: the rollout; ``rewards``: its (B,) rewards; ``ref_lp``: (B, T) reference log-probs or None.

    Returns:
        The ``RolloutBatch`` with advantages and the objective's context.
    """
    for k, v in old.items():
        if not torch.isfinite(v).all():
            raise EntropyLabError(nan_message(run, step, f"rollout {k}"))
    P, G = cfg.prompts_per_step, cfg.samples_per_prompt
    mask = ro.response_mask.float()  # (B, T)
    seq_lp = mean_token_logprob(old["logprob"], mask).view(P, G)
    adv = advantages_for_config(rewards.view(P, G).float(), cfg, seq_lp).reshape(P * G)  # (B,)
    batch = RolloutBatch(
        rollout=ro,
        rewards=rewards,
        advantages=adv,
        old_logprob=old["logprob"],
        old_entropy=old["entropy"],
        old_collision=old["collision"],
        ref_logprob=ref_lp,
    )
    batch.context = prepare_context(batch.full_inputs(), cfg)
    return batch


def batch_metrics(step: int, batch: RolloutBatch) -> dict[str, float]:
    """The step's metrics known before its update: rewards, rollout entropy, length, zero advantages."""
    ro, rewards = batch.rollout, batch.rewards
    return {
        "step": step,
        "reward/mean": float(rewards.mean()),
        "reward/std": float(rewards.std()),
        "entropy/mean": mean_response_entropy({"entropy": batch.old_entropy}, ro),
        "response/length": float(ro.response_lengths.float().mean()),
        "advantage/zero_frac": float((batch.advantages == 0).float().mean()),
    }


@dataclass
class Updater:
    """The parts an update reads and changes; built once by ``Trainer.setup`` (shared references)."""

    cfg: TrainConfig
    run: RunDir
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    controller: Controller
    tracer: EntropyTracer
    streams: RandomStreams
    device: torch.device
    autocast: Callable[[], contextlib.AbstractContextManager]

    def ppo(self, step: int, batch: RolloutBatch) -> dict[str, float]:
        """PPO epochs over mini-batches with micro-batch accumulation; traced when due. Returns the update's metrics."""
        cfg = self.cfg
        ro, B = batch.rollout, batch.size
        adv_tok = batch.token_advantages  # (B, T)
        traced = trace_due(cfg, step)
        sums: Sums = defaultdict(list)
        records = []
        update = 0
        for _ in range(cfg.ppo_epochs):
            order = (
                torch.randperm(B, generator=self.streams.shuffle_gen).to(self.device)
                if cfg.mini_batches > 1
                else torch.arange(B, device=self.device)
            )  # (B,)
            for mb in order.chunk(cfg.mini_batches):  # (b,) rows of one optimizer update
                ctx = (
                    self._trace(step, update, ro, mb, adv_tok[mb], batch.old_logprob[mb])
                    if traced
                    else contextlib.nullcontext()
                )
                with self._post_update_guard(step), ctx as trace:
                    self._optimizer_update(step, mb, self._micro_batches(batch, mb), trace, sums)
                if trace is not None:
                    records.append(trace.records)
                update += 1
        return self._summary(step, sums, records)

    def once(
        self, step: int, ro: Rollout, rewards: torch.Tensor, ref_lp: torch.Tensor | None
    ) -> dict[str, float]:
        """The update of a batch used once (``Trainer.single_use``): one forward gives the loss and the
        rollout policy's statistics (advantages, the objective's context, metrics).

        Returns the step's metrics, those of ``batch_metrics`` first. The tracer, when due, gets
        neither advantages nor old log-probs up front: the advantage comes from the loss's
        annotations and its old log-prob is its own pre-update one (ratio 1), as in the loss.
        """
        rows = torch.arange(ro.input_ids.shape[0], device=self.device)  # (B,)
        sums: Sums = defaultdict(list)
        ctx = self._trace(step, 0, ro, rows) if trace_due(self.cfg, step) else contextlib.nullcontext()
        with self._post_update_guard(step), ctx as trace:
            micro = self._single_micro_batch(step, ro, rewards, ref_lp, rows)
            batch = self._optimizer_update(step, rows, micro, trace, sums)
        # The update reads the batch's tensors and changes none of them: its metrics are those of before.
        metrics = batch_metrics(step, batch)
        metrics.update(self._summary(step, sums, [] if trace is None else [trace.records]))
        return metrics

    # --- the one optimizer-update path -------------------------------------------------------
    def _optimizer_update(
        self,
        step: int,
        rows: torch.Tensor,
        micro_batches: Iterable[MicroBatch],
        trace: TraceStep | None,
        sums: Sums,
    ) -> RolloutBatch:
        """One optimizer update over batch rows ``rows`` (b,); returns the batch it was taken on.

        zero_grad -> each micro-batch's forward (run as it is drawn), loss, backward ->
        ``controller.before_step`` -> clip, check, step.
        """
        self.optimizer.zero_grad(set_to_none=True)
        batch = None
        for micro in micro_batches:
            self._loss_backward(step, micro, trace, sums)
            batch = micro.batch  # a batch used once is built by its micro-batch's forward
        assert batch is not None, "an update has at least one micro-batch"
        ctx = control_context(
            batch, rows, model=self.model, optimizer=self.optimizer, cfg=self.cfg, autocast=self.autocast
        )
        for k, v in self.controller.before_step(ctx).items():
            sums[k].append(v)
        self._optimizer_step(step, sums)
        return batch

    def _micro_batches(self, batch: RolloutBatch, mb: torch.Tensor) -> Iterator[MicroBatch]:
        """The micro-batches of mini-batch ``mb`` (b,); each forward runs when drawn."""
        need = required_inputs(self.cfg)
        n_tok, n_seq = float(batch.mask[mb].sum()), float(len(mb))  # the mini-batch's normalisers
        micro = self.cfg.micro_batch_size or len(mb)
        chunks = [mb[offset : offset + micro] for offset in range(0, len(mb), micro)]  # (m,) each
        selected: list[torch.Tensor | None] = [None] * len(chunks)
        if len(chunks) > 1 and uses_global_selection(self.cfg):
            selected = list(self._select_over_update(batch, chunks))
        offset = 0
        for rows, sel in zip(chunks, selected, strict=True):
            stats = policy_stats(self.model, batch.rollout, rows, need, autocast=self.autocast)
            yield MicroBatch(batch, rows, offset, n_tok, n_seq, stats, sel)
            offset += len(rows)

    @torch.no_grad()
    def _select_over_update(self, batch: RolloutBatch, chunks: list[torch.Tensor]) -> list[torch.Tensor]:
        """Clip-Cov / KL-Cov tokens of the whole update, (m, T) per micro-batch, from a no-grad forward
        of each micro-batch at the update's parameters (one extra forward per micro-batch)."""
        parts = []
        for rows in chunks:
            stats = policy_stats(self.model, batch.rollout, rows, frozenset(), autocast=self.autocast)
            parts.append(
                {
                    "logprob": stats.logprob,
                    "old_logprob": batch.old_logprob[rows],
                    "advantages": batch.token_advantages[rows],
                    "mask": batch.mask[rows],
                }
            )
        return select_tokens(parts, self.cfg, self.streams.loss_gen)

    def _single_micro_batch(
        self, step: int, ro: Rollout, rewards: torch.Tensor, ref_lp: torch.Tensor | None, rows: torch.Tensor
    ) -> Iterator[MicroBatch]:
        """The one micro-batch of a batch used once: its forward, then the batch built from it."""
        stats = policy_stats(
            self.model, ro, rows, required_inputs(self.cfg), with_old=True, autocast=self.autocast
        )
        assert stats.old is not None  # with_old
        batch = make_batch(self.cfg, self.run, step, ro, rewards, stats.old, ref_lp)
        yield MicroBatch(batch, rows, 0, float(batch.mask.sum()), float(len(rows)), stats)

    def _loss_backward(self, step: int, micro: MicroBatch, trace: TraceStep | None, sums: Sums) -> None:
        """Loss of ``micro``'s rows from their forward's statistics, backward, metrics."""
        stats = micro.stats
        inputs = micro.batch.loss_inputs(
            micro.rows,
            stats.logprob,
            stats.entropy,
            stats.collision,
            num_tokens=micro.num_tokens,
            num_seqs=micro.num_seqs,
            generator=self.streams.loss_gen,
            selected=micro.selected,
        )
        out = compute_loss(inputs, self.cfg)
        if not torch.isfinite(out.loss):
            raise EntropyLabError(nan_message(self.run, step, "loss"))
        out.loss.backward()
        if trace is not None:  # what the tracer cannot see from the logits alone
            trace.annotate(
                rows=torch.arange(micro.offset, micro.offset + len(micro.rows)),
                clip_indicator=out.clip_indicator,
                intervention_weight=out.intervention_weight,
                normalizer=out.normalizer,
                advantage=out.advantage,
            )
        for k, v in out.metrics.items():
            sums[k].append(v)

    def _optimizer_step(self, step: int, sums: Sums) -> None:
        """Clip, check and apply the accumulated gradient."""
        cfg = self.cfg
        clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        if not torch.isfinite(grad_norm):
            raise EntropyLabError(nan_message(self.run, step, "gradient"))
        sums["grad/norm"].append(float(grad_norm))
        sums["lr"].append(self.optimizer.param_groups[0]["lr"])
        try:
            self.optimizer.step()
        except RuntimeError as exc:  # torch refuses a step size the parameters' dtype cannot hold
            if "overflow" not in str(exc):
                raise
            raise EntropyLabError(self._diverged(step, "parameters")) from None
        # max |theta| over every parameter: finite iff all are (NaN propagates through the max)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not torch.isfinite(torch.nn.utils.get_total_norm(params, norm_type=math.inf)):
            raise EntropyLabError(self._diverged(step, "parameters"))
        self.scheduler.step()

    def _diverged(self, step: int, what: str) -> str:
        lr = self.optimizer.param_groups[0]["lr"]
        return diverged_message(self.run, step, what, divergence_cause(lr, self.cfg.weight_decay))

    @contextlib.contextmanager
    def _post_update_guard(self, step: int) -> Iterator[None]:
        """Finite but huge parameters make the tracer's post-update logits overflow: the update's fault."""
        try:
            yield
        except NonFiniteLogits as exc:
            if exc.side != "post-update":
                raise
            raise EntropyLabError(self._diverged(step, "logits")) from None

    # --- tracing and metrics -----------------------------------------------------------------
    def _trace(
        self,
        step: int,
        update: int,
        ro: Rollout,
        mb: torch.Tensor,
        advantages: torch.Tensor | None = None,
        old_logprobs: torch.Tensor | None = None,
    ) -> contextlib.AbstractContextManager[TraceStep]:
        """The tracer's context for the optimizer update over rows ``mb`` (b,); advantages, old log-probs (b, T)."""
        return self.tracer.step(
            ro.input_ids[mb],
            ro.attention_mask[mb],
            ro.response_mask[mb],
            advantages=advantages,
            old_logprobs=old_logprobs,
            step=step,
            update=update,
            forward_kwargs={"position_ids": ro.position_ids[mb]},
            optimizer=self.optimizer,
        )

    def _summary(self, step: int, sums: Sums, records: list[pd.DataFrame]) -> dict[str, float]:
        """Mean of each loss and optimizer metric over the updates; trace records saved, summarised."""
        metrics = {k: float(np.mean(v)) for k, v in sums.items()}
        if records:
            df = pd.concat(records, ignore_index=True)
            save_records(df, self.run.trace_path(step), self.cfg.to_dict())
            metrics["trace/delta_entropy_mean"] = float(df.delta_entropy.mean())
            metrics["trace/omega_softmax_mean"] = float(df.omega_softmax.mean())
        return metrics
