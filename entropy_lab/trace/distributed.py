"""The tracer under torch.distributed data parallelism (DDP, FSDP2 ``fully_shard``).

Each rank traces the rows of its own shard of the global batch and holds the pre-update
logits of its own traced tokens only, so tracer memory per rank is bounded by its shard.
``EntropyTracer(distributed=None)`` turns this on when a process group with more than one
rank is initialised (``True`` requires one, ``False`` never). What changes:

- Collective-safe forwards. Under FSDP every forward of the root module all-gathers
  parameters, a collective, so every rank must run the same number of forwards. The
  tracer's own forwards all-reduce (max) their number of chunks and ranks with fewer run
  dummy forwards over one of their rows (output discarded); the pre-update fill at the
  optimizer step runs on every rank, even where nothing is missing.
- Global quantities, so that the records equal those of one process tracing the global
  batch with the same (averaged) update:
  - default normaliser: response tokens of the *global* batch (token-mean over it);
  - ``logit-grad``: the local dLoss/dz divided by the world size, because DDP and FSDP
    average gradients across ranks (each rank's loss must then be its part of the global
    loss times the world size, as verl's ``agg_loss`` with ``dp_size`` does);
  - ``covariance``: batch means over the traced tokens of all ranks.
- A ``rank`` column in the records.

Every collective is on the default process group and runs on the device of the batch
(use CUDA tensors with NCCL). Simplification: every rank needs at least one response token.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
import torch.distributed as dist

from entropy_lab.errors import EntropyLabError


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the default process group."""

    rank: int
    world_size: int

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        """Element-wise sum over ranks (float64)."""
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def max(self, value: int, device: torch.device) -> int:
        """Maximum over ranks."""
        t = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())


def detect(option: bool | None) -> DistInfo | None:
    """DistInfo when tracing is distributed: ``option`` True / False, or None to detect it."""
    if option is False:
        return None
    ready = dist.is_available() and dist.is_initialized()
    if option is True and not ready:
        raise EntropyLabError(
            "EntropyTracer(distributed=True) needs an initialised process group: call torch.distributed.init_process_group first"
        )
    if not ready or (option is None and dist.get_world_size() == 1):
        return None
    return DistInfo(dist.get_rank(), dist.get_world_size())


def global_records(records: pd.DataFrame, info: DistInfo, device: torch.device) -> pd.DataFrame:
    """Add ``rank``; recompute ``omega_covariance`` with batch means over every rank's traced tokens.

    Same formula as the ``covariance`` estimator: -lr (log pi_a - mean log pi)(A - mean A) / N.
    """
    records = records.copy()
    records.insert(0, "rank", info.rank)
    lp, adv = records["logprob"], records["advantage"]
    total_lp, total_adv, count = info.sum([float(lp.sum()), float(adv.sum()), float(len(records))], device)
    if "omega_covariance" in records:
        mean_lp, mean_adv = total_lp / count, total_adv / count
        records["omega_covariance"] = (
            -records["lr"] * (lp - mean_lp) * (adv - mean_adv) / records["normalizer"]
        )
    return records
