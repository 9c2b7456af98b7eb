"""The tracer's hidden-state path: logits from the last hidden state and the LM head, chunk by chunk.

Every record must equal a naive float64 computation from the model's full logits before and
after the step, on Llama-shaped (tied embeddings) and Qwen2-shaped (untied) models; models
whose logits are not the head's output fall back to full logits with the reason.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import transformers

from entropy_lab.errors import EntropyLabError, EntropyLabWarning
from entropy_lab.stats import gather_logprobs
from entropy_lab.trace import EntropyTracer
from entropy_lab.trace.head import HIDDEN_PATH, split_head

B, T, P, V = 4, 16, 6, 96


def llama(tied: bool, seed: int = 0, **kw):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        **kw,
    )
    return transformers.LlamaForCausalLM(cfg)


def qwen2(tied: bool, seed: int = 0, **kw):
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        **kw,
    )
    return transformers.Qwen2ForCausalLM(cfg)


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)  # (B, T)
    attn = torch.ones(B, T, dtype=torch.long)
    attn[1, T - 3 :] = 0  # one right-padded row
    resp = torch.zeros(B, T, dtype=torch.long)
    resp[:, P:] = 1
    adv = torch.randn(B, generator=g)
    return ids, attn, resp, adv


def naive(model, ids, attn, resp):
    """float64 entropy, log-prob and collision at every response token, from the full logits."""
    with torch.no_grad():
        z = model(input_ids=ids, attention_mask=attn).logits.double()  # (B, T, V)
    rows, pos = (resp.bool() & attn.bool()).nonzero(as_tuple=True)
    z = z[rows, pos - 1]  # (n, V)
    logp = z.log_softmax(-1)
    p = logp.exp()
    h = -(p * logp).sum(-1)
    coll = (p * p * (logp + h[:, None])).sum(-1)
    return z, h, logp.gather(-1, ids[rows, pos][:, None])[:, 0], coll


def traced_step(model, *, lr=0.05, jvp=False, **tracer_kw):
    """One traced AdamW step; (records, the step, naive values before, naive values after)."""
    ids, attn, resp, adv = batch()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    before = naive(model, ids, attn, resp)
    tracer = EntropyTracer(model, jvp=jvp, **tracer_kw)
    with tracer.step(ids, attn, resp, advantages=adv, optimizer=opt) as step:
        logits = model(input_ids=ids, attention_mask=attn).logits  # (B, T, V)
        lp = gather_logprobs(logits[:, :-1], ids[:, 1:])  # (B, T-1)
        mask = (resp[:, 1:] * attn[:, 1:]).float()
        (-(adv[:, None] * lp * mask).sum() / mask.sum()).backward()
        opt.step()
    after = naive(model, ids, attn, resp)
    return tracer, step, before, after


def check_exact(step, before, after):
    df = step.records
    z_b, h_b, lp_b, c_b = before
    z_a, h_a, _, _ = after
    p_b = z_b.softmax(-1)
    linear = -(p_b * (z_b.log_softmax(-1) + h_b[:, None]) * (z_a - z_b)).sum(-1)
    for col, ref in [
        ("entropy_before", h_b),
        ("logprob", lp_b),
        ("collision", c_b),
        ("entropy_after", h_a),
        ("delta_entropy", h_a - h_b),
        ("delta_logit_linear", linear),
    ]:
        got = torch.tensor(df[col].to_numpy(), dtype=torch.float64)
        torch.testing.assert_close(got, ref, rtol=0, atol=2e-5, msg=col)
    assert abs(df["delta_entropy"]).max() > 1e-3  # the step moved the entropy: the check has teeth


@pytest.mark.parametrize("family", [llama, qwen2], ids=["llama", "qwen2"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_hidden_path_records_equal_a_float64_recomputation(family, tied):
    model = family(tied)
    tracer, step, before, after = traced_step(model)
    assert tracer.logits_path == HIDDEN_PATH == step.logits_path
    # No (n, V) copy of the logits is kept: the hidden states (n, d) stand in for them.
    assert step.capture.z_before is None
    assert step.capture.h_before is not None and step.capture.h_before.shape == (step.n, 32)
    check_exact(step, before, after)


def test_hidden_and_full_logits_paths_give_the_same_records_with_jvp():
    model = qwen2(tied=False)
    twin = copy.deepcopy(model)
    _, hidden, _, _ = traced_step(model, jvp=True)
    tracer, full, _, _ = traced_step(twin, jvp=True, logits_from_hidden=False)
    assert tracer.logits_path.startswith("full logits") and full.capture.h_before is None
    for col in hidden.records.columns:
        if hidden.records[col].dtype.kind == "f":
            a, b = hidden.records[col].to_numpy(), full.records[col].to_numpy()
            assert abs(a - b).max() <= 1e-5 * max(1.0, abs(b).max()), col


def test_dropout_model_is_measured_from_its_own_hidden_states_in_eval_mode():
    model = qwen2(tied=False, attention_dropout=0.3).train()
    ids, attn, resp, _ = batch()
    tracer, step, _, _ = traced_step(model)
    assert step.capture.z_before is None and not step.forward.deterministic
    # Both sides in eval mode: the reference is the eval-mode model before and after.
    model.eval()
    h_after = naive(model, ids, attn, resp)[1]
    got = torch.tensor(step.records["entropy_after"].to_numpy(), dtype=torch.float64)
    torch.testing.assert_close(got, h_after, rtol=0, atol=2e-5)


def test_soft_capped_family_falls_back_to_full_logits_with_the_reason():
    torch.manual_seed(0)
    cfg = transformers.Gemma2Config(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        final_logit_softcapping=3.0,
        attn_implementation="eager",
    )
    model = transformers.Gemma2ForCausalLM(cfg)
    assert split_head(model)[0] is None
    tracer, step, before, after = traced_step(model)
    assert "final_logit_softcapping=3.0" in tracer.logits_path
    check_exact(step, before, after)


class ScaledQwen2(transformers.Qwen2ForCausalLM):
    """Logits = head output / 2, a transform no config field names: only the check can see it."""

    def forward(self, input_ids=None, attention_mask=None, logits_to_keep=0, **kw):
        out = super().forward(
            input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep, **kw
        )
        out.logits = out.logits / 2
        return out


def test_a_logit_transform_after_the_head_is_caught_and_falls_back():
    torch.manual_seed(0)
    model = ScaledQwen2(qwen2(tied=False).config)
    assert split_head(model)[0] is not None  # nothing in the config says so
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracer, step, before, after = traced_step(model)
    assert any(issubclass(w.category, EntropyLabWarning) and "full logits" in str(w.message) for w in caught)
    assert "differ from its LM head" in tracer.logits_path
    check_exact(step, before, after)


def test_jvp_positions_runs_the_pass_on_a_sample_with_the_full_pass_values():
    model = qwen2(tied=True)
    twin = copy.deepcopy(model)
    _, full, _, _ = traced_step(model, jvp=True)
    _, sampled, _, _ = traced_step(twin, jvp=True, jvp_positions=7, seed=3)
    got, ref = sampled.records["omega_jvp"].to_numpy(), full.records["omega_jvp"].to_numpy()
    kept = ~np.isnan(got)
    assert kept.sum() == 7 and np.isnan(sampled.records["omega_jvp_entropy"].to_numpy()).sum() == len(got) - 7
    np.testing.assert_allclose(got[kept], ref[kept], rtol=1e-5, atol=1e-9)
    assert abs(ref[kept]).max() > 0  # the compared values are not all zero


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"jvp": True, "jvp_positions": 0}, "jvp_positions must be a count >= 1"),
        ({"jvp": True, "jvp_positions": 2.5}, "jvp_positions must be a count >= 1"),
        ({"jvp_positions": 4}, "give jvp=True too"),
    ],
)
def test_bad_jvp_positions_is_one_clear_error(kw, match):
    with pytest.raises(EntropyLabError, match=match):
        EntropyTracer(qwen2(tied=False), **kw)


def test_trace_jvp_positions_is_validated_in_the_config():
    from entropy_lab.config import TrainConfig

    with pytest.raises(EntropyLabError, match="trace_jvp_positions"):
        TrainConfig(trace_jvp_positions=-1).validate()
    with pytest.raises(EntropyLabError, match="add --set trace_jvp=true"):
        TrainConfig(trace_jvp_positions=8).validate()
    assert TrainConfig(trace_jvp=True, trace_jvp_positions=8).validate().trace_jvp_positions == 8


def test_a_body_whose_output_is_not_the_heads_input_falls_back():
    model = qwen2(tied=False)
    tracer = EntropyTracer(model)
    assert tracer.head_path.split is not None
    # The tap now sees (B, T, V) tensors: the width check turns the path off instead of failing.
    h = torch.zeros(2, 3, V)
    assert not tracer.head_path.check(h[0], torch.zeros(3, V))
    assert "width 96" in tracer.logits_path
    ids, attn, resp, adv = batch()
    before = naive(model, ids, attn, resp)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with tracer.step(ids, attn, resp, advantages=adv, optimizer=opt) as step:
        logits = model(input_ids=ids, attention_mask=attn).logits
        (-(gather_logprobs(logits[:, :-1], ids[:, 1:]) * adv[:, None]).mean()).backward()
        opt.step()
    check_exact(step, before, naive(model, ids, attn, resp))
