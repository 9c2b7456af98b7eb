"""Trace one update from a saved checkpoint: step N+1 of a run, on the batch the run would have drawn.

``trace_checkpoint`` restores the weights, optimizer, scheduler and RNG states of the
checkpoint at step N (loaded safely: see ``entropy_lab.checkpoints``), runs step N+1 with
tracing on, and returns where its records went. The checkpoint is never modified.

The trace never goes into the run's own ``traces/`` (whose pooled tables stay those of
training): it goes to a run directory of its own, ``run/retrace/step_N[-<method>][-<variant>]``
(``entropy_lab.runs.retrace_dir``; the method named only when it is not the run's; variant
``jvp`` when the jvp estimators are traced, ``eta-sweep`` with an eta grid - the linear regime:
the traced tokens' entropy at theta + eta dtheta, ``TrainConfig.trace_eta_grid``). Tracing
the same update again replaces that directory. ``CheckpointTrace.trace_path`` is the one file
holding exactly that update.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from entropy_lab import checkpoints
from entropy_lab.config import TrainConfig
from entropy_lab.errors import EntropyLabError
from entropy_lab.runs import RunDir, retrace_dir
from entropy_lab.trace.probes import format_eta_grid
from entropy_lab.trainer.loop import Callback, Trainer


@dataclass
class CheckpointTrace:
    """What ``trace_checkpoint`` did."""

    run: RunDir
    """The run directory holding the new trace (``run/retrace/...``), with its own report."""
    checkpoint: Path
    """The checkpoint traced from."""
    step: int
    """The traced step (checkpoint step + 1)."""
    trace_path: Path
    """The trace file of that update alone."""
    method: str


def method_fields() -> set[str]:
    """Config fields that some method preset sets: they belong to the method, not to the run."""
    from entropy_lab.methods import METHODS

    return {k for m in METHODS.values() for k in m.defaults}


def trace_checkpoint(
    run: RunDir,
    step: int | None = None,
    method: str | None = None,
    callback: Callback | None = None,
    jvp: bool = False,
    eta_grid: Sequence[float] | None = None,
    attribution: str | None = None,
) -> CheckpointTrace:
    """One traced update from the checkpoint at ``step``; see the module docstring.

    Args:
        run: the run directory.
        step: the checkpoint's step (default: the latest).
        method: the method of the traced update (default: the run's).
        callback: the trainer's event callback.
        jvp: also record the jvp and jvp-entropy estimators (``TrainConfig.trace_jvp``).
        eta_grid: also sweep eta over these multiples of the step (``TrainConfig.trace_eta_grid``).
        attribution: also split the jvp prediction over parts (``TrainConfig.trace_attribution``).

    Returns:
        Where the trace went, and of which update.
    """
    from entropy_lab.methods import resolve_config

    ckpts = run.checkpoints()
    if not ckpts:
        raise EntropyLabError(f"{run.path} has no checkpoints to trace from; train with checkpoint_every > 0")
    if step is None:
        step = list(ckpts)[-1]
    ckpt = run.find_checkpoint(step)
    checkpoints.verify_checkpoint(ckpt)  # before its weights are loaded as the policy
    base = run.train_config()
    method = method or base.method
    if method != base.method:  # a new preset over the run's non-method settings
        defaults = TrainConfig().to_dict()
        base = base.replace(**{k: defaults[k] for k in method_fields()})
    overrides: dict = {"model": str(ckpt / "model"), "trace_every": 1}
    if jvp:  # the opt-in estimators of the network's own first order
        overrides["trace_jvp"] = True
    if eta_grid:
        overrides["trace_eta_grid"] = format_eta_grid(eta_grid)
    if attribution and attribution != "none":
        overrides["trace_attribution"] = attribution
    cfg = resolve_config(method, overrides, base=base)
    own_method = method == run.train_config().method
    variant = "eta-sweep" if cfg.trace_eta_grid else "jvp" if cfg.trace_jvp else None
    target = retrace_dir(run, step, None if own_method else method, variant)
    trainer = Trainer(cfg, target.path, callback=callback)
    trainer.setup(create_run=False)
    trainer.load_trainer_state(ckpt)  # verified and loaded with weights_only before anything is written
    target.create(cfg, overwrite=True, extra={"traced_from": str(ckpt), "retrace_of": str(run.path)})
    trainer.train_step(step + 1)
    return CheckpointTrace(target, ckpt, step + 1, target.trace_path(step + 1), method)
