"""The trainer's guards: each failure mid-run becomes one line that says where the run stands.

- ``sampling_guard``: torch's sampler raises a bare ``RuntimeError`` on NaN/inf probabilities.
- ``nan_message``: a non-finite loss, gradient or rollout statistic, found before the optimizer
  step touches the weights.
- ``write_guard``: a failed write (full disk, read-only directory); checkpoints stay.

Every message names the last good checkpoint (``last_good_checkpoint``), the place a
``--resume`` continues from.

Simplification: only the sampler's NaN error is translated; any other ``RuntimeError``
passes through unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from entropy_lab.errors import EntropyLabError, os_error_message
from entropy_lab.runs import RunDir


def last_good_checkpoint(run: RunDir) -> str:
    """Where a failed run can resume from, as a clause of an error message."""
    last = run.latest_checkpoint()
    return f"the last good checkpoint is {last[1]}" if last else "no checkpoint was written yet"


def nan_message(run: RunDir, step: int, what: str) -> str:
    """The error line of a non-finite ``what`` (loss, gradient, ...) at ``step``."""
    return (
        f"non-finite {what} at step {step}; the run stops before the optimizer step and "
        f"{last_good_checkpoint(run)}"
    )


@contextlib.contextmanager
def sampling_guard(run: RunDir, step: int) -> Iterator[None]:
    """torch's sampler raises a bare RuntimeError on NaN/inf probabilities: make it the run's error."""
    try:
        yield
    except RuntimeError as exc:
        if "probability tensor contains" not in str(exc):
            raise
        raise EntropyLabError(nan_message(run, step, "sampling probabilities (policy logits)")) from None


@contextlib.contextmanager
def write_guard(run: RunDir) -> Iterator[None]:
    """A failed write (full disk, read-only directory) ends the run with one line; checkpoints stay."""
    try:
        yield
    except OSError as exc:
        raise EntropyLabError(
            f"{os_error_message(exc)}; the run stopped and {last_good_checkpoint(run)} "
            "(fix the cause, then pass --resume)"
        ) from None
