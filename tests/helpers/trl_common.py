"""Shared builders for the TRL integration tests (no tests here): a tiny Qwen2 policy and tokenizer
saved with save_pretrained, prompts of one length, a toy reward, and GRPOConfig defaults for CPU."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from entropy_lab.tokenizer import build_char_tokenizer

ALPHABET = "0123456789+="


def tiny_model_dir(path: Path, seed: int = 0) -> Path:
    """A random tiny Qwen2 causal LM and its character tokenizer, saved in ``path``."""
    tok = build_char_tokenizer(ALPHABET)
    cfg = transformers.Qwen2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
        tie_word_embeddings=False, initializer_range=0.2,
    )  # fmt: skip
    torch.manual_seed(seed)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def prompts(n: int = 16) -> list[str]:
    """Prompts of one length (no left padding, so batches of several generations concatenate exactly)."""
    return [f"{i % 10}{(3 * i) % 10}+{(7 * i) % 10}=" for i in range(n)]


def dataset(n: int = 16):
    from datasets import Dataset

    return Dataset.from_dict({"prompt": prompts(n)})


def count_reward(completions, **kwargs) -> list[float]:
    """A deterministic toy reward that varies within groups: the character codes' sum mod 7, over 7."""
    return [(sum(map(ord, c)) % 7) / 7 for c in completions]


def grpo_args(out: Path, **overrides):
    from trl import GRPOConfig

    kw = dict(
        output_dir=str(out), per_device_train_batch_size=4, num_generations=4, max_completion_length=6,
        max_steps=2, learning_rate=5e-2, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
        seed=0, disable_tqdm=True, optim="sgd", temperature=1.0, bf16=False,  # fp32 (TRL defaults to bf16)
    )  # fmt: skip
    kw.update(overrides)
    return GRPOConfig(**kw)
