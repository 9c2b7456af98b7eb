"""The network's own first order: dz = J . dtheta by forward-mode autodiff, and its entropy change.

For traced tokens j with pre-update logits z_j, the optimizer's next step dtheta
(``entropy_lab.update_predict``) moves the logits by dz_j = J_j dtheta + O(|dtheta|^2),
J_j the Jacobian of z_j with respect to every parameter. One forward-mode pass at the
pre-update parameters with tangent dtheta gives J dtheta for all tokens at once. Two
predictions of the per-token entropy change follow:

- ``jvp``: -sum_k pi_k l_k dz_k, the first-order change along the predicted logit change;
- ``jvp-entropy``: H(z + dz) - H(z), the exact entropy of the linearised logits (keeps the
  logit-space curvature, drops only the network's own nonlinearity in dtheta).

How: ``tangent_parameters(model, update)`` swaps each parameter for a dual tensor
(primal = the parameter itself, no copy; tangent = its dtheta) inside
``torch.autograd.forward_ad.dual_level``, for the duration of a ``with`` block, and puts
the parameters back in its ``finally``; any forward of the model inside the block carries
tangents, read with ``tangent_of``. Memory: the tangents (one parameter-sized set, the
update itself) and one tangent per activation of the forward.

Forward-mode AD needs every op of the forward to have a forward derivative. Flash
attention kernels have none: the block runs ``scaled_dot_product_attention`` with its
math kernel, and a model loaded with ``attn_implementation="flash_attention_2"`` is
refused with one error naming the fix (load it with ``attn_implementation="eager"`` or
``"sdpa"``).

Naive equivalent of the two predictions (finite differences, an independent check)::

    z_eps = model_at(theta + eps * dtheta)(x).logits;  dz = (z_eps - z) / eps
    jvp = -(pi * (log pi + H) * dz).sum(-1);  jvp_entropy = H(z + dz) - H(z)
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterator

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from entropy_lab.errors import EntropyLabError
from entropy_lab.stats import (
    _nonfinite_rows,
    _plogp,
    _weighted_l_dot,
    compute_dtype,
    resolve_chunk_bytes,
    rows_per_chunk,
)
from entropy_lab.theory import TokenQuantities, register_estimator
from entropy_lab.update_predict import Update

FIX = (
    'load the model with attn_implementation="eager" or attn_implementation="sdpa" '
    "(entropy-lab runs sdpa with its math kernel for forward-mode AD)"
)


def check_forward_ad_supported(model: nn.Module) -> None:
    """One clear error when the model's attention kernel has no forward-mode derivative."""
    impl = str(getattr(getattr(model, "config", None), "_attn_implementation", "") or "")
    if "flash" in impl or "flex" in impl:
        raise EntropyLabError(f"the jvp estimators need forward-mode AD, which {impl} lacks: {FIX}")


def _math_sdpa():
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch without torch.nn.attention
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def parameter_slots(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, nn.Parameter]]:
    """(slot name, module, attribute, parameter) for every parameter slot of ``model``.

    A slot is one use of a parameter: a tied Parameter (input and output embeddings) has one
    slot per module holding it, named like ``named_modules`` + attribute (``lm_head.weight``).
    """
    for prefix, module in model.named_modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                yield (f"{prefix}.{name}" if prefix else name), module, name, p


@contextlib.contextmanager
def tangent_parameters(
    model: nn.Module, update: Update, slots: Collection[str] | None = None
) -> Iterator[None]:
    """Inside the block, ``model``'s parameters carry tangent ``update`` (forward-mode AD, no grad).

    Parameters absent from ``update`` keep no tangent (zero). Tied parameters (one Parameter
    in several modules) get one dual tensor. ``slots`` (names of ``parameter_slots``), when
    given, restricts the tangent to those slots: every other slot keeps its plain parameter,
    so a tied Parameter can carry its tangent in one use only (the output embedding without
    the input one). By linearity the tangents of disjoint slot sets that cover every slot add
    up to the full one. Every slot is restored in ``finally``.
    """
    check_forward_ad_supported(model)
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        stack.enter_context(fwAD.dual_level())
        stack.enter_context(_math_sdpa())
        duals: dict[int, torch.Tensor] = {}
        try:
            for slot, module, name, p in parameter_slots(model):
                if p not in update or (slots is not None and slot not in slots):
                    continue
                if id(p) not in duals:  # one dual per Parameter, shared by its slots
                    duals[id(p)] = fwAD.make_dual(p.detach(), update[p].to(p.dtype))
                swapped.append((module, name, p))
                # Plain dict slot: nn.Module.__getattr__ returns it, no Parameter wrapper needed.
                module._parameters[name] = duals[id(p)]  # type: ignore[assignment]
            yield
        except NotImplementedError as exc:
            if "forward AD" in str(exc):
                raise EntropyLabError(
                    f"forward-mode AD is unavailable in this model ({exc}): {FIX}"
                ) from None
            raise
        finally:
            for module, name, p in reversed(swapped):
                module._parameters[name] = p


def tangent_of(x: torch.Tensor) -> torch.Tensor:
    """The tangent of a tensor computed inside ``tangent_parameters`` (zeros where none flowed)."""
    primal, tangent = fwAD.unpack_dual(x)[:2]
    return torch.zeros_like(primal) if tangent is None else tangent


def primal_of(x: torch.Tensor) -> torch.Tensor:
    """The primal (value) of a tensor computed inside ``tangent_parameters``."""
    return fwAD.unpack_dual(x)[0]


def jvp_logits(model: nn.Module, update: Update, **forward_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, dz): the model's logits and their change J . dtheta under ``update``, each (B, T, V).

    ``forward_kwargs`` go to ``model.forward(**forward_kwargs)`` (``input_ids``, ``attention_mask``,
    ``logits_to_keep`` ...).
    """
    with tangent_parameters(model, update):
        out = model.forward(**forward_kwargs)  # not __call__: no forward hooks see the dual logits
        logits = out if isinstance(out, torch.Tensor) else out.logits  # (B, T, V) dual
        z, dz = fwAD.unpack_dual(logits)[:2]  # views that stay valid after the dual level closes
        return z, torch.zeros_like(z) if dz is None else dz


@torch.no_grad()
def jvp_estimates(
    z: torch.Tensor, dz: torch.Tensor, *, chunk_bytes: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(jvp, jvp_entropy), each (n,): -sum_k pi_k l_k dz_k and H(z + dz) - H(z) for (n, V) logits.

    Chunked over rows like ``entropy_lab.stats``: one (chunk, V) temporary in the compute dtype.
    """
    if z.shape != dz.shape or z.dim() != 2:
        raise EntropyLabError(
            f"jvp_estimates needs two (n, V) tensors of one shape, got {tuple(z.shape)} and {tuple(dz.shape)}"
        )
    cdtype = compute_dtype(torch.promote_types(z.dtype, dz.dtype))
    n, vocab = z.shape
    linear = torch.empty(n, dtype=cdtype, device=z.device)
    change = torch.empty(n, dtype=cdtype, device=z.device)
    step = rows_per_chunk(vocab, resolve_chunk_bytes(chunk_bytes, z.device))
    for s in range(0, n, step):
        linear[s : s + step], change[s : s + step] = _estimates_fast(
            z[s : s + step].to(cdtype), dz[s : s + step].to(cdtype)
        )
    # Rows with -inf logits (masked vocabulary) or NaN tangents come out non-finite on the fast
    # path: redo them exactly, once per call (one check, so a GPU synchronises once).
    redo = _nonfinite_rows(linear, change)
    for s in range(0, len(redo), step):
        rows = redo[s : s + step]
        linear[rows], change[rows] = _estimates_exact(z[rows].to(cdtype), dz[rows].to(cdtype))
    return linear, change


def _estimates_fast(zb: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(linear, change) of one (c, V) chunk; exact to rounding where logits and tangents are finite."""
    logp = torch.log_softmax(zb, -1)  # (c, V)
    p = torch.softmax(zb, -1)  # (c, V); on CPU cheaper than logp.exp()
    w = logp.mul_(p)  # (c, V) p log p, in place of logp
    h_before = -w.sum(-1)  # (c,)
    linear = -w.addcmul_(p, h_before[:, None]).mul_(d).sum(-1)  # -sum p (log p + H) d
    zl = p.copy_(zb).add_(d)  # (c, V) the linearised logits z + dz, in place of p
    h_lin = -torch.softmax(zl, -1).mul_(torch.log_softmax(zl, -1)).sum(-1)
    return linear, h_lin - h_before


def _estimates_exact(zb: torch.Tensor, dz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``_estimates_fast`` that also holds for -inf logits (0 log 0 = 0) and NaN tangents (no tangent there)."""
    d = torch.nan_to_num(dz, nan=0.0)  # (c, V); no tangent at a masked entry
    # One pass over the old distribution gives H(z) and the linear change ...
    logp = torch.log_softmax(zb, -1)
    p = logp.exp()
    plogp = _plogp(p, logp)
    h_before = -plogp.sum(-1, keepdim=True)  # (c, 1)
    linear = -_weighted_l_dot(p, plogp, h_before, d)
    # ... and one over the linearised logits z + dz (-inf stays -inf) their entropy.
    logp = torch.log_softmax(zb + d, -1)
    return linear, -_plogp(logp.exp(), logp).sum(-1) - h_before[:, 0]


# --- the estimators, for the tracer's records ----------------------------------------------
# The tracer computes both columns at the optimizer pre-step hook when asked (``jvp=True``) and
# passes them as the token inputs below; without them the estimators are left out of the records.


@register_estimator("jvp", requires=("jvp",))
def omega_jvp(q: TokenQuantities) -> torch.Tensor:
    """-sum_k pi_k l_k (J dtheta)_k: first order in the logit change the network itself predicts.

    dtheta is the step the optimizer applies (Adam's preconditioning, momentum, weight decay,
    clipping and the scheduled lr included), so no lr factor is applied here.
    """
    return q.inputs["jvp"]


@register_estimator("jvp-entropy", requires=("jvp_entropy",))
def omega_jvp_entropy(q: TokenQuantities) -> torch.Tensor:
    """H(z + J dtheta) - H(z): the exact entropy of the linearised logits (keeps logit-space curvature)."""
    return q.inputs["jvp_entropy"]
