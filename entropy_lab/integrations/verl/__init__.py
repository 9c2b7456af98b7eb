"""verl integration: entropy-lab's losses in verl's policy-loss registry, and actor tracing.

verl imports this package at ``import verl`` (the ``verl.plugins`` entry point), which registers
every ``entropy_lab.*`` loss.

- ``losses``: the plugin losses, the actor loss and their registration.
- ``trace``: tracing a verl actor update into a run directory.
- ``cpu``: a CPU platform for verl's engine (tests and laptops).
"""

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
