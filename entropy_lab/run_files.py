"""Which files entropy-lab wrote: exact name patterns, a ledger of written files, and the vetting
that comes before every delete or replace (docs/cli.md, Run directories).

In a run directory every entry must match one of these patterns, recursively:

    top level     .entropy-lab-run, .entropy-lab-lock, .entropy-lab-files, config.json,
                  metrics.parquet, eval.parquet, report.md, report.json, report.html (and ``<name>.tmp`` of
                  each file written atomically)
    traces/       step_XXXXXX.parquet (and .tmp)
    checkpoints/  step_XXXXXX/ whose every file its checkpoint.json lists; step_XXXXXX.tmp/ and
                  .old/ (a save in flight) holding only model/, trainer_state.pt, checkpoint.json
    figures/      a file the directory's ledger lists with its current SHA-256, or the PNG/PDF of
                  a built-in figure (runs written before the ledger existed)
    tensorboard/, wandb/   experiment logs (``report_to``): any file, no symbolic link
    retrace/      step_XXXXXX[-<method>][-jvp|-eta-sweep]/: runs of their own (with the marker)
    noise-floor-step_XXXXXX/   noise_floor.csv and one run (with the marker) per setting
    retrace-*/, eta-sweep-*/   (older layout) runs of their own, vetted by the same rules

``foreign_paths`` lists everything else, symbolic links included: a link is never followed,
so a linked ``traces/`` can never lead a delete outside the run.

Shared output directories (``figures --out``, a study's ``--out``) are never vetted for a
delete, because nothing there is ever deleted; ``check_replaceable`` lets a write replace an
existing file only when that directory's ledger (``.entropy-lab-files``: name -> SHA-256)
lists it unchanged, or when it is a built-in output of a run or comparison written before
the ledger existed. ``record_written`` adds a file to its directory's ledger.

Simplifications: a checkpoint save in flight (``.tmp``) or one without a readable manifest
is vetted by its top-level names and a flat model/ folder, since the files
``save_pretrained`` writes depend on the model; the ledger is rewritten after each file
(a few small files per report), and two reports written at once into one directory may
lose each other's ledger entries (the next write of those files is then refused, never
silently done).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

from entropy_lab.errors import EntropyLabError

MARKER = ".entropy-lab-run"
"""File that marks a directory as a run entropy-lab created (and may therefore replace)."""
LOCK = ".entropy-lab-lock"
"""The run's lock while a process trains it (``entropy_lab.run_lock``)."""
LEDGER = ".entropy-lab-files"
"""Per directory: the files entropy-lab wrote there, with their SHA-256."""

RUN_FILES = frozenset(
    {
        MARKER,
        LEDGER,
        "config.json",
        "metrics.parquet",
        "eval.parquet",
        "report.md",
        "report.json",
        "report.html",
    }
)
"""Top-level files of a run, each written atomically (through ``<name>.tmp``)."""
RUN_DIRS = frozenset({"traces", "checkpoints", "figures", "retrace"})
"""Top-level folders of a run."""
BUILTIN_FIGURES = frozenset(
    {
        "training_curves",
        "pass_at_k",
        "measured_vs_predicted",
        "tightness_over_steps",
        "residuals_by_factor",
        "quadrants",
        "decomposition",
        "entropy_change_distribution",
        "steer_weights",
        "linear_regime",
        "entropy_by_position",
    }
)
"""Stems of the figures entropy-lab itself draws (PNG and PDF each)."""
FIGURE_SUFFIXES = (".png", ".pdf")

STEP = re.compile(r"step_\d{6}")
TRACE = re.compile(r"step_\d{6}\.parquet(\.tmp)?")
CHECKPOINT = re.compile(r"step_\d{6}(\.tmp|\.old)?")
SUB_RUN = re.compile(r"(retrace|eta-sweep)-.+")
LOG_DIRS = frozenset({"tensorboard", "wandb"})
"""Experiment logs (``report_to``): written by TensorBoard and W&B, at any depth, on entropy-lab's behalf."""
STUDY_DIR = re.compile(r"noise-floor-step_\d{6}")
STUDY_FILES = frozenset({"noise_floor.csv", LEDGER})
"""A study written inside a run (``entropy-lab study noise-floor``): its table and one run per setting."""
CHECKPOINT_TOP = frozenset({"model", "trainer_state.pt", "checkpoint.json"})


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- the ledger --------------------------------------------------------------------------------


def read_ledger(directory: Path) -> dict[str, str]:
    """name -> SHA-256 of what entropy-lab wrote in ``directory``; {} when absent or unreadable."""
    path = directory / LEDGER
    if path.is_symlink() or not path.is_file():
        return {}
    try:
        files = json.loads(path.read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return {}
    if not isinstance(files, dict):
        return {}
    return {k: v for k, v in files.items() if isinstance(k, str) and isinstance(v, str)}


def record_written(paths: Iterable[Path]) -> None:
    """Add each file (just written by entropy-lab) to its directory's ledger."""
    by_dir: dict[Path, list[Path]] = {}
    for p in paths:
        by_dir.setdefault(Path(p).parent, []).append(Path(p))
    for directory, files in by_dir.items():
        ledger = read_ledger(directory)
        ledger.update({p.name: sha256_file(p) for p in files})
        tmp = directory / (LEDGER + ".tmp")
        tmp.write_text(json.dumps({"files": dict(sorted(ledger.items()))}, indent=1) + "\n")
        os.replace(tmp, directory / LEDGER)


def _listed(path: Path, ledger: dict[str, str]) -> bool:
    return ledger.get(path.name) == sha256_file(path)


def _legacy_output(path: Path) -> bool:
    """A built-in output of a run (marker) or a comparison (its report.md is ours) from before the ledger."""
    folder = path.parent
    in_figures = folder.name == "figures"
    root = folder.parent if in_figures else folder
    if in_figures:
        if not (path.suffix in FIGURE_SUFFIXES and path.stem in BUILTIN_FIGURES):
            return False
    elif path.name not in ("report.md", "report.json"):
        return False
    if (root / MARKER).is_file():
        return True
    report = root / "report.md"
    try:
        with open(report, encoding="utf-8", errors="replace") as fh:
            return not report.is_symlink() and fh.readline().startswith("# entropy-lab ")
    except OSError:
        return False


def _owned_figure(path: Path, ledger: dict[str, str]) -> bool:
    return _listed(path, ledger) or _legacy_output(path)


# --- writes that replace nothing of the user's ------------------------------------------------


def check_replaceable(paths: Iterable[Path], what: str = "choose another output directory") -> None:
    """Refuse, in one line naming them, the paths that exist and that entropy-lab did not write.

    A path may be absent (a new file) or a file this directory's ledger lists unchanged (or a
    built-in output from before the ledger); a link, a folder or anything else is refused.
    """
    bad: list[str] = []
    ledgers: dict[Path, dict[str, str]] = {}
    for p in map(Path, paths):
        if p.is_symlink():
            bad.append(f"{p} (a symbolic link)")
        elif not p.exists():
            continue
        elif not p.is_file():
            bad.append(f"{p} (not a file)")
        elif not _owned_figure(p, ledgers.setdefault(p.parent, read_ledger(p.parent))):
            bad.append(str(p))
    if bad:
        raise EntropyLabError(
            f"refusing to replace files entropy-lab did not write: {shown(bad)}; move them away or {what}"
        )


def check_real_dir(path: Path, root: Path) -> None:
    """``path`` (absent, or a folder) may take entropy-lab's files: no link, nothing outside ``root``."""
    for p in [path, *path.parents]:
        if p.is_symlink():
            raise EntropyLabError(
                f"{p} is a symbolic link; entropy-lab never writes or deletes through one: "
                "replace it with a real folder or choose another output directory"
            )
        if p == root or p == p.parent:
            break
    if path.exists() and not path.is_dir():
        raise EntropyLabError(
            f"{path} is a file, not a folder; move it away or choose another output directory"
        )


def shown(items: list[str], limit: int = 5) -> str:
    """At most ``limit`` items, comma-separated, then how many more."""
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


# --- vetting a run directory before a delete -----------------------------------------------------


def foreign_paths(root: Path) -> list[str]:
    """Paths under the run directory ``root`` (relative, folders with a trailing /) that
    entropy-lab did not write, symbolic links included (as ``name (a symbolic link)``)."""
    out: list[str] = []
    _vet_run(Path(root), "", out)
    return out


def links_in(root: Path) -> list[str]:
    """Every symbolic link under ``root`` (relative paths), never followed."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):  # os.walk does not descend into linked folders
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            if p.is_symlink():
                found.append(str(p.relative_to(root)))
    return sorted(found)


def _entries(folder: Path) -> list[os.DirEntry]:
    with os.scandir(folder) as it:
        return sorted(it, key=lambda e: e.name)


def _vet_run(folder: Path, prefix: str, out: list[str]) -> None:
    for e in _entries(folder):
        rel = prefix + e.name
        if e.is_symlink():
            out.append(f"{rel} (a symbolic link)")
        elif e.is_dir():
            if e.name == "traces":
                _vet_flat(Path(e.path), rel + "/", TRACE, out)
            elif e.name == "checkpoints":
                _vet_checkpoints(Path(e.path), rel + "/", out)
            elif e.name == "figures":
                _vet_figures(Path(e.path), rel + "/", out)
            elif e.name in LOG_DIRS:
                out.extend(f"{prefix}{e.name}/{link} (a symbolic link)" for link in links_in(Path(e.path)))
            elif e.name == "retrace" or STUDY_DIR.fullmatch(e.name):
                _vet_sub_runs(Path(e.path), rel + "/", out)
            elif SUB_RUN.fullmatch(e.name) and (Path(e.path) / MARKER).is_file():
                _vet_run(Path(e.path), rel + "/", out)
            else:
                out.append(rel + "/")
        elif not (e.is_file() and (e.name in RUN_FILES or e.name == LOCK or _tmp_of(e.name, RUN_FILES))):
            out.append(rel)


def _vet_sub_runs(folder: Path, prefix: str, out: list[str]) -> None:
    """``retrace/`` and a study's folder: runs of their own (with the marker) and the study's tables."""
    for e in _entries(folder):
        rel = prefix + e.name
        if e.is_symlink():
            out.append(f"{rel} (a symbolic link)")
        elif e.is_dir() and (Path(e.path) / MARKER).is_file():
            _vet_run(Path(e.path), rel + "/", out)
        elif not (e.is_file() and (e.name in STUDY_FILES or _tmp_of(e.name, STUDY_FILES))):
            out.append(rel + ("/" if e.is_dir() else ""))


def _tmp_of(name: str, names: frozenset[str]) -> bool:
    return name.endswith(".tmp") and name[: -len(".tmp")] in names


def _vet_flat(folder: Path, prefix: str, pattern: re.Pattern, out: list[str]) -> None:
    for e in _entries(folder):
        if e.is_symlink():
            out.append(f"{prefix}{e.name} (a symbolic link)")
        elif not (e.is_file() and pattern.fullmatch(e.name)):
            out.append(prefix + e.name + ("/" if e.is_dir() else ""))


def _vet_figures(folder: Path, prefix: str, out: list[str]) -> None:
    ledger = read_ledger(folder)
    for e in _entries(folder):
        p = Path(e.path)
        if e.is_symlink():
            out.append(f"{prefix}{e.name} (a symbolic link)")
        elif not e.is_file():
            out.append(prefix + e.name + "/")
        elif e.name == LEDGER or _owned_figure(p, ledger):
            continue
        elif (
            e.name.endswith(".tmp")
            and (  # a figure write in flight
                e.name[:-4] in ledger or _legacy_output(p.with_name(e.name[:-4]))
            )
        ):
            continue
        else:
            out.append(prefix + e.name)


def _manifest_files(ckpt: Path) -> set[str] | None:
    """The files a checkpoint's manifest lists, or None when it has no readable manifest."""
    try:
        files = json.loads((ckpt / "checkpoint.json").read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {k for k in files if isinstance(k, str)} if isinstance(files, dict) else None


def _vet_checkpoints(folder: Path, prefix: str, out: list[str]) -> None:
    for e in _entries(folder):
        rel = prefix + e.name
        if e.is_symlink():
            out.append(f"{rel} (a symbolic link)")
        elif not (e.is_dir() and CHECKPOINT.fullmatch(e.name)):
            out.append(rel + ("/" if e.is_dir() else ""))
        else:
            _vet_checkpoint(Path(e.path), rel + "/", out)


def _vet_checkpoint(ckpt: Path, prefix: str, out: list[str]) -> None:
    listed = _manifest_files(ckpt) if (ckpt / "checkpoint.json").is_file() else None
    for dirpath, dirnames, filenames in os.walk(ckpt):
        here = Path(dirpath)
        for name in sorted(dirnames + filenames):
            p = here / name
            rel = p.relative_to(ckpt).as_posix()
            if p.is_symlink():
                out.append(f"{prefix}{rel} (a symbolic link)")
            elif p.is_dir():
                if listed is None and (here != ckpt or name != "model"):
                    out.append(f"{prefix}{rel}/")
                    dirnames.remove(name)
            elif listed is not None:
                if rel not in listed and rel != "checkpoint.json":
                    out.append(prefix + rel)
            elif not (here == ckpt and name in CHECKPOINT_TOP) and here != ckpt / "model":
                out.append(prefix + rel)
