"""Shared helpers of the trainer, resume and rollout tests: a tiny random policy on disk, small configs.

Nothing here warm-starts the embedded default policy (that takes minutes): the policy is
a one-layer Qwen2 over the arithmetic task's character tokenizer, saved with
``save_pretrained`` so the trainer goes through the real loading path.

A random policy almost never answers an arithmetic problem, so every reward would be 0,
every advantage 0 and every update a no-op. ``dense_reward`` swaps the task's reward for
"the completion starts with a digit" (about 2/3 of random samples), which gives groups
with mixed rewards, non-zero advantages and real updates.

Fixtures (``tiny_policy_dir``, ``isolated_cache``, ``dense_reward``) are defined under the
names ``*_fixture``; a test module imports those names to make the fixtures available
(without shadowing warnings from ruff).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from entropy_lab.methods import resolve_config
from entropy_lab.models import TinyPolicySpec, build_tiny_policy
from entropy_lab.tasks import get_task
from entropy_lab.tasks.arithmetic import ArithmeticTask
from entropy_lab.tokenizer import build_char_tokenizer

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


@pytest.fixture(scope="session", name="tiny_policy_dir")
def tiny_policy_dir_fixture(tmp_path_factory) -> Path:
    """A saved tiny random policy (shared, read-only)."""
    return save_policy(tmp_path_factory.mktemp("tiny_policy"))


@pytest.fixture(name="isolated_cache")
def isolated_cache_fixture(tmp_path, monkeypatch):
    """ENTROPY_LAB_CACHE points at a fresh temporary directory."""
    monkeypatch.setenv("ENTROPY_LAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(name="dense_reward")
def dense_reward_fixture(monkeypatch):
    """The arithmetic task rewards completions that start with a digit (see the module docstring)."""
    monkeypatch.setattr(ArithmeticTask, "reward", digit_reward)
