"""Checkpoints: write the trainer's whole state atomically, read it back without running code.

A checkpoint directory ``checkpoints/step_XXXXXX/`` holds

    model/               model and tokenizer (``save_pretrained``: safetensors, JSON)
    trainer_state.pt     optimizer, scheduler and RNG states, step, config: tensors and plain data only
    checkpoint.json      manifest: step and the SHA-256 of every file above

Loading never unpickles code: ``trainer_state.pt`` is read with ``torch.load(weights_only=True)``,
which admits tensors and plain containers only, so a crafted file is refused with one line
instead of executing. The manifest detects a damaged (truncated, overwritten) file before
anything is loaded, so ``--resume`` can fall back to the previous checkpoint.

Writes go to ``step_XXXXXX.tmp`` and are renamed into place; a replaced checkpoint is first
renamed to ``.old``, so at every moment each step has a complete checkpoint or none.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from entropy_lab.errors import EntropyLabError

STATE_FILE = "trainer_state.pt"
MANIFEST_FILE = "checkpoint.json"
MODEL_DIR = "model"


class CheckpointError(EntropyLabError):
    """A checkpoint that cannot be used (damaged, incomplete or unsafe); the message names the file."""


# --- RNG state -----------------------------------------------------------------------------------


def rng_state(np_rng: np.random.Generator, shuffle_gen: torch.Generator, loss_gen: torch.Generator) -> dict:
    """Every random state a step draws from: tensors and plain data (loadable with weights_only)."""
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np_rng.bit_generator.state,
        "python": random.getstate(),
        "shuffle": shuffle_gen.get_state(),
        "loss": loss_gen.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(
    rng: dict, np_rng: np.random.Generator, shuffle_gen: torch.Generator, loss_gen: torch.Generator
) -> None:
    torch.set_rng_state(rng["torch"])
    np_rng.bit_generator.state = rng["numpy"]
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    shuffle_gen.set_state(rng["shuffle"])
    loss_gen.set_state(rng["loss"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


# --- writing -------------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    """The file's SHA-256, hex, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)


def save_checkpoint(final: Path, model, tokenizer, state: dict) -> Path:
    """Write model, tokenizer, ``state`` and the manifest to ``final``, atomically; returns ``final``.

    An OSError (full disk, read-only directory) propagates after the partial ``.tmp`` is removed;
    earlier checkpoints are never touched.
    """
    tmp = final.with_name(final.name + ".tmp")
    old = final.with_name(final.name + ".old")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp / MODEL_DIR)
        tokenizer.save_pretrained(tmp / MODEL_DIR)
        torch.save(state, tmp / STATE_FILE)
        manifest = {
            "step": int(state["step"]),
            "files": {str(p.relative_to(tmp)): sha256_file(p) for p in _files(tmp)},
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


# --- reading -------------------------------------------------------------------------------------


def verify_checkpoint(path: Path) -> None:
    """Every file the manifest lists is present and unchanged; else a CheckpointError naming it.

    Checkpoints written before manifests existed are accepted as they are.
    """
    manifest_path = path / MANIFEST_FILE
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: {STATE_FILE} is missing")
    if not manifest_path.is_file():
        return
    try:
        files = json.loads(manifest_path.read_text())["files"]
        if not isinstance(files, dict):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        raise CheckpointError(f"checkpoint manifest {manifest_path} is damaged") from None
    for rel, digest in files.items():
        f = path / rel
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {f} is missing")
        if sha256_file(f) != digest:
            raise CheckpointError(
                f"checkpoint file {f} is damaged (its content changed after it was written)"
            )


def _unsafe_reason(exc: Exception) -> str:
    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
    if found:
        return f"it holds the Python object {found.group(1)}, not only tensors and plain data"
    return "it holds objects other than tensors and plain data"


def load_trainer_state(path: Path) -> dict:
    """The verified trainer state of checkpoint ``path``, read with ``torch.load(weights_only=True)``."""
    verify_checkpoint(path)
    file = path / STATE_FILE
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise CheckpointError(
                f"refusing to load {file}: {_unsafe_reason(exc)}, and unpickling it could run code; "
                f"delete {path} unless you trust whoever wrote it"
            ) from None
        raise CheckpointError(
            f"checkpoint file {file} is damaged ({str(exc).splitlines()[0][:120]})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint file {file} is damaged ({str(exc).splitlines()[0][:120]})"
        ) from None
    missing = [
        k for k in ("step", "optimizer", "scheduler", "rng") if not isinstance(state, dict) or k not in state
    ]
    if missing:
        raise CheckpointError(
            f"checkpoint file {file} lacks {', '.join(missing)}; it was not written by entropy-lab"
        )
    return state
