"""The tracer: exact per-token entropy change around one optimizer step (docs/tracing.md).

``EntropyTracer(model).step(...)`` is the context manager; the modules of this package each do
one part of it:

- ``tracer``: ``EntropyTracer`` and ``StepContext`` (the ``with`` block) - the entry point.
- ``step``: ``TraceStep``, the state of one traced step - ties the parts below together.
- ``rows``: which tokens and rows are traced (``TracedTokens``, ``Annotations``, ``take_rows``).
- ``hooks``: the forward, tensor and optimizer hooks, and their removal on every exit.
- ``capture``: the pre-update side, taken from the training forward.
- ``forward``: the tracer's own forwards and the post-update pass.
- ``build``: the record builder (one row per traced token, the schema of ``entropy_lab.records``).
- ``distributed``: DDP / FSDP2 - collective-safe forwards, global quantities, ``rank``.
- ``probes``: measurements taken just before the optimizer step: the ``PreStepProbe`` protocol,
  the jvp pass and the eta sweep.
"""

from entropy_lab.trace.forward import accepts_logits_to_keep, has_active_dropout
from entropy_lab.trace.probes import EtaSweepProbe, JvpProbe, PreStep, PreStepProbe, ProbeResult
from entropy_lab.trace.rows import Annotations, TracedTokens, take_rows
from entropy_lab.trace.step import TraceStep
from entropy_lab.trace.tracer import EntropyTracer, StepContext

__all__ = [
    "Annotations",
    "EntropyTracer",
    "EtaSweepProbe",
    "JvpProbe",
    "PreStep",
    "PreStepProbe",
    "ProbeResult",
    "StepContext",
    "TraceStep",
    "TracedTokens",
    "accepts_logits_to_keep",
    "has_active_dropout",
    "take_rows",
]
