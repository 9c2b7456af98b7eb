"""Builds the trace records of one traced step: its per-token tensors in, the record DataFrame out.

The columns are those of the record contract (``entropy_lab.records``) with the
predicted ones taken from the estimator registry: every registered estimator whose
required inputs are present gets its ``omega_*`` column, in registration order. It lives
apart from ``entropy_lab.records`` so that reading records never imports torch.
"""

from __future__ import annotations

import pandas as pd
import torch

from entropy_lab.records import COLUMN_GROUPS, INT_COLUMNS
from entropy_lab.stats import TokenStats
from entropy_lab.theory import ESTIMATORS, TokenQuantities, predict_all
from entropy_lab.trace.rows import Annotations, TracedTokens

BASE_COLUMNS: tuple[str, ...] = tuple(
    c for group, cols in COLUMN_GROUPS.items() if group != "predicted" for c in cols
)
"""Every contract column but the predicted ones, in contract order."""


def build_records(
    tokens: TracedTokens,
    annotations: Annotations,
    pre: TokenStats,
    logit_grad_dot: torch.Tensor,
    entropy_after: torch.Tensor,
    linear: torch.Tensor,
    *,
    lr: float | None,
    step: int,
    update: int,
    inputs: dict[str, torch.Tensor] | None = None,
    default_normalizer: float | None = None,
) -> pd.DataFrame:
    """One row per traced token.

    Args:
        tokens, annotations: the traced tokens and the objective terms the loop reported.
        pre: pre-update entropy, log-prob and collision, each (n,).
        logit_grad_dot: (n,) sum_k pi_k l_k g_k, NaN where no gradient was captured.
        entropy_after, linear: (n,) post-update entropy and first-order change in the actual logit change.
        lr: the step's learning rate (NaN in the records when unknown).
        step, update: the record's ``step`` and ``update``.
        inputs: further per-token inputs (n,) for estimators that require them.
        default_normalizer: N where the loop annotated none (default: the batch's response tokens).
    """
    n = tokens.n
    assert pre.logprob is not None, "pre-update statistics are computed with the traced targets"
    logprob = pre.logprob.double()  # (n,)
    lr_value = float("nan") if lr is None else float(lr)
    nan = torch.full((n,), float("nan"), dtype=torch.float64, device=tokens.device)  # (n,)
    # (n,) the advantage used: annotated, else the one given to step(), else NaN
    advantage = annotations.get("advantage", tokens.advantage if tokens.advantage is not None else nan)
    q = TokenQuantities(
        logprob=logprob,
        entropy=pre.entropy.double(),
        collision=pre.collision.double(),
        advantage=advantage,
        old_logprob=tokens.old_logprob if tokens.old_logprob is not None else logprob,
        clip_indicator=annotations.get("clip_indicator", 1.0),
        intervention_weight=annotations.get("intervention_weight", 1.0),
        normalizer=annotations.get(
            "normalizer", tokens.n_response_tokens if default_normalizer is None else default_normalizer
        ),
        lr=lr_value,
        logit_grad_dot=logit_grad_dot,
        inputs=dict(inputs or {}),
    )
    omegas = predict_all(q)  # estimator name -> (n,)
    cols = {  # column -> (n,) tensor, one value per traced token
        "step": torch.full((n,), step),  # int64, like update, sample, position, token_id
        "update": torch.full((n,), update),
        "sample": tokens.b_idx,
        "position": tokens.t_idx,
        "token_id": tokens.targets,
        "advantage": q.advantage,
        "ratio": q.ratio,
        "clip_indicator": q.clip_indicator,
        "intervention_weight": q.intervention_weight,
        "normalizer": q.normalizer,
        "weight": q.weight,
        "lr": torch.full((n,), lr_value, dtype=torch.float64),
        "prob": q.prob,
        "logprob": logprob,
        "surprisal": -logprob,
        "entropy_before": q.entropy,
        "entropy_after": entropy_after,
        "collision": q.collision,
        "delta_entropy": entropy_after - q.entropy,
        "delta_logit_linear": linear,
    }
    cols.update({ESTIMATORS[name].column: omega for name, omega in omegas.items()})
    # n rows: the contract columns in contract order, then one omega_* per computed estimator
    for k in INT_COLUMNS:  # int64 before the frame is built: DataFrame.astype costs milliseconds per step
        cols[k] = cols[k].long()
    return pd.DataFrame(
        {k: _numpy(cols[k]) for k in (*BASE_COLUMNS, *(ESTIMATORS[m].column for m in omegas))}
    )


def _numpy(x: torch.Tensor | float):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x
