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
  multiplier, the ``loss_type``'s normaliser, see ``trl_losses``), so ``weight`` and the closed
  forms mean what they mean in the bundled trainer. Each rank traces its own rows; rank 0
  writes the union with a ``rank`` column to ``traces/step_XXXXXX.parquet``.
- **Run directory.** ``config.json`` (the resolved TrainConfig, TRL's arguments and versions) and
  ``metrics.parquet`` (TRL's logged metrics plus ``entropy/mean`` and ``reward/mean``), so
  ``entropy-lab trace --run``, ``figures`` and ``compare`` read it like a bundled run.
- **Methods.** ``method="steer"`` (or any loss-side catalogue method, with ``method_overrides``)
  replaces TRL's per-token loss by the project's ``compute_loss`` on TRL's own log-probs and
  entropies, aggregated as TRL's ``loss_type`` does (``trl_methods`` lists what is refused).

Deliberate simplifications:

- TRL's fused LM head never materialises the logits, so the tracer measures the policy TRL
  trains, softmax(z / temperature), with its own forwards (pre-update at the optimizer step,
  post-update after it): ``omega_logit_grad`` is NaN in TRL traces (the report's decomposition
  then starts from ``softmax``), and the tracer's extra cost is two no-grad forwards.
- The tracer's forwards call the unwrapped model (no DDP buffer broadcast); under
  torch.distributed the tracer itself keeps the ranks' forward counts in step and adds
  ``rank``. Tested with DDP over gloo (2 CPU processes); FSDP and ZeRO-3 are not tested.
- A traced step prepares its micro-batches at its start instead of one by one; generation runs
  in the same order with the same parameters, so only the RNG draws of active dropout between
  micro-batches could differ (TRL runs without dropout unless the model config has it).
- Clip-Cov, KL-Cov and Fork tokens select per micro-batch and rank; STEER's ``steer_norm='batch'``
  takes min / max |omega| over the whole generation batch of all ranks.

References: TRL 1.16.0 ``trl/trainer/grpo_trainer.py``; transformers ``Trainer._run_epoch``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from entropy_lab.errors import EntropyLabError

SUPPORTED_TRL = ("1.16", "1.17")
"""TRL versions the integration supports: at least the first, below the second (it overrides private methods)."""
OLD_ENTROPY_KEY = "old_per_token_entropy"


def check_trl_version(version: str | None = None) -> str:
    """TRL's version, or one EntropyLabError when TRL is missing or outside ``SUPPORTED_TRL``."""
    from packaging.version import Version

    if version is None:
        try:
            import trl
        except ImportError:
            raise EntropyLabError(
                'TRL is not installed: pip install "entropy-lab[trl]" (TRL >=1.16,<1.17)'
            ) from None
        version = trl.__version__
    low, high = SUPPORTED_TRL
    if not Version(low) <= Version(version) < Version(high):
        raise EntropyLabError(
            f'TRL {version} is outside the supported range >={low},<{high}: pip install "trl>={low},<{high}"'
        )
    return version


check_trl_version()

from transformers import TrainerCallback  # noqa: E402
from trl import GRPOTrainer  # noqa: E402  (after the version check, so a bad TRL gets one clear line)

from entropy_lab.integrations.trl.losses import (  # noqa: E402
    StepCounts,
    SurrogateSettings,
    get_loss_type,
)
from entropy_lab.integrations.trl.methods import TrlSettings, resolve_trl_method  # noqa: E402
from entropy_lab.integrations.trl.run import TrlRunWriter  # noqa: E402
from entropy_lab.objectives import LossInputs, compute_loss, get_objective  # noqa: E402
from entropy_lab.steer import MagnitudeRange  # noqa: E402
from entropy_lab.trace.tracer import EntropyTracer  # noqa: E402


class TemperedLM(nn.Module):
    """The policy TRL trains: ``base``'s logits divided by the sampling temperature, for the tracer.

    ``forward`` runs the model's ordinary (unfused) forward on the unwrapped model, so it
    issues no collective and returns logits (B, T or K, V).
    """

    def __init__(
        self, base: nn.Module, temperature: float, autocast: Callable[[], contextlib.AbstractContextManager]
    ):
        super().__init__()
        self.base: Any = base  # a transformers model
        self.temperature = float(temperature)
        self._autocast = autocast

    @property
    def config(self):
        return self.base.config

    def get_output_embeddings(self):
        return self.base.get_output_embeddings()

    def forward(self, input_ids, attention_mask=None, logits_to_keep=None):
        kw = {} if logits_to_keep is None else {"logits_to_keep": logits_to_keep}
        with self._autocast():
            logits = self.base(input_ids=input_ids, attention_mask=attention_mask, **kw).logits
        return logits / self.temperature  # (B, T, V)


class _Window:
    """One traced optimizer step: its micro-batches as one padded batch, and the open tracer step."""

    def __init__(self, trainer: TracedGRPOTrainer, prepared: list[dict], step: int):
        self.trainer = trainer
        self.step = step
        self.micro = -1  # index of the micro-batch being computed
        pad = trainer._pad_id
        rows, offsets, total = [], [], 0
        for batch in prepared:
            ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)  # (b, T_m)
            attn = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)  # (b, T_m)
            resp = torch.cat([torch.zeros_like(batch["prompt_mask"]), _loss_mask(batch)], dim=1)  # (b, T_m)
            adv = batch["advantages"]
            adv = adv[:, None].expand_as(batch["completion_ids"]) if adv.dim() == 1 else adv  # (b, C)
            old = batch.get("old_per_token_logps")
            rows.append((ids, attn, resp, batch["prompt_ids"].shape[1], adv, old))
            offsets.append(total)
            total += ids.shape[0]
        self.offsets = offsets
        width = max(r[0].shape[1] for r in rows)
        self.width = width
        dev = rows[0][0].device

        def padded(x, value, dtype=None):
            out = torch.full((x.shape[0], width), value, dtype=dtype or x.dtype, device=dev)
            out[:, : x.shape[1]] = x
            return out

        self.prompt_len = [r[3] for r in rows]
        input_ids = torch.cat([padded(r[0], pad) for r in rows])  # (B, W)
        attention = torch.cat([padded(r[1], 0) for r in rows])  # (B, W)
        response = torch.cat([padded(r[2], 0) for r in rows])  # (B, W)
        advantages = torch.cat([self.per_position(r[4], r[3], 0.0) for r in rows])  # (B, W)
        have_old = [r[5] is not None for r in rows]
        old = None
        if any(have_old):
            if not all(have_old):
                raise EntropyLabError("TRL gave old log-probs for some micro-batches of a step only")
            old = torch.cat([self.per_position(cast(torch.Tensor, r[5]), r[3], 0.0) for r in rows])  # (B, W)
        self.input_ids, self.attention_mask = input_ids, attention  # (B, W) each
        self._stack = contextlib.ExitStack()
        self.traced = self._stack.enter_context(
            trainer._tracer.step(
                input_ids,
                attention,
                response,
                advantages=advantages,
                old_logprobs=old,
                step=step,
                update=trainer._update_index(step),
            )
        )

    def per_position(self, x: torch.Tensor, prompt_len: int, fill: float) -> torch.Tensor:
        """A (b, C) per-completion-token tensor placed at its input positions of a (b, W) tensor."""
        out = torch.full((x.shape[0], self.width), fill, dtype=torch.float64, device=x.device)
        out[:, prompt_len : prompt_len + x.shape[1]] = x.double()
        return out

    def annotate(self, **values: torch.Tensor) -> None:
        """Annotate the current micro-batch's rows with (b, C) per-completion-token values."""
        m = self.micro
        start = self.offsets[m]
        plen = self.prompt_len[m]
        first = next(iter(values.values()))
        rows = list(range(start, start + first.shape[0]))
        self.traced.annotate(
            rows=rows, **{k: self.per_position(v, plen, math.nan) for k, v in values.items()}
        )

    def close(self, error: bool = False):
        if error:
            with contextlib.suppress(Exception):
                self._stack.close()
            return None
        self._stack.close()
        return self.traced.records


def _loss_mask(batch: dict) -> torch.Tensor:
    mask = batch["completion_mask"]
    return mask if "tool_mask" not in batch else mask * batch["tool_mask"]


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
            unless training resumes from a checkpoint).
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
        if trace_every < 0:
            raise EntropyLabError(f"trace_every must be >= 0, got {trace_every}")
        settings = TrlSettings.from_args(targs)
        get_loss_type(settings.loss_type)  # unknown loss_types are one clear line
        self._el_cfg = None if method is None else resolve_trl_method(method, method_overrides, settings)
        super().__init__(*args, **kwargs)
        self._el_settings = settings
        self._trace_every = int(trace_every)
        pad = getattr(getattr(self, "_tokenizer", None), "pad_token_id", None)
        self._pad_id = int(pad) if pad is not None else 0
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        self._traced_model = TemperedLM(base, self.temperature, self.accelerator.autocast)
        from entropy_lab.integrations.trl.methods import base_config

        record_cfg = (self._el_cfg or base_config(settings)).replace(
            method=method or f"trl-{settings.loss_type}", steps=int(self.args.max_steps)
        )
        self._record_cfg = record_cfg
        self._tracer = EntropyTracer(
            self._traced_model,
            max_positions=trace_max_positions,
            seed=settings.seed,
            config={**record_cfg.to_dict(), "engine": "trl"},
        )
        self._run = TrlRunWriter(
            Path(run_dir if run_dir is not None else self.args.output_dir),
            record_cfg,
            trl_args=self.args.to_dict(),
            overwrite=overwrite_run,
            is_main=self.accelerator.is_main_process,
        )
        self._window: _Window | None = None
        self._queue: list[dict] = []
        self._capture: dict | None = None  # per-token tensors of the current traced micro-batch
        self._gen_stash: list | None = None
        self._steer_context: dict = {}
        self._generator = torch.Generator(device="cpu").manual_seed(settings.seed)
        self.add_callback(_CloseWindow(self))

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
        if batch_samples and self._traced(step):
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
            self._queue = prepared
            self._window = _Window(self, prepared, step)
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
        records = window.close()
        if "rank" not in records:  # the tracer adds it itself under torch.distributed
            records.insert(0, "rank", int(self.accelerator.process_index))
        self._run.write_trace(window.traced, records, self.accelerator, window.step)

    # --- TRL's forward: stash what the annotations and STEER need ------------------------------
    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *a, **kw):
        gen = self._gen_stash is not None and model is self.model and not torch.is_grad_enabled()
        if gen:
            kw["compute_entropy"] = True
        out = super()._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, logits_to_keep, *a, **kw
        )
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
            self._steer_context = self._batch_context(out)
        return out

    @torch.no_grad()
    def _batch_context(self, out: dict) -> dict:
        """STEER's min / max |omega| over the generation batch of all ranks (steer_norm='batch')."""
        old, ent = out.get("old_per_token_logps"), out.get(OLD_ENTROPY_KEY)
        if old is None:  # aligned generation: the rollout policy is the current one; one no-grad forward
            ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
            attn = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
            old, ent, _ = GRPOTrainer._get_per_token_logps_and_entropies(
                self, self.model, ids, attn, out["completion_ids"].shape[1], compute_entropy=True
            )
        mask = _loss_mask(out)
        adv = out["advantages"]
        adv = adv[:, None].expand_as(old) if adv.dim() == 1 else adv
        full = LossInputs(
            logprob=old, old_logprob=old, advantages=adv, mask=mask, entropy=ent, old_entropy=ent
        )
        assert self._el_cfg is not None  # only STEER runs ask for a batch context
        rng = MagnitudeRange.from_context(get_objective("steer").prepare(full, self._el_cfg))
        big = torch.finfo(torch.float64).max
        local = torch.tensor(
            [rng.count, rng.m_min if rng.count else big, -(rng.m_max if rng.count else -big)],
            dtype=torch.float64,
            device=old.device,
        )
        allr = self.accelerator.gather(local[None]).view(-1, 3)
        count = int(allr[:, 0].sum())
        m_min = float(allr[:, 1].min()) if count else 0.0
        m_max = float(-allr[:, 2].min()) if count else 0.0
        return MagnitudeRange(count, m_min, m_max).to_context()

    # --- the loss --------------------------------------------------------------------------------
    def _window_counts(self, inputs) -> StepCounts:
        items = inputs.get("num_items_in_batch")
        if self.max_completion_length is None:  # dr_grpo's normaliser needs it
            raise EntropyLabError(
                "TRL's max_completion_length is unset; set GRPOConfig(max_completion_length=N)"
            )
        return StepCounts(
            ga=int(self.current_gradient_accumulation_steps),
            world=int(self.accelerator.num_processes),
            steps_per_generation=int(self.args.steps_per_generation),
            max_completion_length=int(self.max_completion_length),
            num_items_in_batch=None if items is None else float(items),
        )

    def _compute_loss(self, model, inputs):
        tracing = self._window is not None and self.model.training
        if self._el_cfg is not None:
            loss, out = self._project_loss(model, inputs)
            if tracing and self._window is not None:
                world = self.accelerator.num_processes
                self._window.annotate(
                    clip_indicator=out.clip_indicator,
                    intervention_weight=out.intervention_weight,
                    normalizer=out.normalizer.double() * world,
                    advantage=out.advantage,
                )
            return loss
        if not tracing:
            return super()._compute_loss(model, inputs)
        self._capture = {}
        try:
            loss = super()._compute_loss(model, inputs)
            captured = self._capture
        finally:
            self._capture = None
        self._annotate_trl(inputs, captured)
        return loss

    @torch.no_grad()
    def _annotate_trl(self, inputs: dict, captured: dict) -> None:
        """Annotate the micro-batch with the per-token terms of TRL's own loss (``trl_losses``)."""
        logps = captured["logps"]  # (b, C)
        mask = _loss_mask(inputs)
        adv = inputs["advantages"]
        adv = adv[:, None].expand_as(logps) if adv.dim() == 1 else adv  # (b, C)
        old = inputs.get("old_per_token_logps")
        old = logps if old is None else old
        s = self._el_settings
        phi = None
        if s.loss_type == "vespo":
            phi = self.get_gamma_weights(
                advantages=adv[:, :1],
                log_ratio_per_token=logps - old,
                mask=mask,
                importance_sampling_ratio=inputs.get("importance_sampling_ratio"),
                k_pos=self.args.vespo_k_pos,
                lambda_pos=self.args.vespo_lambda_pos,
                k_neg=self.args.vespo_k_neg,
                lambda_neg=self.args.vespo_lambda_neg,
            )
        settings = SurrogateSettings(
            epsilon_low=self.epsilon_low,
            epsilon_high=self.epsilon_high,
            delta=self.args.delta,
            sapo_temperature_pos=getattr(self.args, "sapo_temperature_pos", 1.0),
            sapo_temperature_neg=getattr(self.args, "sapo_temperature_neg", 1.05),
            sequence_level=self.importance_sampling_level == "sequence",
        )
        from entropy_lab.integrations.trl.losses import surrogate_terms

        indicator, weight = surrogate_terms(s.loss_type, logps, old, adv, mask, settings, phi)
        # TRL's multipliers on top of the surrogate, computed by TRL's own helpers.
        if self.top_entropy_quantile < 1.0:
            weight = weight * self.get_high_entropy_mask(
                captured["entropies"], mask, 1 - self.top_entropy_quantile
            )
        if self.off_policy_mask_threshold is not None:
            sampling = inputs.get("sampling_per_token_logps", old)
            weight = weight * self.get_off_policy_mask(
                adv[:, :1], logps, sampling, mask, self.off_policy_mask_threshold
            )
        if self.use_vllm and self.vllm_importance_sampling_correction and s.loss_type != "vespo":
            weight = weight * inputs["importance_sampling_ratio"]
        normalizer = get_loss_type(s.loss_type).normalizer(mask.bool(), self._window_counts(inputs))
        assert self._window is not None  # called only inside a traced step
        self._window.annotate(
            clip_indicator=indicator, intervention_weight=weight, normalizer=normalizer, advantage=adv
        )

    def _project_loss(self, model, inputs):
        """The method's loss by the project's ``compute_loss`` on TRL's log-probs and entropies."""
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        extra = {
            k: inputs.get(k)
            for k in (
                "pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
                "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids",
            )
        }  # fmt: skip
        logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model,
            input_ids,
            attention_mask,
            completion_ids.size(1),
            compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled,
            **extra,
        )  # (b, C), (b, C)
        mask = _loss_mask(inputs)
        adv = inputs["advantages"]
        adv = adv[:, None].expand_as(logps) if adv.dim() == 1 else adv
        old = inputs.get("old_per_token_logps")
        old_entropy = inputs.get(OLD_ENTROPY_KEY)
        training = self.model.training
        counts = self._window_counts(inputs)
        agg_of = get_loss_type(self._el_settings.loss_type).agg
        assert agg_of is not None and self._el_cfg is not None  # checked when the trainer was built
        agg = agg_of(mask.bool(), counts if training else _no_accum(counts))
        cfg = self._el_cfg.replace(loss_agg=agg.mode)
        if agg.max_len is not None:
            cfg = cfg.replace(max_new_tokens=agg.max_len)
        li = LossInputs(
            logprob=logps,
            old_logprob=logps.detach() if old is None else old,
            advantages=adv,
            mask=mask,
            entropy=entropies,
            old_entropy=entropies.detach() if old_entropy is None else old_entropy,
            ref_logprob=inputs.get("ref_per_token_logps") if self.beta != 0.0 else None,
            num_tokens=agg.num_tokens,
            num_seqs=agg.num_seqs,
            context=self._steer_context,
            generator=self._generator,
        )
        out = compute_loss(li, cfg)
        loss = out.loss
        mode = "train" if training else "eval"
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss / (counts.ga if training else 1.0)
        self._log_project_metrics(mode, entropies, mask, out.metrics)
        return loss, out

    def _log_project_metrics(self, mode: str, entropies, mask, metrics: dict) -> None:
        """TRL's entropy metric (its formula: token mean over all ranks) and the method's metrics."""
        local = torch.stack([(entropies.detach() * mask).sum(), mask.sum().to(entropies.dtype)])
        totals = self.accelerator.reduce(local, reduction="sum")
        self._metrics[mode]["entropy"].append(float(totals[0] / totals[1].clamp(min=1.0)))
        keys = sorted(metrics)
        values = torch.tensor([float(metrics[k]) for k in keys], device=entropies.device)
        values = self.accelerator.gather(values[None]).view(-1, len(keys)).mean(0)
        for k, v in zip(keys, values.tolist(), strict=True):
            self._metrics[mode][k].append(v)

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


def _no_accum(w: StepCounts) -> StepCounts:
    """TRL's evaluation normalisers: no accumulation (and dapo's window rescaling off)."""
    return StepCounts(1, w.world, 1, w.max_completion_length, w.num_items_in_batch)


class _CloseWindow(TrainerCallback):
    """Trainer callback: end the traced step right after its optimizer step."""

    def __init__(self, trainer: TracedGRPOTrainer):
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._finish_window()
        return None


__all__ = ["TracedGRPOTrainer", "TemperedLM", "check_trl_version", "SUPPORTED_TRL"]
