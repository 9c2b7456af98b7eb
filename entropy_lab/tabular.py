"""A tabular policy: free logits per state, with the call interface of a Hugging Face causal LM.

The state of a position is its whole prefix (every token up to and including it), so
two positions share logits exactly when an autoregressive model would see the same
input. Each state owns V free logits and nothing else is shared: the model in which
the ``softmax`` and ``logit-grad`` estimators are exact to first order under SGD. It is
the ground truth the tests hold the tracer and the theory to.

Simplifications: states are assigned on first sight, up to ``max_states``; the lookup
runs in Python (fine for the few thousand positions a test needs).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from entropy_lab.errors import EntropyLabError


class TabularHead(nn.Module):
    """The table of logits, exposed as the model's output embeddings."""

    def __init__(
        self, max_states: int, vocab_size: int, init_scale: float, generator: torch.Generator | None
    ):
        super().__init__()
        init = torch.randn(max_states, vocab_size, generator=generator, dtype=torch.float64) * init_scale
        self.weight = nn.Parameter(init)  # (S, V)


class TabularPolicy(nn.Module):
    """``model(input_ids, attention_mask=None).logits`` -> (B, T, V), one free row per prefix."""

    def __init__(
        self,
        vocab_size: int,
        max_states: int = 4096,
        init_scale: float = 1.0,
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
    ):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.head = TabularHead(max_states, vocab_size, init_scale, gen)
        self.head.to(dtype)
        self.vocab_size = vocab_size
        self.max_states = max_states
        self._state_of: dict[tuple[int, ...], int] = {}

    def get_output_embeddings(self) -> nn.Module:
        return self.head

    def state_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) state index per position; padding positions get state 0's row (ignored by masks)."""
        ids = input_ids.tolist()
        keep = None if attention_mask is None else attention_mask.bool().tolist()
        out = torch.zeros(input_ids.shape, dtype=torch.long)
        for b, row in enumerate(ids):
            prefix: tuple[int, ...] = ()
            for t, tok in enumerate(row):
                if keep is not None and not keep[b][t]:
                    continue  # padding is not part of the prefix
                prefix = prefix + (tok,)
                state = self._state_of.get(prefix)
                if state is None:
                    if len(self._state_of) >= self.max_states:
                        raise EntropyLabError(
                            f"TabularPolicy ran out of states (max_states={self.max_states})"
                        )
                    state = self._state_of[prefix] = len(self._state_of)
                out[b, t] = state
        return out.to(input_ids.device)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_
    ) -> SimpleNamespace:
        states = self.state_ids(input_ids, attention_mask)  # (B, T)
        return SimpleNamespace(logits=self.head.weight[states])  # (B, T, V)
