"""The bundled GRPO trainer: rollout -> rewards -> advantages -> objective -> traced optimizer step.

Data flows one way. Every method of the catalogue is a preset of the one flat
``TrainConfig`` (``entropy_lab.methods``); the trainer has no per-method branches: the
objective, advantage and aggregation registries do the work. Every ``trace_every``-th
step's updates run inside ``EntropyTracer`` and their records go to ``traces/``.

Reliability: the configuration is validated and the output directory checked before
anything is loaded or deleted; metrics are rewritten atomically after every step (a crash
loses at most the step in flight); checkpoints (``entropy_lab.checkpoints``) hold the
model, optimizer, scheduler, every RNG state and the step; ``resume`` continues from the
latest usable one (falling back past a damaged one) and, on CPU, reproduces the
uninterrupted run's metrics exactly. A non-finite loss or gradient stops the run before
the optimizer touches the weights; a failed write (full disk, read-only directory) stops
it with one line naming the cause, earlier checkpoints intact. Settings that cannot
learn (group size 1, one reward value for the whole run) are warned about.

Simplifications: the policy is in eval mode throughout (no dropout); rollouts use the
current policy (no separate inference engine); the learning-rate schedule is linear
warm-up then constant.
"""

from __future__ import annotations

import contextlib
import random
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from entropy_lab import checkpoints
from entropy_lab.advantages import advantages_for_config, mean_token_logprob
from entropy_lab.batch import RolloutBatch
from entropy_lab.config import TrainConfig
from entropy_lab.controllers import build_controller, control_context
from entropy_lab.errors import EntropyLabError, EntropyLabWarning, os_error_message
from entropy_lab.models import load_policy, warm_start
from entropy_lab.objectives import compute_loss, prepare_context, required_inputs
from entropy_lab.optim import build_optimizer
from entropy_lab.records import save_records
from entropy_lab.rollout import Rollout, evaluate, mean_response_entropy, response_stats, rewards_of, sample
from entropy_lab.runs import RunDir
from entropy_lab.stats import entropy_from_logits, gather_logprobs, token_stats
from entropy_lab.tasks import build_task, get_task, load_dataset_task
from entropy_lab.trace.tracer import EntropyTracer
from entropy_lab.trainer import learnability

Callback = Callable[[str, dict], None]


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise EntropyLabError("device 'cuda' was asked for but torch sees no GPU")
    return torch.device(name)


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPU under 'auto'; fp32 (no autocast) on CPU."""
    if cfg.dtype == "float32" or (cfg.dtype == "auto" and device.type != "cuda"):
        return None
    if cfg.dtype in ("auto", "bfloat16"):
        return torch.bfloat16
    raise EntropyLabError(f"dtype must be auto, float32 or bfloat16, got {cfg.dtype!r}")


class Trainer:
    """GRPO-family training of one policy on one task, writing a run directory."""

    def __init__(
        self,
        cfg: TrainConfig,
        out: str | Path,
        *,
        resume: bool = False,
        overwrite: bool = False,
        callback: Callback | None = None,
    ):
        from entropy_lab.methods import validate_config

        self.cfg = validate_config(cfg)  # the whole configuration, once, before anything is loaded
        self.run = RunDir(Path(out))
        self.callback = callback or (lambda event, info: None)
        self.device = pick_device(cfg.device)
        self.amp_dtype = autocast_dtype(cfg, self.device)
        self.resume, self.overwrite = resume, overwrite
        self.metrics_rows: list[dict] = []
        self.eval_rows: list[dict] = []
        self.start_step = 0

    # --- set-up ------------------------------------------------------------------------
    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _load_policy_and_task(self):
        cfg = self.cfg
        if cfg.dataset and not cfg.model:
            raise EntropyLabError(
                "--dataset needs --model: the embedded tiny policy only knows the built-in tasks"
            )
        info = {}
        if cfg.model:
            model, tokenizer = load_policy(cfg.model, self.device)
            task = (
                load_dataset_task(cfg.dataset, tokenizer) if cfg.dataset else build_task(cfg.task, tokenizer)
            )
        else:
            task = get_task(cfg.task)
            self.callback("warm_start", {"task": task.name})
            model, tokenizer, info = warm_start(
                task,
                progress=lambda s, n, loss: self.callback(
                    "warm_start_progress", {"step": s, "total": n, "loss": loss}
                ),
            )
            model = model.to(self.device)
        return model, tokenizer, task, info

    def setup(self, create_run: bool = True) -> None:
        """Load task and policy, build optimizer and tracer; create (or restore) the run directory.

        The output directory is checked first and an existing run is replaced only after the
        policy and task loaded, so no bad setting can cost an old run.
        """
        cfg = self.cfg
        if create_run:
            self.run.check_target(overwrite=self.overwrite, resume=self.resume)
            if self.resume:
                self._check_resumable()
            self.warn_if_cannot_learn()
        self.model, self.tokenizer, self.task, self.warm_info = self._load_policy_and_task()
        # Seeded after the policy is in place, so a run does not depend on whether its warm
        # start was trained now or read from the cache.
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self.np_rng = np.random.default_rng(cfg.seed)
        self.shuffle_gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.loss_gen = torch.Generator(device=self.device).manual_seed(cfg.seed + 2)
        self.model.eval()  # no dropout anywhere: every forward is deterministic
        self.ref_model = None
        if "ref_logprob" in required_inputs(cfg):
            self.ref_model = load_policy(cfg.model, self.device)[0] if cfg.model else self._copy_policy()
            self.ref_model.requires_grad_(False)
        self.optimizer = build_optimizer(self.model.parameters(), cfg)
        warm = max(cfg.warmup_steps, 0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda u: min(1.0, (u + 1) / warm) if warm else 1.0
        )
        self.tracer = EntropyTracer(
            self.model,
            max_positions=cfg.trace_max_positions or None,
            seed=cfg.seed,
            config=cfg.to_dict(),
            jvp=cfg.trace_jvp,
        )
        self.controller = build_controller(cfg)
        self.eval_set = self.task.eval_problems(cfg.eval_prompts)
        if not create_run:
            return
        if self.resume:
            self._restore()
        else:
            self.run.create(cfg, overwrite=self.overwrite, extra={"warm_start": self.warm_info})

    def _warn(self, message: str) -> None:
        warnings.warn(message, EntropyLabWarning, stacklevel=3)
        self.callback("warning", {"message": message})

    def warn_if_cannot_learn(self) -> None:
        """A setting under which every advantage is 0 by construction (``entropy_lab.trainer.learnability``)."""
        message = learnability.setting_warning(self.cfg)
        if message:
            self._warn(message)

    def _warn_if_nothing_learned(self) -> None:
        message = learnability.outcome_warning(self.metrics_rows)
        if message:
            self._warn(message)

    def _copy_policy(self):
        import copy

        return copy.deepcopy(self.model).eval()

    # --- checkpoints -------------------------------------------------------------------
    def trainer_state(self, step: int) -> dict:
        """Everything besides the weights that step ``step + 1`` depends on (tensors and plain data)."""
        return {
            "step": step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": checkpoints.rng_state(self.np_rng, self.shuffle_gen, self.loss_gen),
            "config": self.cfg.to_dict(),
            "controller": self.controller.state_dict(),
        }

    def save_checkpoint(self, step: int) -> Path:
        return checkpoints.save_checkpoint(
            self.run.checkpoint_path(step), self.model, self.tokenizer, self.trainer_state(step)
        )

    def load_trainer_state(self, path: Path) -> int:
        """Optimizer, scheduler and RNG states of a checkpoint (verified, loaded safely); returns its step."""
        return self._apply_state(checkpoints.load_trainer_state(path))

    def _apply_state(self, state: dict) -> int:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.controller.load_state_dict(state.get("controller", {}))
        checkpoints.set_rng_state(state["rng"], self.np_rng, self.shuffle_gen, self.loss_gen)
        return int(state["step"])

    def _check_resumable(self) -> None:
        """Before anything is loaded: the run's configuration must be this one (a longer budget extends it)."""
        saved = self.run.train_config().to_dict()
        diff = sorted(k for k, v in self.cfg.to_dict().items() if k != "steps" and saved.get(k) != v)
        if diff:
            shown = ", ".join(f"{k} ({saved.get(k)!r} -> {self.cfg.to_dict()[k]!r})" for k in diff[:4])
            raise EntropyLabError(
                f"cannot resume {self.run.path}: its configuration differs in {shown}; "
                "resume with the run's own settings or start a new --out"
            )
        self.run.read_metrics(), self.run.read_eval()  # one clear line if they are unreadable

    def _restore(self) -> None:
        """Continue from the latest usable checkpoint; without one, start the run over (it had none to lose)."""
        damaged: list[tuple[Path, str]] = []
        for step, path in reversed(list(self.run.checkpoints().items())):
            try:
                state = checkpoints.load_trainer_state(path)
                model, _ = load_policy(path / checkpoints.MODEL_DIR, self.device)
            except EntropyLabError as exc:
                damaged.append((path, str(exc)))
                self._warn(f"{exc}; falling back to the checkpoint before it")
                continue
            self.model.load_state_dict(model.state_dict())
            self._apply_state(state)
            self._continue_from(step, f"resuming from {path}")
            return
        if damaged:
            names = ", ".join(p.name for p, _ in damaged)
            raise EntropyLabError(
                f"no usable checkpoint to resume {self.run.path} from ({names}); the latest: {damaged[0][1]}; "
                "remove the damaged checkpoint directories and start over with --overwrite"
            )
        self._continue_from(-1, f"{self.run.path} has no checkpoint yet: starting the run over")

    def _continue_from(self, step: int, message: str) -> None:
        self.run.truncate_after(step)
        self.metrics_rows = self.run.read_metrics().to_dict("records")
        self.eval_rows = self.run.read_eval().to_dict("records")
        self.start_step = max(step, 0)
        if self.run.train_config().steps != self.cfg.steps:  # an extended budget is the run's budget now
            record = self.run.read_config()
            self.run.update_config_record(config={**record["config"], "steps": self.cfg.steps})
        self.callback("resumed", {"step": self.start_step, "message": message})

    # --- one step ----------------------------------------------------------------------
    def rollout(self) -> tuple[Rollout, torch.Tensor, list]:
        cfg = self.cfg
        problems = self.task.sample(cfg.prompts_per_step, self.np_rng)
        with self.autocast():
            ro = sample(
                self.model,
                self.tokenizer,
                problems,
                cfg.samples_per_prompt,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                max_new_tokens=cfg.max_new_tokens,
            )
        rewards = rewards_of(self.task, problems, ro).to(self.device)  # (B,)
        return ro, rewards, problems

    def single_use(self) -> bool:
        """Whether each rollout batch feeds one forward/backward only: one epoch, one mini-batch, one
        micro-batch. Then the rollout policy is the current one (old log-probs = current detached,
        ratio 1), and its statistics come from the training forward instead of a no-grad forward."""
        cfg = self.cfg
        B = cfg.prompts_per_step * cfg.samples_per_prompt
        return (
            cfg.ppo_epochs == 1
            and cfg.mini_batches == 1
            and (cfg.micro_batch_size == 0 or cfg.micro_batch_size >= B)
        )

    def _forward_stats(
        self, ro: Rollout, mb: torch.Tensor, need_entropy: bool, need_collision: bool, with_old: bool = False
    ):
        """Differentiable log-probs (and entropy, collision) of rows ``mb``, aligned with input_ids: (b, T) each.

        ``with_old``: also return the rollout policy's statistics ``{logprob, entropy, collision}``
        ((b, T) each, no grad) from this same forward, for a batch used once (``single_use``);
        else that fourth value is None.
        """
        with self.autocast():
            logits = self.model(**ro.rows(mb)).logits  # (b, T, V)
        ids = ro.input_ids[mb]
        pad = torch.zeros(len(mb), 1, device=ids.device)
        logprob = torch.cat([pad, gather_logprobs(logits[:, :-1], ids[:, 1:])], 1)  # (b, T)
        entropy = collision = old = None
        if need_entropy:
            entropy = torch.cat([pad, entropy_from_logits(logits[:, :-1])], 1)
        if need_collision or with_old:
            # With with_old the trainer checks the values and names the step (as for the rollout's).
            st = token_stats(logits[:, :-1].detach(), ids[:, 1:], check_finite=not with_old)
            st_entropy = torch.cat([pad, st.entropy.float()], 1)  # (b, T)
            st_collision = torch.cat([pad, st.collision.float()], 1)  # (b, T)
            if need_collision:
                collision = st_collision
                if entropy is None:
                    entropy = st_entropy
            if with_old:
                old = {"logprob": logprob.detach(), "entropy": st_entropy, "collision": st_collision}
        return logprob, entropy, collision, old

    def update(self, step: int, batch: RolloutBatch) -> dict:
        """PPO epochs over mini-batches with micro-batch accumulation; traced when due."""
        cfg = self.cfg
        ro, B = batch.rollout, batch.size
        adv_tok = batch.token_advantages  # (B, T)
        traced = cfg.trace_every > 0 and step % cfg.trace_every == 0
        sums: dict[str, list[float]] = defaultdict(list)
        records = []
        update = 0
        for _ in range(cfg.ppo_epochs):
            order = (
                torch.randperm(B, generator=self.shuffle_gen).to(self.device)
                if cfg.mini_batches > 1
                else torch.arange(B, device=self.device)
            )
            for mb in order.chunk(cfg.mini_batches):  # (b,) rows of one optimizer update
                ctx = (
                    self._trace_step(step, update, ro, mb, adv_tok[mb], batch.old_logprob[mb])
                    if traced
                    else contextlib.nullcontext()
                )
                with ctx as trace:
                    self.optimizer.zero_grad(set_to_none=True)
                    self._accumulate(step, batch, mb, trace, sums)
                    for k, v in self.controller.before_step(control_context(self, batch, mb)).items():
                        sums[k].append(v)
                    self._optimizer_step(step, sums)
                if trace is not None:
                    records.append(trace.records)
                update += 1
        return self._update_metrics(step, sums, records)

    def update_once(self, step: int, ro: Rollout, rewards: torch.Tensor, ref_lp) -> dict:
        """The update of a batch used once (``single_use``): one forward gives the loss and the rollout
        policy's statistics (advantages, the objective's context, metrics), no separate no-grad forward.

        Returns the step's metrics, those of ``_batch_metrics`` first. The tracer, when due, gets
        neither advantages nor old log-probs up front: the advantage comes from the loss's
        annotations and its old log-prob is its own pre-update one (ratio 1), as in the loss.
        """
        cfg = self.cfg
        need = required_inputs(cfg)
        rows = torch.arange(ro.input_ids.shape[0], device=self.device)  # (B,)
        traced = cfg.trace_every > 0 and step % cfg.trace_every == 0
        sums: dict[str, list[float]] = defaultdict(list)
        ctx = self._trace_step(step, 0, ro, rows) if traced else contextlib.nullcontext()
        with ctx as trace:
            self.optimizer.zero_grad(set_to_none=True)
            logprob, entropy, collision, old = self._forward_stats(
                ro, rows, "entropy" in need, "collision" in need, with_old=True
            )
            batch = self._make_batch(step, ro, rewards, old, ref_lp)
            metrics = self._batch_metrics(step, batch)
            n_tok, n_seq = float(batch.mask.sum()), float(len(rows))
            self._loss_backward(step, batch, rows, 0, logprob, entropy, collision, n_tok, n_seq, trace, sums)
            for k, v in self.controller.before_step(control_context(self, batch, rows)).items():
                sums[k].append(v)
            self._optimizer_step(step, sums)
        metrics.update(self._update_metrics(step, sums, [] if trace is None else [trace.records]))
        return metrics

    def _trace_step(self, step, update, ro: Rollout, mb, advantages=None, old_logprobs=None):
        """The tracer's context for the optimizer update over rows ``mb`` (b,)."""
        return self.tracer.step(
            ro.input_ids[mb],
            ro.attention_mask[mb],
            ro.response_mask[mb],
            advantages=advantages,
            old_logprobs=old_logprobs,
            step=step,
            update=update,
            forward_kwargs={"position_ids": ro.position_ids[mb]},
            optimizer=self.optimizer,
        )

    def _update_metrics(self, step: int, sums: dict, records: list) -> dict:
        """Mean of each loss and optimizer metric over the updates; trace records saved, summarised."""
        metrics = {k: float(np.mean(v)) for k, v in sums.items()}
        if records:
            df = pd.concat(records, ignore_index=True)
            save_records(df, self.run.trace_path(step), self.cfg.to_dict())
            metrics["trace/delta_entropy_mean"] = float(df.delta_entropy.mean())
            metrics["trace/omega_softmax_mean"] = float(df.omega_softmax.mean())
        return metrics

    @contextlib.contextmanager
    def _sampling_guard(self, step: int):
        """torch's sampler raises a bare RuntimeError on NaN/inf probabilities: make it the run's error."""
        try:
            yield
        except RuntimeError as exc:
            if "probability tensor contains" not in str(exc):
                raise
            raise EntropyLabError(self._nan_message(step, "sampling probabilities (policy logits)")) from None

    def _accumulate(self, step: int, batch: RolloutBatch, mb: torch.Tensor, trace, sums) -> None:
        """Forward/backward over the micro-batches of mini-batch ``mb`` (b,), gradients summed."""
        cfg = self.cfg
        need = required_inputs(cfg)
        n_tok, n_seq = float(batch.mask[mb].sum()), float(len(mb))  # the mini-batch's normalisers
        micro = cfg.micro_batch_size or len(mb)
        for offset in range(0, len(mb), micro):
            rows = mb[offset : offset + micro]  # (m,)
            logprob, entropy, collision, _ = self._forward_stats(
                batch.rollout, rows, "entropy" in need, "collision" in need
            )
            self._loss_backward(
                step, batch, rows, offset, logprob, entropy, collision, n_tok, n_seq, trace, sums
            )

    def _loss_backward(
        self, step, batch: RolloutBatch, rows, offset, logprob, entropy, collision, n_tok, n_seq, trace, sums
    ) -> None:
        """Loss of batch rows ``rows`` (m,) from their forward's (m, T) statistics, backward, metrics.

        ``offset``: where these rows start within the (traced) mini-batch; ``n_tok``, ``n_seq``: the
        mini-batch's normalisers (valid tokens, sequences).
        """
        cfg = self.cfg
        inputs = batch.loss_inputs(
            rows, logprob, entropy, collision, num_tokens=n_tok, num_seqs=n_seq, generator=self.loss_gen
        )
        out = compute_loss(inputs, cfg)
        if not torch.isfinite(out.loss):
            raise EntropyLabError(self._nan_message(step, "loss"))
        out.loss.backward()
        if trace is not None:  # what the tracer cannot see from the logits alone
            trace.annotate(
                rows=torch.arange(offset, offset + len(rows)),
                clip_indicator=out.clip_indicator,
                intervention_weight=out.intervention_weight,
                normalizer=out.normalizer,
                advantage=out.advantage,
            )
        for k, v in out.metrics.items():
            sums[k].append(v)

    def _optimizer_step(self, step: int, sums) -> None:
        """Clip, check and apply the accumulated gradient."""
        cfg = self.cfg
        clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        if not torch.isfinite(grad_norm):
            raise EntropyLabError(self._nan_message(step, "gradient"))
        sums["grad/norm"].append(float(grad_norm))
        sums["lr"].append(self.optimizer.param_groups[0]["lr"])
        self.optimizer.step()
        self.scheduler.step()

    def _nan_message(self, step: int, what: str) -> str:
        last = self.run.latest_checkpoint()
        where = f"the last good checkpoint is {last[1]}" if last else "no checkpoint was written yet"
        return f"non-finite {what} at step {step}; the run stops before the optimizer step and {where}"

    def train_step(self, step: int) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        with self._sampling_guard(step):
            ro, rewards, _ = self.rollout()
        with self.autocast():
            ref_lp = (
                None
                if self.ref_model is None
                else response_stats(self.ref_model, ro, cfg.micro_batch_size)["logprob"]
            )
        if self.single_use():
            metrics = self.update_once(step, ro, rewards, ref_lp)
        else:
            with self.autocast():
                old = response_stats(self.model, ro, cfg.micro_batch_size)  # the rollout policy, no grad
            batch = self._make_batch(step, ro, rewards, old, ref_lp)
            metrics = self._batch_metrics(step, batch)
            metrics.update(self.update(step, batch))
        metrics["time/step_s"] = time.perf_counter() - t0
        return metrics

    def _make_batch(self, step: int, ro: Rollout, rewards, old: dict, ref_lp) -> RolloutBatch:
        """The step's batch from the rollout policy's statistics ``old`` ((B, T) logprob, entropy, collision)."""
        cfg = self.cfg
        for k, v in old.items():
            if not torch.isfinite(v).all():
                raise EntropyLabError(self._nan_message(step, f"rollout {k}"))
        P, G = cfg.prompts_per_step, cfg.samples_per_prompt
        mask = ro.response_mask.float()
        seq_lp = mean_token_logprob(old["logprob"], mask).view(P, G)
        adv = advantages_for_config(rewards.view(P, G).float(), cfg, seq_lp).reshape(P * G)  # (B,)
        batch = RolloutBatch(
            rollout=ro,
            rewards=rewards,
            advantages=adv,
            old_logprob=old["logprob"],
            old_entropy=old["entropy"],
            old_collision=old["collision"],
            ref_logprob=ref_lp,
        )
        batch.context = prepare_context(batch.full_inputs(), cfg)
        return batch

    def _batch_metrics(self, step: int, batch: RolloutBatch) -> dict:
        """The step's metrics known before its update: rewards, rollout entropy, length, zero advantages."""
        ro, rewards = batch.rollout, batch.rewards
        return {
            "step": step,
            "reward/mean": float(rewards.mean()),
            "reward/std": float(rewards.std()),
            "entropy/mean": mean_response_entropy({"entropy": batch.old_entropy}, ro),
            "response/length": float(ro.response_lengths.float().mean()),
            "advantage/zero_frac": float((batch.advantages == 0).float().mean()),
        }

    def evaluate(self, step: int) -> dict:
        cfg = self.cfg
        with self.autocast(), self._sampling_guard(step):
            res = evaluate(
                self.model,
                self.tokenizer,
                self.task,
                self.eval_set,
                k=cfg.eval_k,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                max_new_tokens=cfg.max_new_tokens,
                seed=cfg.seed + 10_000 + step,
            )
        return {"step": step, **res}

    # --- the loop -------------------------------------------------------------------------
    def train(self) -> pd.DataFrame:
        """Run (or resume) to ``cfg.steps``; returns the metrics table."""
        self.setup()
        cfg = self.cfg
        with self._write_guard():
            if self.start_step == 0 and cfg.eval_every > 0:
                self.eval_rows.append(self.evaluate(0))
                self.run.write_eval(self.eval_rows)
        self.callback("start", {"start": self.start_step, "steps": cfg.steps, "warm_start": self.warm_info})
        for step in range(self.start_step + 1, cfg.steps + 1):
            with self._write_guard():
                row = self.train_step(step)
                self.metrics_rows.append(row)
                self.run.write_metrics(self.metrics_rows)
                last = step == cfg.steps
                if cfg.eval_every > 0 and (step % cfg.eval_every == 0 or last):
                    self.eval_rows.append(self.evaluate(step))
                    self.run.write_eval(self.eval_rows)
                    row = {**row, **self.eval_rows[-1]}
                if last or (cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0):
                    self.save_checkpoint(step)
            self.callback("step", row)
        if self.start_step < cfg.steps:
            self._warn_if_nothing_learned()
        self.callback("end", {"steps": cfg.steps})
        return pd.DataFrame(self.metrics_rows)

    @contextlib.contextmanager
    def _write_guard(self):
        """A failed write (full disk, read-only directory) ends the run with one line; checkpoints stay."""
        try:
            yield
        except OSError as exc:
            last = self.run.latest_checkpoint()
            keep = f"the last good checkpoint is {last[1]}" if last else "no checkpoint was written yet"
            raise EntropyLabError(
                f"{os_error_message(exc)}; the run stopped and {keep} (fix the cause, then pass --resume)"
            ) from None
