"""A causal LM split into its body and its LM head, so that logits are formed chunk by chunk.

The tracer's own statistics need the logits of the traced tokens, never all of them at
once. ``split_head(model)`` finds the body (``model.base_model``: input ids -> last hidden
state (B, T, d)) and the head (``model.get_output_embeddings()``, an ``nn.Linear``) of a
Hugging Face causal LM; logits are then ``head(h)`` for a (c, d) chunk of hidden states,
(c, V) at a time. ``HeadPath`` holds that choice for one tracer and checks it against the
model's own logits at the first forward it sees (one position): a model whose logits are
not exactly ``head(h)`` (soft-capping, a logit scale, an added bias outside the head) falls
back to the model's full logits, with the reason in ``HeadPath.reason``.

Deliberate simplifications: only ``nn.Linear`` heads are split; models whose config names a
logit transform (``LOGIT_TRANSFORMS``) fall back without a check, since soft-capping of
small logits can hide inside bf16 rounding; the check compares one position per tracer.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from entropy_lab.errors import EntropyLabWarning

LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_logits_scale")
"""Config fields of model families whose logits are a function of ``head(h)``, not ``head(h)`` itself."""

HIDDEN_PATH = "hidden states and the LM head, in chunks of positions"


@dataclass(frozen=True)
class HeadWeights:
    """The LM head as (weight (V, d), bias (V,) or None): ``self(h)`` maps (..., d) to (..., V)."""

    weight: torch.Tensor
    bias: torch.Tensor | None

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        if not torch.is_autocast_enabled(h.device.type):
            h = h.to(self.weight.dtype)
        return F.linear(h, self.weight, self.bias)


@dataclass(frozen=True)
class HeadSplit:
    """``body`` gives the last hidden state, ``head`` turns it into logits."""

    body: nn.Module
    head: nn.Linear

    def live(self, h: torch.Tensor) -> torch.Tensor:
        """The head applied to ``h`` (..., d) -> (..., V), reading whatever its parameter slots hold
        now (dual tensors in a forward-mode pass, shifted ones in the eta sweep)."""
        return HeadWeights(self.head.weight, self.head.bias)(h)

    def snapshot(self) -> HeadWeights:
        """A copy of the head's weights now (needed after the optimizer moves them); no copy if frozen."""
        w, b = self.head.weight, self.head.bias
        if not (w.requires_grad or (b is not None and b.requires_grad)):
            return HeadWeights(w.detach(), None if b is None else b.detach())
        return HeadWeights(w.detach().clone(), None if b is None else b.detach().clone())


def split_head(model: nn.Module) -> tuple[HeadSplit | None, str]:
    """(the split, "") for a causal LM whose logits are ``head(body(x))``; (None, why not) otherwise."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(head, nn.Linear):
        return None, f"its output embeddings are {type(head).__name__}, not an nn.Linear LM head"
    body = getattr(model, "base_model", None)
    if not isinstance(body, nn.Module) or body is model:
        return None, "it has no base_model (the body that gives the last hidden state)"
    cfg = getattr(model, "config", None)
    get_text = getattr(cfg, "get_text_config", None)
    text_cfg = get_text() if callable(get_text) else cfg
    for key in LOGIT_TRANSFORMS:
        value = getattr(text_cfg, key, None)
        if value is not None and value not in (0, 1, 1.0):
            return None, f"its config sets {key}={value}: its logits are not the LM head's output"
    return HeadSplit(body, head), ""


def last_hidden_of(output) -> torch.Tensor | None:
    """The last hidden state (B, T, d) in a body's output: ``.last_hidden_state`` or the first element."""
    h = getattr(output, "last_hidden_state", None)
    if h is None and isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        h = output[0]
    if h is None and isinstance(output, torch.Tensor):
        h = output
    return h if isinstance(h, torch.Tensor) and h.dim() == 3 else None


class HiddenTap:
    """A forward hook on the body keeping its last output's hidden state (``take()`` hands it over once)."""

    def __init__(self, body: nn.Module):
        self.body = body
        self.enabled = True
        self._h: torch.Tensor | None = None
        self._handle: torch.utils.hooks.RemovableHandle | None = None

    def attach(self) -> HiddenTap:
        def hook(module, args, output):
            if self.enabled:
                self._h = last_hidden_of(output)

        self._handle = self.body.register_forward_hook(hook)
        return self

    def take(self) -> torch.Tensor | None:
        h, self._h = self._h, None
        return h

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._h = None


@contextlib.contextmanager
def tapped(body: nn.Module) -> Iterator[HiddenTap]:
    """A ``HiddenTap`` on ``body`` for the duration of the block."""
    tap = HiddenTap(body).attach()
    try:
        yield tap
    finally:
        tap.remove()


def head_matches(head: nn.Linear, h: torch.Tensor, logits: torch.Tensor) -> bool:
    """Whether the model's ``logits`` (k, V) are ``head(h)`` for hidden states ``h`` (k, d), to rounding."""
    with torch.no_grad():
        mine = HeadWeights(head.weight, head.bias)(h)
    if mine.shape != logits.shape:
        return False
    # Tangents (inside a forward-mode pass) play no part in the check.
    mine = torch.autograd.forward_ad.unpack_dual(mine).primal.float()
    ref = torch.autograd.forward_ad.unpack_dual(logits).primal.float()
    eps = torch.finfo(logits.dtype).eps if logits.dtype.is_floating_point else 1e-6
    finite = torch.isfinite(ref)
    # Non-finite entries (a NaN weight, a masked vocabulary) must be the same ones, and equal.
    if not bool((torch.isfinite(mine) == finite).all()):
        return False
    if not bool(torch.isnan(mine).eq(torch.isnan(ref)).all()) or not bool(
        (mine[~finite & ~torch.isnan(ref)] == ref[~finite & ~torch.isnan(ref)]).all()
    ):
        return False
    if not bool(finite.any()):
        return True
    # Rounding of a d-term dot product grows with its terms' magnitudes, not with the result (the
    # terms of a large hidden state cancel): bound each logit's error by sqrt(d) eps sum_i |h_i w_i|.
    with torch.no_grad():
        hp = torch.autograd.forward_ad.unpack_dual(h).primal.float()
        w = torch.autograd.forward_ad.unpack_dual(head.weight).primal.float()
        terms = F.linear(hp.abs(), w.abs())  # (k, V): sum_i |h_i w_i|
    bound = 8 * eps * (math.sqrt(hp.shape[-1]) * terms + 1.0)
    return bool(((mine - ref).abs() <= bound)[finite].all())


class HeadPath:
    """One tracer's choice between the chunked hidden-state path and the model's full logits.

    ``split`` is None on the full-logits path, with ``reason`` saying why. ``check(h, logits)``
    is called with each forward's hidden states and logits at one position until one has
    been compared; a mismatch turns the path off (once, with a warning).
    """

    def __init__(self, model: nn.Module, enabled: bool = True):
        self.split, self.reason = split_head(model) if enabled else (None, "turned off")
        self.checked = False

    @property
    def active(self) -> bool:
        return self.split is not None

    def describe(self) -> str:
        return HIDDEN_PATH if self.split is not None else f"full logits ({self.reason})"

    def check(self, h: torch.Tensor, logits: torch.Tensor) -> bool:
        """Compare ``head(h)`` (k, d) with the model's ``logits`` (k, V) once; False turns the path off."""
        if self.split is None:
            return False
        if h.shape[-1] != self.split.head.in_features:  # the body's output is not the head's input
            self.split, self.reason = None, f"its body's output has width {h.shape[-1]}, not the head's input"
            return False
        if self.checked:
            return True
        self.checked = True
        if not head_matches(self.split.head, h, logits):
            self.split = None
            self.reason = "its logits differ from its LM head's output (a logit transform after the head)"
            warnings.warn(
                f"entropy-lab traces this model from its full logits: {self.reason}",
                EntropyLabWarning,
                stacklevel=2,
            )
            return False
        return True
