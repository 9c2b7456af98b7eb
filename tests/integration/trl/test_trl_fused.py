"""The pre-update side from TRL's fused-head training forward (``FusedHeadTap``) against full logits.

A tiny Qwen2 gets TRL's fused LM head (``add_fused_lm_head``) and runs TRL's own
``_get_per_token_logps_and_entropies`` inside a traced step, under a loss that weights both the
log-probs and the entropies (so both gradient hooks fire). The reference is computed
independently from the unfused forward's full (B, T, V) logits: the pre-update logits, and
sum_k pi_k l_k g_k with g = dLoss/dz taken by autograd through the full logits. Then: the tap
refuses a head it cannot recompute, and ``squared_weighted_surprisal`` against its naive form.
"""

from __future__ import annotations

import contextlib
import types
import warnings

import pytest
import torch

pytest.importorskip("trl")

import transformers  # noqa: E402
from trl import GRPOTrainer  # noqa: E402
from trl.trainer.utils import add_fused_lm_head  # noqa: E402
from trl_common import tiny_model_dir  # noqa: E402

from entropy_lab.errors import EntropyLabWarning  # noqa: E402
from entropy_lab.integrations.trl.fused import (  # noqa: E402
    FusedHeadTap,
    squared_weighted_surprisal,
    unsupported_head,
)
from entropy_lab.integrations.trl.window import TemperedLM  # noqa: E402
from entropy_lab.trace import EntropyTracer  # noqa: E402

P, C = 3, 5
TEMPERATURE = 0.7
LR = 0.1


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny"))


def _model(model_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    model.train()
    add_fused_lm_head(model, temperature=TEMPERATURE, outputs=("log_probs", "entropy"))
    return model


def _batch(vocab: int):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (3, P + C), generator=g)  # (B, P + C)
    attn = torch.ones_like(ids)
    attn[1, P + 3 :] = 0  # a shorter completion, right-padded
    resp = attn.clone()
    resp[:, :P] = 0
    return ids, attn, resp


def _trl_forward(model, ids, attn):
    """TRL's own training forward (its fused head), as its ``_compute_loss`` calls it."""
    accelerator = types.SimpleNamespace(autocast=contextlib.nullcontext, is_main_process=True)
    trainer = types.SimpleNamespace(accelerator=accelerator)
    return GRPOTrainer._get_per_token_logps_and_entropies(trainer, model, ids, attn, C, compute_entropy=True)


def _loss(logps, entropies, mask, bonus: float = 0.3):
    """A loss of both outputs: per-token weights on log pi_y, and an entropy bonus."""
    w = torch.linspace(-1.0, 1.5, logps.numel()).view_as(logps)
    return -(w * logps * mask).sum() / mask.sum() - bonus * (entropies * mask).sum() / mask.sum()


def _full_logits_reference(model, ids, attn, mask, bonus: float = 0.3):
    """(z (B, C, V), sum_k pi_k l_k g_k (B, C)) from the unfused forward, g = dLoss/dz by autograd."""
    z = model(input_ids=ids, attention_mask=attn).logits[:, P - 1 : -1] / TEMPERATURE  # (B, C, V)
    logp = torch.log_softmax(z, -1)
    p = logp.exp()
    entropy = -(p * logp).sum(-1)  # (B, C)
    (g,) = torch.autograd.grad(_loss(logp.gather(-1, ids[:, P:, None])[..., 0], entropy, mask, bonus), z)
    model.zero_grad()
    return z.detach(), (p * (logp + entropy[..., None]) * g).sum(-1).detach()


def test_tap_gives_the_full_logits_values(model_dir):
    model = _model(model_dir)
    ids, attn, resp = _batch(model.config.vocab_size)
    mask = attn[:, P:].float()  # (B, C)

    z, ref = _full_logits_reference(model, ids, attn, mask)
    _, ref_no_bonus = _full_logits_reference(model, ids, attn, mask, bonus=0.0)

    tap = FusedHeadTap(model, TEMPERATURE)
    assert tap.off is None
    tracer = EntropyTracer(TemperedLM(model, TEMPERATURE, contextlib.nullcontext))
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    calls = []
    original = tracer.model.forward
    tracer.model.forward = lambda *a, **k: calls.append(a or k) or original(*a, **k)
    with tracer.step(ids, attn, resp, optimizer=opt) as step:
        call = lambda: _trl_forward(model, ids, attn)  # noqa: E731
        logps, entropies, _ = tap.forward(step, [0, 1, 2], ids, C, call)
        _loss(logps, entropies, mask).backward()
        grad_dot = step.capture.logit_grad_dot().clone()
        z_before = step.capture.z_before.clone()
        opt.step()
    cols = step.tokens.t_idx - P  # (n,) completion column of each traced token
    rows = step.tokens.b_idx
    assert step.n == int(mask.sum()) == 13
    torch.testing.assert_close(z_before, z[rows, cols], rtol=0, atol=1e-5)
    expected = ref[rows, cols].double()
    print(
        "max |tap - full logits|",
        float((grad_dot - expected).abs().max()),
        "scale",
        float(expected.abs().max()),
    )
    torch.testing.assert_close(grad_dot, expected, rtol=1e-5, atol=1e-8)
    assert float(expected.abs().max()) > 1e-3
    # The entropy bonus's -b D term is tested: without it the sum would be off by far more.
    assert float((ref - ref_no_bonus).abs().max()) > 1e-2 * float(expected.abs().max())
    records = step.records
    torch.testing.assert_close(
        torch.tensor(records["omega_logit_grad"].to_numpy()), LR * expected, rtol=1e-5, atol=1e-9
    )
    assert len(calls) == 1  # the tracer's only forward: the post-update one


def test_tap_turns_off_on_a_head_it_cannot_recompute(model_dir):
    """A temperature that is not TRL's: the log-probs differ, the tracer's own forward fills in."""
    model = _model(model_dir)
    ids, attn, resp = _batch(model.config.vocab_size)
    tap = FusedHeadTap(model, 2 * TEMPERATURE)
    tracer = EntropyTracer(TemperedLM(model, TEMPERATURE, contextlib.nullcontext))
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with tracer.step(ids, attn, resp, optimizer=opt) as step:
            logps, entropies, _ = tap.forward(step, [0, 1, 2], ids, C, lambda: _trl_forward(model, ids, attn))
            (-logps.sum()).backward()
            opt.step()
    assert tap.off is not None and "differ from TRL's" in tap.off
    assert any(issubclass(w.category, EntropyLabWarning) and "TRL traces" in str(w.message) for w in caught)
    df = step.records
    assert df["omega_logit_grad"].isna().all()
    torch.testing.assert_close(  # the pre-update side is the tracer's own forward's: TRL's policy
        torch.tensor(df["logprob"].to_numpy()), logps.detach()[step.tokens.b_idx, step.tokens.t_idx - P].double(),
        rtol=0, atol=1e-5,
    )  # fmt: skip


def test_unsupported_heads_are_named(model_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    assert unsupported_head(model) is None
    model.config.final_logit_softcapping = 30.0
    assert "final_logit_softcapping=30.0" in unsupported_head(model)


@pytest.mark.parametrize("masked", [False, True])
def test_squared_weighted_surprisal_matches_naive(masked):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(7, 11, generator=g, dtype=torch.float64) * 3
    if masked:
        z[:, 4] = -float("inf")
    logp = z.log_softmax(-1)
    p = logp.exp()
    h = -(p * logp).nan_to_num(nan=0.0).sum(-1, keepdim=True)
    naive = (p * (logp + h)).nan_to_num(nan=0.0).pow(2).sum(-1)
    got = squared_weighted_surprisal(z, chunk_bytes=3 * 11 * 4)  # chunks of 3 rows
    torch.testing.assert_close(got, naive, rtol=1e-12, atol=1e-14)
