"""Chunked ``token_stats`` against the naive full-softmax computation: time and peak extra memory.

Run::

    python benchmarks/bench_token_stats.py                     # the two default shapes, fp32
    python benchmarks/bench_token_stats.py --dtype bfloat16
    python benchmarks/bench_token_stats.py --sweep --json out.json

Targets (the issue): the chunked version is no slower than naive (time ratio <= 1.0) and its peak
extra memory is at most 25% of naive's.

Measurements:

- Time: median of ``--repeats`` calls after ``--warmup`` calls, variants interleaved within each
  repeat so that drift of a shared machine hits all of them alike. CUDA is synchronised around calls.
- Peak extra memory, i.e. the peak bytes held beyond the input logits (and targets) during one call:
  on CUDA, ``torch.cuda.max_memory_allocated()`` minus the allocated bytes before the call; on CPU,
  each variant runs in a *fresh subprocess*, which resets the kernel's peak-RSS counter (writing 5
  to /proc/self/clear_refs) just before the call and reads the peak (VmHWM in /proc/self/status)
  after it; the result is that peak minus the resident set (VmRSS) before the call. Not ru_maxrss:
  Linux carries the parent's peak into a child across fork + exec. A warm-up call on two rows loads
  kernels and thread pools first, and freed heap pages go back to the OS (malloc_trim) before the
  baseline. PyTorch's CPU allocator has no cache, so the resident set tracks the tensors alive at
  once, to a resolution of about a MiB.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
from common import add_timing_args, pick_device
from memory import proc_status_kib, release_free_heap, reset_peak_rss

from entropy_lab.stats import token_stats

DEFAULT_SHAPES = "4096x32000,1024x152064"
TIME_TARGET = 1.0  # chunked / naive
MEMORY_TARGET = 0.25  # chunked peak extra / naive peak extra
SWEEP_MIB = (0.5, 2, 8, 32, 128)
MIB = 2**20
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def naive_stats(logits: torch.Tensor, targets: torch.Tensor):
    """The naive equivalent from the docstring of ``token_stats``: full (T, V) fp32 temporaries."""
    logp = logits.float().log_softmax(-1)  # (T, V)
    H = -(logp.exp() * logp).sum(-1)  # (T,)
    C = (logp.exp() ** 2 * (logp + H[..., None])).sum(-1)  # (T,)
    logprob = logp.gather(-1, targets[..., None])[..., 0]  # (T,)
    return H, logprob, C


def run_variant(spec: dict, logits: torch.Tensor, targets: torch.Tensor):
    """spec: {"kind": "naive"} or {"kind": "chunked", "chunk_bytes": int | None, "check_finite": bool}.

    ``chunk_bytes`` None leaves token_stats its own default."""
    if spec["kind"] == "naive":
        return naive_stats(logits, targets)
    kw = {} if spec["chunk_bytes"] is None else {"chunk_bytes": spec["chunk_bytes"]}
    s = token_stats(logits, targets, check_finite=spec["check_finite"], **kw)
    return s.entropy, s.logprob, s.collision


def label(spec: dict) -> str:
    if spec["kind"] == "naive":
        return "naive"
    size = "default" if spec["chunk_bytes"] is None else f"{spec['chunk_bytes'] / MIB:g} MiB"
    check = "" if spec["check_finite"] else ", no check"
    return f"chunked ({size}{check})"


def default_chunk_bytes(device: str) -> str:
    """token_stats' default chunk size, for the header: an int, or None resolved per device."""
    import entropy_lab.stats as stats

    default = inspect.signature(stats.token_stats).parameters["chunk_bytes"].default
    if default is None and hasattr(stats, "resolve_chunk_bytes"):
        default = stats.resolve_chunk_bytes(None, device)
    return "unknown" if default is None else f"{default / MIB:g} MiB"


def make_inputs(T: int, V: int, dtype: torch.dtype, device: str, seed: int = 0):
    """Logits (T, V) ~ 2 N(0, 1) and targets (T,), filled in row blocks (no full-size transient)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    logits = torch.empty(T, V, dtype=dtype, device=device)  # (T, V)
    block = max(1, (4 * MIB) // (4 * V))
    for s in range(0, T, block):
        n = min(block, T - s)
        logits[s : s + n] = (2 * torch.randn(n, V, generator=g)).to(device=device, dtype=dtype)
    targets = torch.randint(0, V, (T,), generator=g).to(device)  # (T,)
    return logits, targets


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_variants(specs: list[dict], logits, targets, repeats: int, warmup: int, device: str) -> list[float]:
    """Median seconds per call of each spec, interleaved: one call of each per repeat."""
    for _ in range(warmup):
        for spec in specs:
            run_variant(spec, logits, targets)
    times: list[list[float]] = [[] for _ in specs]
    for _ in range(repeats):
        for i, spec in enumerate(specs):
            sync(device)
            t0 = time.perf_counter()
            run_variant(spec, logits, targets)
            sync(device)
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


# --- peak memory --------------------------------------------------------------------------


def child_measure_rss(spec: dict, T: int, V: int, dtype: str) -> dict:
    """Runs inside the fresh subprocess: one call of ``spec``, peak resident bytes beyond the inputs."""
    logits, targets = make_inputs(T, V, DTYPES[dtype], "cpu")
    run_variant(spec, logits[:2], targets[:2])  # load kernels, start thread pools
    release_free_heap()
    reset = reset_peak_rss()
    baseline = proc_status_kib("VmRSS")
    # Without a reset, an earlier peak above the baseline would hide a smaller one: report that slack.
    slack = proc_status_kib("VmHWM") - baseline
    out = run_variant(spec, logits, targets)
    peak = proc_status_kib("VmHWM")
    del out
    return {"peak_extra": max(0, peak - baseline) * 1024, "slack": max(0, slack) * 1024, "reset": reset}


def measure_peak_extra(spec: dict, T: int, V: int, dtype: str, device: str) -> dict:
    """Peak extra bytes of one call: CUDA allocator stats, or a fresh subprocess's RSS on CPU."""
    if device == "cuda":
        logits, targets = make_inputs(T, V, DTYPES[dtype], device)
        run_variant(spec, logits[:2], targets[:2])
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = run_variant(spec, logits, targets)
        torch.cuda.synchronize()
        result = {"peak_extra": torch.cuda.max_memory_allocated() - base, "slack": 0, "reset": True}
        del out, logits, targets
        torch.cuda.empty_cache()
        return result
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        json.dumps(spec),
        "--child-shape",
        f"{T}x{V}",
    ]
    cmd += ["--dtype", dtype]
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory subprocess failed for {label(spec)}:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- the benchmark ------------------------------------------------------------------------


def max_abs_diffs(a, b) -> dict[str, float]:
    names = ("entropy", "logprob", "collision")
    return {n: float((x.double() - y.double()).abs().max()) for n, x, y in zip(names, a, b, strict=True)}


def bench_shape(T: int, V: int, args, device: str) -> dict:
    logits, targets = make_inputs(T, V, DTYPES[args.dtype], device)
    naive = {"kind": "naive"}
    chunked = {"kind": "chunked", "chunk_bytes": args.chunk_bytes, "check_finite": True}
    specs = [naive, chunked]
    if args.sweep:
        for mib in SWEEP_MIB:
            for check in (True, False):
                spec = {"kind": "chunked", "chunk_bytes": int(mib * MIB), "check_finite": check}
                if spec != chunked:
                    specs.append(spec)
    diffs = max_abs_diffs(run_variant(naive, logits, targets), run_variant(chunked, logits, targets))
    times = time_variants(specs, logits, targets, args.repeats, args.warmup, device)
    del logits, targets
    mems = [measure_peak_extra(spec, T, V, args.dtype, device) for spec in specs]
    rows = [
        {"variant": label(s), **s, "time_s": t, "peak_extra_bytes": m["peak_extra"], "rss_slack": m["slack"]}
        for s, t, m in zip(specs, times, mems, strict=True)
    ]
    for r in rows:
        r["time_ratio"] = r["time_s"] / rows[0]["time_s"]
        r["memory_ratio"] = r["peak_extra_bytes"] / max(rows[0]["peak_extra_bytes"], 1)
    default = rows[1]
    return {
        "T": T,
        "V": V,
        "logits_bytes": T * V * DTYPES[args.dtype].itemsize,
        "max_abs_diff": diffs,
        "rows": rows,
        "time_ratio": default["time_ratio"],
        "memory_ratio": default["memory_ratio"],
        "time_pass": default["time_ratio"] <= TIME_TARGET,
        "memory_pass": default["memory_ratio"] <= MEMORY_TARGET,
    }


def print_shape(res: dict, args, device: str) -> None:
    mib = res["logits_bytes"] / MIB
    print(f"\nT={res['T']} V={res['V']} {args.dtype} on {device}, logits {mib:.0f} MiB")
    print(f"  {'variant':<28}{'time (s)':>10}{'x naive':>9}{'peak extra (MiB)':>18}{'x naive':>9}")
    for r in res["rows"]:
        print(
            f"  {r['variant']:<28}{r['time_s']:>10.3f}{r['time_ratio']:>9.2f}"
            f"{r['peak_extra_bytes'] / MIB:>18.1f}{r['memory_ratio']:>9.3f}"
        )
    slack = max(r["rss_slack"] for r in res["rows"])
    if slack > 4 * MIB:
        print(f"  note: peak-RSS reset unavailable; memory may be overstated by up to {slack / MIB:.0f} MiB")
    d = res["max_abs_diff"]
    print(
        f"  max |chunked - naive|: entropy {d['entropy']:.2e}, logprob {d['logprob']:.2e}, "
        f"collision {d['collision']:.2e}"
    )
    verdict = {True: "PASS", False: "FAIL"}
    print(
        f"  time ratio chunked/naive   {res['time_ratio']:.2f} (target <= {TIME_TARGET:.2f})  "
        f"{verdict[res['time_pass']]}"
    )
    print(
        f"  memory ratio chunked/naive {res['memory_ratio']:.3f} (target <= {MEMORY_TARGET:.2f})  "
        f"{verdict[res['memory_pass']]}"
    )
    if args.sweep:
        ok = [r for r in res["rows"][1:] if r["memory_ratio"] <= MEMORY_TARGET]
        if ok:
            best = min(ok, key=lambda r: r["time_s"])
            print(
                f"  sweep: fastest within the memory target: {best['variant']}, {best['time_s']:.3f} s "
                f"({best['time_ratio']:.2f} x naive, memory {best['memory_ratio']:.3f} x naive)"
            )


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated TxV (default %(default)s)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    add_timing_args(p, repeats=3, device=True)
    p.add_argument(
        "--chunk-bytes", type=int, default=None, help="the chunked variant's (default: token_stats' own)"
    )
    p.add_argument("--sweep", action="store_true", help=f"also chunk sizes {SWEEP_MIB} MiB, check on/off")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: memory subprocess
    p.add_argument("--child-shape", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child is not None:
        T, V = (int(x) for x in args.child_shape.split("x"))
        print(json.dumps(child_measure_rss(json.loads(args.child), T, V, args.dtype)))
        return 0
    device = pick_device(args.device)
    method = (
        "torch.cuda.max_memory_allocated() minus allocated bytes before the call"
        if device == "cuda"
        else "fresh subprocess per variant: peak RSS (VmHWM, reset before the call) minus RSS before it"
    )
    print(
        f"token_stats benchmark: torch {torch.__version__}, {device}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}"
    )
    print(f"time: median of {args.repeats} interleaved calls after {args.warmup} warm-up; memory: {method}")
    print(f"token_stats default chunk_bytes on {device}: {default_chunk_bytes(device)}")
    results = []
    for shape in args.shapes.split(","):
        T, V = (int(x) for x in shape.lower().split("x"))
        res = bench_shape(T, V, args, device)
        print_shape(res, args, device)
        results.append(res)
    if args.json:
        meta = {"torch": torch.__version__, "device": device, "threads": torch.get_num_threads()}
        out = {**meta, "dtype": args.dtype, "memory_method": method, "results": results}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"\nwrote {args.json}")
    return 0 if all(r["time_pass"] and r["memory_pass"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
