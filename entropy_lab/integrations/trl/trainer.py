"""Trace and intervene inside TRL's ``GRPOTrainer`` (TRL 1.16): ``TracedGRPOTrainer``.

    from entropy_lab.integrations.trl.trainer import TracedGRPOTrainer
    trainer = TracedGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=...,
                                trace_every=5, method="steer")   # method: optional, None keeps TRL's loss
    trainer.train()      # args.output_dir becomes an entropy-lab run directory

What it does:

- **Tracing.** Every ``trace_every``-th optimizer step runs inside ``EntropyTracer.step``. The
  step's micro-batches (gradient accumulation, TRL's generation batching, ``num_iterations``
  reuse) are prepared by TRL's own ``_prepare_inputs`` when the step's raw batches are fetched,
  so the tracer knows every row before the first forward. Each micro-batch's loss is
  annotated with what TRL's loss used per token (advantage, old log-prob, clip indicator,
  multiplier, the ``loss_type``'s normaliser, see ``losses`` and ``annotate``), so ``weight`` and the closed
  forms mean what they mean in the bundled trainer. Each rank traces its own rows; rank 0
  writes the union with a ``rank`` column to ``traces/step_XXXXXX.parquet``.
- **Logging.** With ``args.report_to`` (tensorboard, wandb, ...), each traced step's per-estimator
  Pearson, sign agreement and gain and its measured sum of dH are logged through TRL's own
  integrations next to TRL's metrics (``trace_log``).
- **Run directory.** ``config.json`` (the resolved TrainConfig, TRL's arguments and versions) and
  ``metrics.parquet`` (TRL's logged metrics plus ``entropy/mean`` and ``reward/mean``), so
  ``entropy-lab trace --run``, ``figures`` and ``compare`` read it like a bundled run.
- **Methods.** ``method="steer"`` (or any loss-side catalogue method, with ``method_overrides``)
  replaces TRL's per-token loss by the project's ``compute_loss`` on TRL's own log-probs and
  entropies, aggregated as TRL's ``loss_type`` does (``project_loss``; ``methods`` lists what is refused).

This module holds only the overrides of TRL's methods: the traced step's batch is ``window``'s,
the annotations ``annotate``'s, the project's loss ``project_loss``'s.

Deliberate simplifications:

- TRL's fused LM head never materialises the logits. The pre-update side is taken from TRL's
  training forward instead (``fused``: the traced tokens' logits recomputed from the hidden
  states TRL's head consumes, ``omega_logit_grad`` from the gradients of its log-probs and
  entropies), so the tracer's extra cost is one no-grad forward, the post-update one over the
  step's traced rows. Where ``fused`` cannot recompute the head (a logit soft cap or scale,
  active dropout) the tracer runs its own pre-update forward too and ``omega_logit_grad`` is NaN.
- The tracer's own forwards run without TRL's mixed-precision autocast (accelerate's wrapper of the
  model's forward bypassed), in the weights' dtype: exact fp32 under ``bf16=True`` with fp32 weights;
  under mixed precision the pre-update side is then the tracer's own forward too (``fused`` off).
- The tracer's forwards call the unwrapped model (no DDP buffer broadcast); under
  torch.distributed the tracer itself keeps the ranks' forward counts in step and adds
  ``rank``. Tested with DDP and with Accelerate's FSDP2 over gloo (2 CPU processes); ZeRO-3 is
  not tested.
- A traced step prepares its micro-batches at its start instead of one by one; generation runs
  in the same order with the same parameters, so only the RNG draws of active dropout between
  micro-batches could differ (TRL runs without dropout unless the model config has it).
- Clip-Cov and KL-Cov choose their tokens over the optimizer step's micro-batches and ranks
  (``cov_selection='global'``, the default; the step's micro-batches are then prepared at its
  start, as for a traced step, plus one no-grad forward each), or per call with
  ``method_overrides={"cov_selection": "per-call"}``. Fork tokens select per micro-batch and
  rank; STEER's ``steer_norm='batch'`` takes min / max |omega| over the whole generation batch
  of all ranks.

References: TRL 1.16.0 ``trl/trainer/grpo_trainer.py``; transformers ``Trainer._run_epoch``.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.utils import logging as hf_logging
from trl import GRPOTrainer

from entropy_lab.errors import EntropyLabError
from entropy_lab.integrations.trl._inputs import OLD_ENTROPY_KEY
from entropy_lab.integrations.trl.annotate import annotate_project_loss, annotate_trl_loss
from entropy_lab.integrations.trl.fused import FusedHeadTap
from entropy_lab.integrations.trl.losses import get_loss_type
from entropy_lab.integrations.trl.methods import TrlSettings, base_config, resolve_trl_method
from entropy_lab.integrations.trl.project_loss import batch_context, project_loss, select_over_step
from entropy_lab.integrations.trl.run import TrlRunWriter, check_run_dir
from entropy_lab.integrations.trl.trace_log import TraceLogCallback
from entropy_lab.integrations.trl.window import TemperedLM, TracedStepBatch
from entropy_lab.objectives.cov_select import uses_global_selection
from entropy_lab.trace.tracer import EntropyTracer

logger = hf_logging.get_logger(__name__)


class TracedGRPOTrainer(GRPOTrainer):
    """TRL's GRPOTrainer with entropy-lab tracing, run directory and catalogue methods.

    Args (besides GRPOTrainer's):
        trace_every: trace every k-th optimizer step (1-based steps k, 2k, ...); 0 never.
        trace_max_positions: trace at most this many response tokens per step and rank (int), or
            this fraction (float); None traces all.
        method: a loss-side catalogue method (``entropy_lab.methods``) computed by the project's
            ``compute_loss`` on TRL's tensors; None keeps TRL's own loss.
        method_overrides: TrainConfig overrides on top of the method's preset (e.g.
            ``{"steer_lambda_min": 0.7}``).
        run_dir: where config.json, metrics.parquet and traces/ go (default ``args.output_dir``).
        overwrite_run: replace an entropy-lab run already in ``run_dir`` (else it is an error,
            unless training resumes from a checkpoint); only a run holding nothing entropy-lab
            did not write is replaced (``run.check_run_dir``), never a model or a user's files.
    """

    _step: int  # TRL's buffered-slice counter, set by GRPOTrainer

    def __init__(
        self,
        *args,
        trace_every: int = 1,
        trace_max_positions: int | float | None = None,
        method: str | None = None,
        method_overrides: dict | None = None,
        run_dir: str | Path | None = None,
        overwrite_run: bool = False,
        **kwargs,
    ):
        targs = kwargs.get("args")
        if targs is None:
            raise EntropyLabError("TracedGRPOTrainer needs args=GRPOConfig(...) as a keyword argument")
        check_trace_arguments(trace_every, trace_max_positions)
        if method is None and method_overrides:
            raise EntropyLabError(
                "method_overrides apply to a catalogue method: pass method=... too, or drop method_overrides"
            )
        run_path = Path(run_dir if run_dir is not None else targs.output_dir)
        check_run_dir(run_path, overwrite=overwrite_run, resuming=None)  # before the model is loaded
        settings = TrlSettings.from_args(targs)
        get_loss_type(settings.loss_type)  # unknown loss_types are one clear line
        self._el_cfg = None if method is None else resolve_trl_method(method, method_overrides, settings)
        super().__init__(*args, **kwargs)
        self._el_settings = settings
        self._cov_global = self._el_cfg is not None and uses_global_selection(self._el_cfg)
        self._trace_every = int(trace_every)
        pad = getattr(getattr(self, "_tokenizer", None), "pad_token_id", None)
        self._pad_id = int(pad) if pad is not None else 0
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        # The tracer's own forwards run without TRL's mixed-precision autocast, in the weights' dtype:
        # under bf16=True with fp32 weights they are exact fp32 (see docs/integrations.md).
        self._traced_model = TemperedLM(base, self.temperature, _no_autocast(self.accelerator.device.type))
        self._head = FusedHeadTap(base, self.temperature)  # pre-update side from TRL's training forward
        if self._head.off is None and self.accelerator.mixed_precision != "no":
            # TRL's training forward runs under autocast: statistics read from it would not be exact
            self._head.off = (
                f"TRL trains under {self.accelerator.mixed_precision} mixed precision, so the pre-update "
                "statistics are not read from its autocast forward"
            )
        record_cfg = (self._el_cfg or base_config(settings)).replace(
            method=method or f"trl-{settings.loss_type}",
            steps=int(self.args.max_steps),
            dtype="bfloat16" if self.args.bf16 else "float32" if not self.args.fp16 else "auto",
        )
        self._record_cfg = record_cfg
        self._tracer = EntropyTracer(
            self._traced_model,
            max_positions=trace_max_positions,
            seed=settings.seed,
            config={**record_cfg.to_dict(), "engine": "trl", "trace_precision": _trace_precision(base)},
        )
        self._run = TrlRunWriter(
            run_path,
            record_cfg,
            trl_args=self.args.to_dict(),
            overwrite=overwrite_run,
            is_main=self.accelerator.is_main_process,
        )
        self._window: TracedStepBatch | None = None
        self._queue: list[dict] = []
        self._capture: dict | None = None  # per-token tensors of the current traced micro-batch
        self._gen_stash: list | None = None
        self._steer_context: dict = {}
        self._generator = torch.Generator(device="cpu").manual_seed(settings.seed)
        self.add_callback(_CloseWindow(self))
        self.add_callback(TraceLogCallback(self))  # a traced step's tightness, through args.report_to

    # --- schedule -----------------------------------------------------------------------------
    def _traced(self, step: int) -> bool:
        return self._trace_every > 0 and step % self._trace_every == 0

    def _update_index(self, step: int) -> int:
        """Index of optimizer step ``step`` among those sharing its generation batch (num_iterations reuse)."""
        per_gen = max(1, self.args.steps_per_generation // max(1, self.args.gradient_accumulation_steps))
        return (step - 1) % (per_gen * self.num_iterations)

    def train(self, *args, **kwargs):
        self._run.start(resuming=bool(kwargs.get("resume_from_checkpoint") or (args and args[0])))
        try:
            return super().train(*args, **kwargs)
        finally:
            if self._window is not None:  # an exception inside a traced step: remove the tracer's hooks
                self._window.close(error=True)
                self._window = None
            self._queue.clear()

    # --- preparing a traced step's micro-batches up front ---------------------------------------
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        step = self.state.global_step + 1
        if batch_samples and (self._traced(step) or self._cov_global):
            base, was_training = self._step, self.model.training
            self.model.train()
            prepared = []
            try:
                for i, raw in enumerate(batch_samples):
                    self._step = base + i  # TRL picks the buffered slice (and when to generate) by _step
                    prepared.append(GRPOTrainer._prepare_inputs(self, raw))
            finally:
                self._step = base
                self.model.train(was_training)
            if self._cov_global:
                select_over_step(self, prepared)
            self._queue = prepared
            if self._traced(step):
                self._window = TracedStepBatch(
                    prepared, step, self._update_index(step), self._tracer, self._pad_id
                )
        return batch_samples, num_items

    def _prepare_inputs(self, generation_batch):
        if self._queue and self.model.training:
            if self._window is not None:
                self._window.micro += 1
            return self._queue.pop(0)
        return super()._prepare_inputs(generation_batch)

    def _finish_window(self) -> None:
        window, self._window = self._window, None
        if window is None:
            return
        records = window.close(logit_grad=self._head.off is None)
        if "rank" not in records:  # the tracer adds it itself under torch.distributed
            records.insert(0, "rank", int(self.accelerator.process_index))
        self._run.write_trace(window.traced, records, self.accelerator, window.step)

    # --- TRL's forward: stash what the annotations and STEER need ------------------------------
    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *a, **kw):
        gen = self._gen_stash is not None and model is self.model and not torch.is_grad_enabled()
        if gen:
            kw["compute_entropy"] = True
        call = functools.partial(
            super()._get_per_token_logps_and_entropies,
            model,
            input_ids,
            attention_mask,
            logits_to_keep,
            *a,
            **kw,
        )
        window = self._window
        if window is not None and self.model.training and torch.is_grad_enabled():  # a traced micro-batch
            out = self._head.forward(
                window.traced, window.micro_rows(input_ids), input_ids, logits_to_keep, call
            )
        else:
            out = call()
        if gen and self._gen_stash is not None:
            self._gen_stash.append((out[0], out[1]))
        if self._capture is not None and torch.is_grad_enabled():
            self._capture["logps"] = out[0].detach()
            self._capture["entropies"] = None if out[1] is None else out[1].detach()
        return out

    def _generate_and_score_completions(self, inputs):
        need_old = self._el_cfg is not None and (
            self._el_cfg.objective == "steer"
            and (self._el_cfg.steer_norm == "batch" or self._el_cfg.steer_estimator == "paper")
        )
        if not need_old:
            return super()._generate_and_score_completions(inputs)
        self._gen_stash = []
        try:
            out = super()._generate_and_score_completions(inputs)
            stash = self._gen_stash
        finally:
            self._gen_stash = None
        old = out.get("old_per_token_logps")
        if old is not None:
            found = [e for lp, e in stash if lp is old]
            if not found:
                raise EntropyLabError("could not find the rollout entropies of TRL's old log-probs")
            out[OLD_ENTROPY_KEY] = found[0].detach()
        if self.model.training and self._el_cfg is not None and self._el_cfg.steer_norm == "batch":
            self._steer_context = batch_context(self, out)
        return out

    # --- the loss: the project's (with a method) or TRL's own, annotated when traced ------------
    def _compute_loss(self, model, inputs):
        tracing = self._window is not None and self.model.training
        if self._el_cfg is not None:
            loss, out = project_loss(self, model, inputs)
            if tracing and self._window is not None:
                annotate_project_loss(self._window, out, self.accelerator.num_processes)
            return loss
        if not tracing:
            return super()._compute_loss(model, inputs)
        self._capture = {}
        try:
            loss = super()._compute_loss(model, inputs)
            captured = self._capture
        finally:
            self._capture = None
        assert self._window is not None  # tracing
        annotate_trl_loss(self, self._window, inputs, captured)
        return loss

    # --- metrics ---------------------------------------------------------------------------------
    def log(self, logs: dict, start_time: float | None = None) -> None:
        train_row = (
            self.model.training
            and not any(k.startswith("eval_") for k in logs)
            and "train_runtime" not in logs
        )
        super().log(logs, start_time)
        if train_row:
            self._run.write_metrics(int(self.state.global_step), logs)


def check_trace_arguments(trace_every, trace_max_positions) -> None:
    """One EntropyLabError line for a ``trace_every`` or ``trace_max_positions`` of the wrong type or range."""
    if isinstance(trace_every, bool) or not isinstance(trace_every, int) or trace_every < 0:
        raise EntropyLabError(
            f"trace_every must be a whole number >= 0 (0 never traces), got {trace_every!r}"
        )
    m = trace_max_positions
    if m is None:
        return
    if isinstance(m, bool) or not isinstance(m, (int, float)):
        raise EntropyLabError(
            f"trace_max_positions must be None, a count (int >= 1) or a fraction (float in (0, 1]), got {m!r}"
        )
    # int counts and float fractions are range-checked by the tracer itself


def _no_autocast(device_type: str):
    """A context factory that switches autocast off on ``device_type`` (TemperedLM's forwards)."""
    return lambda: torch.autocast(device_type, enabled=False)


def _trace_precision(model: torch.nn.Module) -> str:
    """What the tracer's forwards compute in: the weights' dtype, never autocast."""
    dtypes = sorted(
        {str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.is_floating_point()}
    )
    return f"{'/'.join(dtypes) or 'float32'} weights, no autocast"


class _CloseWindow(TrainerCallback):
    """Trainer callback: end the traced step right after its optimizer step."""

    def __init__(self, trainer: TracedGRPOTrainer):
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._finish_window()
        return None


__all__ = ["TracedGRPOTrainer"]
