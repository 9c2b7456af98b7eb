"""The bundled GRPO trainer: rollout -> rewards -> advantages -> objective -> traced optimizer step.

Data flows one way. Every method of the catalogue is a preset of the one flat
``TrainConfig`` (``entropy_lab.methods``); the trainer has no per-method branches: the
objective, advantage and aggregation registries do the work. Every ``trace_every``-th
step's updates run inside ``EntropyTracer`` and their records go to ``traces/``.

Reliability: metrics are rewritten atomically after every step (a crash loses at most
the step in flight); checkpoints hold the model, optimizer, scheduler, every RNG state
and the step, written to a temporary directory and renamed; ``resume`` continues from
the latest one and, on CPU, reproduces the uninterrupted run's metrics exactly. A
non-finite loss or gradient stops the run before the optimizer touches the weights.

Simplifications: the policy is in eval mode throughout (no dropout); rollouts use the
current policy (no separate inference engine); the learning-rate schedule is linear
warm-up then constant.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from entropy_lab.advantages import advantages_for_config, mean_token_logprob
from entropy_lab.batch import RolloutBatch
from entropy_lab.config import TrainConfig
from entropy_lab.controllers import build_controller, control_context
from entropy_lab.errors import EntropyLabError
from entropy_lab.models import load_policy, warm_start
from entropy_lab.objectives import compute_loss, prepare_context, required_inputs
from entropy_lab.optim import build_optimizer
from entropy_lab.records import save_records
from entropy_lab.rollout import Rollout, evaluate, mean_response_entropy, response_stats, rewards_of, sample
from entropy_lab.runs import RunDir
from entropy_lab.stats import entropy_from_logits, gather_logprobs, token_stats
from entropy_lab.tasks import get_task, load_dataset_task
from entropy_lab.trace import EntropyTracer

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
        self.cfg = cfg
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
            task = load_dataset_task(cfg.dataset, tokenizer) if cfg.dataset else get_task(cfg.task)
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
        """Load task and policy, build optimizer and tracer; create (or restore) the run directory."""
        cfg = self.cfg
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
        if self.resume and self.run.latest_checkpoint() is not None:
            self._restore()
        elif self.resume:
            raise EntropyLabError(
                f"{self.run.path} has no checkpoint to resume from; start it without --resume"
                + (" and with --overwrite" if self.run.config_path.exists() else "")
            )
        else:
            self.run.create(cfg, overwrite=self.overwrite, extra={"warm_start": self.warm_info})

    def _copy_policy(self):
        import copy

        return copy.deepcopy(self.model).eval()

    # --- checkpoints -------------------------------------------------------------------
    def _rng_state(self) -> dict:
        state = {
            "torch": torch.get_rng_state(),
            "numpy": self.np_rng.bit_generator.state,
            "python": random.getstate(),
            "shuffle": self.shuffle_gen.get_state(),
            "loss": self.loss_gen.get_state(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def save_checkpoint(self, step: int) -> Path:
        import shutil

        final = self.run.checkpoint_path(step)
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self.model.save_pretrained(tmp / "model")
        self.tokenizer.save_pretrained(tmp / "model")
        torch.save(
            {
                "step": step,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": self._rng_state(),
                "config": self.cfg.to_dict(),
                "controller": self.controller.state_dict(),
            },
            tmp / "trainer_state.pt",
        )
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        return final

    def load_trainer_state(self, path: Path) -> int:
        """Optimizer, scheduler and RNG states of a checkpoint; returns its step."""
        state = torch.load(path / "trainer_state.pt", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.controller.load_state_dict(state.get("controller", {}))
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        self.np_rng.bit_generator.state = rng["numpy"]
        random.setstate(rng["python"])
        self.shuffle_gen.set_state(rng["shuffle"])
        self.loss_gen.set_state(rng["loss"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        return int(state["step"])

    def _restore(self) -> None:
        step, path = self.run.latest_checkpoint()
        saved = self.run.train_config().to_dict()
        # A longer budget extends the run; anything else would change what the checkpoint means.
        diff = sorted(k for k, v in self.cfg.to_dict().items() if k != "steps" and saved.get(k) != v)
        if diff:
            raise EntropyLabError(
                f"cannot resume {self.run.path}: its configuration differs in {', '.join(diff)}"
            )
        model, _ = load_policy(path / "model", self.device)  # checks its tokenizer against the model
        self.model.load_state_dict(model.state_dict())
        self.load_trainer_state(path)
        self.run.truncate_after(step)
        self.metrics_rows = self.run.read_metrics().to_dict("records")
        self.eval_rows = self.run.read_eval().to_dict("records")
        self.start_step = step
        self.callback("resumed", {"step": step, "path": str(path)})

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

    def _forward_stats(self, ro: Rollout, mb: torch.Tensor, need_entropy: bool, need_collision: bool):
        """Differentiable log-probs (and entropy, collision) of rows ``mb``, aligned with input_ids: (b, T) each."""
        with self.autocast():
            logits = self.model(**ro.rows(mb)).logits  # (b, T, V)
        ids = ro.input_ids[mb]
        pad = torch.zeros(len(mb), 1, device=ids.device)
        logprob = torch.cat([pad, gather_logprobs(logits[:, :-1], ids[:, 1:])], 1)  # (b, T)
        entropy = collision = None
        if need_entropy:
            entropy = torch.cat([pad, entropy_from_logits(logits[:, :-1])], 1)
        if need_collision:
            st = token_stats(logits[:, :-1].detach(), ids[:, 1:])
            collision = torch.cat([pad, st.collision.float()], 1)
            if entropy is None:
                entropy = torch.cat([pad, st.entropy.float()], 1)
        return logprob, entropy, collision

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
                    self.tracer.step(
                        ro.input_ids[mb],
                        ro.attention_mask[mb],
                        ro.response_mask[mb],
                        advantages=adv_tok[mb],
                        old_logprobs=batch.old_logprob[mb],
                        step=step,
                        update=update,
                        forward_kwargs={"position_ids": ro.position_ids[mb]},
                        optimizer=self.optimizer,
                    )
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
            logprob, entropy, collision = self._forward_stats(
                batch.rollout, rows, "entropy" in need, "collision" in need
            )
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
        B = len(rewards)
        with self.autocast():
            old = response_stats(self.model, ro, cfg.micro_batch_size)
            ref_lp = (
                None
                if self.ref_model is None
                else response_stats(self.ref_model, ro, cfg.micro_batch_size)["logprob"]
            )
        for k, v in old.items():
            if not torch.isfinite(v).all():
                raise EntropyLabError(self._nan_message(step, f"rollout {k}"))
        P, G = cfg.prompts_per_step, cfg.samples_per_prompt
        mask = ro.response_mask.float()
        seq_lp = mean_token_logprob(old["logprob"], mask).view(P, G)
        adv = advantages_for_config(rewards.view(P, G).float(), cfg, seq_lp).reshape(B)  # (B,)
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
        metrics = {
            "step": step,
            "reward/mean": float(rewards.mean()),
            "reward/std": float(rewards.std()),
            "entropy/mean": mean_response_entropy(old, ro),
            "response/length": float(ro.response_lengths.float().mean()),
            "advantage/zero_frac": float((adv == 0).float().mean()),
        }
        metrics.update(self.update(step, batch))
        metrics["time/step_s"] = time.perf_counter() - t0
        return metrics

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

    # --- the loop ----------------------------------------------------------------------
    def train(self) -> pd.DataFrame:
        """Run (or resume) to ``cfg.steps``; returns the metrics table."""
        self.setup()
        cfg = self.cfg
        if self.start_step == 0 and cfg.eval_every > 0:
            self.eval_rows.append(self.evaluate(0))
            self.run.write_eval(self.eval_rows)
        self.callback("start", {"start": self.start_step, "steps": cfg.steps, "warm_start": self.warm_info})
        for step in range(self.start_step + 1, cfg.steps + 1):
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
        self.callback("end", {"steps": cfg.steps})
        return pd.DataFrame(self.metrics_rows)


def method_fields() -> set[str]:
    """Config fields that some method preset sets: they belong to the method, not to the run."""
    from entropy_lab.methods import METHODS

    return {k for m in METHODS.values() for k in m.defaults}


def trace_checkpoint(
    run: RunDir, step: int | None = None, method: str | None = None, callback: Callback | None = None
) -> RunDir:
    """One traced update from the checkpoint at ``step``, on the batch the run would have drawn next.

    The update is step N+1 of the run. With the run's own method its trace goes to
    ``run/traces/step_{N+1}.parquet`` when training did not trace that step; otherwise (another
    method, or the file exists) to the run directory ``run/retrace-<method>-step_N``.
    Returns the run directory holding the trace. The checkpoint itself is not modified.
    """
    from entropy_lab.methods import resolve_config

    ckpts = run.checkpoints()
    if not ckpts:
        raise EntropyLabError(f"{run.path} has no checkpoints to trace from")
    if step is None:
        step = list(ckpts)[-1]
    if step not in ckpts:
        raise EntropyLabError(
            f"{run.path} has no checkpoint at step {step}; available: {', '.join(map(str, ckpts))}"
        )
    base = run.train_config()
    method = method or base.method
    if method != base.method:  # a new preset over the run's non-method settings
        defaults = TrainConfig().to_dict()
        base = base.replace(**{k: defaults[k] for k in method_fields()})
    cfg = resolve_config(method, {"model": str(ckpts[step] / "model"), "trace_every": 1}, base=base)
    target = run
    if method != run.train_config().method or run.trace_path(step + 1).exists():
        target = RunDir(run.path / f"retrace-{method}-step_{step:06d}")
        target.create(cfg, overwrite=True, extra={"traced_from": str(ckpts[step])})
    trainer = Trainer(cfg, target.path, callback=callback)
    trainer.setup(create_run=False)
    trainer.load_trainer_state(ckpts[step])
    trainer.train_step(step + 1)
    return target
