"""Warm-start storage: the assets shipped in the package and the resumable state of one in training.

A shipped warm start is two files in ``entropy_lab/assets/warm_starts/``, named by the task and
the key of its recipe (``models.warm_start_recipe``): ``NAME.safetensors``, the weights exactly as
``save_pretrained`` wrote them in the user cache, and ``NAME.json``, the record: the recipe, the
seed, the steps and the pass@1 reached, the SHA-256 of the weights and the platform that built
them. ``entropy-lab warm-start --rebuild --export DIR`` writes both.

A warm start in training keeps one rolling checkpoint, ``cache_root()/warmstart/NAME.resume.pt``:
weights, AdamW state, the demonstration sampler's RNG state, the step and the last pass@1 check,
so a killed warm start continues where it stopped and ends with the weights of an uninterrupted
one.

Simplifications: the checkpoint is one file replaced by ``os.replace`` (complete or absent at
every moment), so it needs no manifest; a damaged one is set aside with a warning and the warm
start begins again. Bit-identity of a rebuild holds for the platform recorded in the JSON
(torch version, CPU instruction set, float32 on CPU); elsewhere a rebuild is the same recipe,
not the same bits.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import transformers

from entropy_lab.checkpoints import sha256_file
from entropy_lab.errors import EntropyLabError, EntropyLabWarning

ASSET_DIR = Path(__file__).resolve().parent / "assets" / "warm_starts"
"""Where the package's warm starts live (package data)."""

WEIGHTS_FILE = "model.safetensors"
"""The weights file ``save_pretrained`` writes in a cache entry, shipped byte for byte."""

RECORD_FORMAT = "entropy-lab warm start"
"""The ``format`` field of every record this module writes: only such a record is ever replaced."""


def build_platform() -> dict:
    """What the bits of a warm start depend on besides its recipe."""
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "device": "cpu",
        "dtype": "float32",
    }


# --- shipped assets ------------------------------------------------------------------------------


def shipped_record(name: str, asset_dir: Path = ASSET_DIR) -> Path | None:
    """The record ``NAME.json`` of the shipped warm start ``name`` (``task-key``), or None."""
    path = asset_dir / f"{name}.json"
    return path if path.is_file() else None


def read_asset(record_path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(weights, record) of a shipped warm start, its weights checked against the recorded SHA-256."""
    from safetensors.torch import load_file

    try:
        record = json.loads(record_path.read_text())
        weights = record_path.with_name(record["file"])
        expected = record["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        raise EntropyLabError(
            f"the warm-start record {record_path} is damaged; reinstall entropy-lab"
        ) from None
    if not weights.is_file() or sha256_file(weights) != expected:
        raise EntropyLabError(
            f"the shipped warm start {weights} is missing or does not match the SHA-256 in {record_path.name}; "
            f"reinstall entropy-lab, or rebuild it: entropy-lab warm-start --task {record['task']} --rebuild"
        )
    return load_file(weights), record


def load_weights(model, weights: dict[str, torch.Tensor], where: Path) -> None:
    """Copy ``weights`` into ``model``; only tied parameters (``lm_head`` = the embeddings) may be absent."""
    result = model.load_state_dict(weights, strict=False)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    if set(result.missing_keys) - tied or result.unexpected_keys:
        raise EntropyLabError(
            f"the warm start {where} does not fit the embedded policy "
            f"(missing {sorted(set(result.missing_keys) - tied)}, unexpected {sorted(result.unexpected_keys)})"
        )


def write_asset(cache_entry: Path, name: str, record: dict, out_dir: Path) -> Path:
    """Write ``NAME.safetensors`` (copied from ``cache_entry``) and ``NAME.json`` into ``out_dir``.

    Only a record this module wrote is replaced; each file is written beside itself and renamed.
    Returns the record's path.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, weights = out_dir / f"{name}.json", out_dir / f"{name}.safetensors"
    for path in (json_path, weights):
        if path.exists() and not _is_ours(json_path):
            raise EntropyLabError(
                f"{path} exists and is not a warm start entropy-lab wrote; not replacing it"
            )
    tmp = weights.with_name(weights.name + ".tmp")
    shutil.copyfile(cache_entry / WEIGHTS_FILE, tmp)
    os.replace(tmp, weights)
    text = json.dumps({"format": RECORD_FORMAT, **record, "file": weights.name}, indent=2) + "\n"
    tmp = json_path.with_name(json_path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, json_path)
    return json_path


def _is_ours(json_path: Path) -> bool:
    try:
        return json.loads(json_path.read_text()).get("format") == RECORD_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


# --- the rolling checkpoint of a warm start in training ------------------------------------------


class SFTCheckpoint:
    """One rolling checkpoint file of a warm start, written every ``every`` SFT steps (0: never)."""

    def __init__(self, path: Path, every: int):
        self.path = path
        self.every = every

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def save(self, step: int, model, optimizer, np_rng: np.random.Generator, info: dict) -> None:
        state = {
            "step": step,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "numpy": np_rng.bit_generator.state},
            "info": info,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")  # two builds never share one
        torch.save(state, tmp)
        os.replace(tmp, self.path)

    def load(self) -> dict | None:
        """The saved state (tensors and plain data only, ``weights_only``), or None if there is none."""
        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
            if not all(k in state for k in ("step", "model", "optimizer", "rng", "info")):
                raise KeyError("incomplete")
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, KeyError, TypeError):
            aside = self.path.with_name(self.path.name + ".damaged")
            os.replace(self.path, aside)
            warnings.warn(
                f"the warm-start checkpoint {self.path} cannot be read; moved to {aside.name}, starting over",
                EntropyLabWarning,
                stacklevel=2,
            )
            return None
        return state

    def restore(self, state: dict, model, optimizer, np_rng: np.random.Generator) -> int:
        """Put ``state`` into the fresh ``model``, ``optimizer`` and sampler; returns the next step."""
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        np_rng.bit_generator.state = state["rng"]["numpy"]
        torch.set_rng_state(state["rng"]["torch"])
        return int(state["step"]) + 1

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
