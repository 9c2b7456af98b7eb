"""true_float64: a float64 Qwen2 forward with no op below float64, against the unpatched cast."""

from __future__ import annotations

import warnings

import pytest
import torch

from entropy_lab.errors import EntropyLabWarning
from entropy_lab.studies.float64 import reduced_precision_ops, true_float64


@pytest.fixture
def model64(make_tiny_lm):
    return make_tiny_lm("qwen2").eval().to(torch.float64)


def inputs():
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    return dict(input_ids=ids, position_ids=torch.arange(9).expand(2, 9))


def test_a_cast_model_still_computes_in_float32_and_the_patch_removes_every_such_op(model64):
    before = reduced_precision_ops(model64, **inputs())
    assert any("float32" in op for op in before)  # the RMSNorm upcast and the rotary angles
    with true_float64(model64) as n:
        assert n == 2 * 2 + 1 + 1  # two norms per layer, the final norm, the rotary embedding
        assert reduced_precision_ops(model64, **inputs()) == []
    assert reduced_precision_ops(model64, **inputs()) == before  # the originals are back


def test_patched_forward_matches_a_float64_reference_and_the_cast_only_to_float32(model64):
    x = inputs()
    cast = model64(**x).logits  # (2, 9, V)
    with true_float64(model64):
        exact = model64(**x).logits
    # Reference: the same model with its norm and rotary ops written out by hand in float64.
    norm = model64.model.norm
    h = torch.randn(3, 32, dtype=torch.float64)
    ref = norm.weight * h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    with true_float64(model64):
        assert torch.allclose(norm(h), ref, rtol=1e-15, atol=1e-15)
        rope = model64.model.rotary_emb
        cos, _ = rope(h, torch.arange(5)[None])
    dim = 2 * rope.inv_freq.numel()
    angles = torch.arange(5, dtype=torch.float64)[:, None] / 10000.0 ** (
        torch.arange(0, dim, 2, dtype=torch.float64) / dim
    )
    assert torch.allclose(cos[0], torch.cat([angles, angles], -1).cos(), rtol=0, atol=1e-15)
    gap = (exact - cast).abs().max().item()
    assert 1e-12 < gap < 1e-4  # the cast forward differs at float32 round-off, not more


def test_nested_use_patches_once_and_restores(model64):
    with true_float64(model64) as outer:
        with true_float64(model64) as inner:
            assert outer > 0 and inner == 0
        assert reduced_precision_ops(model64, **inputs()) == []
    assert all("forward" not in m.__dict__ for m in model64.modules())


def test_study_check_warns_when_ops_remain(model64):
    from entropy_lab.studies.coupling import StudyBatch, check_float64

    x = inputs()
    batch = StudyBatch(x["input_ids"], torch.ones(2, 9), x["position_ids"], *(torch.empty(0),) * 4)
    with pytest.warns(EntropyLabWarning, match="below float64"):
        check_float64(model64, batch)
    with true_float64(model64), warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_float64(model64, batch) == []
