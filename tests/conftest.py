"""Shared test fixtures: tiny models built from configs and saved to disk (nothing is downloaded).

The plain helpers live in ``tests/helpers`` (``tiny_lm.py``: the tiny causal LM;
``tiny_training.py``: the tiny policy, the ``SMALL`` settings and the dense reward), which this
file puts on ``sys.path`` for tests and their child processes. Tests take them as fixtures: the
helpers that take arguments are served as factories (``make_tiny_lm``, ``tiny_policy``,
``save_policy``, ``small_config``, ``digit_reward``). The names are also importable from here
(``from conftest import save_policy``) for code that runs the helpers without fixtures.

``dense_reward`` patches the arithmetic task's reward for one test (see ``tiny_training.py``
for why the trainer tests need it).
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from entropy_lab.models import TinyPolicySpec
from entropy_lab.tasks.arithmetic import ArithmeticTask

# tests/helpers holds modules that tests and their child processes import by name.
HELPERS = Path(__file__).resolve().parent / "helpers"
sys.path.insert(0, str(HELPERS))

from tiny_lm import make_tiny_lm  # noqa: E402
from tiny_training import (  # noqa: E402
    SMALL,
    TINY_SPEC,
    digit_reward,
    save_policy,
    small_config,
    tiny_policy,
)

# re-exported for code that runs the helpers without fixtures
__all__ = [
    "SMALL",
    "TINY_SPEC",
    "digit_reward",
    "make_tiny_lm",
    "save_policy",
    "small_config",
    "tiny_policy",
]


def serve(helper: Callable) -> Callable:
    """A session fixture named like ``helper`` whose value is ``helper`` itself, for the test to call."""

    def fixture() -> Callable:
        return helper

    params = [p.replace(annotation=p.empty) for p in inspect.signature(helper).parameters.values()]
    fixture.__doc__ = f"``{helper.__name__}{inspect.Signature(params)}``: {helper.__doc__}"
    return pytest.fixture(scope="session", name=helper.__name__)(fixture)


make_tiny_lm_fixture = serve(make_tiny_lm)
tiny_policy_fixture = serve(tiny_policy)
save_policy_fixture = serve(save_policy)
small_config_fixture = serve(small_config)
digit_reward_fixture = serve(digit_reward)  # for module-scoped fixtures that patch the task themselves


@pytest.fixture
def tiny_lm():
    """The default tiny causal LM, ``make_tiny_lm()``."""
    return make_tiny_lm()


@pytest.fixture(scope="session", name="tiny_spec")
def tiny_spec_fixture() -> TinyPolicySpec:
    """The one-layer policy architecture of the trainer tests."""
    return TINY_SPEC


@pytest.fixture(scope="session", name="small_settings")
def small_settings_fixture() -> dict:
    """Settings that make one training step take a fraction of a second (a copy of ``SMALL``)."""
    return dict(SMALL)


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
    """The arithmetic task rewards completions that start with a digit (``digit_reward``)."""
    monkeypatch.setattr(ArithmeticTask, "reward", digit_reward)
