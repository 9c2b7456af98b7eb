"""The training batch type and row slicing of ``LossInputs``."""

from dataclasses import fields

import torch

from entropy_lab.batch import RolloutBatch
from entropy_lab.objectives import LossInputs
from entropy_lab.rollout import Rollout

B, T = 4, 6


def rollout() -> Rollout:
    ids = torch.arange(B * T).view(B, T)
    resp = torch.zeros(B, T, dtype=torch.long)
    resp[:, 3:] = 1
    resp[2, 5] = 0
    return Rollout(
        input_ids=ids,
        attention_mask=torch.ones(B, T, dtype=torch.long),
        position_ids=torch.arange(T).expand(B, T),
        response_mask=resp,
        prompt_index=torch.tensor([0, 0, 1, 1]),
        completions=["a", "b", "c", "d"],
    )


def batch(ref: bool = True) -> RolloutBatch:
    g = torch.Generator().manual_seed(0)
    return RolloutBatch(
        rollout=rollout(),
        rewards=torch.tensor([1.0, 0.0, 1.0, 1.0]),
        advantages=torch.tensor([0.5, -0.5, 0.0, 1.5]),
        old_logprob=-torch.rand(B, T, generator=g),
        old_entropy=torch.rand(B, T, generator=g),
        old_collision=torch.rand(B, T, generator=g),
        ref_logprob=-torch.rand(B, T, generator=g) if ref else None,
        context={"k": 1},
    )


def test_per_token_fields_are_every_tensor_field_but_the_generator():
    tensor_fields = [f.name for f in fields(LossInputs) if "torch.Tensor" in str(f.type)]
    assert LossInputs.per_token_fields() == tuple(tensor_fields)
    assert "generator" not in LossInputs.per_token_fields() and "context" not in LossInputs.per_token_fields()


def test_select_rows_slices_every_per_token_field_and_shares_the_rest():
    full = batch().full_inputs()
    rows = torch.tensor([3, 1])
    part = full.select_rows(rows)
    for name in LossInputs.per_token_fields():
        if getattr(full, name) is None:  # an optional field the batch does not give (``selected``)
            assert getattr(part, name) is None, name
            continue
        assert torch.equal(getattr(part, name), getattr(full, name)[rows]), name
    assert full.selected is None  # the only per-token field a batch leaves unset
    assert part.context is full.context and part.num_tokens is None
    no_ref = batch(ref=False).full_inputs().select_rows(rows)
    assert no_ref.ref_logprob is None


def test_full_inputs_are_at_the_rollout_policy():
    b = batch()
    full = b.full_inputs()
    mask = b.rollout.response_mask.float()
    assert torch.equal(full.logprob, b.old_logprob) and torch.equal(full.old_logprob, b.old_logprob)
    assert torch.equal(full.advantages, b.advantages[:, None] * mask)  # (B, T), 0 off the response
    assert full.advantages[2].abs().sum() == 0 and full.advantages[3, 0] == 0 and full.advantages[3, 4] == 1.5
    assert torch.equal(full.entropy, b.old_entropy) and torch.equal(full.old_entropy, b.old_entropy)
    assert torch.equal(full.collision, b.old_collision) and full.context == {"k": 1}


def test_loss_inputs_take_the_current_forward_for_the_rows():
    b = batch()
    rows = torch.tensor([0, 2])
    lp, ent = torch.full((2, T), -0.1), torch.full((2, T), 0.7)
    gen = torch.Generator()
    inputs = b.loss_inputs(rows, lp, ent, None, num_tokens=9.0, num_seqs=2.0, generator=gen)
    assert inputs.logprob is lp and inputs.entropy is ent and inputs.collision is None
    assert torch.equal(inputs.old_logprob, b.old_logprob[rows])
    assert torch.equal(inputs.old_entropy, b.old_entropy[rows])  # the rollout policy's, not the current
    assert torch.equal(inputs.ref_logprob, b.ref_logprob[rows])
    assert torch.equal(inputs.mask, b.rollout.response_mask[rows].float())
    assert (inputs.num_tokens, inputs.num_seqs, inputs.generator) == (9.0, 2.0, gen)
    assert b.size == B
