"""Clip-Cov's and KL-Cov's tokens chosen over the whole update (``objectives.cov_select``).

The reference is the objectives' own per-call selection on the whole batch in one call (the
reference code's selection, which is the methods' definition when one call holds the whole
batch): the detached tokens are those with intervention weight 0 (Clip-Cov), the penalised
ones those whose loss exceeds -A r (KL-Cov). Split into 4 micro-batches, and over 2 gloo
ranks with 4 micro-batches each, ``select_tokens`` must give exactly those tokens; the
per-call selection on the micro-batches must not (else the test could not fail).
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from entropy_lab.methods import resolve_config
from entropy_lab.objectives import LossInputs, compute_loss
from entropy_lab.objectives.cov_select import select_tokens

B, T = 16, 9
SEED = 11
CASES = {
    "clip-cov": dict(clip_cov_ratio=0.2, clip_cov_lb=-1e9, clip_cov_ub=1e9),  # the draw decides
    "clip-cov-band": dict(clip_cov_ratio=0.5, clip_cov_lb=0.0, clip_cov_ub=0.5),  # the band decides
    "kl-cov": dict(kl_cov_ratio=0.1),
}


def config(case: str):
    return resolve_config(case.removesuffix("-band"), CASES[case])


def batch():
    """(B, T) logprob, old_logprob, advantages, mask: ratios on both sides of the clip."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(2, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).double()  # (B, T)
    logprob = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = logprob + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, 1, generator=g, dtype=torch.float64).expand(B, T).clone()
    return {"logprob": logprob, "old_logprob": old, "advantages": adv, "mask": mask}


def per_call_selection(part: dict, cfg) -> torch.Tensor:
    """The objective's own selection in one loss call on ``part``, read off its outputs: (b, T) bool."""
    out = compute_loss(LossInputs(**part, generator=torch.Generator().manual_seed(SEED)), cfg)
    valid = part["mask"] > 0
    if cfg.objective == "clip-cov":
        return valid & (out.intervention_weight == 0)
    ratio = (part["logprob"] - part["old_logprob"]).exp()
    return valid & (out.per_token - (-part["advantages"] * ratio)).abs().gt(1e-12)


def parts_of(b: dict, rows: range, n: int) -> list[dict]:
    rows_l = list(rows)
    size = len(rows_l) // n
    return [{k: v[rows_l[i * size : (i + 1) * size]] for k, v in b.items()} for i in range(n)]


@pytest.mark.parametrize("case", sorted(CASES))
def test_four_micro_batches_select_the_whole_batchs_tokens(case):
    cfg = config(case)
    b = batch()
    whole = per_call_selection(b, cfg)
    assert 2 <= int(whole.sum()) < int((b["mask"] > 0).sum()) // 2  # a real choice among the tokens
    parts = parts_of(b, range(B), 4)
    got = select_tokens(parts, cfg, torch.Generator().manual_seed(SEED))
    assert torch.equal(torch.cat(got), whole)
    per_call = torch.cat([per_call_selection(p, cfg) for p in parts])
    assert not torch.equal(per_call, whole)  # the reference code's per-micro-batch choice differs


@pytest.mark.parametrize("case", ["clip-cov", "kl-cov"])
def test_the_selection_passed_in_is_the_loss_of_the_whole_batch(case):
    """compute_loss with ``selected``: the micro-batches' losses (whole-batch normaliser) sum to the whole batch's."""
    cfg = config(case)
    b = batch()
    whole = compute_loss(LossInputs(**b, generator=torch.Generator().manual_seed(SEED)), cfg).loss
    parts = parts_of(b, range(B), 4)
    chosen = select_tokens(parts, cfg, torch.Generator().manual_seed(SEED))
    n_tok = float((b["mask"] > 0).sum())
    total = sum(
        compute_loss(LossInputs(**p, selected=s, num_tokens=n_tok), cfg).loss
        for p, s in zip(parts, chosen, strict=True)
    )
    torch.testing.assert_close(total, whole, rtol=1e-12, atol=1e-12)


def test_per_call_is_a_valid_setting_and_global_the_default():
    assert config("clip-cov").cov_selection == "global"
    assert resolve_config("kl-cov", {"cov_selection": "per-call"}).cov_selection == "per-call"
    from entropy_lab.errors import EntropyLabError

    with pytest.raises(EntropyLabError, match="cov_selection"):
        resolve_config("kl-cov", {"cov_selection": "local"})


# --- 2 gloo ranks x 4 micro-batches -----------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        b = batch()
        half = B // world
        chosen = {}
        for case in CASES:
            parts = parts_of(b, range(rank * half, (rank + 1) * half), 4)
            chosen[case] = torch.cat(select_tokens(parts, config(case), torch.Generator().manual_seed(SEED)))
        torch.save(chosen, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_with_four_micro_batches_select_the_whole_batchs_tokens(tmp_path):
    mp.start_processes(
        _rank_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn"
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    b = batch()
    for case in CASES:
        whole = per_call_selection(b, config(case))
        got = torch.cat([ranks[0][case], ranks[1][case]])
        assert torch.equal(got, whole), case
        assert int(ranks[0][case].sum()) > 0 and int(ranks[1][case].sum()) > 0, case  # both ranks choose
