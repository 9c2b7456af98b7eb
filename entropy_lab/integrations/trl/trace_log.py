"""A traced step's tightness and sum of dH, logged through TRL's own ``report_to``.

``TraceLogCallback`` reads the trace file a traced optimizer step has just written and logs
``entropy_lab.trainer.loggers.trace_metrics`` of it (per estimator Pearson, sign agreement
and gain against the measured change, and the measured sum of dH) with ``Trainer.log``, so
every integration in ``args.report_to`` (TensorBoard, W&B, ...) receives them at that step,
as it receives TRL's own metrics.

Deliberate simplifications:

- Nothing is logged when ``report_to`` is empty or ``"none"``: there is nobody to receive it
  (the trace file and the reports hold the same numbers).
- The metrics go through ``transformers.Trainer.log`` itself, not ``GRPOTrainer.log``: the
  latter would fold in and clear TRL's running averages, which belong to TRL's own row. They
  appear in ``state.log_history`` as a row of their own at the traced step.
- Only the main process logs (it alone holds the gathered trace file).
"""

from __future__ import annotations

from transformers import Trainer, TrainerCallback

from entropy_lab.records import load_records
from entropy_lab.trainer.loggers import trace_metrics


def reports_somewhere(report_to) -> bool:
    """Whether TRL's ``report_to`` names any integration."""
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    return any(name and name != "none" for name in names)


class TraceLogCallback(TrainerCallback):
    """After a traced optimizer step, log its ``trace_metrics`` through the trainer's integrations."""

    def __init__(self, trainer) -> None:
        self.trainer = trainer
        self.logged: set[int] = set()

    def on_step_end(self, args, state, control, **kwargs):
        step = int(state.global_step)
        path = self.trainer._run.run.trace_path(step)
        if not state.is_world_process_zero or step in self.logged or not reports_somewhere(args.report_to):
            return None
        if path.is_file():
            self.logged.add(step)
            metrics = trace_metrics(load_records(path)[0])
            if metrics:
                Trainer.log(self.trainer, metrics)
        return None
