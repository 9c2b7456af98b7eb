"""The tiny causal LM of the tests: one factory for every test, fixture and child process.

A model family is a registry entry: its transformers config and model class, the config values
every tiny model of that family shares, and the config fields that ``dropout`` sets. Keyword
overrides replace or add config fields, so a test that needs a smaller vocabulary, a shorter
context or a larger ``initializer_range`` states only that.

Deliberate simplifications: random init from ``torch.manual_seed(seed)`` (the global generator,
so the weights depend on the seed and the config alone), fp32, nothing downloaded, and
``transformers`` imported on first use (collection stays fast).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class TinyFamily:
    """How to build one model family: transformers class names and its shared tiny config."""

    config_class: str
    model_class: str
    defaults: dict[str, Any]
    dropout_fields: tuple[str, ...] = field(default=())


FAMILIES: dict[str, TinyFamily] = {
    "qwen2": TinyFamily(
        config_class="Qwen2Config",
        model_class="Qwen2ForCausalLM",
        defaults=dict(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            tie_word_embeddings=False,
        ),
        dropout_fields=("attention_dropout",),
    ),
    "gpt2": TinyFamily(
        config_class="GPT2Config",
        model_class="GPT2LMHeadModel",
        defaults=dict(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=128),
        dropout_fields=("resid_pdrop", "embd_pdrop", "attn_pdrop"),
    ),
}


def make_tiny_lm(family: str = "qwen2", *, seed: int = 0, dropout: float = 0.0, **overrides: Any):
    """A 2-layer causal LM (hidden 32, vocabulary 64) from a transformers config, random init, fp32.

    Args:
        family: a key of ``FAMILIES`` ("qwen2" or "gpt2").
        seed: seeds the global torch generator just before the model is built.
        dropout: every dropout probability of the family (attention, residual, embedding).
        **overrides: config fields that replace the family's tiny defaults (``vocab_size=48``,
            ``max_position_embeddings=32``, ``initializer_range=0.3``, ...).

    Returns:
        The model, in training mode as transformers builds it.
    """
    import transformers

    if family not in FAMILIES:
        raise ValueError(f"unknown tiny LM family {family!r}; known: {', '.join(FAMILIES)}")
    spec = FAMILIES[family]
    torch.manual_seed(seed)
    values = {**spec.defaults, **dict.fromkeys(spec.dropout_fields, dropout), **overrides}
    cfg = getattr(transformers, spec.config_class)(**values)
    return getattr(transformers, spec.model_class)(cfg)
