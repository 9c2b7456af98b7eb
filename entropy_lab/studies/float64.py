"""A float64 forward that is float64 end to end, for the studies that need one.

Casting a Hugging Face model to float64 does not make its forward float64: Llama-family
RMSNorm layers (Qwen2, Llama, Mistral ...) compute ``hidden_states.to(torch.float32)``
and cast back, and their rotary embedding computes its angles in float32
(``position_ids.float() * inv_freq.float()``, ``inv_freq`` itself built in float32). Those
ops cap the whole forward (and its forward-mode tangents) at float32 round-off.

``true_float64(model)`` replaces, for the duration of a ``with`` block, the ``forward`` of
every such norm and rotary module with one that computes in the input's dtype when that
is float64 (and calls the original otherwise); the originals are put back in ``finally``.
``reduced_precision_ops(model, **inputs)`` lists the ops of one forward that produced a
floating tensor below float64, the check that the forward really is float64.

Deliberate simplifications: only RMSNorm classes with the Llama-family forward
(``weight * x / sqrt(mean(x^2) + variance_epsilon)``) and rotary embeddings of
``rope_type == "default"`` are patched; anything else is left as it is and shows up in
``reduced_precision_ops``. The patched rotary embedding recomputes ``inv_freq`` in
float64 from the config's ``rope_theta``.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

REDUCED = (torch.float32, torch.float16, torch.bfloat16)


def _is_rms_norm(module: nn.Module) -> bool:
    return (
        type(module).__name__.endswith("RMSNorm")
        and hasattr(module, "variance_epsilon")
        and isinstance(getattr(module, "weight", None), torch.Tensor)
    )


def _rope_theta(module: nn.Module) -> float | None:
    config = getattr(module, "config", None)
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    return None if theta is None else float(theta)


def _is_default_rope(module: nn.Module) -> bool:
    return (
        getattr(module, "rope_type", None) == "default"
        and isinstance(getattr(module, "inv_freq", None), torch.Tensor)
        and _rope_theta(module) is not None
    )


def _rms_forward(original):
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.dtype != torch.float64:
            return original(hidden_states)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)  # (..., 1)
        return self.weight.to(torch.float64) * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))

    return forward


def _rope_forward(original, theta: float):
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        if x.dtype != torch.float64:
            return original(x, position_ids)
        dim = 2 * self.inv_freq.numel()
        inv = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=x.device) / dim)  # (dim/2,)
        freqs = position_ids[..., None].to(torch.float64) * inv  # (B, T, dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, dim)
        return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling

    return forward


@contextlib.contextmanager
def true_float64(model: nn.Module) -> Iterator[int]:
    """Inside the block, the model's RMSNorm and default rotary modules compute in float64 on float64 input.

    Yields the number of modules patched. Instance attributes only: the classes are untouched.
    """
    patched: list[nn.Module] = []
    try:
        for module in model.modules():
            if "forward" in module.__dict__:
                continue  # already patched (nested use) or a user's own instance forward
            if _is_rms_norm(module):
                fn = _rms_forward(module.forward)
            elif _is_default_rope(module):
                fn = _rope_forward(module.forward, _rope_theta(module))  # type: ignore[arg-type]
            else:
                continue
            module.forward = types.MethodType(fn, module)
            patched.append(module)
        yield len(patched)
    finally:
        for module in patched:
            del module.forward


class _RecordReduced(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype in REDUCED:
                self.ops.append(f"{getattr(func, '__name__', str(func))} -> {t.dtype}")
                break
        return out


@torch.no_grad()
def reduced_precision_ops(model: nn.Module, **inputs) -> list[str]:
    """The ops of one ``model(**inputs)`` forward that returned a floating tensor below float64.

    Empty means the forward is float64 end to end (for a model whose parameters are float64).
    """
    mode = _RecordReduced()
    with mode:
        model(**inputs)
    return mode.ops
