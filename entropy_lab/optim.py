"""Optimizers by name: AdamW (the default) and plain SGD.

The estimators of ``entropy_lab.theory`` model one plain SGD step; ``optimizer=sgd`` lets a
run test them without Adam's per-parameter rescaling, so what remains between prediction
and measurement is parameter coupling and curvature alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from entropy_lab.config import TrainConfig
from entropy_lab.registry import Registry

OptimizerBuilder = Callable[[Iterable[torch.nn.Parameter], TrainConfig], torch.optim.Optimizer]
OPTIMIZERS: Registry[OptimizerBuilder] = Registry("optimizer")


@OPTIMIZERS.register("adamw")
def adamw(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with lr and weight decay from the config, torch's default betas and eps."""
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


@OPTIMIZERS.register("sgd")
def sgd(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Plain SGD (no momentum): the update the first-order estimators assume."""
    return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    return OPTIMIZERS[cfg.optimizer](params, cfg)
