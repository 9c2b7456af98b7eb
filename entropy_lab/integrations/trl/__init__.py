"""TRL integration: ``TracedGRPOTrainer``, TRL's ``GRPOTrainer`` traced, with entropy-lab's methods.

Importing this package checks TRL's version first (``_compat``), before any module here imports
TRL, so a missing or unsupported TRL is one clear error line.

- ``trainer``: ``TracedGRPOTrainer``, thin overrides of TRL's methods that delegate to:
- ``window``: the policy the tracer sees (``TemperedLM``) and a traced step's batch;
- ``fused``: the pre-update side and logit-grad from TRL's own fused-head training forward;
- ``annotate``: the per-token terms of the loss, TRL's own mirrored or the project's;
- ``project_loss``: TRL's loss replaced by a catalogue method's ``compute_loss``.
- ``losses``: TRL's loss types as per-token terms and normalisers.
- ``methods``: entropy-lab's methods mapped onto TRL's settings.
- ``run``: the run directory a traced TRL run writes.
"""

from entropy_lab.integrations.trl._compat import SUPPORTED_TRL, check_trl_version

check_trl_version()

from entropy_lab.integrations.trl.trainer import TracedGRPOTrainer  # noqa: E402  (after the version check)
from entropy_lab.integrations.trl.window import TemperedLM  # noqa: E402

__all__ = ["SUPPORTED_TRL", "TemperedLM", "TracedGRPOTrainer", "check_trl_version"]
