"""verl integration: entropy-lab's losses in verl's policy-loss registry, and actor tracing.

verl imports this package at ``import verl`` (the ``verl.plugins`` entry point), which registers
every ``entropy_lab.*`` loss. verl logs a plugin's import error at debug level only, so a failure
here is also an ``EntropyLabWarning`` naming the cause when verl is the importer.

- ``losses``: the plugin losses, the actor loss and their registration.
- ``trace``: tracing a verl actor update into a run directory.
- ``cpu``: a CPU platform for verl's engine (tests and laptops).
"""

import sys
import warnings

from entropy_lab.errors import EntropyLabWarning

try:
    from entropy_lab.integrations.verl.losses import (
        ACTOR_INPUTS,
        OBJECTIVE_METHODS,
        OVERRIDES_ENV,
        PREFIX,
        SUPPORTED_VERL,
        actor_loss,
        check_verl_version,
        compute_verl_loss,
        extra_inputs,
        install_actor_loss,
        make_policy_loss,
        register,
        train_config,
        verl_loss_names,
    )
except Exception as exc:
    if "verl" in sys.modules:  # imported by verl's plugin loader, which logs the failure at debug level only
        warnings.warn(
            f"entropy-lab's verl plugin failed to import, so no entropy_lab.* policy loss is registered: "
            f"{type(exc).__name__}: {exc}",
            EntropyLabWarning,
            stacklevel=2,
        )
    raise

__all__ = [
    "ACTOR_INPUTS",
    "OBJECTIVE_METHODS",
    "OVERRIDES_ENV",
    "PREFIX",
    "SUPPORTED_VERL",
    "actor_loss",
    "check_verl_version",
    "compute_verl_loss",
    "extra_inputs",
    "install_actor_loss",
    "make_policy_loss",
    "register",
    "train_config",
    "verl_loss_names",
]
