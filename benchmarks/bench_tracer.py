"""Overhead of ``EntropyTracer`` on one optimizer step of a small transformer.

Run::

    python benchmarks/bench_tracer.py                 # default model and batch, about a minute on 2 cores
    python benchmarks/bench_tracer.py --profile       # also cProfile one traced step
    python benchmarks/bench_tracer.py --json out.json
    python benchmarks/bench_tracer.py --memory        # peak extra memory at V = 49k and 152k instead

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

``--memory`` measures instead the tracer's peak extra memory: peak resident memory of one traced
step minus that of one untraced step (CPU; each in a fresh subprocess, peak RSS as in
``bench_token_stats.py``, see ``memory.py``), for the tracer's hidden-state path and for its
full-logits path (``logits_from_hidden=False``, the path every model took before the hidden
one), at each vocabulary of ``--memory-vocabs``. Target: the hidden path's extra memory <= 0.25 x
one full fp32 logits tensor of the batch (B x T x V x 4 bytes). On CUDA the same is read from
``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import subprocess
import sys

import torch
import transformers
from common import add_timing_args, qwen2_from_args
from memory import proc_status_kib, release_free_heap, reset_peak_rss
from timing import interleaved, medians, print_table

from entropy_lab.stats import gather_logprobs
from entropy_lab.trace import EntropyTracer

TARGET = 1.10  # traced / floor
MEMORY_TARGET = 0.25  # tracer's peak extra memory / one full fp32 logits tensor of the batch
MEMORY_VARIANTS = {"untraced": None, "traced, hidden states": True, "traced, full logits": False}


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
    p.add_argument("--memory", action="store_true", help="measure peak extra memory instead of time")
    p.add_argument("--memory-vocabs", default="49152,151936", help="vocabularies of the memory table")
    p.add_argument(
        "--memory-shape", default="2x512x384", help="batch x seq-len x response of the memory table"
    )
    p.add_argument("--memory-hidden", type=int, default=128, help="hidden size of the memory table's model")
    p.add_argument("--child-memory", default=None, help=argparse.SUPPRESS)  # internal: memory subprocess
    return p.parse_args(argv)


def memory_args(args, vocab: int):
    """The options of one memory measurement: the memory table's model and batch at ``vocab``."""
    B, T, R = (int(x) for x in args.memory_shape.split("x"))
    return argparse.Namespace(
        **{
            **vars(args),
            "vocab": vocab,
            "batch": B,
            "seq_len": T,
            "response": R,
            "hidden": args.memory_hidden,
        }
    )


def measure_memory(args) -> dict:
    """One step of variant ``args.child_memory`` after a warm-up step on one short row: peak extra bytes."""
    from_hidden = MEMORY_VARIANTS[args.child_memory]
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    model = qwen2_from_args(args, seed=args.seed).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    tracer = None if from_hidden is None else EntropyTracer(model, logits_from_hidden=from_hidden)
    run = run_untraced if tracer is None else run_traced
    warm = argparse.Namespace(**{**vars(args), "batch": 1, "seq_len": 16, "response": 8})
    run(model, opt, tracer, [x.to(dev) for x in make_batch(warm)])  # kernels, Adam state
    batch = [x.to(dev) for x in make_batch(args)]
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run(model, opt, tracer, batch)
        torch.cuda.synchronize()
        return {"peak_extra": torch.cuda.max_memory_allocated() - base, "reset": True}
    release_free_heap()
    reset = reset_peak_rss()
    base = proc_status_kib("VmRSS")
    run(model, opt, tracer, batch)
    return {"peak_extra": max(0, proc_status_kib("VmHWM") - base) * 1024, "reset": reset}


def memory_table(args) -> tuple[list[dict], bool]:
    """Per vocabulary: each variant's peak extra bytes in a fresh subprocess, and the tracer's share."""
    rows = []
    for vocab in (int(v) for v in args.memory_vocabs.split(",")):
        margs = memory_args(args, vocab)
        peaks = {}
        for variant in MEMORY_VARIANTS:
            cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--child-memory", variant]
            cmd += ["--vocab", str(vocab)]
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            if proc.returncode != 0:
                raise RuntimeError(f"memory subprocess failed for {variant} at V={vocab}:\n{proc.stderr}")
            peaks[variant] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_extra"]
        logits_bytes = margs.batch * margs.seq_len * vocab * 4
        row = {
            "vocab": vocab,
            "full_fp32_logits_bytes": logits_bytes,
            "untraced_peak_bytes": peaks["untraced"],
        }
        for variant in list(MEMORY_VARIANTS)[1:]:
            extra = peaks[variant] - peaks["untraced"]
            row[variant] = {"extra_bytes": extra, "share_of_full_logits": extra / logits_bytes}
        rows.append(row)
    passed = all(r["traced, hidden states"]["share_of_full_logits"] <= MEMORY_TARGET for r in rows)
    return rows, passed


def print_memory(rows: list[dict], args, passed: bool) -> None:
    margs = memory_args(args, 0)
    print(
        f"tracer memory: Qwen2 hidden {margs.hidden}, {margs.layers} layers, batch {margs.batch} x {margs.seq_len}, "
        f"{margs.response} traced tokens each; AdamW; peak extra over an untraced step, "
        f"{'CUDA allocator' if torch.cuda.is_available() else 'CPU peak RSS, fresh subprocess each'}"
    )
    mib = 2**20
    print(
        f"  {'V':>7}{'fp32 logits':>13}{'untraced':>10}{'tracer, hidden':>16}{'tracer, full logits':>21}  (MiB)"
    )
    for r in rows:
        h, f = r["traced, hidden states"], r["traced, full logits"]
        print(
            f"  {r['vocab']:>7}{r['full_fp32_logits_bytes'] / mib:>13.0f}{r['untraced_peak_bytes'] / mib:>10.0f}"
            f"{h['extra_bytes'] / mib:>9.0f} ({h['share_of_full_logits']:.2f}x)"
            f"{f['extra_bytes'] / mib:>13.0f} ({f['share_of_full_logits']:.2f}x)"
        )
    print(
        f"  tracer's peak extra memory (hidden path) <= {MEMORY_TARGET} x one full fp32 logits tensor: "
        f"{'PASS' if passed else 'FAIL'}"
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child_memory is not None:
        print(json.dumps(measure_memory(memory_args(args, args.vocab))))
        return 0
    if args.memory:
        rows, passed = memory_table(args)
        print_memory(rows, args, passed)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(
                    {"threads": args.threads, "config": vars(args), "memory": rows, "pass": passed},
                    f,
                    indent=2,
                )
            print(f"wrote {args.json}")
        return 0 if passed else 1
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
