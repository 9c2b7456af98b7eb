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
  training loop never forwarded get their pre-update logits then, the learning
  rate is read from the optimizer when not given, and the tracer's probes
  (``entropy_lab.trace.probes``: the jvp pass, the eta sweep, any ``PreStepProbe``
  given) measure along the step about to be applied. Pass the optimizer
  (``tracer.step(..., optimizer=opt)``) and the hook goes on that optimizer alone;
  without it the tracer falls back to torch's process-global pre-step hook, which
  fires for the first step of *any* optimizer inside the block.
- After the step, one no-grad forward over the traced rows gives ``entropy_after`` and
  ``delta_logit_linear``. That forward is the floor of exact tracing.

Memory: for a model whose logits are its LM head's output (``entropy_lab.trace.head``), the
traced tokens' last hidden states (n_traced, d), a copy of the head taken before the optimizer
moves it, and (chunk, V) temporaries: never (B, T, V) logits. Otherwise the pre-update logits
of traced tokens, (n_traced, V) in the logits' dtype. Bound either with ``max_positions`` (a
count or a fraction of response tokens, sampled uniformly; exact on the sampled ones).

Conventions: every per-token tensor passed in is (B, T), aligned with ``input_ids``;
``response_mask[b, t] = 1`` marks token t of row b as a response token, predicted by
the logits at t - 1. Micro-batches of gradient accumulation are recognised by content:
each forward's rows must be rows of the step's ``input_ids`` with the same length.

Defaults for a loop that does not annotate its objective (``step.annotate``): clip
indicator 1, intervention weight 1, normaliser = response tokens in the batch
(token-mean), advantage NaN when not given, old log-prob = the pre-update log-prob
(ratio 1) when not given.

The parts live in the sibling modules of ``entropy_lab.trace`` (its ``__init__`` lists them).
This module is the entry point: the tracer and the ``with`` block of one step; the state of
that step is ``entropy_lab.trace.step.TraceStep``.

Simplifications: ``covariance`` takes its batch means over the traced tokens; with
several optimizer steps inside one context, the records cover their sum (a warning says so).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from entropy_lab.errors import EntropyLabError
from entropy_lab.trace.attribution import attribution_probes
from entropy_lab.trace.forward import accepts_logits_to_keep, has_active_dropout
from entropy_lab.trace.head import HeadPath
from entropy_lab.trace.probes import EtaSweepProbe, JvpProbe, PreStepProbe, build_probes
from entropy_lab.trace.rows import take_rows
from entropy_lab.trace.step import TraceStep

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
        jvp: also record the ``jvp`` and ``jvp-entropy`` estimators (``probes.JvpProbe``): one
            forward-mode pass over the traced rows at the optimizer pre-step hook.
        jvp_positions: with ``jvp``, run the forward-mode pass on at most this many traced tokens,
            sampled uniformly with ``seed`` (None: all); the others' jvp estimators are NaN.
        eta_grid: multiples eta of the step at which to also measure the traced tokens' entropy,
            theta + eta dtheta (``probes.EtaSweepProbe``), as numbers or as the comma-separated text
            of ``TrainConfig.trace_eta_grid``; the records gain ``regime@`` columns.
        attribution: also split ``omega_jvp`` over parameter groups: the attribution kinds of
            ``TrainConfig.trace_attribution`` ("layer"; ``entropy_lab.trace.attribution``); the
            records gain ``attr_<kind>:<part>`` columns. None or "none": no attribution.
        probes: further ``PreStepProbe``s, run after the jvp, eta-sweep and attribution ones, in this order.
        logits_from_hidden: form the traced tokens' logits from the last hidden state and the LM
            head, chunk by chunk (``entropy_lab.trace.head``), where the model allows it; False
            keeps the model's full logits of the traced tokens, (n, V). ``logits_path`` says
            which one is in use, and why when it is the full logits.

    ``probes`` holds the pre-step probes the arguments asked for, in the order they run.
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
        jvp_positions: int | None = None,
        eta_grid: Sequence[float] | str | None = None,
        attribution: str | None = None,
        probes: Sequence[PreStepProbe] = (),
        logits_from_hidden: bool = True,
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
        if jvp_positions is not None and (
            isinstance(jvp_positions, bool) or not isinstance(jvp_positions, int) or jvp_positions < 1
        ):
            raise EntropyLabError(
                f"jvp_positions must be a count >= 1 or None (all tokens), got {jvp_positions!r}"
            )
        if jvp_positions is not None and not jvp:
            raise EntropyLabError(
                "jvp_positions samples the jvp pass: give jvp=True too, or drop jvp_positions"
            )
        self.probes: tuple[PreStepProbe, ...] = build_probes(
            jvp, eta_grid, (*attribution_probes(attribution), *probes), jvp_positions, seed
        )
        self.head_path = HeadPath(model, enabled=logits_from_hidden)

    @property
    def logits_path(self) -> str:
        """How the tracer's own passes get the traced tokens' logits, and why when from full logits."""
        return self.head_path.describe()

    @property
    def jvp(self) -> bool:
        """Whether the jvp estimators are recorded."""
        return any(isinstance(p, JvpProbe) for p in self.probes)

    @property
    def eta_grid(self) -> tuple[float, ...] | None:
        """The eta sweep's multiples of the step, None without a sweep."""
        return next((p.etas for p in self.probes if isinstance(p, EtaSweepProbe)), None)

    def __repr__(self) -> str:
        open_step = "none" if self._open is None else f"step {self._open.step_index}"
        return (
            f"EntropyTracer(model={type(self.model).__name__}, max_positions={self.max_positions!r}, "
            f"forward_batch_size={self.forward_batch_size!r}, chunk_bytes={self.chunk_bytes!r}, "
            f"seed={self.seed}, distributed={self.distributed!r}, probes={list(self.probes)!r}, "
            f"open={open_step})"
        )

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
