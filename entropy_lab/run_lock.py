"""One process per run directory: the lock a training run holds (docs/cli.md, Run directories).

``RUN/.entropy-lab-lock`` is JSON: pid, host, start time (UTC), the process's own start tick
(Linux, so a reused pid is told apart) and a random token. It is created with
``O_CREAT | O_EXCL``, so of two processes exactly one gets it; it is removed when training
ends, also on an exception or Ctrl-C. A lock whose process is gone (same host, pid not
running or now another process) is stale: it is named in a warning and replaced. A lock of
another host cannot be checked and is never taken over: the error says how to remove it.

Readers (``trace --run``, ``figures``) never take the lock; they read only complete files,
which every writer renames into place.

Simplifications: two processes that find the same stale lock at the same moment may both
remove it; the one that then creates the lock first wins and the other is refused (each
re-reads the lock before removing it, which narrows this to a few microseconds). A lock
file that is unreadable JSON is a lock being written for ``YOUNG_S`` seconds, then stale.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from entropy_lab.errors import EntropyLabError, os_error_message
from entropy_lab.run_files import LOCK

YOUNG_S = 10.0
"""How long an unreadable lock file counts as one being written rather than a stale one."""

_HELD: dict[Path, str] = {}
"""Locks this process holds: run directory -> token."""


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc, Linux), or None elsewhere."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    return None if fields[0] == "Z" else fields[19]  # a zombie has exited already


@dataclass(frozen=True)
class LockInfo:
    """Who holds a run's lock; ``None`` fields when the file was unreadable."""

    path: Path
    pid: int | None = None
    host: str | None = None
    started: str | None = None
    proc_start: str | None = None
    token: str | None = None

    def describe(self) -> str:
        if self.pid is None:
            return f"an unreadable lock {self.path}"
        return f"pid {self.pid} on host {self.host}, started {self.started}"

    def alive(self) -> bool | None:
        """Whether the holder still runs: True, False, or None when it is on another host."""
        if self.pid is None:
            try:
                return time.time() - self.path.stat().st_mtime < YOUNG_S
            except OSError:
                return False
        if self.host != socket.gethostname():
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # someone else's process: it exists
        now = _proc_start(self.pid)
        if Path("/proc/self/stat").exists() and now is None:
            return False  # gone, or a zombie
        return self.proc_start is None or now is None or now == self.proc_start


def read_lock(run: Path) -> LockInfo | None:
    """The lock of the run directory ``run``, or None when it has none."""
    path = Path(run) / LOCK
    try:
        raw = path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError):
        return LockInfo(path)
    try:
        rec = json.loads(raw)
        return LockInfo(
            path, int(rec["pid"]), str(rec["host"]), str(rec["started"]), rec.get("proc_start"), rec["token"]
        )
    except (ValueError, KeyError, TypeError):
        return LockInfo(path)


def held_here(run: Path) -> bool:
    """Whether this process holds the run's lock."""
    info = read_lock(run)
    return info is not None and info.token is not None and _HELD.get(Path(run)) == info.token


def live_holder(run: Path) -> LockInfo | None:
    """The lock of another process that may still be training the run (None: nobody, or this process)."""
    info = read_lock(run)
    if info is None or held_here(run) or info.alive() is False:
        return None
    return info


def check_unlocked(run: Path, doing: str) -> None:
    """Refuse, in one line naming the holder, a run another live process holds (a stale lock passes)."""
    info = read_lock(run)
    if info is None or held_here(run):
        return
    alive = info.alive()
    if alive is False:
        return
    if alive is None:
        raise EntropyLabError(
            f"cannot {doing} {run}: it is locked by {info.describe()}, which cannot be checked from "
            f"{socket.gethostname()}; if that run has ended, delete {info.path}"
        )
    raise EntropyLabError(
        f"cannot {doing} {run}: another process is training it ({info.describe()}, lock {info.path}); "
        "wait for it to finish or choose another --out"
    )


class RunLock:
    """The lock of one run directory, taken by ``acquire`` and given back by ``release``."""

    def __init__(self, run: str | os.PathLike, warn: Callable[[str], None] | None = None):
        self.run = Path(run).resolve()
        self.warn = warn or (lambda message: None)
        self.token: str | None = None
        self.made: list[Path] = []  # folders acquire created, removed again if left empty

    def acquire(self, doing: str = "train") -> None:
        """Take the lock (creating the run directory if needed); one error line if another process holds it."""
        try:
            missing = [p for p in [self.run, *self.run.parents] if not p.exists()]
            self.run.mkdir(parents=True, exist_ok=True)
            self.made = missing
            for _ in range(3):
                if self._create():
                    return
                info = read_lock(self.run)
                if info is None:
                    continue  # released between our attempt and the read
                if held_here(self.run):  # another trainer of this process holds it
                    raise EntropyLabError(
                        f"cannot {doing} {self.run}: this process is training it already ({info.describe()})"
                    )
                check_unlocked(self.run, doing)
                self.warn(f"removing the stale lock {info.path}: {info.describe()} is no longer running")
                if read_lock(self.run) == info:  # not replaced by another process meanwhile
                    info.path.unlink(missing_ok=True)
        except OSError as exc:
            self._remove_made()
            raise EntropyLabError(os_error_message(exc, doing="lock") + "; choose another --out") from None
        raise EntropyLabError(f"cannot {doing} {self.run}: its lock keeps changing hands; try again")

    def _create(self) -> bool:
        token = secrets.token_hex(8)
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "proc_start": _proc_start(os.getpid()),
            "token": token,
        }
        try:
            fd = os.open(self.run / LOCK, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, (json.dumps(record) + "\n").encode())
        finally:
            os.close(fd)
        self.token = token
        _HELD[self.run] = token
        return True

    def release(self) -> None:
        """Give the lock back (only our own) and remove folders ``acquire`` made that stayed empty."""
        if self.token is None:
            return
        info = read_lock(self.run)
        if info is not None and info.token == self.token:
            info.path.unlink(missing_ok=True)
        _HELD.pop(self.run, None)
        self.token = None
        self._remove_made()

    def _remove_made(self) -> None:
        for p in self.made:  # deepest first
            try:
                p.rmdir()  # only if empty
            except OSError:
                break
        self.made = []

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
