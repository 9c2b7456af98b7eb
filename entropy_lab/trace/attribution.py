"""Where the predicted entropy change comes from: the jvp prediction split over parameter groups.

dz_j = J_j dtheta is linear in the step, so with dtheta split over disjoint parameter
slots (``entropy_lab.jvp.parameter_slots``: one use of a parameter each), dz_j is the sum
of the groups' J_j dtheta_group, and so is the first-order entropy change
``omega_jvp`` = -sum_k pi_k l_k dz_k: per token

    omega_jvp = sum_group attr_layer:<group>,   attr = -sum_k pi_k l_k (J dtheta restricted to the group)_k

``LayerAttributionProbe`` computes one forward-mode pass per group with the tangent
restricted to that group's slots and records the group's contribution (nats, the same
units as ``omega_jvp``) as the column ``attr_layer:<group>`` (``entropy_lab.records``).
A share is a contribution divided by ``omega_jvp``; the tables (``entropy_lab.analyses.attribution``)
compute shares from the columns, since a per-token ratio is unbounded where ``omega_jvp`` ~ 0.

Groups (``layer_group``): ``embedding`` (input embeddings), ``block<i>.attn`` and
``block<i>.mlp`` per transformer block, ``norms`` (every normalisation layer), ``lm_head``
(the output embedding, ``get_output_embeddings()``; a weight tied to the input embedding
counts here only through its output use), and ``other`` for anything else. Attribution
kinds are registered by name (``ATTRIBUTIONS``), which ``TrainConfig.trace_attribution`` names.

Deliberate simplifications: the grouping reads module names and types (Hugging Face's
``layers.<i>``/``h.<i>``/``blocks.<i>`` for blocks, ``attn``/``attention`` and
``mlp``/``ffn``/``feed_forward`` inside them); cost is one forward-mode pass per group
(2 x blocks + 3 for a transformer) that the step moves, on top of the jvp probe's own; a
group the step leaves alone (frozen parameters) gets a column of zeros, so every traced
update of a model has the same columns.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from entropy_lab.jvp import jvp_estimates, parameter_slots, tangent_of, tangent_parameters
from entropy_lab.records import attribution_column
from entropy_lab.registry import Registry
from entropy_lab.trace.probes import PreStep, PreStepProbe, ProbeResult
from entropy_lab.trace.rows import take_rows
from entropy_lab.update_predict import predict_update

BLOCK = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)(?:\.|$)")
ATTENTION = ("attn", "attention")
MLP = ("mlp", "ffn", "feed_forward")


def layer_group(model: nn.Module, slot: str, module: nn.Module) -> str:
    """The layer group of one parameter slot (``parameter_slots``): see the module docstring."""
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    if output is not None and module is output:
        return "lm_head"
    if "norm" in type(module).__name__.lower():  # RMSNorm, LayerNorm ...
        return "norms"
    block = BLOCK.search(slot)
    if block is not None:
        path = slot[block.end() :]
        kind = next(
            (k for k, keys in (("attn", ATTENTION), ("mlp", MLP)) if any(x in path for x in keys)), "other"
        )
        return f"block{block.group(1)}.{kind}"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return "other"


def layer_groups(model: nn.Module, params: set[int] | None = None) -> dict[str, list[str]]:
    """Group name -> the slot names it holds, in a fixed order (embedding, blocks, norms, lm_head, other).

    ``params`` (ids of parameters), when given, keeps only the slots of those parameters
    (the ones the step moves); groups left empty are dropped.
    """
    groups: dict[str, list[str]] = {}
    for slot, module, _, p in parameter_slots(model):
        if params is None or id(p) in params:
            groups.setdefault(layer_group(model, slot, module), []).append(slot)

    def order(name: str) -> tuple:
        block = re.fullmatch(r"block(\d+)\.(\w+)", name)
        if block:
            return (1, int(block.group(1)), ("attn", "mlp", "other").index(block.group(2)))
        return ({"embedding": 0, "norms": 2, "lm_head": 3}.get(name, 4), 0, 0)

    return {name: groups[name] for name in sorted(groups, key=order)}


@dataclass(frozen=True)
class LayerAttributionProbe:
    """``attr_layer:<group>`` columns: each parameter group's contribution to ``omega_jvp`` per token."""

    def __call__(self, pre: PreStep) -> ProbeResult:
        z_before = pre.z_before  # (n, V)
        update = predict_update(pre.optimizer)
        moving = {id(p) for p in update}
        every = pre.every_token()
        columns: dict[str, torch.Tensor] = {}
        for group, slots in layer_groups(pre.model).items():
            contribution = torch.zeros(pre.n, dtype=torch.float64, device=z_before.device)  # (n,)
            if not any(id(pre.model.get_parameter(s)) in moving for s in slots):
                columns[attribution_column("layer", group)] = contribution  # the step leaves it alone
                continue
            with tangent_parameters(pre.model, update, slots=set(slots)):
                for idx, z in pre.forward.traced_logits(every):
                    dz = tangent_of(z)  # (k, V) J . dtheta restricted to the group
                    lin, _ = jvp_estimates(take_rows(z_before, idx), dz, chunk_bytes=pre.chunk_bytes)
                    contribution[idx] = lin.double()
            columns[attribution_column("layer", group)] = contribution
        return ProbeResult(columns=columns)


ATTRIBUTIONS: Registry[Callable[[], PreStepProbe]] = Registry("attribution")
"""Attribution kind -> factory of its probe; ``TrainConfig.trace_attribution`` names one or more."""
ATTRIBUTIONS.add("layer", LayerAttributionProbe)


def parse_attribution(spec: str | None) -> tuple[str, ...]:
    """The attribution kinds of ``TrainConfig.trace_attribution`` ("none", "layer", "layer,source"), validated."""
    if spec is None or spec.strip() in ("", "none"):
        return ()
    kinds = tuple(s.strip() for s in spec.split(","))
    for kind in kinds:
        ATTRIBUTIONS[kind]  # an unknown kind: one error listing the valid ones
    return kinds


def attribution_probes(spec: str | None) -> tuple[PreStepProbe, ...]:
    """The probes of ``spec`` (see ``parse_attribution``), in its order."""
    return tuple(ATTRIBUTIONS[kind]() for kind in parse_attribution(spec))
