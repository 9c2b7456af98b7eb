"""The jvp estimators inside the tracer: at the optimizer pre-step hook, J . dtheta for the traced tokens.

``record_jvp(step, optimizer)`` predicts the update the optimizer is about to apply
(``entropy_lab.update_predict``), runs the tracer's own forward over the traced rows with
that update as the parameters' tangent (``entropy_lab.jvp.tangent_parameters``), and hands
the two predictions to the record builder as the token inputs ``jvp`` and ``jvp_entropy``
(columns ``omega_jvp`` and ``omega_jvp_entropy``). Cost: one forward-mode pass over the
traced rows, before the parameters move.
"""

from __future__ import annotations

import torch

from entropy_lab.jvp import jvp_estimates, tangent_of, tangent_parameters
from entropy_lab.trace.rows import take_rows
from entropy_lab.update_predict import predict_update


def record_jvp(step, optimizer: torch.optim.Optimizer) -> None:
    """Add the ``jvp`` and ``jvp_entropy`` token inputs to ``step`` (a ``TraceStep`` at its pre-step hook)."""
    z_before = step.capture.z_before  # (n, V), filled for every traced token by now
    n = z_before.shape[0]
    linear = torch.empty(n, dtype=torch.float64, device=z_before.device)
    change = torch.empty(n, dtype=torch.float64, device=z_before.device)
    update = predict_update(optimizer)
    with tangent_parameters(step.model, update):
        for idx, z in step.forward.traced_logits(torch.ones(n, dtype=torch.bool, device=z_before.device)):
            dz = tangent_of(z)  # (k, V) J . dtheta at the traced tokens of these rows
            lin, ch = jvp_estimates(take_rows(z_before, idx), dz, chunk_bytes=step.tracer.chunk_bytes)
            linear[idx], change[idx] = lin.double(), ch.double()
    step.add_token_input("jvp", linear)
    step.add_token_input("jvp_entropy", change)
