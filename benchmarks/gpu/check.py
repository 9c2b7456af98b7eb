"""The one-command GPU check: each part measured, timed out or failed on its own, all written as JSON.

Run through ``bash benchmarks/gpu/run.sh`` (which installs what is missing first), or directly::

    python benchmarks/gpu/check.py --out gpu-results            # on a GPU: the real shapes
    python benchmarks/gpu/check.py --out /tmp/x --dry-run       # CPU, tiny shapes, same code paths

Parts (``PARTS``, in order), each with a time budget (``BUDGETS``, or ``--budget`` seconds for
every part; SIGALRM stops a part past it):

- ``env``: torch, transformers, the device.
- ``trace_smollm2``: SmolLM2-135M-Instruct (``entropy_lab.model_sources`` name
  ``smollm2-135m-instruct``) traced under bf16 autocast: untraced and traced step time and
  peak memory (the traced step on the hidden-state path and on the full-logits path), and the
  records' entropies against an fp32 recomputation from full logits.
- ``trace_qwen2_0p5b``: the same for a Qwen2.5-0.5B-shaped model built from a config (vocabulary
  151,936, tied embeddings, random init).
- ``token_stats``: ``entropy_lab.stats.token_stats`` at (8192, 151936) against the naive
  full-softmax version: time and peak memory.
- ``jvp``: the jvp pass against one no-grad forward (``bench_jvp.py``).
- ``trl``: a traced TRL step against an untraced one (skipped with a note without TRL).

Every part's result (or its error and traceback) goes into ``results.json`` as soon as the part
ends, so one failure or a kill loses nothing already measured. ``--dry-run`` runs every part on
the CPU at tiny shapes (a tiny Llama stands in for SmolLM2), as the CI test does.

Deliberate simplifications: one seed, one repeat after one warm-up per timed step (the GPU is lent
for minutes); peak memory is the CUDA allocator's, not measured on the CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the benchmark scripts' shared modules
sys.path.insert(1, str(HERE.parent.parent))  # the project, when it is not installed

PartFn = Callable[[argparse.Namespace], dict]
BUDGETS = {"env": 15, "trace_smollm2": 150, "trace_qwen2_0p5b": 90, "token_stats": 45, "jvp": 90, "trl": 90}
"""Seconds per part on a GPU: 480 in all, the 8 minutes of the check (SmolLM2's first load converts it)."""
DRY_BUDGET = 60.0  # seconds per part in the dry run
PARTS: dict[str, PartFn] = {}


def part(name: str) -> Callable[[PartFn], PartFn]:
    def register(fn: PartFn) -> PartFn:
        PARTS[name] = fn
        return fn

    return register


class Budget(Exception):
    """A part ran past its time budget."""


@contextlib.contextmanager
def time_budget(seconds: float):
    """Raise ``Budget`` inside the block after ``seconds`` (main thread, POSIX; no limit elsewhere)."""
    if seconds <= 0 or not hasattr(signal, "setitimer"):
        yield
        return

    def stop(signum, frame):
        raise Budget(f"past its budget of {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def budget_of(args, name: str) -> float:
    """``--budget`` if given, else the part's entry of ``BUDGETS`` (``DRY_BUDGET`` in the dry run)."""
    if args.budget:
        return float(args.budget)
    return DRY_BUDGET if args.dry_run else float(BUDGETS.get(name, 60))


def device(args) -> torch.device:
    return torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def measured(fn: Callable[[], object], dev: torch.device) -> dict:
    """Wall seconds of one call, and on CUDA its peak allocated bytes above those allocated before."""
    sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    fn()
    sync(dev)
    out: dict = {"seconds": time.perf_counter() - t0}
    out["peak_extra_bytes"] = torch.cuda.max_memory_allocated() - base if dev.type == "cuda" else None
    return out


# --- tracing a model -----------------------------------------------------------------------


def random_batch(vocab: int, B: int, T: int, R: int, dev: torch.device, seed: int = 0):
    """input_ids, attention_mask, response_mask (B, T) with the last R tokens as the response; advantages (B,)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    resp = torch.zeros(B, T, dtype=torch.long)
    resp[:, T - R :] = 1
    adv = torch.randn(B, generator=g)
    return ids.to(dev), torch.ones(B, T, dtype=torch.long, device=dev), resp.to(dev), adv.to(dev)


def autocast(dev: torch.device, enabled: bool):
    return torch.autocast(dev.type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def train_step(model, opt, batch, bf16: bool) -> None:
    from entropy_lab.stats import gather_logprobs

    ids, attn, resp, adv = batch
    opt.zero_grad(set_to_none=True)
    with autocast(ids.device, bf16):
        logits = model(input_ids=ids, attention_mask=attn).logits  # (B, T, V)
    logp = gather_logprobs(logits[:, :-1], ids[:, 1:])  # (B, T-1)
    mask = resp[:, 1:].float()
    (-(adv[:, None] * logp * mask).sum() / mask.sum()).backward()
    del logits, logp
    opt.step()


@torch.no_grad()
def fp32_entropy(model, batch) -> torch.Tensor:
    """Entropy at every response token (row-major, the records' order), fp32 full logits, row by row."""
    from entropy_lab.stats import token_stats

    ids, attn, resp, _ = batch
    out = []
    for b in range(ids.shape[0]):
        z = model(input_ids=ids[b : b + 1], attention_mask=attn[b : b + 1]).logits[0].float()  # (T, V)
        pos = resp[b].nonzero(as_tuple=True)[0]  # tokens; logits at pos - 1 predict them
        out.append(token_stats(z[pos - 1]).entropy.double())
    return torch.cat(out)


def error_stats(got: torch.Tensor, ref: torch.Tensor) -> dict:
    err = (got - ref).abs()
    return {
        "max_abs": float(err.max()),
        "mean_abs": float(err.mean()),
        "ref_mean_abs": float(ref.abs().mean()),
    }


def trace_model(model, args, *, B: int, T: int, R: int, lr: float = 1e-5) -> dict:
    """Untraced and traced bf16-autocast steps of ``model``: time, peak memory, records' error vs fp32."""
    from entropy_lab.trace import EntropyTracer

    dev = device(args)
    bf16 = dev.type == "cuda"
    model = model.to(dev).train()
    vocab = model.get_output_embeddings().weight.shape[0]
    batch = random_batch(vocab, B, T, R, dev)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    train_step(model, opt, batch, bf16)  # warm-up; Adam state allocated
    untraced = measured(lambda: train_step(model, opt, batch, bf16), dev)
    tracer = EntropyTracer(model)
    ids, attn, resp, adv = batch
    with tracer.step(ids, attn, resp, advantages=adv, optimizer=opt):  # warm-up of the traced step
        train_step(model, opt, batch, bf16)
    h_before = fp32_entropy(model, batch)
    box: dict = {}

    def traced() -> None:
        with tracer.step(ids, attn, resp, advantages=adv, optimizer=opt) as step:
            train_step(model, opt, batch, bf16)
        box["records"] = step.records

    timed = measured(traced, dev)
    h_after = fp32_entropy(model, batch)
    full = EntropyTracer(model, logits_from_hidden=False)  # the full-logits path, for its memory

    def traced_full() -> None:
        with full.step(ids, attn, resp, advantages=adv, optimizer=opt):
            train_step(model, opt, batch, bf16)

    traced_full()  # warm-up
    timed_full = measured(traced_full, dev)
    df = box["records"]
    got_b = torch.tensor(df["entropy_before"].to_numpy(), dtype=torch.float64, device=h_before.device)
    got_a = torch.tensor(df["entropy_after"].to_numpy(), dtype=torch.float64, device=h_before.device)
    delta = error_stats(got_a - got_b, h_after - h_before)
    return {
        "shape": {"batch": B, "seq_len": T, "response": R, "vocab": int(vocab)},
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "precision": "bf16 autocast, fp32 weights" if bf16 else "fp32 (CPU)",
        "logits_path": tracer.logits_path,
        "untraced": untraced,
        "traced": timed,
        "traced_full_logits": timed_full,
        "traced_over_untraced_time": timed["seconds"] / untraced["seconds"],
        "traced_full_logits_over_untraced_time": timed_full["seconds"] / untraced["seconds"],
        "fp32_logits_of_batch_bytes": B * T * int(vocab) * 4,
        "error_vs_fp32": {
            "entropy_before": error_stats(got_b, h_before),
            "entropy_after": error_stats(got_a, h_after),
            "delta_entropy": delta,
            "delta_noise_share": delta["mean_abs"] / max(delta["ref_mean_abs"], 1e-30),
        },
    }


def tiny_llama(vocab: int = 256):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg)


@part("env")
def env(args) -> dict:
    import transformers

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(device(args)),
        "dry_run": args.dry_run,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


@part("trace_smollm2")
def trace_smollm2(args) -> dict:
    if args.dry_run:
        return {"model": "tiny Llama (dry run; SmolLM2 is loaded on the real run)", **trace_model(
            tiny_llama(), args, B=2, T=24, R=16
        )}  # fmt: skip
    import transformers

    from entropy_lab.model_sources import resolve_model

    path = resolve_model("smollm2-135m-instruct")
    model = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    return {"model": f"SmolLM2-135M-Instruct ({path})", **trace_model(model, args, B=8, T=1024, R=768)}


def qwen2_0p5b(dry: bool):
    import transformers

    torch.manual_seed(0)
    if dry:
        shape = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    else:  # Qwen2.5-0.5B's shape
        shape = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                     num_attention_heads=14, num_key_value_heads=2)  # fmt: skip
    cfg = transformers.Qwen2Config(**shape, max_position_embeddings=4096, tie_word_embeddings=True)
    return transformers.Qwen2ForCausalLM(cfg)


@part("trace_qwen2_0p5b")
def trace_qwen2(args) -> dict:
    B, T, R = (2, 24, 16) if args.dry_run else (8, 1024, 768)
    return {
        "model": "Qwen2.5-0.5B-shaped, random init",
        **trace_model(qwen2_0p5b(args.dry_run), args, B=B, T=T, R=R),
    }


@part("token_stats")
def token_stats_part(args) -> dict:
    from bench_token_stats import naive_stats

    from entropy_lab.stats import token_stats

    dev = device(args)
    N, V = (64, 1024) if args.dry_run else (8192, 151936)
    g = torch.Generator(device=dev).manual_seed(0)
    logits = (torch.randn(N, V, generator=g, device=dev) * 3).to(torch.bfloat16)  # (N, V)
    targets = torch.randint(0, V, (N,), generator=g, device=dev)
    out = {"shape": [N, V], "dtype": "bfloat16"}
    for name, fn in (
        ("chunked", lambda: token_stats(logits, targets)),
        ("naive", lambda: naive_stats(logits, targets)),
    ):
        fn()  # warm-up
        out[name] = measured(fn, dev)
    st, (h, lp, c) = token_stats(logits, targets), naive_stats(logits, targets)
    out["max_abs_diff"] = {
        "entropy": float((st.entropy - h).abs().max()),
        "logprob": float((st.logprob - lp).abs().max()),
        "collision": float((st.collision - c).abs().max()),
    }
    out["time_chunked_over_naive"] = out["chunked"]["seconds"] / out["naive"]["seconds"]
    if dev.type == "cuda":
        out["memory_chunked_over_naive"] = (
            out["chunked"]["peak_extra_bytes"] / out["naive"]["peak_extra_bytes"]
        )
    return out


@part("jvp")
def jvp_part(args) -> dict:
    import bench_jvp

    path = Path(args.out) / "jvp.json"
    if args.dry_run:
        argv = ["--hidden", "32", "--layers", "2", "--vocab", "256", "--batch", "2", "--seq-len", "24",
                "--response-len", "8", "--repeats", "1", "--warmup", "1", "--device", "cpu"]  # fmt: skip
    else:
        argv = ["--hidden", "896", "--layers", "24", "--heads", "14", "--vocab", "151936", "--batch", "8",
                "--seq-len", "1024", "--response-len", "768", "--repeats", "3", "--device", "cuda"]  # fmt: skip
    status = bench_jvp.main([*argv, "--json", str(path)])
    result = json.loads(path.read_text())
    return {
        "args": argv,
        "ratio_jvp_over_forward": result["ratio"],
        "median_s": result["median_s"],
        "exit": status,
    }


@part("trl")
def trl_part(args) -> dict:
    try:
        import trl  # noqa: F401
    except ImportError:
        return {"skipped": "TRL is not installed (pip install 'entropy-lab[trl]')"}
    bench = HERE.parent / "bench_trl_trace.py"
    if bench.exists() and not args.dry_run:  # the TRL benchmark prints the traced / untraced step ratio
        import subprocess

        cmd = [sys.executable, str(bench)]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, check=False, timeout=budget_of(args, "trl") / 2
        )
        bench_out = {
            "command": cmd,
            "exit": proc.returncode,
            "output_tail": (proc.stdout + proc.stderr)[-4000:],
        }
        if proc.returncode == 0:
            return bench_out
        return {"bench_trl_trace": bench_out, **trl_steps(args)}
    return trl_steps(args)


def trl_steps(args) -> dict:
    """A few GRPO steps of TRL's trainer, traced every step and untraced: seconds per step of each."""
    import tempfile

    import transformers
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from entropy_lab.integrations.trl import TracedGRPOTrainer
    from entropy_lab.tokenizer import build_char_tokenizer

    dev = device(args)
    tok = build_char_tokenizer("0123456789+=")
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, tie_word_embeddings=False,
    )  # fmt: skip
    data = Dataset.from_dict({"prompt": [f"{a}+{b}=" for a in range(10) for b in range(10)]})

    def reward(completions, **kw):
        return [float(c[:1] == "1") for c in completions]

    steps = 2 if args.dry_run else 8
    out: dict = {
        "model": "tiny Qwen2 (char tokenizer)",
        "steps": steps,
        "note": "step time includes generation",
    }
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        transformers.Qwen2ForCausalLM(cfg).save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
        for name, cls, extra in (
            ("untraced", GRPOTrainer, {}),
            ("traced", TracedGRPOTrainer, {"trace_every": 1}),
        ):
            targs = GRPOConfig(
                output_dir=str(Path(tmp) / name), per_device_train_batch_size=8, num_generations=8,
                max_completion_length=4, max_steps=steps, learning_rate=1e-3, report_to=[], save_strategy="no",
                use_cpu=dev.type == "cpu", bf16=dev.type == "cuda", seed=0, disable_tqdm=True, logging_steps=1,
            )  # fmt: skip
            trainer = cls(model=str(model_dir), reward_funcs=reward, args=targs, train_dataset=data,
                          processing_class=tok, **extra)  # fmt: skip
            t0 = time.perf_counter()
            trainer.train()
            out[name] = {"seconds_per_step": (time.perf_counter() - t0) / steps}
    out["traced_over_untraced"] = out["traced"]["seconds_per_step"] / out["untraced"]["seconds_per_step"]
    return out


# --- driver ----------------------------------------------------------------------------------


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu-results"))
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: the same code paths in seconds")
    ap.add_argument("--budget", type=float, default=None, help="seconds for every part (default: BUDGETS)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "parts": {}}
    failed = []
    for name in args.parts.split(","):
        if name not in PARTS:
            print(f"error: unknown part {name!r}; valid: {', '.join(PARTS)}", file=sys.stderr)
            return 2
        t0 = time.perf_counter()
        print(f"[gpu-check] {name} ...", flush=True)
        try:
            with time_budget(budget_of(args, name)):
                res = PARTS[name](args)
            res = {"status": "skipped" if "skipped" in res else "ok", **res}
        except BaseException as exc:  # one part's failure (or its budget) must not lose the others
            if isinstance(exc, KeyboardInterrupt):
                raise
            res = {
                "status": "error",
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(),
            }
            failed.append(name)
        res["part_seconds"] = time.perf_counter() - t0
        results["parts"][name] = res
        write_json(out / "results.json", results)  # after every part: a kill loses only the current one
        print(f"[gpu-check] {name}: {res['status']} in {res['part_seconds']:.1f} s", flush=True)
        if dev_is_cuda():
            torch.cuda.empty_cache()
    print(f"[gpu-check] wrote {out / 'results.json'}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def dev_is_cuda() -> bool:
    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
