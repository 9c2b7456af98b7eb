"""The trainer's guards: each failure mid-run becomes one line that says where the run stands.

- ``sampling_guard``: torch's sampler raises a bare ``RuntimeError`` on NaN/inf probabilities.
- ``nan_message``: a non-finite loss, gradient or rollout statistic, found before the optimizer
  step touches the weights.
- ``diverged_message``: an optimizer step that made the policy non-finite: its parameters (checked
  right after the step, before the tracer's post-update pass) or, when they are finite but so large
  that the logits overflow, its logits (the tracer's post-update pass, the next sampling); the
  message names the step and the likely cause (``divergence_cause``: learning rate, weight decay).
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


def divergence_cause(lr: float, weight_decay: float) -> str:
    """The likely cause of a policy made non-finite by an update, as a clause of an error message."""
    return (
        f"the likely cause is a learning rate (lr={lr:g}) or weight decay (weight_decay={weight_decay:g}) "
        "too large for this model: lower them"
    )


def diverged_message(run: RunDir, step: int, what: str, cause: str) -> str:
    """The error line of the optimizer step at ``step`` that left the policy's ``what`` NaN or infinite."""
    return (
        f"the optimizer step at step {step} made the policy's {what} non-finite (NaN or inf); {cause}; "
        f"the run stopped and {last_good_checkpoint(run)}"
    )


@contextlib.contextmanager
def sampling_guard(run: RunDir, step: int, updated_at: int | None = None, cause: str = "") -> Iterator[None]:
    """torch's sampler raises a bare RuntimeError on NaN/inf probabilities: make it the run's error.

    ``updated_at``: the step whose optimizer update produced the weights sampled from (None: the
    weights as loaded); the message then blames that update, with ``cause``.
    """
    try:
        yield
    except RuntimeError as exc:
        if "probability tensor contains" not in str(exc):
            raise
        if updated_at is None:
            raise EntropyLabError(nan_message(run, step, "sampling probabilities (policy logits)")) from None
        raise EntropyLabError(
            f"non-finite sampling probabilities (policy logits) at step {step}: the optimizer step at step "
            f"{updated_at} made the policy non-finite; {cause}; the run stopped and {last_good_checkpoint(run)}"
        ) from None


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
