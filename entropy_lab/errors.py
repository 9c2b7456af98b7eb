"""One exception type for bad input, one warning type for settings that cannot work well.

``EntropyLabError`` carries one complete sentence for the user (the CLI prints it as a
single line); ``did_you_mean`` offers the closest valid names for a mistyped one; ``os_error_message`` turns a failed file operation into such a sentence,
naming the cause (full disk, read-only file system, permissions) instead of a traceback.
"""

from __future__ import annotations

import difflib
import errno
import os
from collections.abc import Iterable


class EntropyLabError(ValueError):
    """Bad input or configuration. The message is one complete sentence for the user."""


class EntropyLabWarning(UserWarning):
    """A setting or outcome that makes a run meaningless (nothing to learn) without being an error."""


def did_you_mean(name: str, valid: Iterable[str]) -> str:
    """' (did you mean 'steer'?)' for a mistyped ``name`` close to a valid one (difflib), else ''."""
    close = difflib.get_close_matches(name, list(valid), n=2, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


_CAUSES = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENOTDIR: "a part of the path is a file, not a directory",
    errno.EISDIR: "it is a directory",
}


def os_error_message(exc: OSError, path: str | os.PathLike | None = None, doing: str = "write") -> str:
    """'could not write PATH: the disk is full' for an OSError (no newline, no traceback)."""
    cause = _CAUSES.get(exc.errno or -1) or (exc.strerror or str(exc)).splitlines()[0]
    where = path if path is not None else (exc.filename or "a file")
    return f"could not {doing} {where}: {cause}"
