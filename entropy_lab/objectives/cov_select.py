"""Clip-Cov's and KL-Cov's token selection over a whole optimizer step: micro-batches and ranks.

The methods define their tokens over the training batch of one update: cov_t = (logp_t - mean
logp)(A_t - mean A) with the means over every valid token of the step, Clip-Cov detaching a
random max(1, int(ratio N)) of the unclipped tokens with lb < cov < ub and KL-Cov penalising
the top max(1, int(ratio N)) by cov, N the step's valid tokens. The per-call selection of the
reference code (``cov_selection="per-call"``) takes the means, N and the draw over one loss
call, i.e. one micro-batch of one rank.

``select_tokens(parts, cfg, generator, group)`` takes this rank's micro-batches of the step,
(B_m, T) tensors each, in row order; with torch.distributed the ranks' parts are joined in rank
order (one all-reduce of the sums, one all-gather of the band sizes or covariance values), so
the selected tokens are exactly those of one process holding the whole batch in that order,
drawn with the same generator state on every rank. Everything is computed in float64.

Deliberate simplification: all covariance values are all-gathered for KL-Cov (one float per
valid token of the step), not only each rank's top k.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from entropy_lab.config import TrainConfig
from entropy_lab.objectives.core import ppo_clip

COV_OBJECTIVES = ("clip-cov", "kl-cov")
"""Objectives whose tokens ``cov_selection`` chooses."""


def uses_global_selection(cfg: TrainConfig) -> bool:
    """Whether ``cfg``'s objective selects its tokens over the whole step (``cov_selection='global'``)."""
    return cfg.objective in COV_OBJECTIVES and cfg.cov_selection == "global"


def _world(group) -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def _gather_sizes(n: int, device, group) -> list[int]:
    rank, world = _world(group)
    if world == 1:
        return [n]
    t = torch.tensor([n], dtype=torch.int64, device=device)
    out = [torch.zeros_like(t) for _ in range(world)]
    dist.all_gather(out, t, group=group)
    return [int(x) for x in out]


def _gather_values(x: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    """Every rank's (n_r,) float64 values joined in rank order (padded to the largest for all_gather)."""
    if len(sizes) == 1:
        return x
    padded = torch.zeros(max(sizes), dtype=x.dtype, device=x.device)
    padded[: len(x)] = x
    out = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(out, padded, group=group)
    return torch.cat([o[:n] for o, n in zip(out, sizes, strict=True)])


def select_tokens(
    parts: list[dict[str, torch.Tensor]],
    cfg: TrainConfig,
    generator: torch.Generator | None = None,
    group=None,
) -> list[torch.Tensor]:
    """The (B_m, T) bool tokens each part selects (detached for Clip-Cov, penalised for KL-Cov).

    Args:
        parts: this rank's micro-batches of the step in row order, each a dict of (B_m, T) tensors
            ``logprob`` (current, detached here), ``old_logprob``, ``advantages``, ``mask``.
        cfg: the configuration (objective clip-cov or kl-cov and their parameters).
        generator: Clip-Cov's draw; the same state on every rank.
        group: the torch.distributed process group (None: the default one, if initialised).
    """
    rank, world = _world(group)
    valid = [p["mask"] > 0 for p in parts]  # (B_m, T) each
    lp = torch.cat([p["logprob"].detach()[v].double() for p, v in zip(parts, valid, strict=True)])  # (n,)
    a = torch.cat([p["advantages"].detach()[v].double() for p, v in zip(parts, valid, strict=True)])  # (n,)
    sums = torch.stack(
        [lp.sum(), a.sum(), torch.tensor(float(len(lp)), dtype=torch.float64, device=lp.device)]
    )
    if world > 1:
        dist.all_reduce(sums, group=group)
    n_global = int(sums[2])
    if n_global == 0:
        return [torch.zeros_like(v) for v in valid]
    cov = (lp - sums[0] / n_global) * (a - sums[1] / n_global)  # (n,)
    sizes = _gather_sizes(len(lp), lp.device, group)
    if cfg.objective == "clip-cov":
        unclipped = torch.cat(
            [
                ppo_clip(p["logprob"].detach(), p["old_logprob"], p["advantages"], cfg).clip_indicator[v] > 0
                for p, v in zip(parts, valid, strict=True)
            ]
        )  # (n,)
        band = unclipped & (cov > cfg.clip_cov_lb) & (cov < cfg.clip_cov_ub)  # (n,)
        local = band.nonzero().squeeze(-1)  # (n_band,) positions among this rank's valid tokens
        band_sizes = _gather_sizes(len(local), lp.device, group)
        offset = sum(band_sizes[:rank])
        n_pick = max(1, int(cfg.clip_cov_ratio * n_global))
        dev = generator.device if generator is not None else "cpu"
        perm = torch.randperm(sum(band_sizes), generator=generator, device=dev)[:n_pick].to(lp.device)
        mine = perm[(perm >= offset) & (perm < offset + len(local))] - offset
        chosen_local = local[mine]
    else:
        all_cov = _gather_values(cov, sizes, group)  # (N,) in rank order
        k = max(1, int(cfg.kl_cov_ratio * n_global))
        top = torch.topk(all_cov, min(k, n_global)).indices
        offset = sum(sizes[:rank])
        chosen_local = top[(top >= offset) & (top < offset + len(lp))] - offset
    flat = torch.zeros(len(lp), dtype=torch.bool, device=lp.device)
    flat[chosen_local] = True
    out, start = [], 0
    for v in valid:
        sel = torch.zeros_like(v)
        n = int(v.sum())
        sel[v] = flat[start : start + n]
        out.append(sel)
        start += n
    return out
