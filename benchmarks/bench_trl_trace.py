"""A traced TRL GRPO step against an untraced one at the example's shape, alternating in one run.

Run::

    python benchmarks/bench_trl_trace.py                 # 2 warm-up + 12 timed generation periods
    python benchmarks/bench_trl_trace.py --method none   # TRL's own loss instead of STEER
    python benchmarks/bench_trl_trace.py --own-forward   # also the tracer's own pre-update forward
    python benchmarks/bench_trl_trace.py --hidden 256 --layers 4 --completion 32   # a heavier model

Both variants are ``TracedGRPOTrainer`` s on the model, data, reward and ``GRPOConfig`` of
``examples/trl_grpo_traced.py`` (a tiny Qwen2, 8 generations of one prompt per micro-batch,
gradient accumulation 2, num_iterations 2, ``loss_type="dapo"``, STEER), one with
``trace_every=1`` (every step traced, its trace written) and one with ``trace_every=0``, so that
tracing is the only difference. ``--own-forward`` adds a third traced variant whose pre-update
side comes from the tracer's own no-grad forward instead of TRL's training forward (the path a
head the tap cannot recompute takes, and the only path before the tap). Each trainer runs its own ``train()`` in a thread; a callback
hands the turn over after every optimizer step, so the two alternate step by step (traced,
untraced, traced, ...) and never run at once. A step is everything its loop did between two
hand-overs: batch fetch, generation and reward where due, forwards, backward, optimizer step,
logging, and for the traced one the tracer's post-update forward and the trace file.

TRL generates once per ``steps_per_generation * num_iterations / gradient_accumulation_steps``
optimizer steps (2 here), so single steps alternate between steps with and without generation;
the timed unit is one such generation period (its steps summed), and the reported time is the
median over periods. Also printed: the same ratio without the time spent in TRL's
``_generate_and_score_completions`` (the training part of the step alone), which is the stricter
number, since generation costs the same in both variants.

Target: traced / untraced <= 1.35 per full step (CPU-time medians). CPU time of the process
(``time.process_time``) counts only the running variant, because the other one is blocked.
The threads share the global torch generator; it is seeded before every generation (the k-th
of each variant alike), so all variants sample the same completions: tracing does not change the
update, so their parameters stay equal.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import torch
import transformers
from common import add_timing_args
from timing import CLOCKS, clock, print_table, since

TARGET = 1.35  # traced / untraced step, CPU time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="steer", help="catalogue method, or 'none' for TRL's own loss")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hidden", type=int, default=64, help="hidden size (the example's: 64; MLP 2x, 4 heads)")
    p.add_argument("--layers", type=int, default=2, help="decoder layers (the example's: 2)")
    p.add_argument("--completion", type=int, default=4, help="max_completion_length (the example's: 4)")
    p.add_argument(
        "--own-forward", action="store_true", help="add the variant traced with its own pre-update forward"
    )
    add_timing_args(p, repeats=12, warmup=2, unit="generation periods of each variant")
    return p.parse_args(argv)


def build_example(model_dir: Path, hidden: int = 64, layers: int = 2, context: int = 64):
    """The example's tiny Qwen2 (``hidden``, ``layers``) and character tokenizer, saved in ``model_dir``;
    its prompts and reward."""
    from datasets import Dataset

    from entropy_lab.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer("0123456789+=")
    cfg = transformers.Qwen2Config(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, tie_word_embeddings=False,
        initializer_range=0.1,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    rows = [(a, b) for a in range(10) for b in range(10)]
    data = Dataset.from_dict(
        {"prompt": [f"{a}+{b}=" for a, b in rows], "answer": [str((a + b) % 10) for a, b in rows]}
    )

    def correct(completions, answer, **kwargs):
        return [float(c[:1] == a) for c, a in zip(completions, answer, strict=True)]

    return tok, data, correct


def example_args(out: Path, max_steps: int, seed: int, completion: int = 4):
    """The example's GRPOConfig, for ``max_steps`` steps of at most ``completion`` new tokens."""
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=str(out), per_device_train_batch_size=8, num_generations=8, max_completion_length=completion,
        gradient_accumulation_steps=2, num_iterations=2, max_steps=max_steps, learning_rate=1e-3,
        temperature=1.0, loss_type="dapo", logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
        seed=seed, disable_tqdm=True, bf16=False,
    )  # fmt: skip


class Turns:
    """Lock-step turns of the variants' train loops, in the order of ``variants``; per-step times."""

    def __init__(self, variants: tuple[str, ...]):
        self.variants = variants
        self.sem = {name: threading.Semaphore(1 if i == 0 else 0) for i, name in enumerate(variants)}
        self.steps: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
        self.generation: dict[str, list[dict[str, float]]] = {name: [] for name in variants}

    def other(self, name: str) -> str:
        """The variant whose turn follows ``name``'s."""
        return self.variants[(self.variants.index(name) + 1) % len(self.variants)]

    def callback(self, name: str):
        from transformers import TrainerCallback

        turns = self

        class Turn(TrainerCallback):
            def on_train_begin(self, *a, **k):
                turns.sem[name].acquire()
                self.mark, turns.generation[name] = clock(), [{"cpu": 0.0, "wall": 0.0}]

            def on_step_end(self, *a, **k):
                turns.steps[name].append(since(self.mark))
                turns.sem[turns.other(name)].release()
                turns.sem[name].acquire()
                turns.generation[name].append({"cpu": 0.0, "wall": 0.0})
                self.mark = clock()

            def on_train_end(self, *a, **k):
                turns.sem[turns.other(name)].release()

        return Turn()

    def time_generation(self, name: str, trainer, seed: int) -> None:
        """Time TRL's generation and scoring into the current step's ``generation`` entry; seed the k-th
        generation of every variant alike, so that all variants train on the same completions."""
        inner = trainer._generate_and_score_completions
        calls = [0]

        def timed(inputs):
            calls[0] += 1
            torch.manual_seed(seed * 1_000_003 + calls[0])  # the threads share the global generator
            t0 = clock()
            try:
                return inner(inputs)
            finally:
                spent = since(t0)
                for c in CLOCKS:
                    self.generation[name][-1][c] += spent[c]

        trainer._generate_and_score_completions = timed


def per_period(steps: list[dict[str, float]], period: int, warmup: int) -> dict[str, list[float]]:
    """Sum the steps of each generation period; drop the first ``warmup`` periods and a partial last one."""
    n = len(steps) // period
    return {
        c: [sum(s[c] for s in steps[i * period : (i + 1) * period]) for i in range(warmup, n)] for c in CLOCKS
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import trl

        from entropy_lab.integrations.trl import TracedGRPOTrainer
    except ImportError:
        print("bench_trl_trace: TRL is not installed (pip install 'entropy-lab[trl]'); skipped")
        return 0
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    period = 2  # optimizer steps per generation: steps_per_generation 2 x num_iterations 2 / accumulation 2
    max_steps = period * (args.warmup + args.repeats)
    method = None if args.method == "none" else args.method
    variants = ("traced", "untraced") + (("own-forward",) if args.own_forward else ())
    turns = Turns(variants)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tmp = Path(tmp)
        tok, data, reward = build_example(tmp / "model", args.hidden, args.layers, 64 + args.completion)
        trainers = {}
        for name in variants:
            trainers[name] = TracedGRPOTrainer(
                model=str(tmp / "model"), reward_funcs=reward, args=example_args(tmp / name, max_steps, args.seed, args.completion),
                train_dataset=data, processing_class=tok, method=method, trace_every=0 if name == "untraced" else 1,
                callbacks=[turns.callback(name)],
            )  # fmt: skip
            if name == "own-forward":
                trainers[name]._head.off = "measured with the tracer's own pre-update forward"
            turns.time_generation(name, trainers[name], args.seed)
            trainers[name].remove_callback(transformers.trainer_callback.PrinterCallback)
        errors: list[BaseException] = []

        def run(name):
            try:
                trainers[name].train()
            except BaseException as exc:  # re-raised below, after the other thread is released
                errors.append(exc)
                for sem in turns.sem.values():
                    sem.release()

        threads = [threading.Thread(target=run, args=(name,)) for name in variants]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        n_traces = len(list((tmp / "traced" / "traces").glob("step_*.parquet")))
        # Same completions and exact updates: every variant ends with the same weights.
        weights = {name: trainers[name].model.state_dict() for name in variants}
        same = all(
            max(float((weights[name][k] - w).abs().max()) for k, w in weights["untraced"].items()) <= 1e-5
            for name in variants
        )

    full = {name: per_period(turns.steps[name], period, args.warmup) for name in variants}
    gen = {name: per_period(turns.generation[name], period, args.warmup) for name in variants}
    train_only = {
        name: {c: [a - b for a, b in zip(full[name][c], gen[name][c], strict=True)] for c in CLOCKS}
        for name in variants
    }
    as_table = {c: {name: full[name][c] for name in variants} for c in CLOCKS}
    med = {name: {c: statistics.median(v) for c, v in full[name].items()} for name in variants}
    med_train = {name: {c: statistics.median(v) for c, v in train_only[name].items()} for name in variants}
    ratios = {
        name: ({c: med[name][c] / med["untraced"][c] for c in CLOCKS},
               {c: med_train[name][c] / med_train["untraced"][c] for c in CLOCKS})
        for name in variants if name != "untraced"
    }  # fmt: skip
    ratio, ratio_train = ratios["traced"]
    passed = ratio["cpu"] <= TARGET
    print(
        f"TRL trace cost: torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, "
        f"cpu, {torch.get_num_threads()} threads"
    )
    print(
        f"config: examples/trl_grpo_traced.py (Qwen2 hidden {args.hidden}, {args.layers} layers, V {len(tok)}, "
        f"at most {args.completion} new tokens; 8 generations per micro-batch, accumulation 2, num_iterations 2, "
        f"dapo, method {args.method}); {args.repeats} timed "
        f"generation periods of {period} steps each after {args.warmup} warm-up; traced: {n_traces} traces written"
    )
    print(f"  the variants ended with the same weights (same completions, same updates): {same}")
    print_table(as_table, unit="s per generation period")
    print(f"  {'ratio of medians':<36}{'cpu':>8}{'wall':>8}")
    for name, (r, r_train) in ratios.items():
        print(f"  {name + '/untraced, full step':<36}{r['cpu']:>8.3f}{r['wall']:>8.3f}")
        print(f"  {name + '/untraced, without generation':<36}{r_train['cpu']:>8.3f}{r_train['wall']:>8.3f}")
    print(
        f"  traced/untraced (CPU time) {ratio['cpu']:.3f} (target <= {TARGET:.2f})  {'PASS' if passed else 'FAIL'}"
    )
    if args.json:
        out = {
            "torch": torch.__version__,
            "trl": trl.__version__,
            "threads": torch.get_num_threads(),
            "config": vars(args),
            "period_s": full,
            "generation_s": gen,
            "ratio_over_untraced": {name: r for name, (r, _) in ratios.items()},
            "ratio_over_untraced_without_generation": {name: r for name, (_, r) in ratios.items()},
            "target": TARGET,
            "same_final_weights": same,
            "pass": passed,
        }
        Path(args.json).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
