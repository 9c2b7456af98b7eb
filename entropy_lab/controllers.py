"""Entropy controllers, consulted by the trainer before each optimizer step (registry ``CONTROLLERS``).

The trainer calls ``controller.before_step(ctx)`` after the mini-batch's gradients are
accumulated and before clipping and ``optimizer.step()``; a controller may change ``.grad``
and returns metrics. Its state (``state_dict``) is checkpointed with the trainer's.

- ``none``: does nothing.
- ``adaptive-entropy`` (reactive; Skywork-OR1, He et al. 2025, arXiv 2505.22312): an entropy
  bonus whose coefficient c is raised by ``adaptive_entropy_delta`` when the batch entropy
  is below ``entropy_target`` and lowered by it when above (c >= 0, c <= 1); the bonus is
  active only while entropy is at or below the target. Applied as a gradient: .grad +=
  c * grad(-token-mean H) from one extra forward/backward over the mini-batch.
- ``entropy-target`` (predictive): the step is split into the positive- and negative-
  advantage parts, dtheta(a) = c0 + a+ c+ + a- c-; J is linear in the tangent, so three
  forward-mode JVPs give the first-order batch entropy change h0 + a+ h+ + a- h- of every mix.
  The controller picks the mix closest to (1, 1) whose predicted change equals
  dH* = kappa (H_target - H) (``choose_scales``), bounded to [scale_min, scale_max], and
  sets .grad = a+ g+ + a- g-. The loss is otherwise untouched. The trainer's gradient clip, which
  follows, is part of the prediction: once it is active only the direction of the mix steers.

Adam: its step is not linear in the gradient. For the prediction the controller holds
Adam's preconditioner fixed at the one this step will use with the unscaled gradient
(denominator sqrt(v_hat) + eps from the current gradient), which makes the step affine in the
gradient mix: c0 = the momentum carried over (and weight decay), c+- = the new-gradient
share (1 - beta1) of each part through that preconditioner. The applied step then uses the
second moment of the scaled gradient; for scales near 1 the two differ little, and the
second moment moves slowly (beta2 = 0.999). SGD (with or without momentum) is affine in
the gradient, so there the prediction is exact to first order.

Deliberate simplifications (entropy-target): g+ is the gradient of the plain policy-gradient
term of the A > 0 tokens, -(1/N) sum A log pi (N = response tokens of the mini-batch): the
PPO-clip gradient at ratio 1 (first epoch, one mini-batch), so g- = g - g+ carries every
other term (negative advantages, KL, entropy terms). Entropy is the token mean over the
mini-batch's response tokens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from entropy_lab.batch import RolloutBatch
from entropy_lab.config import TrainConfig
from entropy_lab.errors import EntropyLabError
from entropy_lab.jvp import jvp_logits
from entropy_lab.registry import Registry
from entropy_lab.stats import entropy_from_logits, entropy_gradient_dot, gather_logprobs
from entropy_lab.update_predict import Update


@dataclass
class ControlContext:
    """What a controller sees before one optimizer step."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    input_ids: torch.Tensor  # (b, T) the mini-batch's rows
    attention_mask: torch.Tensor  # (b, T)
    response_mask: torch.Tensor  # (b, T) 1 at response tokens
    advantages: torch.Tensor  # (b, T) per-token advantage used by the loss
    forward_kwargs: dict  # further model inputs (position_ids), (b, T) each
    cfg: TrainConfig
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


class Controller:
    """Base: no change. Subclasses override ``before_step`` and, if stateful, the state methods."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    def before_step(self, ctx: ControlContext) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


CONTROLLERS: Registry[type[Controller]] = Registry("controller")
CONTROLLERS.add("none", Controller)


def build_controller(cfg: TrainConfig) -> Controller:
    return CONTROLLERS[cfg.controller](cfg)


def control_context(
    batch: RolloutBatch,
    rows: torch.Tensor,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> ControlContext:
    """The context of the next optimizer step of ``model`` over rows ``rows`` (b,) of ``batch``.

    Args:
        batch: the step's rollout batch.
        rows: (b,) the rows of this update.
        model, optimizer: the policy and the optimizer about to step it.
        cfg: the run's configuration.
        autocast: the run's autocast context (``entropy_lab.runtime.autocast``).

    Returns:
        The ``ControlContext``, its tensors (b, T).
    """
    ro = batch.rollout
    return ControlContext(
        model=model,
        optimizer=optimizer,
        input_ids=ro.input_ids[rows],
        attention_mask=ro.attention_mask[rows],
        response_mask=ro.response_mask[rows],
        advantages=batch.token_advantages[rows],
        forward_kwargs={"position_ids": ro.position_ids[rows]},
        cfg=cfg,
        autocast=autocast,
    )


def _response_logits(ctx: ControlContext, grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits at response tokens (n, V), their targets (n,), advantages (n,)); logits at t-1 predict t."""
    # .forward, not __call__: the tracer's forward hook must not see (or hook the gradient of) this pass
    with torch.set_grad_enabled(grad), ctx.autocast():
        logits = ctx.model.forward(
            input_ids=ctx.input_ids, attention_mask=ctx.attention_mask, **ctx.forward_kwargs
        ).logits  # (b, T, V)
    b, t = ctx.response_mask.bool().nonzero(as_tuple=True)
    return logits[b, t - 1], ctx.input_ids[b, t], ctx.advantages[b, t].float()


def _params(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


@CONTROLLERS.register("adaptive-entropy")
class AdaptiveEntropy(Controller):
    """Skywork-OR1's adaptive entropy coefficient (see the module docstring)."""

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        self.coef = 0.0  # c_k, starts at 0 as in Skywork-OR1

    def before_step(self, ctx: ControlContext) -> dict[str, float]:
        z, _, _ = _response_logits(ctx, grad=True)  # (n, V)
        entropy = entropy_from_logits(z).mean()  # token-mean over the mini-batch
        h = float(entropy.detach())
        target = self.cfg.entropy_target
        active = self.coef if h <= target else 0.0
        if active > 0:
            params = _params(ctx.model)
            grads = torch.autograd.grad(-active * entropy, params, allow_unused=True)
            for p, g in zip(params, grads, strict=True):
                if g is not None:
                    p.grad = g if p.grad is None else p.grad + g
        delta = self.cfg.adaptive_entropy_delta
        self.coef = min(1.0, max(0.0, self.coef + (delta if h < target else -delta if h > target else 0.0)))
        return {"control/entropy": h, "control/entropy_coef": active, "control/target": target}

    def state_dict(self) -> dict:
        return {"coef": self.coef}

    def load_state_dict(self, state: dict) -> None:
        self.coef = float(state.get("coef", 0.0))


def choose_scales(
    h0: float,
    h_plus: float,
    h_minus: float,
    dh_star: float,
    lo: float,
    hi: float,
    *,
    gram: tuple[float, float, float] | None = None,
    clip: float = float("inf"),
) -> tuple[float, float]:
    """The scales (a+, a-) in [lo, hi] whose predicted change h0 + c (a+ h+ + a- h-) is nearest dh_star.

    Without clipping (c = 1): the closed form of min |a - 1|^2 subject to the linear constraint,
    a = 1 + lam (h+, h-), lam = (dh_star - h0 - h+ - h-) / (h+^2 + h-^2), each clipped to [lo, hi];
    with h+ = h- = 0 nothing can be steered: (1, 1).

    With a gradient-norm clip after the mix (``gram`` = (|g+|^2, <g+, g->, |g-|^2), ``clip`` the max
    norm), c = min(1, clip / |a+ g+ + a- g-|) rescales the mixed part, so only the direction of the
    mix steers once c < 1: a 81 x 81 grid over [lo, hi]^2, nearest prediction first, then nearest (1, 1).
    """
    norm = h_plus**2 + h_minus**2
    if not norm > 0:
        return 1.0, 1.0
    if gram is None or not np.isfinite(clip):
        lam = (dh_star - h0 - h_plus - h_minus) / norm
        return min(hi, max(lo, 1 + lam * h_plus)), min(hi, max(lo, 1 + lam * h_minus))
    grid = np.linspace(lo, hi, 81)
    ap, am = np.meshgrid(grid, grid, indexing="ij")  # (81, 81)
    gpp, gpm, gmm = gram
    mix_norm = np.sqrt(np.maximum(ap**2 * gpp + 2 * ap * am * gpm + am**2 * gmm, 0.0))
    c = np.minimum(1.0, clip / np.maximum(mix_norm, 1e-30))
    miss = np.abs(h0 + c * (ap * h_plus + am * h_minus) - dh_star)
    near = miss <= miss.min() + 1e-3 * abs(dh_star) + 1e-15
    dist = np.where(near, (ap - 1) ** 2 + (am - 1) ** 2, np.inf)
    i, j = np.unravel_index(int(np.argmin(dist)), dist.shape)
    return float(ap[i, j]), float(am[i, j])


def update_parts(optimizer: torch.optim.Optimizer, parts: list[dict]) -> tuple[Update, list[Update]]:
    """The next step as c0 + sum_i a_i c_i for gradient parts g_i (sum_i g_i = the current .grad).

    SGD: exact (the step is affine in the gradient). Adam/AdamW: the preconditioner held at the
    one the current gradient gives (see the module docstring).
    """
    c0: Update = {}
    cs: list[Update] = [{} for _ in parts]
    for group in optimizer.param_groups:
        lr, wd = float(group["lr"]), float(group["weight_decay"])
        for p in group["params"]:
            if p.grad is None:
                continue
            state = optimizer.state.get(p, {})
            if type(optimizer) is torch.optim.SGD:
                mu, damp = float(group["momentum"]), float(group["dampening"])
                buf = state.get("momentum_buffer")
                nest = group["nesterov"]
                # d = g + wd p; buf' = mu buf + (1 - damp) d (d on the first step); step = -lr (d + mu buf' | buf')
                k = 1.0 if (mu == 0 or buf is None) else (1 - damp)
                gain = (1 + mu * k) if (mu != 0 and nest) else (k if mu != 0 else 1.0)
                hist = torch.zeros_like(p) if (mu == 0 or buf is None) else mu * buf
                const = gain * wd * p + (hist * (mu if nest else 1.0) if mu != 0 else 0.0)
                c0[p] = -lr * const
                for c, part in zip(cs, parts, strict=True):
                    c[p] = -lr * gain * part[p]
            elif type(optimizer) in (torch.optim.Adam, torch.optim.AdamW):
                b1, b2 = (float(b) for b in group["betas"])
                eps = float(group["eps"])
                decoupled = group.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW))
                t = float(state["step"]) + 1 if "step" in state else 1.0
                g = p.grad + (wd * p if wd and not decoupled else 0.0)
                v = (
                    (1 - b2) * g * g
                    if state.get("exp_avg_sq") is None
                    else b2 * state["exp_avg_sq"] + (1 - b2) * g * g
                )
                if group["amsgrad"] and state.get("max_exp_avg_sq") is not None:
                    v = torch.maximum(state["max_exp_avg_sq"], v)
                scale = (lr / (1 - b1**t)) / (v.sqrt() / (1 - b2**t) ** 0.5 + eps)  # held preconditioner
                m_prev = state.get("exp_avg")
                const = -scale * (b1 * m_prev if m_prev is not None else torch.zeros_like(p))
                if wd and not decoupled:
                    const = const - scale * (1 - b1) * wd * p
                if wd and decoupled:
                    const = const - lr * wd * p
                c0[p] = const
                for c, part in zip(cs, parts, strict=True):
                    c[p] = -scale * (1 - b1) * part[p]
            else:
                raise EntropyLabError(
                    f"entropy-target cannot split the step of {type(optimizer).__name__}: use optimizer=adamw or sgd"
                )
    return c0, cs


def predicted_mean_change(ctx: ControlContext, update: Update) -> float:
    """First-order change of the mini-batch's token-mean entropy under ``update``: one JVP."""
    z, dz = jvp_logits(
        ctx.model, update, input_ids=ctx.input_ids, attention_mask=ctx.attention_mask, **ctx.forward_kwargs
    )  # (b, T, V) each
    b, t = ctx.response_mask.bool().nonzero(as_tuple=True)
    return float(-entropy_gradient_dot(z[b, t - 1], dz[b, t - 1]).mean())


@CONTROLLERS.register("entropy-target")
class EntropyTarget(Controller):
    """Predictive control of the batch entropy through the mix of the advantage-signed update parts."""

    def before_step(self, ctx: ControlContext) -> dict[str, float]:
        cfg = self.cfg
        z, targets, adv = _response_logits(ctx, grad=True)  # (n, V), (n,), (n,)
        n_tok = max(1, int(ctx.response_mask.sum()))
        logp = gather_logprobs(z, targets)  # (n,)
        h = float(entropy_from_logits(z.detach()).mean())
        params = [p for p in _params(ctx.model) if p.grad is not None]
        pos = adv > 0
        loss_plus = -(adv[pos] * logp[pos]).sum() / n_tok
        if not bool(pos.any()):
            return {"control/entropy": h, "control/alpha_plus": 1.0, "control/alpha_minus": 1.0}
        g_plus = torch.autograd.grad(loss_plus, params, allow_unused=True)
        plus = {
            p: (torch.zeros_like(p) if g is None else g.to(p.dtype))
            for p, g in zip(params, g_plus, strict=True)
        }
        minus = {p: (torch.zeros_like(p) if p.grad is None else p.grad) - plus[p] for p in params}
        c0, (c_plus, c_minus) = update_parts(ctx.optimizer, [plus, minus])
        h0, hp, hm = (predicted_mean_change(ctx, u) for u in (c0, c_plus, c_minus))
        dh_star = cfg.entropy_target_kappa * (cfg.entropy_target - h)

        def dot(a: dict, b: dict) -> float:
            return float(sum((a[p].double() * b[p].double()).sum() for p in params))

        gram = (dot(plus, plus), dot(plus, minus), dot(minus, minus))
        clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        a_plus, a_minus = choose_scales(
            h0,
            hp,
            hm,
            dh_star,
            cfg.entropy_target_scale_min,
            cfg.entropy_target_scale_max,
            gram=gram,
            clip=clip,
        )
        mixed_norm = (a_plus**2 * gram[0] + 2 * a_plus * a_minus * gram[1] + a_minus**2 * gram[2]) ** 0.5
        c = min(1.0, clip / mixed_norm) if mixed_norm > 0 else 1.0
        for p in params:
            p.grad = a_plus * plus[p] + a_minus * minus[p]
        return {
            "control/entropy": h,
            "control/target": cfg.entropy_target,
            "control/alpha_plus": a_plus,
            "control/alpha_minus": a_minus,
            "control/predicted_dH": h0 + c * (a_plus * hp + a_minus * hm),
            "control/wanted_dH": dh_star,
        }
