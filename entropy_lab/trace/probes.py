"""Measurements taken just before the optimizer step: the ``PreStepProbe`` protocol and the two built-in probes.

At the optimizer pre-step hook the parameters are untouched and the gradients final, so the
step the optimizer is about to apply can be predicted (``entropy_lab.update_predict``) and
measured along. The tracer hands each of its probes a ``PreStep`` (the model, the
optimizer, the traced tokens' pre-update logits and statistics, the tracer's own forward)
and merges the ``ProbeResult`` it returns: token inputs feed the estimators that require
them (``TraceStep.add_token_input``), columns are appended to the records as they are.

- ``JvpProbe``: one forward-mode pass over the traced rows with the update as the
  parameters' tangent (``entropy_lab.jvp.tangent_parameters``) gives J . dtheta at the traced
  tokens: the token inputs ``jvp`` and ``jvp_entropy`` (columns ``omega_jvp`` and
  ``omega_jvp_entropy``). Cost: one forward-mode pass.
- ``EtaSweepProbe``: for each multiple eta of the step, one no-grad forward with every
  parameter slot holding theta + eta dtheta (``shifted_parameters``: one shifted tensor per
  parameter, the originals put back in ``finally``; no model copy), and one forward-mode pass
  for H(z + eta J dtheta). Columns ``regime@<eta>:<quantity>`` (``entropy_lab.records``),
  tabled by ``entropy_lab.analyses.regime``. Cost: one forward per eta plus one forward-mode pass.

Deliberate simplifications: a probe sees only the first optimizer step of a traced block;
each probe predicts the update itself (it is cheap and has no side effects); per eta the
sweep records only the measured change, its first order along the actual logit change and
the jvp-entropy prediction (the other estimators are linear in the step: ``analyses.regime``
scales them by eta); eta grids are floats, so a column reads ``regime@1.0:...`` for eta 1.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from entropy_lab.errors import EntropyLabError
from entropy_lab.jvp import jvp_estimates, primal_of, tangent_of, tangent_parameters
from entropy_lab.records import COLUMNS, PREDICTED_PREFIX, regime_column
from entropy_lab.stats import TokenStats, entropy_change_stats
from entropy_lab.trace.forward import OwnForward
from entropy_lab.update_predict import Update, predict_update

DEFAULT_ETAS: tuple[float, ...] = tuple(2.0**k for k in range(-6, 2))
"""1/64, 1/32, ..., 1, 2: multiples of the actual step."""


@dataclass(frozen=True)
class PreStep:
    """What a probe is given at the optimizer pre-step hook (parameters untouched, gradients final)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    """The optimizer about to step; ``predict_update(optimizer)`` is the step it will apply."""
    before_rows: Callable[[torch.Tensor], torch.Tensor]
    """``before_rows(idx)``: the pre-update logits (c, V) of the traced tokens ``idx`` (c,)."""
    stats: TokenStats
    """Pre-update entropy, log-prob and collision of the traced tokens, (n,) each."""
    forward: OwnForward
    """The tracer's own no-grad forwards: ``forward.traced_logit_chunks(mask, chunk_bytes)`` yields
    (idx (c,), logits (c, V)) in bounded chunks, ``forward.traced_logits(mask)`` one (k, V) per forward."""
    chunk_bytes: int | None
    """The tracer's bound on one fp32 (chunk, V) temporary (None: the device default)."""

    @property
    def n(self) -> int:
        """Number of traced tokens."""
        return self.stats.entropy.shape[0]

    @property
    def z_before(self) -> torch.Tensor:
        """(n, V) pre-update logits of every traced token, formed whole: one full copy on the hidden
        path, so a probe that can work chunk by chunk reads ``before_rows`` instead."""
        return self.before_rows(torch.arange(self.n, device=self.stats.entropy.device))

    def every_token(self) -> torch.Tensor:
        """(n,) bool, all True: the mask that makes ``forward.traced_logits`` cover every traced token."""
        return torch.ones(self.n, dtype=torch.bool, device=self.stats.entropy.device)


@dataclass
class ProbeResult:
    """What a probe hands back; every tensor is (n,), in traced-token order (the records' row order)."""

    token_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    """Inputs of estimators that require them by name (``register_estimator(..., requires=...)``)."""
    columns: dict[str, torch.Tensor] = field(default_factory=dict)
    """Further record columns, appended after the estimators' in this order."""


class PreStepProbe(Protocol):
    """A measurement at the optimizer pre-step hook: ``probe(pre) -> ProbeResult``.

    It must leave the parameters as it found them; it runs once per traced step, before the update.
    """

    def __call__(self, pre: PreStep) -> ProbeResult: ...


@dataclass(frozen=True)
class JvpProbe:
    """The ``jvp`` and ``jvp_entropy`` token inputs: J . dtheta at the traced tokens, one forward-mode pass.

    ``positions``: run the pass on at most this many traced tokens, sampled uniformly (seeded by
    ``seed`` and the number of traced tokens); the others get NaN. None: every traced token.
    """

    positions: int | None = None
    seed: int = 0

    def __repr__(self) -> str:
        return (
            "JvpProbe()"
            if self.positions is None
            else f"JvpProbe(positions={self.positions}, seed={self.seed})"
        )

    def sample(self, pre: PreStep) -> torch.Tensor:
        """(n,) bool: the traced tokens the pass covers."""
        mask = pre.every_token()
        if self.positions is None or self.positions >= pre.n:
            return mask
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + pre.n)
        mask[:] = False
        mask[torch.randperm(pre.n, generator=gen)[: self.positions].to(mask.device)] = True
        return mask

    def __call__(self, pre: PreStep) -> ProbeResult:
        dev = pre.stats.entropy.device
        linear = torch.full((pre.n,), float("nan"), dtype=torch.float64, device=dev)  # (n,)
        change = torch.full((pre.n,), float("nan"), dtype=torch.float64, device=dev)  # (n,)
        update = predict_update(pre.optimizer)
        with tangent_parameters(pre.model, update):
            # On the hidden path the head runs per chunk, so no (rows, T, V) tangent exists at once.
            for idx, z in pre.forward.traced_logit_chunks(self.sample(pre), pre.chunk_bytes):
                dz = tangent_of(z)  # (c, V) J . dtheta at these traced tokens
                # The primal is the pre-update logits, computed in the same pass: no re-read.
                lin, ch = jvp_estimates(primal_of(z), dz, chunk_bytes=pre.chunk_bytes)
                linear[idx], change[idx] = lin.double(), ch.double()
        return ProbeResult(token_inputs={"jvp": linear, "jvp_entropy": change})


@contextlib.contextmanager
def shifted_parameters(model: nn.Module, update: Update, eta: float) -> Iterator[None]:
    """Inside the block (no grad), every parameter in ``update`` reads theta + eta * dtheta; restored after."""
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    shifted: dict[int, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for module in model.modules():
                for name, p in list(module._parameters.items()):
                    if p is None or p not in update:
                        continue
                    if id(p) not in shifted:  # tied parameters share one shifted tensor
                        shifted[id(p)] = p.detach() + eta * update[p].to(p.dtype)
                    swapped.append((module, name, p))
                    module._parameters[name] = shifted[id(p)]  # type: ignore[assignment]  # a plain tensor in the slot
            yield
    finally:
        for module, name, p in reversed(swapped):
            module._parameters[name] = p


@dataclass(frozen=True)
class EtaSweepProbe:
    """The traced tokens' entropy at theta + eta dtheta for each eta of ``etas``: ``regime@`` columns."""

    etas: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.etas or any(not (e > 0) for e in self.etas):
            raise EntropyLabError(
                f"the eta grid must hold positive multiples of the step, got {list(self.etas)}"
            )

    def __call__(self, pre: PreStep) -> ProbeResult:
        h_before = pre.stats.entropy.double()  # (n,)
        n, dev = pre.n, h_before.device
        every = pre.every_token()
        update = predict_update(pre.optimizer)
        cols: dict[str, torch.Tensor] = {}
        for eta in self.etas:
            h_eta = torch.empty(n, dtype=torch.float64, device=dev)  # (n,)
            lin_eta = torch.empty(n, dtype=torch.float64, device=dev)  # (n,)
            with shifted_parameters(pre.model, update, eta):
                for idx, z in pre.forward.traced_logit_chunks(every, pre.chunk_bytes):
                    h, lin, _ = entropy_change_stats(pre.before_rows(idx), z, chunk_bytes=pre.chunk_bytes)
                    h_eta[idx], lin_eta[idx] = h.double(), lin.double()
            cols[regime_column(eta, "delta_entropy")] = h_eta - h_before
            cols[regime_column(eta, "delta_logit_linear")] = lin_eta
        jvp_cols = {eta: torch.empty(n, dtype=torch.float64, device=dev) for eta in self.etas}  # (n,) each
        with tangent_parameters(pre.model, update):
            for idx, z in pre.forward.traced_logit_chunks(every, pre.chunk_bytes):
                dz, z0 = tangent_of(z), primal_of(z)  # (c, V) each
                for eta in self.etas:
                    jvp_cols[eta][idx] = jvp_estimates(z0, eta * dz)[1].double()
        for eta in self.etas:
            cols[regime_column(eta, "jvp_entropy")] = jvp_cols[eta]
        return ProbeResult(columns=cols)


def build_probes(
    jvp: bool,
    eta_grid: Sequence[float] | str | None,
    extra: Sequence[PreStepProbe] = (),
    jvp_positions: int | None = None,
    seed: int = 0,
) -> tuple[PreStepProbe, ...]:
    """A tracer's probes in the order they run: the jvp probe, the eta sweep, then ``extra``."""
    etas = parse_eta_grid(eta_grid)
    return (
        *((JvpProbe(jvp_positions, seed),) if jvp else ()),
        *((EtaSweepProbe(etas),) if etas else ()),
        *extra,
    )


def run_probes(probes: Sequence[PreStepProbe], pre: PreStep) -> ProbeResult:
    """Run ``probes`` in order on ``pre``; their results merged (a column given twice is an error).

    Args:
        probes: the probes, each called once.
        pre: what they are given.

    Returns:
        Every probe's token inputs and columns, in probe order; each column checked to be (n,)
        and new (no contract column, no ``omega_*`` column, no other probe's).
    """
    merged = ProbeResult()
    for probe in probes:
        result = probe(pre)
        merged.token_inputs.update(result.token_inputs)  # shapes checked by TraceStep.add_token_input
        for name, values in result.columns.items():
            if name in merged.columns or name in COLUMNS or name.startswith(PREDICTED_PREFIX):
                raise EntropyLabError(
                    f"probe {probe!r} returned column {name!r}, which the records already have; name it anew"
                )
            if tuple(values.shape) != (pre.n,):
                raise EntropyLabError(
                    f"probe {probe!r} returned column {name!r} with shape {tuple(values.shape)}; it must be "
                    f"(n,) = ({pre.n},), one value per traced token"
                )
            merged.columns[name] = values
    return merged


def parse_eta_grid(grid: Sequence[float] | str | None) -> tuple[float, ...]:
    """The eta grid as a tuple of floats; () for no sweep.

    Args:
        grid: multiples of the step, as numbers or as the comma-separated text of
            ``TrainConfig.trace_eta_grid`` ("0.25,0.5,1"); None or empty for no sweep.

    Returns:
        The floats in the given order (each parsed exactly as ``float`` does).
    """
    if grid is None:
        return ()
    items = [s.strip() for s in grid.split(",")] if isinstance(grid, str) else list(grid)
    if isinstance(grid, str) and items == [""]:
        return ()
    try:
        return tuple(float(e) for e in items)
    except (TypeError, ValueError):
        raise EntropyLabError(
            f"the eta grid must be numbers (or comma-separated text such as 0.25,0.5,1), got {grid!r}"
        ) from None


def format_eta_grid(etas: Sequence[float]) -> str:
    """The comma-separated text of ``TrainConfig.trace_eta_grid`` for ``etas``; ``parse_eta_grid`` reads it back exactly."""
    return ",".join(repr(float(e)) for e in etas)
