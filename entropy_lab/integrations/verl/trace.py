"""Trace a verl actor update with ``EntropyTracer``, into the project's run layout.

verl 0.9's actor update is ``TrainingWorker.train_batch(data)``: one mini-batch, its
micro-batches' forward/backward through the engine, then one optimizer step. This module
turns the actor's no-padding batch (``left_right_2_no_padding`` output) into the tracer's
(B, L) tensors and runs ``train_batch`` inside ``tracer.step``::

    run = VerlTraceRun("runs/verl-steer", verl_config=OmegaConf.to_container(cfg))
    for step, data in enumerate(mini_batches):
        output = run.train_batch(worker, data, step=step)   # traced when step % every == 0

Layout: row b of the tracer's ``input_ids`` is sequence b of the batch, its prompt and
response tokens left-aligned and right-padded: the layout verl's FSDP engine forwards with
``use_remove_padding=False``. The engine's training forwards are then recognised by content
and give the pre-update logits; with remove-padding (packed (1, total) forwards) the tracer
should take them from one no-grad forward of its own when the optimizer steps (one forward
more, no ``logit-grad`` estimator); that path is not tested.

Simplifications:
- Records are annotated with verl's advantages and old log-probs; clip indicator,
  intervention weight and normaliser keep the tracer's defaults (1, 1, response tokens of
  the global batch = verl's token-mean).
- The tracer measures the model's own distribution (temperature 1); verl's loss divides the
  logits by ``temperature``: trace runs with rollout temperature 1.
- With data parallelism (dp > 1) each rank traces its own shard; the tracer detects the
  process group (``entropy_lab.trace.distributed``) and keeps its forwards collective-safe.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import torch

from entropy_lab.config import TrainConfig
from entropy_lab.errors import EntropyLabError
from entropy_lab.runs import RunDir, write_parquet_atomic
from entropy_lab.trace.tracer import EntropyTracer


def tracer_inputs(data: Any, pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """verl actor batch (no-padding) -> ``EntropyTracer.step`` arguments, every tensor (B, L).

    Needs the keys the actor update has: nested ``input_ids`` and ``position_ids``, padded
    ``prompts``, ``attention_mask`` (B, P + R), ``response_mask``, ``advantages`` and
    ``old_log_probs`` (B, R).
    """
    for key in ("input_ids", "prompts", "attention_mask", "response_mask", "advantages", "old_log_probs"):
        if key not in data.keys():
            raise EntropyLabError(
                f"verl actor batch has no {key!r}; trace the batch that train_batch receives"
            )
    input_ids = data["input_ids"]
    if not input_ids.is_nested:
        raise EntropyLabError(
            "tracer_inputs expects verl's no-padding batch (left_right_2_no_padding output)"
        )
    lengths = input_ids.offsets().diff()  # (B,)
    B, L = len(lengths), int(lengths.max())
    ids = torch.nested.to_padded_tensor(input_ids, padding=pad_token_id, output_size=(B, L))  # (B, L)
    columns = torch.arange(L, device=ids.device)
    attention = (columns[None, :] < lengths[:, None]).long()  # (B, L)
    P = data["prompts"].shape[1]
    prompt_lens = data["attention_mask"][:, :P].sum(-1)  # (B,)
    resp = data["response_mask"]  # (B, R)
    in_seq = (
        torch.arange(resp.shape[1], device=ids.device)[None, :] < (lengths - prompt_lens)[:, None]
    )  # (B, R)
    b, r = in_seq.nonzero(as_tuple=True)
    col = prompt_lens[b] + r  # response token r of row b sits at column prompt_len_b + r

    def place(x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(B, L, dtype=torch.float32, device=ids.device)  # (B, L)
        out[b, col] = x[b, r].float()
        return out

    response_mask = place(resp).long()
    out = {
        "input_ids": ids,
        "attention_mask": attention,
        "response_mask": response_mask,
        "advantages": place(data["advantages"]),
        "old_logprobs": place(data["old_log_probs"]),
    }
    if "position_ids" in data.keys() and data["position_ids"].is_nested and data["position_ids"].dim() == 2:
        out["position_ids"] = torch.nested.to_padded_tensor(
            data["position_ids"], padding=0, output_size=(B, L)
        )
    return out


class VerlTraceRun:
    """A run directory fed by traced verl actor updates (config.json, traces/, metrics.parquet).

    Args:
        path: the run directory (created; an existing run is refused unless ``overwrite``).
        verl_config: verl's configuration as a plain dict, stored in config.json under ``verl``.
        method: the entropy-lab method the verl loss runs (recorded as ``config.method``).
        every: trace every k-th call of ``train_batch`` (0: never).
        max_positions: as ``EntropyTracer`` (all response tokens by default).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        verl_config: dict | None = None,
        method: str = "grpo",
        every: int = 1,
        max_positions: int | float | None = None,
        overwrite: bool = False,
    ):
        self.run = RunDir(Path(path))
        self.cfg = TrainConfig(method=method, trace_every=every)
        self.run.create(self.cfg, overwrite=overwrite, extra={"engine": "verl", "verl": verl_config or {}})
        self.every, self.max_positions = every, max_positions
        self.metrics: list[dict] = []
        self._tracer: EntropyTracer | None = None

    def _tracer_for(self, model) -> EntropyTracer:
        if self._tracer is None or self._tracer.model is not model:
            self._tracer = EntropyTracer(
                model, max_positions=self.max_positions, config={"engine": "verl", **self.cfg.to_dict()}
            )
        return self._tracer

    def train_batch(self, worker: Any, data: Any, *, step: int, pad_token_id: int = 0):
        """``worker.train_batch(data)``, traced when ``step % every == 0``; returns verl's output."""
        traced = self.every > 0 and step % self.every == 0
        if not traced:
            output = worker.train_batch(data)
        else:
            module = worker.engine.module
            device = next(module.parameters()).device  # the batch may still be on the host
            inputs: dict[str, Any] = {k: v.to(device) for k, v in tracer_inputs(data, pad_token_id).items()}
            position_ids = inputs.pop("position_ids", None)
            tracer = self._tracer_for(module)
            fwd = {} if position_ids is None else {"position_ids": position_ids}
            with tracer.step(**inputs, step=step, forward_kwargs=fwd) as st:
                output = worker.train_batch(data)
            self.run.traces_dir.mkdir(exist_ok=True)
            st.save(self.run.trace_path(step))
        row: dict[str, Any] = {"step": step, "traced": traced}
        metrics = output.get("metrics", None) if output is not None else None
        if metrics is not None:
            metrics = metrics.data if hasattr(metrics, "data") else metrics
            row.update({k: float(v) for k, v in dict(metrics).items() if isinstance(v, int | float)})
        if traced:
            rec = st.records
            assert rec is not None  # the traced block has finished
            row.update(
                {
                    "entropy/before": float(rec.entropy_before.mean()),
                    "entropy/delta": float(rec.delta_entropy.mean()),
                }
            )
        self.metrics.append(row)
        write_parquet_atomic(pd.DataFrame(self.metrics), self.run.metrics_path)
        return output
