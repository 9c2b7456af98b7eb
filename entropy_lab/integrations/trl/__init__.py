"""TRL integration: ``TracedGRPOTrainer``, TRL's ``GRPOTrainer`` traced, with entropy-lab's methods.

Importing this package checks TRL's version first, so an unsupported TRL is one clear error.

- ``trainer``: ``TracedGRPOTrainer`` and the policy the tracer sees (``TemperedLM``).
- ``losses``: TRL's loss types as per-token terms and normalisers.
- ``methods``: entropy-lab's methods mapped onto TRL's settings.
- ``run``: the run directory a traced TRL run writes.
"""

from entropy_lab.integrations.trl.trainer import (
    SUPPORTED_TRL,
    TemperedLM,
    TracedGRPOTrainer,
    check_trl_version,
)

__all__ = ["SUPPORTED_TRL", "TemperedLM", "TracedGRPOTrainer", "check_trl_version"]
