"""Overhead of ``EntropyTracer`` on one optimizer step of a small transformer.

Run::

    python benchmarks/bench_tracer.py                 # default model and batch, about a minute on 2 cores
    python benchmarks/bench_tracer.py --profile       # also cProfile one traced step
    python benchmarks/bench_tracer.py --json out.json

Three steps are timed, interleaved within every repeat (median over repeats, after a warm-up),
in CPU time of the process and in wall-clock time (``timing.py``); the target is judged on CPU time:

(a) untraced: forward + token-mean policy-gradient loss + backward + ``optimizer.step()``;
(b) floor:    (a) + one no-grad forward over the batch, the physical floor of exact tracing
              (docs/theory.md section 10: the post-update statistics need one more forward);
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
import sys

import torch
import transformers
from common import add_timing_args, qwen2_from_args
from timing import interleaved, medians, print_table

from entropy_lab.stats import gather_logprobs
from entropy_lab.trace import EntropyTracer

TARGET = 1.10  # traced / floor


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
    add_timing_args(p, repeats=9)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument(
        "--chunk-bytes", type=int, default=None, help="EntropyTracer(chunk_bytes=...); default: the tracer's"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="cProfile one traced step and print the top")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model = qwen2_from_args(args, seed=args.seed).train()
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
    runs = {name: (lambda fn=fn: fn(model, opt, tracer, batch)) for name, fn in VARIANTS.items()}
    times = interleaved(runs, args.repeats, args.warmup)
    med = medians(times)
    ratios = {
        clock: {
            "traced/untraced": m["traced"] / m["untraced"],
            "floor/untraced": m["floor"] / m["untraced"],
            "traced/floor": m["traced"] / m["floor"],
        }
        for clock, m in med.items()
    }
    passed = ratios["cpu"]["traced/floor"] <= TARGET
    print(f"\ntime per step, {args.repeats} interleaved repeats after {args.warmup} warm-up")
    print_table(times)
    print(f"  {'ratio of medians':<18}{'cpu':>8}{'wall':>8}")
    for key in ratios["cpu"]:
        print(f"  {key:<18}{ratios['cpu'][key]:>8.3f}{ratios['wall'][key]:>8.3f}")
    print(
        f"  traced/floor (CPU time) {ratios['cpu']['traced/floor']:.3f} (target <= {TARGET:.2f})  "
        f"{'PASS' if passed else 'FAIL'}"
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
            "target_traced_over_floor": TARGET,
            "pass": passed,
        }
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {args.json}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
