"""Checkpoints: write the trainer's whole state atomically, read it back without running code.

A checkpoint directory ``checkpoints/step_XXXXXX/`` holds

    model/               model and tokenizer (``save_pretrained``: safetensors, JSON)
    trainer_state.pt     optimizer, scheduler and RNG states, step, config: tensors and plain data only
    checkpoint.json      manifest: step and the SHA-256 of every file above

Loading never unpickles code: ``trainer_state.pt`` is read with ``torch.load(weights_only=True)``,
which admits tensors and plain containers only, so a crafted file is refused with one line
instead of executing. The manifest detects a damaged (truncated, overwritten) file before
anything is loaded, so ``--resume`` can fall back to the previous checkpoint. The manifest is
untrusted data too (``read_manifest``): its paths must stay inside the checkpoint folder, it must
list the state and the weights, and the folder must hold nothing it does not list.

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
from entropy_lab.untrusted import read_json

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


MAX_MANIFEST_BYTES = 1 << 20
"""Largest manifest read (1 MiB; a sharded 70B model's lists a few hundred files)."""
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _step_of(path: Path) -> int | None:
    digits = path.name.removeprefix("step_")
    return int(digits) if path.name.startswith("step_") and digits.isdigit() else None


def _confined(root: Path, rel: object) -> bool:
    """``rel`` names a file inside ``root``: relative, no ``..``, and no link that leads out of it."""
    if not isinstance(rel, str) or not rel or rel.startswith("/") or "\\" in rel or "\x00" in rel:
        return False
    if any(part in ("", ".", "..") for part in rel.split("/")):
        return False
    return (root / rel).resolve().is_relative_to(root.resolve())


def read_manifest(path: Path) -> dict[str, str]:
    """The checked manifest of checkpoint ``path``: relative file path -> SHA-256; a CheckpointError if unusable.

    The manifest must be a JSON object (``untrusted.read_json``: size and depth limits) whose ``step``
    is the directory's step and whose ``files`` map paths confined to the checkpoint folder (no
    absolute path, no ``..``, no link out of it) to SHA-256 digests; it lists the trainer state, the
    model's config.json and its safetensors weights, and every file the folder holds.
    """
    manifest_path = path / MANIFEST_FILE
    try:
        manifest = read_json(
            manifest_path, what="checkpoint manifest", max_bytes=MAX_MANIFEST_BYTES, max_depth=4
        )
    except EntropyLabError as exc:
        raise CheckpointError(str(exc)) from None

    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"checkpoint manifest {manifest_path} is damaged: {why}")

    unknown = sorted(set(manifest) - {"step", "files"})
    if unknown:
        raise bad(f"it has entries entropy-lab does not write ({', '.join(map(repr, unknown[:3]))})")
    step, files = manifest.get("step"), manifest.get("files")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise bad(f"its step is {step!r}, not a step number")
    if _step_of(path) is not None and step != _step_of(path):
        raise bad(f"it is the manifest of step {step}, not of {path.name}")
    if not isinstance(files, dict) or not files:
        raise bad("it lists no files")
    for rel, digest in files.items():
        if not _confined(path, rel):
            raise bad(f"it names {rel!r}, which is not a path inside the checkpoint folder")
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise bad(f"the digest of {rel} is {str(digest)[:80]!r}, not a SHA-256")
    required = [STATE_FILE, f"{MODEL_DIR}/config.json"]
    missing = [f for f in required if f not in files]
    if not any(f.startswith(f"{MODEL_DIR}/") and f.endswith(".safetensors") for f in files):
        missing.append(f"{MODEL_DIR}/*.safetensors")
    if missing:
        raise bad(f"it does not list {', '.join(missing)}")
    unlisted = [str(p.relative_to(path)) for p in _files(path) if str(p.relative_to(path)) not in files]
    if unlisted:
        raise CheckpointError(
            f"checkpoint {path} holds {', '.join(unlisted[:3])}, which its manifest does not list; "
            "entropy-lab did not write it there"
        )
    return files


def verify_checkpoint(path: Path) -> None:
    """Every file the manifest (``read_manifest``) lists is present and unchanged; else a CheckpointError naming it.

    Checkpoints written before manifests existed are accepted as they are.
    """
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: {STATE_FILE} is missing")
    if not (path / MANIFEST_FILE).exists():
        return
    for rel, digest in read_manifest(path).items():
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
    kinds = {
        "step": int,
        "optimizer": dict,
        "scheduler": dict,
        "rng": dict,
        "config": dict,
        "controller": dict,
    }
    wrong = [k for k, kind in kinds.items() if k in state and not isinstance(state[k], kind)]
    if wrong:
        raise CheckpointError(
            f"checkpoint file {file} is damaged: its {wrong[0]!r} entry is a {type(state[wrong[0]]).__name__}"
        )
    if _step_of(path) is not None and state["step"] != _step_of(path):
        raise CheckpointError(
            f"checkpoint file {file} holds the state of step {state['step']}, not of {path.name}"
        )
    return state
