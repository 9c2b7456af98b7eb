"""Overhead of ``EntropyTracer`` on one optimizer step of a small transformer.

Run::

    python benchmarks/bench_tracer.py                 # default model and batch, about a minute on 2 cores
    python benchmarks/bench_tracer.py --profile       # also cProfile one traced step
    python benchmarks/bench_tracer.py --json out.json

Three steps are timed, interleaved within every repeat (median over repeats, after a warm-up):

(a) untraced: forward + token-mean policy-gradient loss + backward + ``optimizer.step()``;
(b) floor:    (a) + one no-grad forward over the batch, the physical floor of exact tracing
              (DESIGN.md section 2: the post-update statistics need one more forward);
(c) traced:   (a) inside ``EntropyTracer(model).step(...)``, records built.

The default model (hidden 512, 4 layers, vocabulary 8192, ~21M parameters) has about the
forward FLOPs per vocabulary entry of Qwen2.5-0.5B (~5k vs ~6.6k): the tracer's work is
proportional to the vocabulary, the step's to the model, so that ratio decides the overhead.
``--hidden 256`` is a vocabulary-heavier shape (~2k FLOPs per entry) for comparison.

Target: traced <= 1.10 x floor. The weights keep training across steps (no restore); every
variant sees the same shapes, and their order rotates per repeat so that neither drift of a shared
machine nor the position in the repeat favours one of them.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
import time

import torch
import transformers

from entropy_lab.stats import gather_logprobs
from entropy_lab.trace import EntropyTracer

TARGET = 1.10  # traced / floor


def build_model(args) -> torch.nn.Module:
    """A small Qwen2 causal LM from a config: random init, fp32, nothing downloaded."""
    torch.manual_seed(args.seed)
    cfg = transformers.Qwen2Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=max(256, args.seq_len),
        tie_word_embeddings=False,
    )
    return transformers.Qwen2ForCausalLM(cfg).train()


def make_batch(args):
    """input_ids, attention_mask, response_mask (B, T); advantages (B,): the last ``response`` tokens."""
    g = torch.Generator().manual_seed(args.seed)
    B, T = args.batch, args.seq_len
    ids = torch.randint(0, args.vocab, (B, T), generator=g)  # (B, T)
    attn = torch.ones(B, T, dtype=torch.long)  # (B, T)
    resp = torch.zeros(B, T, dtype=torch.long)  # (B, T)
    resp[:, T - args.response :] = 1
    adv = torch.randn(B, generator=g)  # (B,)
    return ids, attn, resp, adv


def train_step(model, opt, ids, attn, resp, adv) -> None:
    """forward + token-mean PG loss + backward + optimizer step."""
    opt.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, attention_mask=attn).logits  # (B, T, V)
    logp = gather_logprobs(logits[:, :-1], ids[:, 1:])  # (B, T-1): token t predicted at t-1
    mask = resp[:, 1:].float()  # (B, T-1)
    loss = -(adv[:, None] * logp * mask).sum() / mask.sum()
    loss.backward()
    opt.step()


def run_untraced(model, opt, tracer, batch) -> None:
    train_step(model, opt, *batch)


def run_floor(model, opt, tracer, batch) -> None:
    ids, attn = batch[0], batch[1]
    train_step(model, opt, *batch)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=attn)


def run_traced(model, opt, tracer, batch) -> None:
    ids, attn, resp, adv = batch
    with tracer.step(ids, attn, resp, advantages=adv) as step:
        train_step(model, opt, *batch)
    assert step.records is not None and len(step.records) == int(resp[:, 1:].sum())


VARIANTS = {"untraced": run_untraced, "floor": run_floor, "traced": run_traced}


def timed(fn, *a) -> float:
    t0 = time.perf_counter()
    fn(*a)
    return time.perf_counter() - t0


def profile_traced(model, opt, tracer, batch, top: int) -> str:
    """cProfile of one traced step: the entropy_lab functions (and the model forward) by cumulative time."""
    prof = cProfile.Profile()
    prof.enable()
    run_traced(model, opt, tracer, batch)
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(
        r"entropy_lab|qwen2.py.*\(forward\)|backward", top
    )
    return buf.getvalue()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--hidden", type=int, default=512, help="512: Qwen2.5-0.5B-like FLOPs per vocabulary entry"
    )
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--response", type=int, default=96, help="response tokens at the end of each sequence")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads; 1 (default) keeps timings stable on a shared machine",
    )
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument(
        "--chunk-bytes", type=int, default=None, help="EntropyTracer(chunk_bytes=...); default: the tracer's"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="cProfile one traced step and print the top")
    p.add_argument("--json", default=None, metavar="PATH", help="write the numbers here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model = build_model(args)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    tracer_kw = {} if args.chunk_bytes is None else {"chunk_bytes": args.chunk_bytes}
    tracer = EntropyTracer(model, **tracer_kw)
    batch = make_batch(args)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"tracer benchmark: torch {torch.__version__}, transformers {transformers.__version__}, cpu, "
        f"{torch.get_num_threads()} threads"
    )
    print(
        f"model: Qwen2 hidden {args.hidden}, {args.layers} layers, {args.heads} heads, vocab {args.vocab} "
        f"({n_params / 1e6:.1f} M params); batch {args.batch} x {args.seq_len}, {args.response} response "
        f"tokens each; AdamW; tracer chunk_bytes {args.chunk_bytes or 'default'}"
    )
    names = list(VARIANTS)
    for _ in range(args.warmup):
        for name in names:
            VARIANTS[name](model, opt, tracer, batch)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.repeats):
        order = names[r % 3 :] + names[: r % 3]  # rotate, so no variant always runs first
        for name in order:
            times[name].append(timed(VARIANTS[name], model, opt, tracer, batch))
    med = {name: statistics.median(t) for name, t in times.items()}
    ratios = {
        "traced/untraced": med["traced"] / med["untraced"],
        "floor/untraced": med["floor"] / med["untraced"],
        "traced/floor": med["traced"] / med["floor"],
    }
    # Minima are the least disturbed by other processes on a shared machine: a cross-check.
    best = {name: min(t) for name, t in times.items()}
    min_ratios = {
        "traced/untraced": best["traced"] / best["untraced"],
        "floor/untraced": best["floor"] / best["untraced"],
        "traced/floor": best["traced"] / best["floor"],
    }
    passed = ratios["traced/floor"] <= TARGET
    print(f"\ntime per step, median of {args.repeats} interleaved repeats after {args.warmup} warm-up")
    print(f"  {'step':<10}{'median (s)':>12}{'min (s)':>10}{'max (s)':>10}")
    for name in names:
        t = times[name]
        print(f"  {name:<10}{med[name]:>12.3f}{min(t):>10.3f}{max(t):>10.3f}")
    print(f"  {'ratio':<16}{'of medians':>11}{'of minima':>11}")
    for key, value in ratios.items():
        print(f"  {key:<16}{value:>11.3f}{min_ratios[key]:>11.3f}")
    print(
        f"  traced/floor {ratios['traced/floor']:.3f} (target <= {TARGET:.2f})  {'PASS' if passed else 'FAIL'}"
    )
    if args.profile:
        print("\ncProfile of one traced step (cumulative):")
        print(profile_traced(model, opt, tracer, batch, top=30))
    if args.json:
        out = {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "config": vars(args),
            "times_s": times,
            "median_s": med,
            "ratios": ratios,
            "ratios_of_minima": min_ratios,
            "target_traced_over_floor": TARGET,
            "pass": passed,
        }
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {args.json}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
