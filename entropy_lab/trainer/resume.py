"""The trainer's state besides the weights, and continuing a run from its latest usable checkpoint.

``TrainerState`` is what step ``N + 1`` depends on: optimizer, scheduler, controller and
every RNG state, the step and the configuration. ``as_dict`` is the layout of a
checkpoint's ``trainer_state.pt`` (tensors and plain data, loaded with ``weights_only``:
see ``entropy_lab.checkpoints``), so checkpoints written before this type existed load too.

Resuming: ``check_resumable`` runs before anything is loaded (the configuration must be
the run's own; a longer ``steps`` extends the run); ``latest_usable`` walks the checkpoints
newest first, falling back past damaged ones; ``continue_from`` drops what came after the
checkpoint and returns the tables the run continues.

Simplification: a run without any checkpoint starts over (it had nothing to lose); a run
whose checkpoints are all damaged is one error line, never silently restarted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from entropy_lab import checkpoints
from entropy_lab.config import TrainConfig
from entropy_lab.controllers import Controller
from entropy_lab.errors import EntropyLabError
from entropy_lab.models import load_policy
from entropy_lab.runs import RunDir


@dataclass
class RandomStreams:
    """The random generators a step draws from besides torch's, Python's and CUDA's global ones."""

    np_rng: np.random.Generator  # problem sampling
    shuffle_gen: torch.Generator  # mini-batch order (CPU)
    loss_gen: torch.Generator  # the objective's random choices (on the run's device)


@dataclass
class TrainerState:
    """Everything besides the weights that step ``step + 1`` depends on (tensors and plain data)."""

    step: int
    optimizer: dict[str, Any]  # optimizer.state_dict()
    scheduler: dict[str, Any]  # scheduler.state_dict()
    rng: dict[str, Any]  # checkpoints.rng_state(...): torch, numpy, python, shuffle, loss[, cuda]
    config: dict[str, Any]  # TrainConfig.to_dict()
    controller: dict[str, Any] = field(default_factory=dict)  # absent in checkpoints from before controllers

    @classmethod
    def capture(
        cls,
        step: int,
        cfg: TrainConfig,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        controller: Controller,
        streams: RandomStreams,
    ) -> TrainerState:
        """The state after ``step``, read from the live objects."""
        return cls(
            step=step,
            optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict(),
            rng=checkpoints.rng_state(streams.np_rng, streams.shuffle_gen, streams.loss_gen),
            config=cfg.to_dict(),
            controller=controller.state_dict(),
        )

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> TrainerState:
        """From a checkpoint's ``trainer_state.pt`` (``checkpoints.load_trainer_state``)."""
        return cls(
            step=int(state["step"]),
            optimizer=state["optimizer"],
            scheduler=state["scheduler"],
            rng=state["rng"],
            config=state.get("config", {}),
            controller=state.get("controller", {}),
        )

    def as_dict(self) -> dict[str, Any]:
        """The checkpoint file's layout, keys in the order it has always had."""
        return {
            "step": self.step,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "rng": self.rng,
            "config": self.config,
            "controller": self.controller,
        }

    def apply(
        self,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        controller: Controller,
        streams: RandomStreams,
    ) -> int:
        """Load this state into the live objects (in place: the trainer's references stay valid); returns the step."""
        optimizer.load_state_dict(self.optimizer)
        scheduler.load_state_dict(self.scheduler)
        controller.load_state_dict(self.controller)
        checkpoints.set_rng_state(self.rng, streams.np_rng, streams.shuffle_gen, streams.loss_gen)
        return self.step


@dataclass
class Usable:
    """The latest checkpoint that loaded: its step, path, trainer state and weights."""

    step: int
    path: Path
    state: TrainerState
    weights: dict[str, torch.Tensor]  # the model's state_dict


FREE_ON_RESUME = ("steps", "report_to")
"""Settings a resumed run may change: a longer budget, and where its metrics are also logged."""


def check_resumable(run: RunDir, cfg: TrainConfig) -> None:
    """Before anything is loaded: the run's configuration must be this one (a longer budget extends it)."""
    saved = run.train_config().to_dict()
    diff = sorted(k for k, v in cfg.to_dict().items() if k not in FREE_ON_RESUME and saved.get(k) != v)
    if diff:
        shown = ", ".join(f"{k} ({saved.get(k)!r} -> {cfg.to_dict()[k]!r})" for k in diff[:4])
        raise EntropyLabError(
            f"cannot resume {run.path}: its configuration differs in {shown}; "
            "resume with the run's own settings or start a new --out"
        )
    run.read_metrics(), run.read_eval()  # one clear line if they are unreadable


def latest_usable(run: RunDir, device: torch.device, warn: Callable[[str], None]) -> Usable | None:
    """The newest checkpoint whose state and weights load, warning past each damaged one.

    Returns:
        The checkpoint, or None when the run has none yet; every checkpoint damaged is one error.
    """
    damaged: list[tuple[Path, str]] = []
    for step, path in reversed(list(run.checkpoints().items())):
        try:
            state = checkpoints.load_trainer_state(path)
            model, _ = load_policy(path / checkpoints.MODEL_DIR, device)
        except EntropyLabError as exc:
            damaged.append((path, str(exc)))
            warn(f"{exc}; falling back to the checkpoint before it")
            continue
        return Usable(step, path, TrainerState.from_dict(state), model.state_dict())
    if damaged:
        names = ", ".join(p.name for p, _ in damaged)
        raise EntropyLabError(
            f"no usable checkpoint to resume {run.path} from ({names}); the latest: {damaged[0][1]}; "
            "remove the damaged checkpoint directories and start over with --overwrite"
        )
    return None


def continue_from(run: RunDir, cfg: TrainConfig, step: int) -> tuple[list[dict], list[dict]]:
    """Drop what the run wrote after ``step`` (-1: everything) and extend its budget to ``cfg.steps``.

    Returns:
        The metrics and evaluation rows the run continues from.
    """
    run.truncate_after(step)
    metrics_rows = run.read_metrics().to_dict("records")
    eval_rows = run.read_eval().to_dict("records")
    if run.train_config().steps != cfg.steps:  # an extended budget is the run's budget now
        record = run.read_config()
        run.update_config_record(config={**record["config"], "steps": cfg.steps})
    return metrics_rows, eval_rows
