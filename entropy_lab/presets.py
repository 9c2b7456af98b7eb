"""Pretrained-model presets: a built-in task's measured settings for a real ``--model``.

``TrainConfig``'s defaults are sized for the embedded 0.3M-parameter policy and do not
fit a pretrained language model (its lr of 1e-3 wrecks a 135M model in one step; its 16
response tokens cut every worked answer). A built-in task may carry
``PRETRAINED_DEFAULTS`` (config field -> value), measured with a small pretrained model
on CPU and documented in the task's docstring. ``resolve_with_preset`` applies them when
a model is given and no dataset, to every field that neither the user nor the method
preset sets: precedence is TrainConfig < task preset < method preset < the user's
options and ``--set`` pairs. The names of the fields it filled are recorded in
``cfg.preset_applied`` (so in the run's config.json), and ``describe`` states them with
their values in one line, which the CLI prints at start.

Simplifications: a preset belongs to a task, not to a model: its values were measured
with one model (SmolLM2-135M-Instruct) and are a starting point for others of that
size; dataset runs (``--dataset``) get none.
"""

from __future__ import annotations

from typing import Any

from entropy_lab.config import TrainConfig
from entropy_lab.errors import EntropyLabError
from entropy_lab.methods import get_method, resolve_config
from entropy_lab.tasks import TASKS


def task_preset(cfg: TrainConfig) -> dict[str, Any]:
    """The pretrained-model defaults of ``cfg``'s task, or {} (no model, a dataset, or a task without any).

    Args:
        cfg: A resolved configuration.

    Returns:
        Config field -> value, as the task declares them (``Task.PRETRAINED_DEFAULTS``).
    """
    if cfg.model is None or cfg.dataset is not None or cfg.task not in TASKS:
        return {}
    return dict(TASKS[cfg.task].PRETRAINED_DEFAULTS)


def resolve_with_preset(method: str, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """``resolve_config(method, overrides)`` with the task's pretrained-model preset under the method's.

    Args:
        method: Method name (``entropy_lab.methods``).
        overrides: The user's settings; none of them is ever replaced.

    Returns:
        The validated configuration; ``preset_applied`` names the fields the preset filled
        (space-separated, in the preset's order), '' when it filled none.
    """
    overrides = dict(overrides or {})
    if "preset_applied" in overrides:
        raise EntropyLabError(
            "preset_applied records which fields a task's preset filled in and cannot be set; "
            "set those fields themselves instead"
        )
    cfg = resolve_config(method, overrides)
    taken = set(overrides) | set(get_method(method).defaults)
    applied = {k: v for k, v in task_preset(cfg).items() if k not in taken}
    if not applied:
        return cfg
    base = TrainConfig().replace(**applied, preset_applied=" ".join(applied))
    return resolve_config(method, overrides, base=base)


def describe(cfg: TrainConfig) -> str:
    """One line naming every field the task's preset filled in, with its value; '' when it filled none."""
    if not cfg.preset_applied:
        return ""
    values = ", ".join(f"{k}={getattr(cfg, k)}" for k in cfg.preset_applied.split())
    return (
        f"task {cfg.task!r} preset for a pretrained model: {values} "
        "(the settings you gave are kept; change any with --set key=value)"
    )
