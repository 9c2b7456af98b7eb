"""The hooks of one traced step, and their guaranteed removal.

Three kinds: a forward hook on the model (sees every training forward's input_ids and
logits), tensor hooks on those logits (see dLoss/dlogits during backward), and an
optimizer pre-step hook (marks the moment the parameters change). The pre-step hook
goes on the caller's optimizer when one is given (``Optimizer.register_step_pre_hook``);
without one it falls back to torch's process-global pre-step hook, which fires for
every optimizer in the process. ``StepHooks.remove`` drops every handle; the tracer
calls it in a ``finally`` so none survives an exception or a nested trace.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from entropy_lab.trace.forward import require_logits

ForwardCallback = Callable[[torch.Tensor, torch.Tensor], None]
"""(input_ids (b, T), logits (b, T, V)) of one forward of the model."""
StepCallback = Callable[[torch.optim.Optimizer], None]
"""The optimizer about to step."""


class StepHooks:
    """Owns every hook handle of one traced step."""

    def __init__(self) -> None:
        self._handles: list = []

    def attach(
        self,
        model: nn.Module,
        on_forward: ForwardCallback,
        on_step: StepCallback,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        """Hook ``model``'s forward and ``optimizer``'s step (the global pre-step hook when None)."""

        def forward_hook(module, args, kwargs, output):
            ids = kwargs.get("input_ids", args[0] if args else None)
            logits = require_logits(output)  # a model without .logits cannot be traced: say so now
            if isinstance(ids, torch.Tensor):
                on_forward(ids, logits)
            return None

        def step_hook(opt, args, kwargs):
            on_step(opt)
            return None

        self._handles.append(model.register_forward_hook(forward_hook, with_kwargs=True))
        if optimizer is not None:
            self._handles.append(optimizer.register_step_pre_hook(step_hook))
        else:
            self._handles.append(register_optimizer_step_pre_hook(step_hook))

    def watch_grad(self, tensor: torch.Tensor, hook: Callable[[torch.Tensor], None]) -> None:
        """Call ``hook(grad)`` when backward reaches ``tensor``."""
        self._handles.append(tensor.register_hook(hook))

    def remove(self) -> None:
        """Remove every handle (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
