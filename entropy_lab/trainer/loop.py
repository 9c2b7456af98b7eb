"""The bundled GRPO trainer: rollout -> rewards -> advantages -> objective -> traced optimizer step.

Data flows one way. Every method of the catalogue is a preset of the one flat
``TrainConfig`` (``entropy_lab.methods``); the trainer has no per-method branches: the
objective, advantage and aggregation registries do the work. Every ``trace_every``-th
step's updates run inside ``EntropyTracer`` and their records go to ``traces/``.

This module is the loop; its parts live beside it: ``update`` (the optimizer updates of a
step), ``resume`` (the trainer state and continuing a run), ``guards`` (the one-line errors
of a failed step or write); ``entropy_lab.runtime`` picks the device and autocast.

Reliability: the configuration is validated and the output directory checked before
anything is loaded or deleted; ``train`` holds the run's lock (``entropy_lab.run_lock``)
from just before the directory is touched until it returns or raises; metrics are rewritten atomically after every step (a crash
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
import copy
import random
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from entropy_lab import checkpoints
from entropy_lab.batch import RolloutBatch
from entropy_lab.config import TrainConfig
from entropy_lab.controllers import build_controller
from entropy_lab.errors import EntropyLabWarning
from entropy_lab.methods import validate_config
from entropy_lab.models import load_policy, load_policy_and_task
from entropy_lab.objectives import required_inputs
from entropy_lab.optim import build_optimizer
from entropy_lab.rollout import (
    Rollout,
    check_positions,
    evaluate,
    prompt_ids,
    response_stats,
    rewards_of,
    sample,
)
from entropy_lab.run_lock import RunLock
from entropy_lab.runs import RunDir
from entropy_lab.runtime import autocast, autocast_dtype, pick_device
from entropy_lab.trace.tracer import EntropyTracer
from entropy_lab.trainer import learnability, resume
from entropy_lab.trainer.guards import divergence_cause, sampling_guard, write_guard
from entropy_lab.trainer.loggers import with_loggers
from entropy_lab.trainer.resume import RandomStreams, TrainerState
from entropy_lab.trainer.update import Updater, batch_metrics, make_batch

Callback = Callable[[str, dict], None]


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
        self.cfg = validate_config(cfg)  # the whole configuration, once, before anything is loaded
        self.run = RunDir(Path(out))
        self.lock = RunLock(self.run.path, warn=self._warn)
        # report_to: TensorBoard / W&B see every step's metrics (an unknown or missing logger fails here).
        self.callback = with_loggers(callback or (lambda event, info: None), self.cfg, self.run)
        self.device = pick_device(cfg.device)
        self.amp_dtype = autocast_dtype(cfg, self.device)
        self.resume, self.overwrite = resume, overwrite
        self.metrics_rows: list[dict] = []
        self.eval_rows: list[dict] = []
        self.start_step = 0
        self.step = 0  # the last step done
        self.ready = False  # set-up done

    def __repr__(self) -> str:
        policy = self.cfg.model or "the embedded tiny policy"
        task = self.cfg.dataset or self.cfg.task
        state = f"step={self.step}/{self.cfg.steps}" if self.ready else "not set up"
        return (
            f"Trainer(method={self.cfg.method!r}, task={task!r}, model={policy!r}, "
            f"device={self.device}, {state}, run={str(self.run.path)!r})"
        )

    def autocast(self) -> contextlib.AbstractContextManager:
        """The run's autocast context (none on CPU under ``dtype=auto``)."""
        return autocast(self.device, self.amp_dtype)

    # --- set-up ------------------------------------------------------------------------
    def setup(self, create_run: bool = True) -> None:
        """Load task and policy, build optimizer and tracer; create (or restore) the run directory.

        The output directory is checked first and an existing run is replaced only after the
        policy and task loaded, so no bad setting can cost an old run. With ``create_run`` the
        run's lock is taken just before the directory is touched; ``train`` gives it back,
        and a caller driving ``setup`` and ``train_step`` itself calls ``release_lock``.
        """
        cfg = self.cfg
        if create_run:
            self.run.check_target(overwrite=self.overwrite, resume=self.resume)
            if self.resume:
                resume.check_resumable(self.run, cfg)
            self.warn_if_cannot_learn()
        self.model, self.tokenizer, self.task, self.warm_info = load_policy_and_task(
            cfg, self.device, self.callback
        )
        # Seeded after the policy is in place, so a run does not depend on whether its warm
        # start was trained now or read from the cache.
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self.streams = RandomStreams(
            np_rng=np.random.default_rng(cfg.seed),
            shuffle_gen=torch.Generator().manual_seed(cfg.seed + 1),
            loss_gen=torch.Generator(device=self.device).manual_seed(cfg.seed + 2),
        )
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
            jvp_positions=cfg.trace_jvp_positions or None,
            eta_grid=cfg.trace_eta_grid,
            attribution=cfg.trace_attribution,
        )
        self.controller = build_controller(cfg)
        self.updater = Updater(
            cfg=cfg,
            run=self.run,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            controller=self.controller,
            tracer=self.tracer,
            streams=self.streams,
            device=self.device,
            autocast=self.autocast,
        )
        self.eval_set = self.task.eval_problems(cfg.eval_prompts)
        self.check_prompts_fit()
        self.ready = True
        if not create_run:
            return
        self.lock.acquire("--resume" if self.resume else "--overwrite" if self.overwrite else "train into")
        self.run.check_target(overwrite=self.overwrite, resume=self.resume)  # again, now under the lock
        if self.resume:
            self._restore()
        else:
            self.run.create(cfg, overwrite=self.overwrite, extra={"warm_start": self.warm_info})

    def release_lock(self) -> None:
        """Give back the run's lock (``train`` does this itself on every exit)."""
        self.lock.release()

    def check_prompts_fit(self, draws: int = 64) -> None:
        """Before the run directory is touched: the evaluation prompts and ``draws`` training prompts (drawn
        with a generator of their own, so the run's draws are unchanged) plus ``max_new_tokens`` fit the
        model's positions. ``rollout.sample`` checks every later batch too."""
        problems = [*self.eval_set, *self.task.sample(draws, np.random.default_rng(self.cfg.seed))]
        longest = max(len(prompt_ids(self.tokenizer, p.prompt)) for p in problems)
        check_positions(self.model, longest, self.cfg.max_new_tokens)

    def _copy_policy(self):
        return copy.deepcopy(self.model).eval()

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

    # --- checkpoints (``resume``) ------------------------------------------------------------
    def trainer_state(self, step: int) -> dict:
        """Everything besides the weights that step ``step + 1`` depends on (tensors and plain data)."""
        state = TrainerState.capture(
            step, self.cfg, self.optimizer, self.scheduler, self.controller, self.streams
        )
        return state.as_dict()

    def save_checkpoint(self, step: int) -> Path:
        return checkpoints.save_checkpoint(
            self.run.checkpoint_path(step), self.model, self.tokenizer, self.trainer_state(step)
        )

    def load_trainer_state(self, path: Path) -> int:
        """Optimizer, scheduler and RNG states of a checkpoint (verified, loaded safely); returns its step."""
        return self._apply_state(TrainerState.from_dict(checkpoints.load_trainer_state(path)))

    def _apply_state(self, state: TrainerState) -> int:
        self.step = state.apply(self.optimizer, self.scheduler, self.controller, self.streams)
        return self.step

    def _restore(self) -> None:
        """Continue from the latest usable checkpoint; without one, start the run over (it had none to lose)."""
        found = resume.latest_usable(self.run, self.device, self._warn)
        if found is None:
            step, message = -1, f"{self.run.path} has no checkpoint yet: starting the run over"
        else:
            self.model.load_state_dict(found.weights)
            self._apply_state(found.state)
            step, message = found.step, f"resuming from {found.path}"
        self.metrics_rows, self.eval_rows = resume.continue_from(self.run, self.cfg, step)
        self.start_step = self.step = max(step, 0)
        self.callback("resumed", {"step": self.start_step, "message": message})

    # --- one step ----------------------------------------------------------------------
    def rollout(self) -> tuple[Rollout, torch.Tensor, list]:
        """Sample the step's prompts and responses; returns (rollout, (B,) rewards, problems)."""
        cfg = self.cfg
        problems = self.task.sample(cfg.prompts_per_step, self.streams.np_rng)
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

    def train_step(self, step: int) -> dict:
        """Rollout, rewards, the batch and its updates; returns the step's metrics."""
        t0 = time.perf_counter()
        with sampling_guard(self.run, step, *self._updated_before(step - 1)):
            ro, rewards, _ = self.rollout()
        metrics = self.learn(step, ro, rewards)
        metrics["time/step_s"] = time.perf_counter() - t0
        return metrics

    def learn(self, step: int, ro: Rollout, rewards: torch.Tensor) -> dict:
        """The step's updates on a sampled batch (traced when due); returns the step's metrics.

        Split from ``train_step`` so a study can apply several updates to one rollout.
        """
        cfg = self.cfg
        with self.autocast():
            ref_lp = (
                None
                if self.ref_model is None
                else response_stats(self.ref_model, ro, cfg.micro_batch_size)["logprob"]
            )  # (B, T)
        if self.single_use():
            metrics = self.update_once(step, ro, rewards, ref_lp)
        else:
            with self.autocast():
                old = response_stats(self.model, ro, cfg.micro_batch_size)  # the rollout policy, no grad
            batch = make_batch(cfg, self.run, step, ro, rewards, old, ref_lp)
            metrics = batch_metrics(step, batch)
            metrics.update(self.update(step, batch))
        return metrics

    def update(self, step: int, batch: RolloutBatch) -> dict:
        """PPO epochs over mini-batches of ``batch``, traced when due (``Updater.ppo``); the update's metrics."""
        return self.updater.ppo(step, batch)

    def update_once(self, step: int, ro: Rollout, rewards: torch.Tensor, ref_lp: torch.Tensor | None) -> dict:
        """The one update of a batch used once (``Updater.once``); the step's metrics."""
        return self.updater.once(step, ro, rewards, ref_lp)

    def _updated_before(self, step: int) -> tuple[int | None, str]:
        """(the step whose update made the current weights, the likely cause if they diverged); None before any."""
        if step < 1:
            return None, ""
        return step, divergence_cause(self.optimizer.param_groups[0]["lr"], self.cfg.weight_decay)

    def evaluate(self, step: int) -> dict:
        """pass@k and the other evaluation metrics of the held-out problems at ``step``."""
        cfg = self.cfg
        with self.autocast(), sampling_guard(self.run, step, *self._updated_before(step)):
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
        """Run (or resume) to ``cfg.steps``, holding the run's lock; returns the metrics table."""
        try:
            return self._train()
        finally:
            self.lock.release()  # also on an error or Ctrl-C

    def _train(self) -> pd.DataFrame:
        self.setup()
        cfg = self.cfg
        with write_guard(self.run):
            if self.start_step == 0 and cfg.eval_every > 0:
                self.eval_rows.append(self.evaluate(0))
                self.run.write_eval(self.eval_rows)
        self.callback("start", {"start": self.start_step, "steps": cfg.steps, "warm_start": self.warm_info})
        for step in range(self.start_step + 1, cfg.steps + 1):
            with write_guard(self.run):
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
            self.step = step
            self.callback("step", row)
        if self.start_step < cfg.steps:
            self._warn_if_nothing_learned()
        self.callback("end", {"steps": cfg.steps})
        return pd.DataFrame(self.metrics_rows)
