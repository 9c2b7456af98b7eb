"""Run directories (docs/cli.md, Run directories): configuration, per-step metrics, traces, checkpoints.

    runs/<name>/.entropy-lab-run     marker: this directory is a run that entropy-lab created
    runs/<name>/.entropy-lab-lock    while a process trains it (``entropy_lab.run_lock``)
    runs/<name>/.entropy-lab-files   ledger of written files, also in figures/ (``entropy_lab.run_files``)
    runs/<name>/config.json          resolved configuration, seed, package versions
    runs/<name>/metrics.parquet      one row per step, rewritten atomically after every step
    runs/<name>/eval.parquet         periodic evaluation (greedy accuracy, pass@k)
    runs/<name>/traces/step_XXXXXX.parquet   every traced update of that step (column ``update``)
    runs/<name>/checkpoints/step_XXXXXX/     model + tokenizer (save_pretrained), trainer_state.pt
    runs/<name>/figures/, report.md, report.json, report.html
    runs/<name>/tensorboard/, wandb/          experiment logs (``report_to``)
    runs/<name>/retrace/step_XXXXXX[-<method>][-jvp|-eta-sweep]/   an update traced from a
        checkpoint, a run directory of its own (older runs: retrace-*/, eta-sweep-*/ beside traces/)

Every file is written under a temporary name and renamed into place, so a killed run
leaves either the old or the new version, never half of one. Every file is checked when read
(``entropy_lab.untrusted``): config.json as a ``TrainConfig``, the tables' steps and dtypes.

Safety: the path is resolved first (``ghost/../run`` is ``run``), so every check sees the
directory that will be written. ``check_target`` refuses an unusable output directory
before anything is loaded or deleted, and a run another live process trains
(``entropy_lab.run_lock``). Replacing a run (``--overwrite``) removes only a directory that
carries the marker and holds nothing, at any depth, but what entropy-lab writes
(``entropy_lab.run_files``), and never the working directory, one of its parents, the home
directory or a Hugging Face model directory. No delete follows a symbolic link: a run
holding one is neither replaced nor resumed.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pandas as pd

from entropy_lab.config import TrainConfig
from entropy_lab.errors import EntropyLabError, os_error_message
from entropy_lab.run_files import (
    LOCK,
    MARKER,
    RUN_DIRS,
    RUN_FILES,
    SUB_RUN,
    TRACE,
    check_real_dir,
    foreign_paths,
    links_in,
    shown,
)
from entropy_lab.run_lock import check_unlocked
from entropy_lab.untrusted import check_step_table, read_json, read_parquet


def package_versions() -> dict[str, str]:
    """Versions of the packages that decide a run's numbers, read from their metadata (no torch import)."""
    import entropy_lab

    return {
        "python": platform.python_version(),
        "torch": metadata.version("torch"),
        "transformers": metadata.version("transformers"),
        "numpy": metadata.version("numpy"),
        "pandas": pd.__version__,
        "entropy_lab": entropy_lab.__version__,
    }


def write_parquet_atomic(df: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def write_text_atomic(text: str, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


MAX_CONFIG_BYTES = 4 << 20
"""Largest config.json read (4 MiB; entropy-lab writes a few KiB, a verl run's some tens)."""


def _is_known_entry(p: Path) -> bool:
    """A top-level entry of a run's layout (``run_files``), before its contents are vetted."""
    if p.is_symlink():
        return False
    if p.is_dir():
        return p.name in RUN_DIRS or (SUB_RUN.fullmatch(p.name) is not None and (p / MARKER).is_file())
    return p.name in RUN_FILES or p.name == LOCK or (p.name.endswith(".tmp") and p.name[:-4] in RUN_FILES)


LEGACY_RETRACE_PREFIXES = ("retrace-", "eta-sweep")
"""Where older versions put updates traced from a checkpoint: beside the run's own entries."""


def _hf_model_dir(path: Path) -> bool:
    """A Hugging Face model directory: config.json with a model_type or architectures entry."""
    try:
        record = json.loads((path / "config.json").read_text())
    except (OSError, ValueError, RecursionError):  # unreadable: not a model's (readers say what is wrong)
        return False
    return (
        isinstance(record, dict)
        and "config" not in record
        and ("model_type" in record or "architectures" in record)
    )


def _writable(path: Path) -> bool:
    """Whether a new entry can be made in ``path``, or in its nearest existing ancestor."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe.is_dir() and os.access(probe, os.W_OK | os.X_OK)


@dataclass
class RunDir:
    """Paths and I/O of one run directory."""

    path: Path

    def __post_init__(self):
        # Resolved before any check: "ghost/../run" is "run" even when ghost does not exist
        # (the kernel would refuse it), and a linked run directory is the folder it names.
        self.path = Path(self.path).resolve()

    marker_path = property(lambda self: self.path / MARKER)
    config_path = property(lambda self: self.path / "config.json")
    metrics_path = property(lambda self: self.path / "metrics.parquet")
    eval_path = property(lambda self: self.path / "eval.parquet")
    traces_dir = property(lambda self: self.path / "traces")
    checkpoints_dir = property(lambda self: self.path / "checkpoints")
    figures_dir = property(lambda self: self.path / "figures")
    report_path = property(lambda self: self.path / "report.md")

    # --- what is there -----------------------------------------------------------------
    def holds_run(self) -> bool:
        """A config.json that is a run's (not a model's) is here."""
        return self.config_path.is_file() and not _hf_model_dir(self.path)

    def check_target(self, *, overwrite: bool = False, resume: bool = False) -> None:
        """Refuse an output directory that cannot take this run; nothing is created or deleted.

        Called before the policy is loaded, so a bad ``--out`` fails in a second, not after
        a warm start; ``create`` checks again before it replaces anything.
        """
        p = self.path
        if overwrite and resume:
            raise EntropyLabError(
                "--resume and --overwrite exclude each other: pass --resume to continue the run or --overwrite to replace it"
            )
        if p.exists() and not p.is_dir():
            raise EntropyLabError(
                f"--out {p} is a file, not a directory; choose a directory path for the run"
            )
        if p.is_dir() and _hf_model_dir(p):
            raise EntropyLabError(
                f"{p} holds a Hugging Face model (config.json with model_type), not a run; choose another --out"
            )
        if p.is_dir():
            check_unlocked(p, "--resume" if resume else "--overwrite" if overwrite else "train into")
        if resume:
            if not self.holds_run():
                raise EntropyLabError(f"there is no run to resume in {p}; start it without --resume")
            self.check_no_links("--resume")
        elif self.holds_run():
            if not overwrite:
                raise EntropyLabError(
                    f"{p} already holds a run; pass --resume to continue it or --overwrite to replace it"
                )
            self.check_removable()
        elif p.is_dir() and any(p.iterdir()):
            entries = list(p.iterdir())
            known = all(_is_known_entry(e) for e in entries)
            only_lock = [e.name for e in entries] == [LOCK]  # a run that stopped right after taking its lock
            if not (known and (self.marker_path.is_file() or only_lock)):
                raise EntropyLabError(
                    f"{p} is not empty and holds no entropy-lab run; choose a new or empty --out"
                )
        if not _writable(p):
            raise EntropyLabError(f"cannot write the run to {p}: permission denied; choose a writable --out")

    def check_removable(self) -> None:
        """Refuse to replace anything but a directory entropy-lab recognisably wrote."""
        p = self.path.resolve()
        cwd = Path.cwd().resolve()
        if p == cwd or p in cwd.parents or p == Path.home().resolve() or p == p.parent:
            raise EntropyLabError(
                f"refusing to --overwrite {self.path}: it is the working directory, one of its parents or the home directory; give the run its own --out"
            )
        if not self.marker_path.is_file():
            raise EntropyLabError(
                f"refusing to --overwrite {self.path}: it has no {MARKER} marker, so entropy-lab did not create it (or an older version did); delete it yourself if it is disposable"
            )
        unknown = foreign_paths(self.path)
        if unknown:
            raise EntropyLabError(
                f"refusing to --overwrite {self.path}: it holds files entropy-lab did not write ({shown(unknown)}); move them away or choose another --out"
            )

    def check_no_links(self, doing: str) -> None:
        """Refuse a run holding a symbolic link: what is deleted or truncated must be the run's own."""
        links = links_in(self.path)
        if links:
            raise EntropyLabError(
                f"refusing to {doing} {self.path}: it holds symbolic links ({shown(links)}), and entropy-lab never "
                "deletes or rewrites through one; replace them with the real files or folders"
            )

    # --- creation ----------------------------------------------------------------------
    def create(self, cfg: TrainConfig, *, overwrite: bool = False, extra: dict | None = None) -> None:
        """Start a new run here; replaces an existing run only with ``overwrite`` and only a recognised one."""
        self.check_target(overwrite=overwrite)
        try:
            if self.holds_run():
                for entry in self.path.iterdir():  # check_removable vetted every entry
                    if entry.name == LOCK:
                        continue  # this process's own lock (check_target refused anyone else's)
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry)
                    else:
                        entry.unlink()
            self.path.mkdir(parents=True, exist_ok=True)
            write_text_atomic(
                json.dumps({"entropy_lab": package_versions()["entropy_lab"]}), self.marker_path
            )
            record = {
                "config": cfg.to_dict(),
                "seed": cfg.seed,
                "versions": package_versions(),
                **(extra or {}),
            }
            write_text_atomic(json.dumps(record, indent=2, default=str), self.config_path)
        except OSError as exc:
            raise EntropyLabError(os_error_message(exc) + "; choose another --out") from None

    def read_config(self) -> dict:
        """The whole config.json record, its ``config`` entry validated as a ``TrainConfig`` (all fields
        filled in); one error line if this is not a run directory or the file is not a valid record."""
        if not self.path.is_dir():
            raise EntropyLabError(f"no run directory at {self.path}")
        if not self.config_path.is_file():
            raise EntropyLabError(f"{self.path} is not a run directory (no config.json)")
        if _hf_model_dir(self.path):
            raise EntropyLabError(f"{self.path} holds a Hugging Face model, not a run directory")
        record = read_json(self.config_path, what="malformed run configuration", max_bytes=MAX_CONFIG_BYTES)
        if not isinstance(record.get("config"), dict):
            raise EntropyLabError(f"{self.config_path} is malformed (no readable 'config' entry)")
        try:
            config = TrainConfig.from_dict(record["config"])
        except EntropyLabError as exc:
            raise EntropyLabError(f"{self.config_path} is not a valid run configuration: {exc}") from None
        for key, kind in (("seed", int), ("versions", dict)):
            if key in record and (not isinstance(record[key], kind) or isinstance(record[key], bool)):
                raise EntropyLabError(
                    f"{self.config_path} is not a valid run configuration: its {key!r} entry is a "
                    f"{type(record[key]).__name__}, not a {kind.__name__}"
                )
        return {**record, "config": config.to_dict()}

    def train_config(self) -> TrainConfig:
        """The run's configuration, parsed and validated (config.json is data, never code)."""
        return TrainConfig.from_dict(self.read_config()["config"])

    def update_config_record(self, **entries) -> None:
        record = self.read_config()
        record.update(entries)
        write_text_atomic(json.dumps(record, indent=2, default=str), self.config_path)

    # --- tables ------------------------------------------------------------------------
    def _read_table(self, path: Path) -> pd.DataFrame:
        """A per-step table, checked (``untrusted.check_step_table``); empty when the file is absent."""
        if not path.is_file():
            return pd.DataFrame()
        try:
            df, _ = read_parquet(path, "table")
            return check_step_table(df, str(path))
        except EntropyLabError as exc:
            raise EntropyLabError(
                f"{exc}; the run's history in {path.name} is lost: start the run over with --overwrite"
            ) from None

    def read_metrics(self) -> pd.DataFrame:
        return self._read_table(self.metrics_path)

    def read_eval(self) -> pd.DataFrame:
        return self._read_table(self.eval_path)

    def write_metrics(self, rows: list[dict]) -> None:
        write_parquet_atomic(pd.DataFrame(rows), self.metrics_path)

    def write_eval(self, rows: list[dict]) -> None:
        write_parquet_atomic(pd.DataFrame(rows), self.eval_path)

    def trace_path(self, step: int) -> Path:
        return self.traces_dir / f"step_{step:06d}.parquet"

    def trace_files(self) -> list[Path]:
        return sorted(self.traces_dir.glob("step_*.parquet")) if self.traces_dir.is_dir() else []

    # --- checkpoints -------------------------------------------------------------------
    def checkpoint_path(self, step: int) -> Path:
        return self.checkpoints_dir / f"step_{step:06d}"

    def checkpoints(self) -> dict[int, Path]:
        """step -> complete checkpoint directory (temporary leftovers of a killed save are ignored)."""
        if not self.checkpoints_dir.is_dir():
            return {}
        out = {}
        for p in self.checkpoints_dir.iterdir():
            if p.name.startswith("step_") and p.name[5:].isdigit() and (p / "trainer_state.pt").is_file():
                out[int(p.name[5:])] = p
        return dict(sorted(out.items()))

    def find_checkpoint(self, step: int) -> Path:
        """The checkpoint of ``step``; one error listing the existing ones when there is none."""
        ckpts = self.checkpoints()
        if step in ckpts:
            return ckpts[step]
        names = ", ".join(p.name for p in ckpts.values()) or "none"
        raise EntropyLabError(f"{self.path} has no checkpoint at step {step}; existing checkpoints: {names}")

    def latest_checkpoint(self) -> tuple[int, Path] | None:
        ckpts = self.checkpoints()
        return None if not ckpts else list(ckpts.items())[-1]

    def truncate_after(self, step: int) -> None:
        """Drop metrics, evaluations and traces of steps after ``step`` (they are redone on resume)."""
        check_real_dir(self.traces_dir, self.path)  # never a delete through a link
        for path in (self.metrics_path, self.eval_path):
            df = self._read_table(path)
            if not df.empty:
                write_parquet_atomic(df[df["step"] <= step], path)
        for f in self.trace_files():
            if int(f.stem[5:]) > step and TRACE.fullmatch(f.name) and not f.is_symlink():
                f.unlink()


# --- updates traced from a checkpoint -----------------------------------------------------
RETRACE_DIR = "retrace"
"""``RUN/retrace/``: the updates traced from the run's checkpoints, one run directory each, so
the run's own ``traces/`` and report stay those of training."""


def retrace_dir(run: RunDir, step: int, method: str | None = None, variant: str | None = None) -> RunDir:
    """``RUN/retrace/step_000100[-<method>][-<variant>]``: update ``step + 1`` traced from checkpoint ``step``.

    ``method`` is named only when it is not the run's; ``variant`` is ``"jvp"`` or ``"eta-sweep"``.
    """
    name = "-".join([f"step_{step:06d}", *(part for part in (method, variant) if part)])
    return RunDir(run.path / RETRACE_DIR / name)


@dataclass(frozen=True)
class Retrace:
    """One update traced from a checkpoint of a run, as ``list_retraces`` finds it."""

    path: Path
    checkpoint_step: int | None  # None when its config.json does not say
    method: str
    variant: str  # "", "jvp" or "eta-sweep"
    legacy: bool  # the older layout (``retrace-*`` or ``eta-sweep-*`` beside the run's entries)


def list_retraces(run: RunDir) -> list[Retrace]:
    """Every traced-from-checkpoint run directory of ``run``, new layout first; unreadable ones are skipped."""
    new = sorted((run.path / RETRACE_DIR).glob("step_*")) if (run.path / RETRACE_DIR).is_dir() else []
    old = sorted(p for p in run.path.glob("*") if p.name.startswith(LEGACY_RETRACE_PREFIXES))
    found = []
    for p in new + old:
        if not (p / "config.json").is_file():
            continue
        try:
            record = RunDir(p).read_config()
        except EntropyLabError:
            continue
        cfg = record["config"]
        source = Path(str(record.get("traced_from", ""))).name
        variant = "eta-sweep" if cfg.get("trace_eta_grid") else "jvp" if cfg.get("trace_jvp") else ""
        found.append(
            Retrace(
                path=p,
                checkpoint_step=int(source[5:]) if source[5:].isdigit() else None,
                method=str(cfg.get("method")),
                variant=variant,
                legacy=p in old,
            )
        )
    return found
