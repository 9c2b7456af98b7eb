"""The tracer under torch.distributed: DDP and FSDP2 (fully_shard), gloo on CPU, 2 processes.

Each rank holds half of a global batch and traces it; the union of the ranks' records must
equal the records of one process tracing the whole global batch with the same update (the
ranks' losses are their parts of the global token-mean loss times the world size, so the
averaged gradient is the global one). The ranks trace different numbers of tokens and, with
``forward_batch_size=1``, run different numbers of forward chunks: under FSDP that hangs
unless the tracer pads its forwards, so the workers run under a timeout.
"""

from __future__ import annotations

import os
import socket
import time

import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tiny_lm import make_tiny_lm

from entropy_lab.trace import EntropyTracer

WORLD = 2
V, B, T = 40, 4, 10
LR = 0.5
# rows 0-1 go to rank 0, rows 2-3 to rank 1; row 3 has no response token, so rank 1 forwards
# one row where rank 0 forwards two.
RESPONSE_LENGTHS = [6, 4, 5, 0]
PROMPT = 3


def tiny_model() -> torch.nn.Module:
    return make_tiny_lm(vocab_size=V, max_position_embeddings=32, initializer_range=0.3)


def global_batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, V, (B, T), generator=g)  # (B, T)
    attn = torch.ones(B, T, dtype=torch.long)
    resp = torch.zeros(B, T, dtype=torch.long)
    for b, n in enumerate(RESPONSE_LENGTHS):
        resp[b, PROMPT : PROMPT + n] = 1
    adv = torch.tensor([1.0, -0.5, 0.8, -1.2])  # (B,)
    return ids, attn, resp, adv


def pg_loss(logits, ids, resp, adv, n_global: float, scale: float):
    """scale * sum over response tokens of -A log pi(a) / n_global: the rank's part of the token-mean."""
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]  # (b, T-1)
    mask = resp[:, 1:].float()
    return scale * (-(adv[:, None] * logp * mask).sum()) / n_global


def traced_update(model, tracer_model, ids, attn, resp, adv, n_global, scale, params, **tracer_kw):
    opt = torch.optim.SGD(params, lr=LR)
    tracer = EntropyTracer(tracer_model, forward_batch_size=1, **tracer_kw)
    with tracer.step(ids, attn, resp, advantages=adv, optimizer=opt) as step:
        for b in range(ids.shape[0]):  # micro-batches of one row
            out = model(input_ids=ids[b : b + 1], attention_mask=attn[b : b + 1])
            pg_loss(out.logits, ids[b : b + 1], resp[b : b + 1], adv[b : b + 1], n_global, scale).backward()
        opt.step()
    return step


def single_process_records() -> pd.DataFrame:
    ids, attn, resp, adv = global_batch()
    model = tiny_model()
    step = traced_update(model, model, ids, attn, resp, adv, float(resp.sum()), 1.0, model.parameters())
    return step.records


def _worker(rank: int, port: int, out_dir: str, modes: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        ids, attn, resp, adv = global_batch()
        n_global = float(resp.sum())
        rows = slice(rank * B // WORLD, (rank + 1) * B // WORLD)
        local = [x[rows] for x in (ids, attn, resp, adv)]
        for mode in modes:
            model = tiny_model()
            if mode == "ddp":
                from torch.nn.parallel import DistributedDataParallel as DDP

                wrapped = DDP(model)
                step = traced_update(wrapped, model, *local, n_global, WORLD, wrapped.parameters())
            else:
                from torch.distributed.fsdp import fully_shard

                for layer in model.model.layers:
                    fully_shard(layer)
                fully_shard(model)
                step = traced_update(model, model, *local, n_global, WORLD, model.parameters())
            rec = step.records.copy()
            rec["sample"] += rows.start
            rec["n_before_rows"] = step.capture.z_before.shape[0]  # tracer memory on this rank
            rec.to_parquet(os.path.join(out_dir, f"{mode}_rank{rank}.parquet"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(tmp_path, modes: list[str], timeout: float = 240.0) -> dict[str, pd.DataFrame]:
    ctx = mp.spawn(_worker, args=(_free_port(), str(tmp_path), modes), nprocs=WORLD, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(
                f"distributed tracing did not finish in {timeout:.0f} s (a rank hung in a collective)"
            )
    return {
        mode: pd.concat([pd.read_parquet(tmp_path / f"{mode}_rank{r}.parquet") for r in range(WORLD)])
        for mode in modes
    }


def max_abs_diffs(distributed: pd.DataFrame, single: pd.DataFrame) -> dict[str, float]:
    key = ["sample", "position"]
    a = distributed.sort_values(key).reset_index(drop=True)
    b = single.sort_values(key).reset_index(drop=True)
    assert a[key].equals(b[key])
    cols = [c for c in b.columns if c not in ("step", "update") and pd.api.types.is_numeric_dtype(b[c])]
    return {c: float((a[c] - b[c]).abs().max()) for c in cols}


def test_ddp_and_fsdp2_records_equal_single_process(tmp_path):
    single = single_process_records()
    assert single["delta_entropy"].abs().max() > 1e-3  # the update moves entropy
    results = run_ranks(tmp_path, ["ddp", "fsdp2"])
    for mode, rec in results.items():
        assert sorted(rec["rank"].unique()) == [0, 1]
        per_rank = rec.groupby("rank").size()
        assert per_rank[0] == 10 and per_rank[1] == 5  # ranks traced different numbers of tokens
        # memory: each rank holds pre-update logits of its own traced tokens only
        assert (rec.groupby("rank")["n_before_rows"].first() == per_rank).all()
        diffs = max_abs_diffs(rec.drop(columns=["rank", "n_before_rows"]), single)
        print(mode, {k: f"{v:.2e}" for k, v in diffs.items()})
        for col, d in diffs.items():
            scale = max(1.0, float(single[col].abs().max()))
            assert d <= 1e-5 * scale, (mode, col, d)


def test_distributed_option_without_process_group_is_one_clear_error():
    from entropy_lab.errors import EntropyLabError
    from entropy_lab.trace.distributed import detect

    assert not dist.is_initialized()
    assert detect(None) is None and detect(False) is None
    ids, attn, resp, adv = global_batch()
    model = tiny_model()
    with pytest.raises(EntropyLabError, match="needs an initialised process group"):
        with EntropyTracer(model, distributed=True).step(ids, attn, resp, advantages=adv):
            pass
