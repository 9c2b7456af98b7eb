"""Which response tokens one traced step covers, and which batch rows a forward's rows are.

``TracedTokens`` validates the step's (B, T) inputs, picks the traced tokens (all
response tokens, or a uniform sample of them), and maps any forward's ``input_ids`` back
to rows of the step's batch by content, so micro-batches of gradient accumulation are
recognised without the loop saying which rows it forwarded. ``Annotations`` holds the
objective terms the loop reports per batch row, mapped onto the traced tokens.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from entropy_lab.errors import EntropyLabError
from entropy_lab.stats import first_nonfinite


def take_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x[idx]``, as a view (no copy) when ``idx`` is an ascending run of consecutive rows."""
    n = len(idx)
    if n and int(idx[-1]) - int(idx[0]) == n - 1 and (n == 1 or bool((idx.diff() == 1).all())):
        return x[int(idx[0]) : int(idx[0]) + n]
    return x[idx]


def n_sampled(max_positions: int | float | None, n_total: int) -> int:
    """How many of ``n_total`` response tokens to trace: all (None), a count (int) or a fraction (float)."""
    if max_positions is None:
        return n_total
    if isinstance(max_positions, float):
        return max(1, min(n_total, round(max_positions * n_total)))
    return max(1, min(n_total, int(max_positions)))


class NonFiniteLogits(EntropyLabError):
    """Logits the tracer read are NaN or +inf; ``side`` says whose: "pre-update" or "post-update"."""

    def __init__(self, message: str, side: str):
        super().__init__(message)
        self.side = side


class TracedTokens:
    """The n traced tokens of one step: (sample, position) pairs and their per-token inputs.

    Args:
        input_ids: (B, T) the step's batch.
        attention_mask: (B, T) or None.
        response_mask: (B, T), 1 at the response tokens to trace (position t is predicted by
            the logits at t - 1, so position 0 is never a response token).
        advantages: (B,) or (B, T), or None.
        old_logprobs: (B, T) rollout-policy log-probs of the batch tokens, or None.
        max_positions: see ``EntropyTracer``.
        seed: seeds the uniform sample when ``max_positions`` keeps fewer than all tokens.
    """

    def __init__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        response_mask: torch.Tensor | None,
        advantages: torch.Tensor | None,
        old_logprobs: torch.Tensor | None,
        *,
        max_positions: int | float | None,
        seed: int,
    ):
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

        self.input_ids = input_ids  # (B, T)
        self.attention_mask = per_token("attention_mask", attention_mask)  # (B, T) or None
        if response_mask is None:
            raise EntropyLabError("response_mask is required: (B, T), 1 at the response tokens to trace")
        rmask = per_token("response_mask", response_mask).bool()  # (B, T)
        if self.attention_mask is not None:
            rmask = rmask & self.attention_mask.bool()
        if bool(rmask[:, 0].any()):
            raise EntropyLabError("response_mask marks position 0, which no logits predict")
        if not bool(rmask.any()):
            raise EntropyLabError("response_mask selects no tokens: there is nothing to trace")
        self.n_response_tokens = int(rmask.sum())
        b_idx, t_idx = rmask.nonzero(as_tuple=True)  # (n,), (n,)
        n_keep = n_sampled(max_positions, len(b_idx))
        if n_keep < len(b_idx):
            gen = torch.Generator().manual_seed(seed)
            keep = torch.randperm(len(b_idx), generator=gen)[:n_keep].sort().values.to(dev)
            b_idx, t_idx = b_idx[keep], t_idx[keep]
        self.b_idx, self.t_idx = b_idx, t_idx  # (n,), (n,)
        self.n = len(b_idx)
        self.targets = input_ids[b_idx, t_idx]  # (n,)
        adv = per_token("advantages", advantages, allow_row=True)
        self.advantage = None if adv is None else adv[b_idx, t_idx].double()  # (n,) or None
        old = per_token("old_logprobs", old_logprobs)
        self.old_logprob = None if old is None else old[b_idx, t_idx].double()  # (n,) or None
        for name, x in (("advantages", self.advantage), ("old_logprobs", self.old_logprob)):
            # one NaN here would make a batch statistic (omega_covariance) NaN for every row
            if x is not None and not bool(torch.isfinite(x).all()):
                i = int((~torch.isfinite(x)).nonzero()[0])
                raise EntropyLabError(
                    f"{name} is NaN or infinite at response token (sample {int(b_idx[i])}, position "
                    f"{int(t_idx[i])}); give finite values at every response token (padding may be anything)"
                )
        # Row -> traced-token indices, for matching micro-batches and filling annotations.
        self.tokens_of_row: dict[int, torch.Tensor] = {}
        for b in b_idx.unique().tolist():
            self.tokens_of_row[b] = (b_idx == b).nonzero(as_tuple=True)[0]
        self._rows_of_content: dict[tuple, list[int]] = defaultdict(list)
        for b, row in enumerate(input_ids.tolist()):
            self._rows_of_content[tuple(row)].append(b)

    @property
    def device(self) -> torch.device:
        return self.b_idx.device

    def match_rows(self, ids: torch.Tensor) -> list[int | None]:
        """Full-batch row index of each row of a forward's input_ids (None when unknown)."""
        if ids.dim() != 2 or ids.shape[1] != self.input_ids.shape[1]:
            return [None] * (ids.shape[0] if ids.dim() else 0)
        taken: dict[tuple, int] = defaultdict(int)
        out: list[int | None] = []
        for row in ids.tolist():
            key = tuple(row)
            cands = self._rows_of_content.get(key, [])
            # Identical rows (two equal samples of a group) are assigned in order.
            out.append(cands[taken[key]] if taken[key] < len(cands) else None)
            taken[key] += 1
        return out

    def locate(self, rows: list[int | None]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """For a forward over batch rows ``rows``: (local row, traced-token index), each (k,); None if none."""
        local, token = [], []
        for i, b in enumerate(rows):
            if b is not None and b in self.tokens_of_row:
                idx = self.tokens_of_row[b]
                local.append(torch.full_like(idx, i))
                token.append(idx)
        if not token:
            return None
        return torch.cat(local), torch.cat(token)

    def check_finite(self, z: torch.Tensor, what: str, token_idx: torch.Tensor | None = None) -> None:
        """One error naming the first traced token whose logits ``z`` (rows = ``token_idx``) are bad."""
        bad = first_nonfinite(z)
        if bad is not None:
            i = bad[0] if token_idx is None else int(token_idx[bad[0]])
            raise NonFiniteLogits(
                f"{what} logits are NaN/+inf (or all -inf) at sample {int(self.b_idx[i])}, position {int(self.t_idx[i])}",
                side=what,
            )


ANNOTATION_KEYS = ("clip_indicator", "intervention_weight", "normalizer", "advantage")
"""Objective terms a training loop may report per token (``TraceStep.annotate``)."""


class Annotations:
    """Objective terms reported per batch row, as (n,) float64 buffers over the traced tokens (NaN = unset)."""

    def __init__(self, tokens: TracedTokens):
        self.tokens = tokens
        self.values: dict[str, torch.Tensor] = {}

    def set(self, rows: torch.Tensor | list[int] | None = None, **values: torch.Tensor) -> None:
        """Fill ``values`` ((rows, T) tensors or scalars) for batch rows ``rows`` (default: all)."""
        tok = self.tokens
        B, T = tok.input_ids.shape
        row_list = list(range(B)) if rows is None else torch.as_tensor(rows).tolist()
        # The traced tokens of those rows, (k,) each: their index and the row of ``value`` they read.
        parts = [(i, tok.tokens_of_row[b]) for i, b in enumerate(row_list) if b in tok.tokens_of_row]
        idx = (
            torch.cat([p for _, p in parts]) if parts else torch.zeros(0, dtype=torch.long, device=tok.device)
        )
        local = torch.cat([torch.full_like(p, i) for i, p in parts]) if parts else torch.zeros_like(idx)
        for key, value in values.items():
            if key not in ANNOTATION_KEYS:
                raise EntropyLabError(f"unknown annotation {key!r}; valid: {', '.join(ANNOTATION_KEYS)}")
            buf = self.values.get(key)
            if buf is None:
                buf = self.values[key] = torch.full(
                    (tok.n,), float("nan"), dtype=torch.float64, device=tok.device
                )
            value = torch.as_tensor(value, device=buf.device).detach().double()
            if value.dim() == 0:  # one value for every token of those rows
                value = value.expand(len(row_list), T)
            if value.dim() != 2 or tuple(value.shape) != (len(row_list), T):
                raise EntropyLabError(
                    f"annotation {key!r} must be (rows, T) = ({len(row_list)}, {T}) "
                    f"or a scalar, got {tuple(value.shape)}"
                )
            buf[idx] = value[local, tok.t_idx[idx]]

    def get(self, key: str, default: torch.Tensor | float) -> torch.Tensor:
        """(n,) float64: the annotated values, ``default`` where none was given."""
        n, dev = self.tokens.n, self.tokens.device
        fill = torch.as_tensor(default, dtype=torch.float64, device=dev).expand(n)
        buf = self.values.get(key)
        return fill.clone() if buf is None else torch.where(torch.isnan(buf), fill, buf)
