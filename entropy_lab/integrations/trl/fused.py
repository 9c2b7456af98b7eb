"""The pre-update side of a traced TRL step, taken from TRL's own training forward: ``FusedHeadTap``.

TRL's fused LM head (``trl.trainer.utils.add_fused_lm_head``) turns the backbone's last hidden
states into per-token log-probs and entropies tile by tile and never builds the logits, so the
tracer's forward hook never sees them. ``FusedHeadTap.forward`` wraps TRL's training forward of
one traced micro-batch:

- **Pre-update logits.** A forward hook on the backbone receives the hidden states TRL's head
  consumes. The hidden state at t - 1 of every traced token t goes through the model's own LM
  head, chunk by chunk over the tokens, divided by the temperature: the very computation of
  ``TemperedLM``'s post-update forward, so both sides of the update share one head and one
  precision. These become the tracer's pre-update logits, and the tracer runs no pre-update
  forward of its own: a traced step costs one no-grad forward (the post-update one) more than
  an untraced step.
- **logit-grad.** Tensor hooks on TRL's log-probs and entropies receive, per token, a = dL/d
  log pi_y and b = dL/dH, and ``omega_logit_grad``'s sum_k pi_k l_k g_k follows exactly (below).

Why not the gradient at the hidden states: with z = W h / tau (W the V x H head), dL/dh =
W^T g / tau loses every part of g = dL/dz orthogonal to the H columns of W, while
sum_k pi_k l_k g_k is the product of g with pi * l, which is in general not in their span. The
head's outputs carry the whole of g instead. TRL's loss depends on z only through log pi_y = z_y -
logsumexp(z) and H = -sum_k pi_k log pi_k (its other outputs carry no gradient), and

    d log pi_y / dz_k = [k = y] - pi_k,        dH / dz_k = -pi_k l_k,       l_k = log pi_k + H,

so g_k = a ([k = y] - pi_k) - b pi_k l_k, and

    sum_k pi_k l_k g_k = a (pi_y l_y - sum_k pi_k^2 l_k) - b sum_k pi_k^2 l_k^2
                       = a (pi_y l_y - C) - b D,

C the collision term of ``stats.token_stats`` (which also gives pi_y and H in the same pass) and
D = sum_k (pi_k l_k)^2 (``squared_weighted_surprisal``), needed only when the entropy reaches
the loss (an entropy bonus).

Deliberate simplifications:

- The tap needs a head whose logits are the LM head's output: a model config with a logit soft
  cap or a logit scale, dropout active in the training forward, or a first traced micro-batch
  whose recomputed log-probs differ from TRL's turn it off for the run, with one warning; the
  tracer then measures the pre-update side with its own forward (two no-grad forwards per
  traced step) and ``omega_logit_grad`` is NaN.
- The recomputation of the log-probs against TRL's is checked on the first traced micro-batch
  only.
- The head's matmul is repeated for the traced tokens only; under FSDP2 a head sharded on its
  own is gathered once per micro-batch on every rank (the tested layout keeps the head in the
  root module, whose parameters are gathered during the forward anyway).

Reference: TRL 1.16.0 ``trl/trainer/utils.py`` (``add_fused_lm_head``) and
``trl/kernels/chunked_logprob.py`` (the outputs of its head and their gradients).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from entropy_lab.errors import EntropyLabWarning
from entropy_lab.stats import DEFAULT_CHUNK_BYTES, resolve_chunk_bytes, rows_per_chunk, token_stats
from entropy_lab.trace.rows import take_rows
from entropy_lab.trace.step import TraceStep

HEAD_TRANSFORMS = (
    "final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling",
)  # fmt: skip
"""Config fields of models whose logits are not their LM head's output (TRL's head applies them)."""


def check_tolerance(z: torch.Tensor) -> float:
    """Largest |log pi_y (recomputed) - log pi_y (TRL)| accepted for logits ``z`` (k, V).

    fp32 and wider: 1e-4. bf16 and fp16 logits are rounded to a relative eps once more than TRL's
    fp32 ones (the division by the temperature), which moves a log-prob by up to about two
    roundings of the largest logit: 4 eps (1 + max |z|).
    """
    if z.dtype in (torch.float32, torch.float64):
        return 1e-4
    return 4 * torch.finfo(z.dtype).eps * (1 + float(z.abs().amax())) if z.numel() else 0.0


def unsupported_head(model: Any) -> str | None:
    """Why the hidden states cannot give ``model``'s logits through its LM head alone, or None."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for key in HEAD_TRANSFORMS:
        if getattr(config, key, None) is not None:
            return f"the model's logits are not its LM head's output ({key}={getattr(config, key)})"
    if model.get_output_embeddings() is None:
        return "the model has no output embeddings"
    backbone = getattr(model, "base_model", None)
    if not isinstance(backbone, nn.Module) or backbone is model:
        return "the model has no separate backbone to read the hidden states from"
    return None


@torch.no_grad()
def squared_weighted_surprisal(logits: torch.Tensor, *, chunk_bytes: int | None = None) -> torch.Tensor:
    """D = sum_k (pi_k l_k)^2 per row, l_k = log pi_k + H: (n, V) -> (n,) fp32 or wider, chunked over rows.

    Naive equivalent::

        logp = logits.float().log_softmax(-1); p = logp.exp()
        H = -(p * logp).sum(-1, keepdim=True)
        D = (p * (logp + H)).pow(2).sum(-1)
    """
    n, vocab = logits.shape
    cdtype = torch.promote_types(logits.dtype, torch.float32)
    out = torch.empty(n, dtype=cdtype, device=logits.device)
    step = rows_per_chunk(vocab, resolve_chunk_bytes(chunk_bytes, logits.device))
    for s in range(0, n, step):
        logp = torch.log_softmax(logits[s : s + step].to(cdtype), -1)  # (c, V)
        p = logp.exp()
        h = -(p * logp).nan_to_num_(nan=0.0).sum(-1, keepdim=True)  # (c, 1); 0 log 0 = 0
        w = logp.add_(h).mul_(p).nan_to_num_(nan=0.0)  # (c, V) pi l, 0 where pi = 0
        out[s : s + step] = w.mul_(w).sum(-1)
    return out


def head_parameters(head: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The LM head's (weight (V, H), bias (V,) or None) as plain tensors.

    An FSDP2-sharded head (wrapped on its own) holds DTensors here: gathered, as TRL's head
    does, which is a collective, so the caller fetches them on every rank alike.
    """
    weight: torch.Tensor = head.weight
    bias: torch.Tensor | None = getattr(head, "bias", None)
    if isinstance(weight, DTensor):
        weight = weight.full_tensor()
        bias = bias.full_tensor() if isinstance(bias, DTensor) else bias
    return weight, bias


class FusedHeadTap:
    """Pre-update logits and the logit-grad term of traced tokens, from TRL's fused-head training forward.

    Args:
        model: the unwrapped causal LM TRL trains (its forward patched by ``add_fused_lm_head``).
        temperature: TRL's sampling temperature; the policy trained is softmax(head(h) / temperature).
    """

    def __init__(self, model: nn.Module, temperature: float):
        self.model: Any = model
        self.temperature = float(temperature)
        self.off: str | None = unsupported_head(model)
        """Why the tap is off for this run (None while it is on)."""
        self._checked = False
        self._warned = False

    def forward(
        self, traced: TraceStep, rows: list[int] | None, input_ids: torch.Tensor, logits_to_keep: int, call
    ):
        """Run ``call()``, TRL's training forward of one traced micro-batch, with the tap on; return its output.

        Args:
            traced: the open traced step.
            rows: the step's batch rows that ``input_ids`` holds, in order (None: not the traced batch).
            input_ids: (b, T) the forward's ids, prompt then completion.
            logits_to_keep: C, the completion width of TRL's (b, C) log-probs and entropies.
            call: runs TRL's forward; returns (log-probs (b, C), entropies (b, C) or None, aux loss).
        """
        if self.off is None and not traced.forward.deterministic:
            self.off = (
                "dropout is active in TRL's training forward (GRPOConfig(disable_dropout=True) turns it off)"
            )
        if self.off is not None or rows is None:
            self._warn_off()
            return call()
        tokens = traced.tokens
        located = tokens.locate(list(rows))
        if located is None:  # no traced token here; the hook still runs, so every rank gathers alike
            located = (torch.zeros(0, dtype=torch.long, device=tokens.device),) * 2
        local, tok = located  # (k,), (k,) row in the micro-batch, traced-token index
        pos = tokens.t_idx[tok] - 1  # (k,) the hidden state at t - 1 predicts token t
        seen = [0]  # rows the backbone has run over: TRL may split the micro-batch into chunks
        stored = torch.zeros_like(tok, dtype=torch.bool)  # (k,)

        def on_backbone(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state  # (r, T, H)
            start, seen[0] = seen[0], seen[0] + hidden.shape[0]
            sel = ((local >= start) & (local < seen[0])).nonzero(as_tuple=True)[0]
            weight, bias = head_parameters(self.model.get_output_embeddings())  # on every rank
            if len(sel):
                self._store_logits(
                    traced, hidden.detach()[local[sel] - start, pos[sel]], tok[sel], weight, bias
                )
                stored[sel] = True

        handle = self.model.base_model.register_forward_hook(on_backbone)
        try:
            out = call()
        finally:
            handle.remove()
        if not bool(stored.all()):  # the forward was not the one expected: the tracer's own forward fills in
            traced.capture.have_before[tok] = False
            return out
        logps, entropies = out[0], out[1]  # (b, C) each
        col = tokens.t_idx[tok] - (input_ids.shape[1] - logits_to_keep)  # (k,) column in TRL's outputs
        if not self._checked and not self._check(traced, tok, logps.detach()[local, col]):
            return out
        if logps.requires_grad:
            traced.hooks.watch_grad(logps, self._logprob_grad_hook(traced, local, col, tok))
        if entropies is not None and entropies.requires_grad:
            traced.hooks.watch_grad(entropies, self._entropy_grad_hook(traced, local, col, tok))
        return out

    @torch.no_grad()
    def _store_logits(
        self,
        traced: TraceStep,
        hidden: torch.Tensor,
        tok: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> None:
        """head(hidden) / temperature -> the tracer's pre-update logits of tokens ``tok``; hidden (k, H)."""
        # Chunks of at least the GPU default: the matmul wants many rows; (k, V) is kept anyway.
        chunk = max(resolve_chunk_bytes(traced.capture.chunk_bytes, hidden.device), DEFAULT_CHUNK_BYTES)
        step = rows_per_chunk(int(weight.shape[0]), chunk)
        for s in range(0, len(tok), step):
            # (c, V): nn.Linear's own computation, in the forward's autocast dtype
            z = F.linear(hidden[s : s + step], weight, bias) / self.temperature
            traced.capture.store(tok[s : s + step], z)

    def _check(self, traced: TraceStep, tok: torch.Tensor, trl_logps: torch.Tensor) -> bool:
        """Hold the recomputed log-probs of ``tok`` to TRL's (k,); on a mismatch turn the tap off."""
        self._checked = True
        capture = traced.capture
        assert capture.z_before is not None  # just stored
        z = take_rows(capture.z_before, tok)  # (k, V)
        st = token_stats(z, traced.tokens.targets[tok], chunk_bytes=capture.chunk_bytes, check_finite=False)
        assert st.logprob is not None  # targets were given
        diff = float((st.logprob.double() - trl_logps.double()).abs().max()) if len(tok) else 0.0
        if diff <= check_tolerance(z):
            return True
        self.off = f"the log-probs recomputed from the hidden states and the LM head differ from TRL's by up to {diff:.2e}"
        capture.have_before[tok] = False
        self._warn_off()
        return False

    def _logprob_grad_hook(
        self, traced: TraceStep, local: torch.Tensor, col: torch.Tensor, tok: torch.Tensor
    ) -> Callable[[torch.Tensor], None]:
        """Tensor hook for TRL's log-probs (b, C): adds a (pi_y l_y - C) with a = dL/d log pi_y."""
        capture = traced.capture

        def hook(grad: torch.Tensor) -> None:
            if capture.z_before is None or not bool(capture.have_before[tok].all()):
                return
            a = grad.detach()[local, col].double()  # (k,)
            st = token_stats(
                take_rows(capture.z_before, tok),
                traced.tokens.targets[tok],
                chunk_bytes=capture.chunk_bytes,
                check_finite=False,
            )
            assert st.logprob is not None  # targets were given
            lp, h = st.logprob.double(), st.entropy.double()  # (k,) each
            capture.add_grad_dot(tok, a * (lp.exp() * (lp + h) - st.collision.double()), st)

        return hook

    def _entropy_grad_hook(
        self, traced: TraceStep, local: torch.Tensor, col: torch.Tensor, tok: torch.Tensor
    ) -> Callable[[torch.Tensor], None]:
        """Tensor hook for TRL's entropies (b, C): adds -b D with b = dL/dH (zero unless H is in the loss)."""
        capture = traced.capture

        def hook(grad: torch.Tensor) -> None:
            b = grad.detach()[local, col].double()  # (k,)
            if capture.z_before is None or not bool(capture.have_before[tok].all()) or not bool(b.any()):
                return
            d = squared_weighted_surprisal(take_rows(capture.z_before, tok), chunk_bytes=capture.chunk_bytes)
            capture.add_grad_dot(tok, -b * d.double())

        return hook

    def _warn_off(self) -> None:
        if self._warned or self.off is None:
            return
        self._warned = True
        warnings.warn(
            f"TRL traces: {self.off}; the tracer measures the pre-update side with its own forward "
            "(one more no-grad forward per traced step) and omega_logit_grad is NaN",
            EntropyLabWarning,
            stacklevel=4,
        )
