"""The coupling study: why the tabular closed forms lose their grip as an update grows.

The estimators of ``entropy_lab.theory`` model one plain SGD step on free logits per state.
In a network every token's logits move with every parameter, so the gradients of the
*other* tokens in an update move a token's logits too (coupling, itself first order in the
learning rate), and Adam rescales the step per parameter. Both grow with the number of
tokens that share one update. This study measures it on the built-in policy:

1. one rollout batch of the task under the policy (the cached warm start by default),
   with GRPO advantages;
2. for every optimizer (SGD, AdamW), learning rate and number of tokens per update k,
   updates from the same starting parameters, each on k tokens drawn from the batch's
   tokens with nonzero advantage (the PPO/GRPO objective of the trainer, token-mean), each
   traced by ``EntropyTracer``; a fresh optimizer per update (its first step);
3. per setting, every estimator's tightness (``analyses.tightness.fit_statistics``: Pearson,
   gain, ...) pooled over the setting's traced tokens, and the decomposition's coupling and
   curvature shares.

Deliberate simplifications:

- Small updates are repeated on disjoint token sets (drawn again once the batch's tokens
  are used up) until a setting has traced at least ``min_tokens`` tokens, so Pearson over
  single-token updates is defined; every setting at one k uses the same token sets.
- Tokens with zero advantage carry no gradient and are left out of every update (in a
  full-batch update they would only be moved by coupling, every estimator predicting 0).
- Gradient clipping is off and weight decay is 0: the step is the optimizer's own.
- The updates run in float64 by default (the rollout is sampled in float32), so that
  round-off does not masquerade as a loss of tightness at small learning rates. float64 end
  to end: the float32 ops of Llama-family norms and rotary embeddings are replaced for the
  study's duration (``entropy_lab.studies.float64.true_float64``); the study checks one
  forward for ops still below float64 and warns, naming them, if any remain.
- The network's own first order (``omega_jvp`` and its entropy form) is included unless
  ``jvp=False``.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from entropy_lab import models
from entropy_lab.analyses.decomposition import decomposition_summary
from entropy_lab.analyses.tightness import MEASURED, as_float, default_noise_floor, fit_statistics
from entropy_lab.config import TrainConfig
from entropy_lab.errors import EntropyLabError, EntropyLabWarning
from entropy_lab.objectives import LossInputs, compute_loss
from entropy_lab.optim import OPTIMIZERS, build_optimizer
from entropy_lab.run_files import FIGURE_SUFFIXES, check_replaceable, record_written
from entropy_lab.runs import write_parquet_atomic, write_text_atomic
from entropy_lab.runtime import pick_device
from entropy_lab.stats import gather_logprobs
from entropy_lab.studies.float64 import reduced_precision_ops, true_float64
from entropy_lab.trace.tracer import EntropyTracer

Callback = Callable[[str, dict], None]
SETTING_COLUMNS = ["optimizer", "lr", "tokens_per_update"]
TABLE_NAME = "coupling_study"
FIGURE_ESTIMATORS = ("paper", "sampled-logit", "logit-grad", "covariance", "jvp", "jvp-entropy")
"""Estimators drawn in the figure when present (``softmax`` equals ``logit-grad`` for this loss)."""
DTYPES = {"float64": torch.float64, "float32": torch.float32}


@dataclass
class CouplingStudyConfig:
    """Settings of the coupling study; the defaults take a few minutes on 2 CPU cores."""

    tokens_per_update: tuple[int, ...] = (1, 4, 16, 64, 256, 1024, 0)
    """Tokens sharing one update; 0 = every token of the batch with nonzero advantage."""
    lrs: dict[str, tuple[float, ...]] = field(
        default_factory=lambda: {"sgd": (0.1, 1.0, 10.0), "adamw": (1e-5, 1e-4, 1e-3)}
    )
    """Optimizer name (``entropy_lab.optim.OPTIMIZERS``) -> learning rates to sweep."""
    min_tokens: int = 256
    """Traced tokens per setting at least: updates smaller than this are repeated."""
    task: str = "countdown"
    """Built-in task the rollout batch is drawn from."""
    model: str | None = None
    """Any ``--model`` form (``entropy_lab.model_sources``); None = the task's cached warm start."""
    prompts: int = 32
    """Prompts in the rollout batch (the trainer's default ``prompts_per_step``)."""
    samples_per_prompt: int = 8
    """Responses per prompt (GRPO group size)."""
    max_new_tokens: int = 16
    """Response length limit of the rollout."""
    dtype: str = "float64"
    """Precision of the traced updates: float64 (default) or float32."""
    jvp: bool = True
    """Trace the network's own first order when the installed tracer supports it."""
    seed: int = 0
    """Seed of the rollout and of the token draws."""
    device: str = "cpu"
    """cpu, cuda or auto."""

    def __post_init__(self):
        if not self.tokens_per_update or any(int(k) < 0 for k in self.tokens_per_update):
            raise EntropyLabError("tokens_per_update needs counts >= 1, or 0 for the full batch")
        for name, lrs in self.lrs.items():
            if name not in OPTIMIZERS:
                raise EntropyLabError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")
            if not lrs or any(not lr > 0 for lr in lrs):
                raise EntropyLabError(f"learning rates of {name} must be positive, got {lrs}")
        if self.dtype not in DTYPES:
            raise EntropyLabError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.min_tokens < 1 or self.prompts < 1 or self.samples_per_prompt < 2:
            raise EntropyLabError(
                "min_tokens and prompts must be >= 1, samples_per_prompt >= 2 (GRPO groups)"
            )


@dataclass
class StudyBatch:
    """The rollout batch every update draws its tokens from."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    position_ids: torch.Tensor  # (B, T)
    advantages: torch.Tensor  # (B, T) sequence advantage on response tokens, 0 elsewhere
    old_logprob: torch.Tensor  # (B, T) log pi(token) under the starting parameters
    rows: torch.Tensor  # (n,) batch row of each candidate token (nonzero advantage)
    positions: torch.Tensor  # (n,) its position


def load_policy_and_task(cfg: CouplingStudyConfig, callback: Callback | None = None):
    """(model, tokenizer, task) on the CPU (``draw_batch`` moves the model): the given model
    directory, else the task's warm start (``models.load_policy_and_task``, told ``callback``)."""
    loaded = models.load_policy_and_task(
        TrainConfig(task=cfg.task, model=cfg.model), torch.device("cpu"), callback
    )
    return loaded.model, loaded.tokenizer, loaded.task


def draw_batch(model, tokenizer, task, cfg: CouplingStudyConfig, device: torch.device) -> StudyBatch:
    """Sample the rollout, score it and compute GRPO advantages and the starting log-probs."""
    from entropy_lab.advantages import advantages_for_config
    from entropy_lab.rollout import response_stats, rewards_of, sample

    problems = task.sample(cfg.prompts, np.random.default_rng(cfg.seed))
    model.to(device=device, dtype=torch.float32)
    with torch.random.fork_rng(
        devices=[device] if device.type == "cuda" else []
    ):  # the caller's RNG is left alone
        torch.manual_seed(cfg.seed)
        ro = sample(model, tokenizer, problems, cfg.samples_per_prompt, max_new_tokens=cfg.max_new_tokens)
    rewards = rewards_of(task, problems, ro).float()  # (B,)
    adv = advantages_for_config(rewards.view(cfg.prompts, cfg.samples_per_prompt), TrainConfig())
    adv_tok = adv.reshape(-1).to(device)[:, None] * ro.response_mask  # (B, T)
    model.to(dtype=DTYPES[cfg.dtype])
    old = response_stats(model, ro)["logprob"]  # (B, T), in the study's precision
    rows, positions = ((adv_tok != 0) & ro.response_mask.bool()).nonzero(as_tuple=True)
    if len(rows) == 0:
        raise EntropyLabError(
            "every sampled group scored all-equal rewards, so no token carries gradient: "
            "raise --prompts or use a policy that solves some of the task"
        )
    return StudyBatch(
        ro.input_ids, ro.attention_mask, ro.position_ids, adv_tok.to(old.dtype), old, rows, positions
    )


def token_sets(n_candidates: int, sizes, min_tokens: int, seed: int) -> dict[int, list[torch.Tensor]]:
    """Per update size k, the candidate-token index sets of its updates.

    k = 0 (or k >= n_candidates) is one update on every candidate. Otherwise
    ceil(min_tokens / k) updates on disjoint random sets, a fresh permutation once the
    candidates run out.
    """
    gen = torch.Generator().manual_seed(seed)
    out: dict[int, list[torch.Tensor]] = {}
    for k in sizes:
        k = int(k)
        if k == 0 or k >= n_candidates:
            out[n_candidates] = [torch.arange(n_candidates)]
            continue
        sets, perm, at = [], torch.randperm(n_candidates, generator=gen), 0
        for _ in range(math.ceil(min_tokens / k)):
            if at + k > n_candidates:
                perm, at = torch.randperm(n_candidates, generator=gen), 0
            sets.append(perm[at : at + k].sort().values)
            at += k
        out[k] = sets
    return dict(sorted(out.items()))


def traced_update(model, tracer, batch: StudyBatch, tokens: torch.Tensor, optimizer, update: int):
    """One traced optimizer step of the GRPO objective on candidate tokens ``tokens``; its records."""
    rows, local = batch.rows[tokens].unique(return_inverse=True)  # (r,), (k,)
    mask = torch.zeros(len(rows), batch.input_ids.shape[1], dtype=batch.old_logprob.dtype)  # (r, T)
    mask[local, batch.positions[tokens]] = 1.0
    inputs = dict(
        input_ids=batch.input_ids[rows],
        attention_mask=batch.attention_mask[rows],
        position_ids=batch.position_ids[rows],
    )
    with tracer.step(
        inputs["input_ids"],
        inputs["attention_mask"],
        mask,
        advantages=batch.advantages[rows],
        old_logprobs=batch.old_logprob[rows],
        update=update,
        forward_kwargs={"position_ids": inputs["position_ids"]},
    ) as step:
        optimizer.zero_grad(set_to_none=True)
        logits = model(**inputs).logits  # (r, T, V)
        pad = torch.zeros(len(rows), 1, dtype=logits.dtype)
        logprob = torch.cat([pad, gather_logprobs(logits[:, :-1], inputs["input_ids"][:, 1:])], 1)  # (r, T)
        out = compute_loss(
            LossInputs(
                logprob=logprob,
                old_logprob=batch.old_logprob[rows],
                advantages=batch.advantages[rows],
                mask=mask,
            ),
            TrainConfig(),
        )
        out.loss.backward()
        step.annotate(
            clip_indicator=out.clip_indicator,
            intervention_weight=out.intervention_weight,
            normalizer=out.normalizer,
            advantage=out.advantage,
        )
        optimizer.step()
    return step.records


def run_coupling_study(cfg: CouplingStudyConfig, callback: Callback | None = None) -> pd.DataFrame:
    """Trace every update of the study; one row per traced token.

    Returns the trace records (``entropy_lab.records`` columns, plus the opt-in ``omega_jvp*``
    columns when traced) with the setting in front: ``optimizer``, ``lr``,
    ``tokens_per_update``; ``update`` numbers the updates of a setting.
    """
    callback = callback or (lambda event, info: None)
    device = pick_device(cfg.device)
    model, tokenizer, task = load_policy_and_task(cfg, callback)
    with contextlib.ExitStack() as stack:
        if cfg.dtype == "float64":
            stack.enter_context(true_float64(model))
        batch = draw_batch(model, tokenizer, task, cfg, device)
        if cfg.dtype == "float64":
            check_float64(model, batch)
        return _run_updates(model, batch, cfg, callback)


def check_float64(model, batch: StudyBatch) -> list[str]:
    """The ops of one float64 forward (first two sequences) still below float64; warns when any remain."""
    ops = reduced_precision_ops(
        model,
        input_ids=batch.input_ids[:2],
        attention_mask=batch.attention_mask[:2],
        position_ids=batch.position_ids[:2],
    )
    if ops:
        names = sorted(set(ops))
        warnings.warn(
            f"the coupling study's float64 forward still computes {len(ops)} op(s) below float64 "
            f"({', '.join(names[:5])}{' ...' if len(names) > 5 else ''}); its round-off is that of those ops",
            EntropyLabWarning,
            stacklevel=3,
        )
    return ops


def _run_updates(model, batch: StudyBatch, cfg: CouplingStudyConfig, callback: Callback) -> pd.DataFrame:
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sets = token_sets(len(batch.rows), cfg.tokens_per_update, cfg.min_tokens, cfg.seed)
    jvp = cfg.jvp
    tracer = EntropyTracer(model, jvp=jvp)
    total = sum(len(v) for v in sets.values()) * sum(len(v) for v in cfg.lrs.values())
    callback(
        "start",
        {"total": total, "candidates": len(batch.rows), "sequences": len(batch.input_ids), "jvp": jvp},
    )
    frames, done = [], 0
    for name, lrs in cfg.lrs.items():
        for lr in lrs:
            settings = TrainConfig(optimizer=name, lr=float(lr), weight_decay=0.0)
            for k, token_sets_k in sets.items():
                for update, tokens in enumerate(token_sets_k):
                    model.load_state_dict(start)  # every update starts from the same parameters
                    optimizer = build_optimizer(model.parameters(), settings)
                    records = traced_update(model, tracer, batch, tokens, optimizer, update)
                    # the records' own lr column is the rate the optimizer applied: it stays
                    setting = {"optimizer": name, "tokens_per_update": k}
                    frames.append(records.assign(**setting, lr=float(lr)))
                    done += 1
                    callback("update", {"done": done, "total": total, "setting": f"{name} lr={lr:g} k={k}"})
    model.load_state_dict(start)
    callback("end", {"total": total})
    records = pd.concat(frames, ignore_index=True)
    return records[SETTING_COLUMNS + [c for c in records.columns if c not in SETTING_COLUMNS]]


def study_table(records: pd.DataFrame) -> pd.DataFrame:
    """Tightness per setting and estimator, pooled over the setting's traced tokens.

    Returns:
        One row per (``optimizer``, ``lr``, ``tokens_per_update``) and estimator (every
        ``omega_*`` column with a finite value): ``updates``, ``estimator``, the statistics of
        ``fit_statistics`` (``n``, ``pearson``, ``spearman``, ``sign_agreement``, ``gain``,
        ``r2`` ...), and per setting the decomposition's ``split``, ``coupling_share`` and
        ``coupling_share_calibrated`` (tabular base ``logit-grad``, calibrated by one gain per
        setting; with ``omega_jvp`` the coupling is omega_jvp minus it) and ``curvature_share``.
    """
    columns = [c for c in records.columns if str(c).startswith("omega_")]
    rows = []
    for setting, group in records.groupby(SETTING_COLUMNS, sort=False):
        floor = default_noise_floor(as_float(group[MEASURED]))
        # One gain per setting (all its updates share lr, k and the start), not per update:
        # with one token per update a per-update gain would fit every token exactly.
        parts = decomposition_summary(group.drop(columns=[*SETTING_COLUMNS, "update"]), by=())
        parts = parts.set_index("part")
        shared = {
            **dict(zip(SETTING_COLUMNS, setting, strict=True)),
            "updates": group["update"].nunique(),
        }
        decomposition = {
            "split": parts["split"].iloc[0],
            "coupling_share": parts.loc["coupling", "share"],
            "coupling_share_calibrated": parts.loc["coupling", "share_calibrated"],
            "curvature_share": parts.loc["curvature", "share"],
        }
        for column in columns:
            measured, predicted = as_float(group[MEASURED]), as_float(group[column])
            ok = np.isfinite(measured) & np.isfinite(predicted)
            if not ok.any():
                continue
            stats = fit_statistics(measured[ok], predicted[ok], floor)
            name = column.removeprefix("omega_").replace("_", "-")
            rows.append({**shared, "estimator": name, **stats, **decomposition})
    return pd.DataFrame(rows)


WIDE_ESTIMATORS = ("paper", "logit-grad", "jvp", "jvp-entropy")
"""Estimators of the printed table (``softmax`` equals ``logit-grad`` for this loss)."""


def wide_table(table: pd.DataFrame, estimators=WIDE_ESTIMATORS) -> pd.DataFrame:
    """One row per setting, in the study's order: Pearson (r), Spearman (rho) and gain (g) of each
    estimator side by side, and the calibrated coupling share."""
    present = [e for e in estimators if e in set(table["estimator"])]
    index = [*SETTING_COLUMNS, "updates"]
    order = table[index].drop_duplicates()
    parts = [
        table.pivot_table(index=index, columns="estimator", values=value)[present].add_prefix(prefix)
        for value, prefix in (("pearson", "r "), ("spearman", "rho "), ("gain", "g "))
    ]
    parts.append(table.groupby(index)[["coupling_share_calibrated"]].first())
    return order.merge(pd.concat(parts, axis=1).reset_index(), on=index, how="left")


def write_coupling_study(
    cfg: CouplingStudyConfig, out_dir: str | Path, callback: Callback | None = None
) -> dict[str, object]:
    """Run the study and write ``coupling_study.csv``/``.parquet`` (the table),
    ``coupling_records.parquet`` (every traced token) and ``coupling_study.png``/``.pdf``.

    Returns ``{"table": DataFrame, "wide": DataFrame, "paths": [Path, ...]}``.
    """
    from entropy_lab.figures import coupling_study_figure, save_figure

    out_dir = Path(out_dir).resolve()
    paths = [
        out_dir / f"{TABLE_NAME}.csv",
        out_dir / f"{TABLE_NAME}.parquet",
        out_dir / "coupling_records.parquet",
    ]
    # before the study runs: no file of the user's is in the way of its outputs
    check_replaceable(paths + [out_dir / f"{TABLE_NAME}{suffix}" for suffix in FIGURE_SUFFIXES])
    out_dir.mkdir(parents=True, exist_ok=True)
    records = run_coupling_study(cfg, callback)
    table = study_table(records)
    write_text_atomic(table.to_csv(index=False), paths[0])
    write_parquet_atomic(table, paths[1])
    write_parquet_atomic(records, paths[2])
    record_written(paths)
    shown = [e for e in FIGURE_ESTIMATORS if e in set(table["estimator"])]
    paths += save_figure(coupling_study_figure(table, shown), out_dir / TABLE_NAME)
    return {"table": table, "wide": wide_table(table), "paths": paths}
