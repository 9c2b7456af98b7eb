"""What the tracer sees of a traced TRL step: the policy (``TemperedLM``) and the step's batch.

``TracedStepBatch`` packs every micro-batch TRL prepared for one optimizer step into one padded
batch, opens the tracer's step on it, places each micro-batch's per-token annotations at
its rows and input positions, and names the rows a training forward of the current micro-batch
holds (``micro_rows``, for ``fused``).

Deliberate simplifications: micro-batches are right-padded to the step's widest one (pad id
for the tokens, 0 for the masks and advantages, NaN for annotations); the tracer's forwards
call the unwrapped model, so they issue no collective under DDP (under FSDP2 they all-gather
like any forward, and ``TemperedLM`` reshards afterwards).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple, cast

import torch
from torch import nn

from entropy_lab.errors import EntropyLabError
from entropy_lab.integrations.trl._inputs import _full_sequence, _loss_mask, _token_advantages
from entropy_lab.trace.tracer import EntropyTracer


class TemperedLM(nn.Module):
    """The policy TRL trains: ``base``'s logits divided by the sampling temperature, for the tracer.

    ``forward`` runs the model's ordinary (unfused) forward on the unwrapped model, so it
    issues no collective and returns logits (B, T or K, V).
    """

    def __init__(
        self, base: nn.Module, temperature: float, autocast: Callable[[], contextlib.AbstractContextManager]
    ):
        super().__init__()
        self.base: Any = base  # a transformers model
        self.temperature = float(temperature)
        self._autocast = autocast
        self._fsdp: list | None = None  # the FSDP2 modules in base, found at the first forward

    @property
    def config(self):
        return self.base.config

    def get_output_embeddings(self):
        return self.base.get_output_embeddings()

    def forward(self, input_ids, attention_mask=None, logits_to_keep=None):
        kw = {} if logits_to_keep is None else {"logits_to_keep": logits_to_keep}
        # Under mixed precision accelerate replaces base.forward by an autocast wrapper and keeps the
        # model's own as _original_forward: call that one, so ``autocast`` alone decides the precision.
        forward = self.base.__dict__.get("_original_forward", self.base)
        try:
            with self._autocast():
                logits = forward(input_ids=input_ids, attention_mask=attention_mask, **kw).logits
        finally:
            self._reshard()
        return logits / self.temperature  # (B, T, V)

    def _reshard(self) -> None:
        """Reshard FSDP2 modules after a forward outside TRL's training step.

        Left unsharded (the root module keeps its parameters gathered after a forward), they made
        the next training step's update differ from the one without this forward (measured: TRL
        under FSDP2 on 2 gloo processes, the second step's gradient norm 1.075 instead of 1.031).
        """
        if self._fsdp is None:
            from torch.distributed.fsdp import FSDPModule

            self._fsdp = [m for m in self.base.modules() if isinstance(m, FSDPModule)]
        for m in self._fsdp:
            m.reshard()


class MicroRows(NamedTuple):
    """One prepared micro-batch's rows, prompt then completion, before padding to the step's width."""

    input_ids: torch.Tensor
    """(b, T_m) prompt and completion token ids."""
    attention_mask: torch.Tensor
    """(b, T_m) prompt and completion masks."""
    response_mask: torch.Tensor
    """(b, T_m) 1 at the completion tokens TRL's loss counts, 0 on the prompt."""
    prompt_len: int
    """P, the micro-batch's prompt width: completion token j sits at input position P + j."""
    advantages: torch.Tensor
    """(b, C) advantage per completion token."""
    old_logprobs: torch.Tensor | None
    """(b, C) TRL's old log-probs, or None when TRL's generation is aligned with the update."""

    @classmethod
    def from_batch(cls, batch: dict) -> MicroRows:
        """The rows of TRL's prepared micro-batch ``batch``."""
        ids, attn = _full_sequence(batch)  # (b, T_m) each
        resp = torch.cat([torch.zeros_like(batch["prompt_mask"]), _loss_mask(batch)], dim=1)  # (b, T_m)
        adv = _token_advantages(batch, batch["completion_ids"])  # (b, C)
        old = batch.get("old_per_token_logps")
        return cls(ids, attn, resp, batch["prompt_ids"].shape[1], adv, old)


class TracedStepBatch:
    """One traced optimizer step: its micro-batches as one padded batch, and the open tracer step.

    Args:
        prepared: the step's micro-batches as TRL's ``_prepare_inputs`` returned them, in order.
        step: the 1-based optimizer step.
        update: the step's index among those sharing its generation batch.
        tracer: the trainer's tracer; its step stays open until ``close``.
        pad_id: the token id padding shorter micro-batches.
    """

    def __init__(self, prepared: list[dict], step: int, update: int, tracer: EntropyTracer, pad_id: int):
        self.step = step
        self.micro = -1  # index of the micro-batch being computed
        rows: list[MicroRows] = []
        offsets, total = [], 0
        for batch in prepared:
            r = MicroRows.from_batch(batch)
            rows.append(r)
            offsets.append(total)
            total += r.input_ids.shape[0]
        self.offsets = offsets
        width = max(r.input_ids.shape[1] for r in rows)
        self.width = width
        dev = rows[0].input_ids.device

        def padded(x, value, dtype=None):
            out = torch.full((x.shape[0], width), value, dtype=dtype or x.dtype, device=dev)
            out[:, : x.shape[1]] = x
            return out

        self.prompt_len = [r.prompt_len for r in rows]
        input_ids = torch.cat([padded(r.input_ids, pad_id) for r in rows])  # (B, W)
        attention = torch.cat([padded(r.attention_mask, 0) for r in rows])  # (B, W)
        response = torch.cat([padded(r.response_mask, 0) for r in rows])  # (B, W)
        advantages = torch.cat([self.per_position(r.advantages, r.prompt_len, 0.0) for r in rows])  # (B, W)
        have_old = [r.old_logprobs is not None for r in rows]
        old = None
        if any(have_old):
            if not all(have_old):
                raise EntropyLabError("TRL gave old log-probs for some micro-batches of a step only")
            old = torch.cat(
                [self.per_position(cast(torch.Tensor, r.old_logprobs), r.prompt_len, 0.0) for r in rows]
            )  # (B, W)
        self.input_ids, self.attention_mask = input_ids, attention  # (B, W) each
        self._stack = contextlib.ExitStack()
        self.traced = self._stack.enter_context(
            tracer.step(
                input_ids,
                attention,
                response,
                advantages=advantages,
                old_logprobs=old,
                step=step,
                update=update,
            )
        )

    def per_position(self, x: torch.Tensor, prompt_len: int, fill: float) -> torch.Tensor:
        """A (b, C) per-completion-token tensor placed at its input positions of a (b, W) tensor."""
        out = torch.full((x.shape[0], self.width), fill, dtype=torch.float64, device=x.device)
        out[:, prompt_len : prompt_len + x.shape[1]] = x.double()
        return out

    def annotate(self, **values: torch.Tensor) -> None:
        """Annotate the current micro-batch's rows with (b, C) per-completion-token values."""
        m = self.micro
        start = self.offsets[m]
        plen = self.prompt_len[m]
        first = next(iter(values.values()))
        rows = list(range(start, start + first.shape[0]))
        self.traced.annotate(
            rows=rows, **{k: self.per_position(v, plen, math.nan) for k, v in values.items()}
        )

    def micro_rows(self, input_ids: torch.Tensor) -> list[int] | None:
        """The step's batch rows that a forward of the current micro-batch over ``input_ids`` (b, T_m) holds.

        None when ``input_ids`` is not the current micro-batch (other rows, or not right-padded to it).
        """
        if self.micro < 0 or input_ids.dim() != 2 or not len(input_ids) or input_ids.shape[1] > self.width:
            return None
        start = self.offsets[self.micro]
        rows = list(range(start, start + input_ids.shape[0]))
        if rows[-1] >= self.input_ids.shape[0]:
            return None
        same = torch.equal(self.input_ids[start : rows[-1] + 1, : input_ids.shape[1]], input_ids)
        return rows if same else None

    def close(self, error: bool = False, logit_grad: bool = True):
        """End the tracer's step and return its records; after an error, only remove its hooks.

        ``logit_grad``: False when the training forward cannot give dLoss/dz (the trainer has said
        why once), so the tracer's per-step warning about tokens without a gradient is left out.
        """
        if error:
            with contextlib.suppress(Exception):
                self._stack.close()
            return None
        with warnings.catch_warnings():
            if not logit_grad:
                warnings.filterwarnings("ignore", message="no gradient reached", category=UserWarning)
            self._stack.close()
        return self.traced.records
