"""Steps per second of the bundled GRPO trainer against TRL's ``GRPOTrainer``, side by side in one run.

Run::

    python benchmarks/bench_trainer_vs_trl.py              # default config, 2 warm-up + 8 timed steps each
    python benchmarks/bench_trainer_vs_trl.py --repeats 12 --json out.json

Both trainers get the same configuration, as far as TRL's options reach:

- weights: the default warm-started countdown policy (``entropy_lab.models.warm_start``), saved
  with ``save_pretrained`` and loaded by each trainer from that directory;
- prompts: the same 32 countdown prompts every step (the bundled task's ``sample`` is pinned to
  them; TRL's dataset holds exactly them), 8 samples each (TRL ``num_generations``), the same
  text with the tokenizer's BOS in front, as the bundled rollout encodes it;
- sampling: temperature 1, top-p 1, no top-k, at most 16 new tokens (``max_completion_length``);
- reward: the countdown task's ``reward`` on the decoded completion;
- advantage: group mean and std (TRL ``scale_rewards="group"``);
- loss: PPO-clip with eps 0.2/0.2, token-mean over the whole batch (TRL ``loss_type="dapo"``: the
  number of active tokens of the global batch), no KL (``beta=0``, so no reference model), one
  epoch and one mini-batch per rollout batch (``num_iterations=1``, no gradient accumulation);
- optimizer: AdamW (torch's), lr 1e-3, weight decay 0, betas (0.9, 0.999), eps 1e-8, constant
  schedule, gradient-norm clip 1.0; fp32 on CPU.

The bundled trainer runs with tracing, evaluation and checkpoints off (TRL does none of them per
step). Timing: TRL drives its own loop; a callback runs one bundled step after each TRL step, so
the two alternate (TRL, bundled, TRL, ...). A TRL step is everything its loop did since the
previous bundled step ended (batch fetch, generation, reward, loss, backward, optimizer step,
logging bookkeeping); a bundled step is one ``Trainer.train_step``. CPU time of the process
(``time.process_time``) and wall time are both recorded; with ``--threads 1`` CPU time is the
stable one on a shared machine and decides the target.

Target: bundled steps/s >= 1.15 x TRL's (CPU-time medians). TRL is an optional extra
(``pip install 'entropy-lab[trl]'``); without it the script prints one line and exits 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import transformers
from common import add_timing_args
from timing import CLOCKS, clock, since

from entropy_lab.methods import resolve_config
from entropy_lab.models import load_policy, warm_start
from entropy_lab.tasks import get_task
from entropy_lab.trainer import Trainer

TARGET = 1.15  # bundled steps/s over TRL steps/s


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=32, help="prompts per step")
    p.add_argument("--samples", type=int, default=8, help="samples per prompt (group size)")
    p.add_argument("--seed", type=int, default=0)
    add_timing_args(p, repeats=8, warmup=2, unit="steps of each trainer")
    return p.parse_args(argv)


def bundled_trainer(policy_dir: Path, run_dir: Path, problems, args) -> Trainer:
    """The bundled trainer on the default grpo config, prompts pinned to ``problems``."""
    cfg = resolve_config(
        "grpo",
        {
            "model": str(policy_dir),
            "prompts_per_step": args.prompts,
            "samples_per_prompt": args.samples,
            "seed": args.seed,
            "device": "cpu",
            "trace_every": 0,
            "eval_every": 0,
            "checkpoint_every": 0,
        },
    )
    trainer = Trainer(cfg, run_dir)
    trainer.setup()
    trainer.task.sample = lambda n, rng: list(problems)  # same prompts as TRL's dataset, every step
    return trainer


def trl_trainer(policy_dir: Path, out_dir: Path, problems, task, bundled: Trainer, args, callbacks):
    """TRL's GRPOTrainer configured like ``bundled.cfg`` (see the module docstring)."""
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    cfg = bundled.cfg
    model, tokenizer = load_policy(policy_dir)
    rows = [{"prompt": tokenizer.bos_token + p.prompt, "problem": i} for i, p in enumerate(problems)]

    def countdown_reward(prompts, completions, problem, **_):
        return [task.reward(problems[i], c) for i, c in zip(problem, completions, strict=True)]

    targs = GRPOConfig(
        output_dir=str(out_dir),
        use_cpu=True,
        bf16=False,
        seed=args.seed,
        max_steps=args.warmup + args.repeats,
        per_device_train_batch_size=cfg.prompts_per_step * cfg.samples_per_prompt,
        gradient_accumulation_steps=1,
        num_generations=cfg.samples_per_prompt,
        max_completion_length=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=0,
        learning_rate=cfg.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=cfg.weight_decay,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        optim="adamw_torch",
        max_grad_norm=cfg.grad_clip,
        beta=0.0,
        epsilon=cfg.clip_eps_low,
        epsilon_high=cfg.clip_eps_high,
        loss_type="dapo",
        scale_rewards="group",
        num_iterations=cfg.ppo_epochs,
        mask_truncated_completions=False,
        logging_steps=10**6,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        log_completions=False,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=countdown_reward,
        args=targs,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)  # its end-of-training log dict is not a result here
    return trainer


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import trl
        from transformers import TrainerCallback
    except ImportError:
        print("bench_trainer_vs_trl: TRL is not installed (pip install 'entropy-lab[trl]'); skipped")
        return 0
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    task = get_task("countdown")
    problems = task.sample(args.prompts, np.random.default_rng(args.seed))
    times = {clock_: {"bundled": [], "trl": []} for clock_ in CLOCKS}

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model, tokenizer, _ = warm_start(task)
        model.save_pretrained(tmp / "policy")
        tokenizer.save_pretrained(tmp / "policy")
        bundled = bundled_trainer(tmp / "policy", tmp / "run", problems, args)

        class Alternate(TrainerCallback):
            """After each TRL step: record it, then run and record one bundled step."""

            def __init__(self):
                self.mark = None
                self.step = 0

            def on_train_begin(self, *a, **k):
                self.mark = clock()

            def on_step_end(self, *a, **k):
                trl_t = since(self.mark)
                self.step += 1
                t0 = clock()
                bundled.train_step(self.step)
                bundled_t = since(t0)
                if self.step > args.warmup:
                    for c in CLOCKS:
                        times[c]["trl"].append(trl_t[c])
                        times[c]["bundled"].append(bundled_t[c])
                self.mark = clock()

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = trl_trainer(tmp / "policy", tmp / "trl", problems, task, bundled, args, [Alternate()])
            trainer.train()

    med = {c: {k: statistics.median(v) for k, v in times[c].items()} for c in CLOCKS}
    ratio = {c: med[c]["trl"] / med[c]["bundled"] for c in CLOCKS}  # = bundled steps/s over TRL's
    pair = {
        c: statistics.median(t / b for t, b in zip(times[c]["trl"], times[c]["bundled"], strict=True))
        for c in CLOCKS
    }
    passed = ratio["cpu"] >= TARGET
    print(
        f"trainer vs TRL: torch {torch.__version__}, transformers {transformers.__version__}, "
        f"trl {trl.__version__}, cpu, {torch.get_num_threads()} threads"
    )
    print(
        f"config: grpo, {args.prompts} prompts x {args.samples} samples, max {bundled.cfg.max_new_tokens} new "
        f"tokens, AdamW lr {bundled.cfg.lr}, token-mean PPO-clip, beta 0; "
        f"{args.repeats} alternating timed steps each after {args.warmup} warm-up"
    )
    print(f"  {'trainer':<10}{'clock':<6}{'median s':>10}{'min':>8}{'max':>8}{'steps/s':>9}")
    for name in ("bundled", "trl"):
        for c in CLOCKS:
            v = times[c][name]
            print(
                f"  {name:<10}{c:<6}{med[c][name]:>10.3f}{min(v):>8.3f}{max(v):>8.3f}{1 / med[c][name]:>9.2f}"
            )
    print(f"  {'bundled/TRL steps/s':<22}{'cpu':>8}{'wall':>8}")
    print(f"  {'ratio of medians':<22}{ratio['cpu']:>8.3f}{ratio['wall']:>8.3f}")
    print(f"  {'median of pair ratios':<22}{pair['cpu']:>8.3f}{pair['wall']:>8.3f}")
    print(
        f"  bundled/TRL (CPU time) {ratio['cpu']:.3f} (target >= {TARGET:.2f})  {'PASS' if passed else 'FAIL'}"
    )
    if args.json:
        out = {
            "torch": torch.__version__,
            "trl": trl.__version__,
            "threads": torch.get_num_threads(),
            "config": vars(args),
            "times_s": times,
            "median_s": med,
            "ratio_bundled_over_trl": ratio,
            "median_pair_ratio": pair,
            "target": TARGET,
            "pass": passed,
        }
        Path(args.json).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
