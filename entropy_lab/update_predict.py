"""The update an optimizer is about to apply, predicted from its state without touching it.

``predict_update(optimizer)`` returns, for every parameter the next ``optimizer.step()``
will move, the change dtheta = theta_after - theta_before, computed from the gradients
in ``.grad`` and the optimizer's state *as they are now* (call it from an optimizer
pre-step hook: gradients are final, clipping already applied, the learning rate read
from ``param_groups`` at that moment, so any schedule is covered). Nothing is written:
moments, momentum buffers and step counts are read, never updated.

Supported (one predictor per optimizer type, ``UPDATE_PREDICTORS``):

- ``torch.optim.SGD``: momentum, dampening, Nesterov, L2 weight decay, maximize.
  Naive equivalent::

      d = g + wd * p;  buf = d if first else mu * buf + (1 - dampening) * d
      d = d + mu * buf if nesterov else buf;  dtheta = -lr * d

- ``torch.optim.Adam`` / ``torch.optim.AdamW``: L2 (Adam) or decoupled (AdamW) weight
  decay, bias correction, amsgrad, maximize. Naive equivalent (t = state step + 1)::

      m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;  v_hat = max(v_max, v) if amsgrad else v
      dtheta = -lr/(1 - b1^t) * m / (sqrt(v_hat)/sqrt(1 - b2^t) + eps)  [- lr * wd * p for AdamW]

Simplifications: ``capturable``/``fused``/``foreach`` variants compute the same update in
another order, so they agree to rounding; complex parameters and gradient scalers that
unscale inside ``step()`` (AMP's ``GradScaler``) are not covered. Exact optimizer types
only: a subclass may change ``step()``, so it is refused rather than guessed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from entropy_lab.errors import EntropyLabError

Update = dict[torch.nn.Parameter, torch.Tensor]
"""Parameter -> its predicted change dtheta (same shape and dtype); parameters that will not move are absent."""

UpdatePredictor = Callable[[Any], Update]  # fn(an optimizer of the type it is registered for)
UPDATE_PREDICTORS: dict[type, UpdatePredictor] = {}


def register_update_predictor(*types: type) -> Callable[[UpdatePredictor], UpdatePredictor]:
    """Decorator: ``fn(optimizer) -> Update`` predicts the next step of these exact optimizer types."""

    def deco(fn: UpdatePredictor) -> UpdatePredictor:
        for t in types:
            if t in UPDATE_PREDICTORS:
                raise EntropyLabError(f"an update predictor for {t.__name__} is already registered")
            UPDATE_PREDICTORS[t] = fn
        return fn

    return deco


def supported_optimizers() -> list[str]:
    return sorted(t.__name__ for t in UPDATE_PREDICTORS)


def predict_update(optimizer: torch.optim.Optimizer) -> Update:
    """dtheta of the next ``optimizer.step()`` for every parameter with a gradient; state untouched."""
    fn = UPDATE_PREDICTORS.get(type(optimizer))
    if fn is None:
        raise EntropyLabError(
            f"cannot predict the update of {type(optimizer).__name__}: supported optimizers are "
            f"{', '.join(supported_optimizers())} (or register one with register_update_predictor)"
        )
    with torch.no_grad():
        return fn(optimizer)


def _scalar(x) -> float:
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


def _grad(p: torch.nn.Parameter, maximize: bool) -> torch.Tensor | None:
    g = p.grad
    if g is None:
        return None
    if g.is_sparse:
        raise EntropyLabError("sparse gradients are not supported by the update prediction")
    return -g if maximize else g


@register_update_predictor(torch.optim.SGD)
def _predict_sgd(opt: torch.optim.SGD) -> Update:
    out: Update = {}
    for group in opt.param_groups:
        lr, wd = _scalar(group["lr"]), _scalar(group["weight_decay"])
        mu, damp, nesterov = _scalar(group["momentum"]), _scalar(group["dampening"]), group["nesterov"]
        for p in group["params"]:
            g = _grad(p, group.get("maximize", False))
            if g is None:
                continue
            d = g + wd * p if wd != 0 else g
            if mu != 0:
                buf = opt.state.get(p, {}).get("momentum_buffer")
                # First step: torch seeds the buffer with d itself (no dampening).
                buf = d if buf is None else mu * buf + (1 - damp) * d
                d = d + mu * buf if nesterov else buf
            out[p] = -lr * d
    return out


@register_update_predictor(torch.optim.Adam, torch.optim.AdamW)
def _predict_adam(opt: torch.optim.Optimizer) -> Update:
    out: Update = {}
    for group in opt.param_groups:
        lr, wd, eps = _scalar(group["lr"]), _scalar(group["weight_decay"]), _scalar(group["eps"])
        b1, b2 = (_scalar(b) for b in group["betas"])
        decoupled = group.get("decoupled_weight_decay", isinstance(opt, torch.optim.AdamW))
        amsgrad = group["amsgrad"]
        for p in group["params"]:
            g = _grad(p, group.get("maximize", False))
            if g is None:
                continue
            state = opt.state.get(p, {})
            t = _scalar(state["step"]) + 1 if "step" in state else 1.0
            if wd != 0 and not decoupled:
                g = g + wd * p
            m_prev = state.get("exp_avg")
            v_prev = state.get("exp_avg_sq")
            # In place on fresh temporaries, in torch's own order (lerp, mul-addcmul, addcdiv):
            # three (p,)-sized buffers instead of a dozen, and the optimizer's rounding.
            m = g * (1 - b1) if m_prev is None else m_prev.lerp(g, 1 - b1)
            v = g * g * (1 - b2) if v_prev is None else (v_prev * b2).addcmul_(g, g, value=1 - b2)
            if amsgrad and state.get("max_exp_avg_sq") is not None:
                v = torch.maximum(state["max_exp_avg_sq"], v)
            denom = v.sqrt_().div_((1 - b2**t) ** 0.5).add_(eps)
            d = m.div_(denom).mul_(-(lr / (1 - b1**t)))
            if wd != 0 and decoupled:
                d.add_(p.detach(), alpha=-lr * wd)
            out[p] = d
    return out
