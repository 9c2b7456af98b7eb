"""Where a run computes: the device it asked for and the autocast precision it uses there.

The trainer, the studies and the controllers share this one policy, so a setting means the
same thing everywhere: ``device="auto"`` is the GPU when torch sees one, and ``dtype="auto"``
is bf16 autocast on a GPU and plain fp32 on the CPU.

Simplifications: one device per run (no model sharding); autocast is the only mixed
precision (the weights stay in the dtype they were loaded in).
"""

from __future__ import annotations

import contextlib

import torch

from entropy_lab.config import TrainConfig
from entropy_lab.errors import EntropyLabError


def pick_device(name: str) -> torch.device:
    """The device named by a run's ``device`` setting.

    Args:
        name: ``auto`` (the GPU when torch sees one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``.

    Returns:
        The ``torch.device``; asking for a GPU torch cannot see is one error line.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise EntropyLabError("device 'cuda' was asked for but torch sees no GPU")
    return torch.device(name)


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPU under 'auto'; fp32 (no autocast) on CPU.

    Args:
        cfg: the run's configuration (its ``dtype``: auto, float32 or bfloat16).
        device: where the run computes.

    Returns:
        The autocast dtype, or None for no autocast.
    """
    if cfg.dtype == "float32" or (cfg.dtype == "auto" and device.type != "cuda"):
        return None
    if cfg.dtype in ("auto", "bfloat16"):
        return torch.bfloat16
    raise EntropyLabError(f"dtype must be auto, float32 or bfloat16, got {cfg.dtype!r}")


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """The autocast context of ``dtype`` on ``device``; None is no autocast (a null context)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
