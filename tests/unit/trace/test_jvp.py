"""jvp estimators against ground truths: a logit-linear model, the tabular policy, a tiny transformer."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from entropy_lab.errors import EntropyLabError
from entropy_lab.jvp import jvp_estimates, jvp_logits, tangent_parameters
from entropy_lab.stats import gather_logprobs, token_stats
from entropy_lab.tabular import TabularPolicy
from entropy_lab.update_predict import predict_update


class LinearSoftmaxLM(nn.Module):
    """Logits linear in the parameters: z = W f(prefix) + b, f fixed random features."""

    def __init__(self, vocab: int = 23, dim: int = 9, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("tok", torch.randn(vocab, dim, generator=g, dtype=torch.float64))
        self.register_buffer("pos", torch.randn(64, dim, generator=g, dtype=torch.float64))
        self.head = nn.Linear(dim, vocab).double()

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, attention_mask=None, **_):
        h = self.tok[input_ids].cumsum(1) + self.pos[: input_ids.shape[1]]  # (B, T, D)
        return SimpleNamespace(logits=self.head(h))  # (B, T, V)


def _batch(vocab, B=6, T=10, P=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    ids[:, 0] = torch.arange(B) % vocab  # distinct first tokens: no two rows share a prefix
    resp = torch.zeros(B, T, dtype=torch.long)
    resp[:, P:] = 1
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    return ids, resp, adv


def _pg_loss(logits, ids, resp, adv):
    lp = gather_logprobs(logits[:, :-1], ids[:, 1:])  # (B, T-1)
    mask = resp[:, 1:].to(lp.dtype)
    return -(adv[:, None] * lp * mask).sum() / mask.sum()


def _at_tokens(logits, resp):
    b, t = resp.bool().nonzero(as_tuple=True)
    return logits[b, t - 1]  # (n, V): logits at t-1 predict token t


def _entropy(z):
    return token_stats(z).entropy.double()


def _traced_update(model, opt, ids, resp, adv, warm_steps=0):
    """Runs ``warm_steps`` plain steps, then one step with its predicted (z, dz) and the actual z_after."""
    for _ in range(warm_steps + 1):
        opt.zero_grad()
        _pg_loss(model(input_ids=ids).logits, ids, resp, adv).backward()
        if _ < warm_steps:
            opt.step()
    update = predict_update(opt)
    z, dz = jvp_logits(model, update, input_ids=ids)
    opt.step()
    with torch.no_grad():
        z_after = model(input_ids=ids).logits
    return _at_tokens(z, resp), _at_tokens(dz, resp), _at_tokens(z_after, resp)


@pytest.mark.parametrize("optimizer", ["sgd-momentum", "adamw"])
def test_logit_linear_model_jvp_is_the_actual_logit_change(optimizer):
    model = LinearSoftmaxLM()
    ids, resp, adv = _batch(23)
    opt = (
        torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
        if optimizer == "sgd-momentum"
        else torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    )
    z, dz, z_after = _traced_update(model, opt, ids, resp, adv, warm_steps=3)
    torch.testing.assert_close(dz, z_after - z, rtol=1e-9, atol=1e-12)
    linear, change = jvp_estimates(z, dz)
    # logits are linear in the parameters: jvp is delta_logit_linear and jvp-entropy the exact change
    naive_linear = -(z.softmax(-1) * (z.log_softmax(-1) + _entropy(z)[:, None]) * (z_after - z)).sum(-1)
    torch.testing.assert_close(linear, naive_linear, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(change, _entropy(z_after) - _entropy(z), rtol=1e-9, atol=1e-12)
    assert change.abs().max() > 1e-3  # a real step, with curvature: the two predictions differ
    assert (change - linear).abs().max() > 1e-6


def test_tabular_policy_under_sgd_jvp_equals_softmax():
    vocab, lr = 17, 0.05
    model = TabularPolicy(vocab, max_states=256, seed=1)
    ids, resp, adv = _batch(vocab)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    z, dz, _ = _traced_update(model, opt, ids, resp, adv)
    linear, _ = jvp_estimates(z, dz)
    # softmax estimator, from its closed form: -eta w (pi_a l_a - C), w = A / N
    b, t = resp.bool().nonzero(as_tuple=True)
    st = token_stats(z, ids[b, t])
    w = adv[b] / resp[:, 1:].sum()
    softmax = -lr * w * (st.logprob.exp() * (st.logprob + st.entropy) - st.collision)
    torch.testing.assert_close(linear, softmax.double(), rtol=1e-9, atol=1e-14)


def test_tiny_transformer_sgd_tiny_lr_matches_measured_entropy_change(make_tiny_lm):
    model = make_tiny_lm(vocab_size=48, seed=3).double()
    ids, resp, adv = _batch(48, B=8, T=12, P=4, seed=2)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    z, dz, z_after = _traced_update(model, opt, ids, resp, adv)
    linear, change = jvp_estimates(z, dz)
    measured = (_entropy(z_after) - _entropy(z)).numpy()
    assert np.abs(measured).max() > 1e-7
    assert np.corrcoef(linear.numpy(), measured)[0, 1] >= 0.999
    assert np.corrcoef(change.numpy(), measured)[0, 1] >= 0.999


def test_jvp_matches_finite_differences_on_a_transformer(make_tiny_lm):
    model = make_tiny_lm(vocab_size=32, seed=4).double()
    ids, _, _ = _batch(32, B=3, T=8)
    g = torch.Generator().manual_seed(5)
    update = {p: torch.randn(p.shape, generator=g, dtype=p.dtype) * 1e-2 for p in model.parameters()}
    _, dz = jvp_logits(model, update, input_ids=ids)
    eps = 1e-3
    with torch.no_grad():
        for p, d in update.items():
            p.add_(eps * d)
        z_plus = model(input_ids=ids).logits
        for p, d in update.items():
            p.sub_(2 * eps * d)
        z_minus = model(input_ids=ids).logits
    fd = (z_plus - z_minus) / (2 * eps)
    # the model computes rotary in fp32, so finite differences carry ~1e-4 noise at this eps
    assert float((fd - dz).abs().max() / dz.abs().max()) < 1e-3


def test_sdpa_runs_with_the_math_kernel_and_equals_eager(make_tiny_lm):
    ids, _, _ = _batch(32, B=3, T=8)
    out = {}
    for impl in ("eager", "sdpa"):
        model = make_tiny_lm(vocab_size=32, seed=6).double()
        model.config._attn_implementation = impl
        update = {p: torch.full_like(p, 1e-3) for p in model.parameters()}
        out[impl] = jvp_logits(model, update, input_ids=ids)[1]
    torch.testing.assert_close(out["sdpa"], out["eager"], rtol=1e-5, atol=1e-8)


def test_flash_attention_is_refused_with_the_fix(make_tiny_lm):
    model = make_tiny_lm()
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(EntropyLabError, match='attn_implementation="eager"'):
        jvp_logits(model, {}, input_ids=torch.zeros(1, 3, dtype=torch.long))


def test_parameters_are_restored_after_an_exception(make_tiny_lm):
    model = make_tiny_lm()
    before = {n: p for n, p in model.named_parameters()}
    update = {p: torch.ones_like(p) for p in model.parameters()}
    with pytest.raises(RuntimeError, match="boom"), tangent_parameters(model, update):
        assert not isinstance(model.lm_head.weight, nn.Parameter)
        raise RuntimeError("boom")
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)


def test_jvp_estimates_chunked_equals_one_chunk():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(37, 101, generator=g, dtype=torch.float64)
    dz = torch.randn(37, 101, generator=g, dtype=torch.float64) * 0.1
    a = jvp_estimates(z, dz, chunk_bytes=4 * 101 * 5)
    b = jvp_estimates(z, dz, chunk_bytes=2**30)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y)
    with pytest.raises(EntropyLabError, match="one shape"):
        jvp_estimates(z, dz[:3])
