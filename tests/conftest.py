"""Shared test fixtures: tiny models built from configs and saved to disk (nothing is downloaded).

Nothing here warm-starts the embedded default policy (that takes minutes): the trainer
tests use a one-layer Qwen2 over the arithmetic task's character tokenizer, saved with
``save_pretrained`` so the trainer goes through the real loading path.

A random policy almost never answers an arithmetic problem, so every reward would be 0,
every advantage 0 and every update a no-op. ``dense_reward`` swaps the task's reward for
"the completion starts with a digit" (about 2/3 of random samples), which gives groups
with mixed rewards, non-zero advantages and real updates.

Tests take everything here as fixtures (factories for the helpers that take arguments:
``make_tiny_lm``, ``tiny_policy``, ``save_policy``, ``small_config``). The plain functions
stay importable only for the child processes of ``test_resume``, which get no fixtures.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from entropy_lab.methods import resolve_config
from entropy_lab.models import TinyPolicySpec, build_tiny_policy
from entropy_lab.tasks import get_task
from entropy_lab.tasks.arithmetic import ArithmeticTask
from entropy_lab.tokenizer import build_char_tokenizer

# tests/helpers holds modules that tests and their child processes import by name.
HELPERS = Path(__file__).resolve().parent / "helpers"
sys.path.insert(0, str(HELPERS))

# --- plain helpers (child processes import these) ---------------------------------------------


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


TINY_SPEC = TinyPolicySpec(
    hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1
)

SMALL = dict(
    task="arithmetic",
    steps=2,
    prompts_per_step=4,
    samples_per_prompt=4,
    max_new_tokens=4,
    eval_prompts=8,
    eval_k=2,
    eval_every=1,
    trace_every=1,
    checkpoint_every=2,
    device="cpu",
)
"""Settings that make one training step take a fraction of a second on a 2-core CPU."""


def tiny_tokenizer():
    return build_char_tokenizer(get_task("arithmetic").alphabet())


def tiny_policy(seed: int = 0):
    """(model, tokenizer): a random one-layer Qwen2 over the arithmetic alphabet."""
    tok = tiny_tokenizer()
    return build_tiny_policy(tok, TINY_SPEC, seed=seed), tok


def save_policy(path: Path, *, seed: int = 0, poison: bool = False) -> Path:
    """Save a tiny policy to ``path``; ``poison`` sets its final norm to NaN (every logit NaN)."""
    model, tok = tiny_policy(seed)
    if poison:
        with torch.no_grad():
            model.model.norm.weight.fill_(float("nan"))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def digit_reward(self, problem, completion: str) -> float:
    """1 when the completion starts with a digit: a dense reward a random policy earns ~2/3 of the time."""
    return float(completion[:1].isdigit())


def small_config(method: str, model_dir: Path | str, **overrides):
    """The resolved config of ``method`` on the tiny policy with the ``SMALL`` settings."""
    return resolve_config(method, {**SMALL, "model": str(model_dir), **overrides})


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="session", name="make_tiny_lm")
def make_tiny_lm_fixture():
    """``make_tiny_lm(vocab_size=64, dropout=0.0, seed=0, family="qwen2")``: a 2-layer causal LM, fp32."""
    return make_tiny_lm


@pytest.fixture
def tiny_lm():
    return make_tiny_lm()


@pytest.fixture(scope="session", name="tiny_spec")
def tiny_spec_fixture() -> TinyPolicySpec:
    """The one-layer policy architecture of the trainer tests."""
    return TINY_SPEC


@pytest.fixture(scope="session", name="small_settings")
def small_settings_fixture() -> dict:
    """Settings that make one training step take a fraction of a second (a copy of ``SMALL``)."""
    return dict(SMALL)


@pytest.fixture(scope="session", name="tiny_policy")
def tiny_policy_fixture():
    """``tiny_policy(seed=0)``: (model, tokenizer), a random one-layer Qwen2 over the arithmetic alphabet."""
    return tiny_policy


@pytest.fixture(scope="session", name="save_policy")
def save_policy_fixture():
    """``save_policy(path, seed=0, poison=False)``: save a tiny policy to ``path``; returns ``path``."""
    return save_policy


@pytest.fixture(scope="session", name="small_config")
def small_config_fixture():
    """``small_config(method, model_dir, **overrides)``: the resolved config with the ``SMALL`` settings."""
    return small_config


@pytest.fixture(scope="session", name="digit_reward")
def digit_reward_fixture():
    """The dense reward of ``dense_reward``, for module-scoped fixtures that patch the task themselves."""
    return digit_reward


@pytest.fixture(scope="session")
def tiny_policy_dir(tmp_path_factory) -> Path:
    """A saved tiny random policy (shared, read-only)."""
    return save_policy(tmp_path_factory.mktemp("tiny_policy"))


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """ENTROPY_LAB_CACHE points at a fresh temporary directory."""
    monkeypatch.setenv("ENTROPY_LAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def dense_reward(monkeypatch):
    """The arithmetic task rewards completions that start with a digit (see the module docstring)."""
    monkeypatch.setattr(ArithmeticTask, "reward", digit_reward)
