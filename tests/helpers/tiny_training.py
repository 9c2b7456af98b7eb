"""The tiny policy, settings and dense reward that the trainer tests and their child processes run on.

Nothing here warm-starts the embedded default policy (that takes minutes): the trainer tests
use a one-layer Qwen2 over the arithmetic task's character tokenizer, saved with
``save_pretrained`` so the trainer goes through the real loading path.

A random policy almost never answers an arithmetic problem, so every reward would be 0, every
advantage 0 and every update a no-op. ``digit_reward`` replaces the task's reward with "the
completion starts with a digit" (about 2/3 of random samples), which gives groups with mixed
rewards, non-zero advantages and real updates.

Plain functions and constants: ``tests/conftest.py`` serves them to tests as fixtures, and
child processes, which get no fixtures, import them by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from entropy_lab.methods import resolve_config
from entropy_lab.models import TinyPolicySpec, build_tiny_policy
from entropy_lab.tasks import get_task
from entropy_lab.tokenizer import build_char_tokenizer

TINY_SPEC = TinyPolicySpec(
    hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1
)

SMALL: dict[str, Any] = dict(
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
    """The character tokenizer of the arithmetic task's alphabet."""
    return build_char_tokenizer(get_task("arithmetic").alphabet())


def tiny_policy(seed: int = 0):
    """(model, tokenizer): a random one-layer Qwen2 over the arithmetic alphabet."""
    tok = tiny_tokenizer()
    return build_tiny_policy(tok, TINY_SPEC, seed=seed), tok


def save_policy(path: Path, *, seed: int = 0, poison: bool = False) -> Path:
    """Save a tiny policy to ``path`` and return ``path``; ``poison`` sets its final norm to NaN (every logit NaN)."""
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


def train_cli_run(root: Path, base: str) -> tuple[Path, Path]:
    """(model directory, a finished 2-step run on it) made through ``entropy-lab train {base}``.

    ``base`` holds a ``{model}`` field for the tiny policy saved under ``root``; the run is
    ``root / "run"``, trained with the dense ``digit_reward`` so its updates move the policy.
    """
    import shlex

    import pytest
    from typer.testing import CliRunner

    from entropy_lab.cli.app import app
    from entropy_lab.tasks.arithmetic import ArithmeticTask

    model = save_policy(root / "model")
    args = shlex.split(base.format(model=model)) + ["--steps", "2", "--out", str(root / "run")]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ArithmeticTask, "reward", digit_reward)
        result = CliRunner().invoke(app, ["train", *args])
    assert result.exit_code == 0, result.output
    return model, root / "run"
