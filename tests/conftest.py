"""Shared fixtures: tiny models built from configs (nothing is downloaded)."""

import pytest
import torch


def make_tiny_lm(vocab_size: int = 64, dropout: float = 0.0, seed: int = 0, family: str = "qwen2"):
    """A 2-layer causal LM from a transformers config, random init, fp32."""
    import transformers

    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    if family == "qwen2":
        cfg = transformers.Qwen2Config(**common, attention_dropout=dropout, tie_word_embeddings=False)
        model = transformers.Qwen2ForCausalLM(cfg)
    elif family == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=vocab_size,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=128,
            resid_pdrop=dropout,
            embd_pdrop=dropout,
            attn_pdrop=dropout,
        )
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        raise ValueError(family)
    return model


@pytest.fixture
def tiny_lm():
    return make_tiny_lm()
