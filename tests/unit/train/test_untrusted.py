"""The checks of untrusted files (``entropy_lab.untrusted``, ``records``, ``checkpoints.read_manifest``)
against independent references: a recursive depth, files written by safetensors itself, hand-made
boundary cases; and the configuration's new limits at their edges."""

from __future__ import annotations

import json
import random
import struct

import numpy as np
import pandas as pd
import pytest
import torch

from entropy_lab.config import MAX_SEED, TrainConfig, field_ranges
from entropy_lab.errors import EntropyLabError
from entropy_lab.records import RANGE_SLACK, validate_records
from entropy_lab.untrusted import _depth, check_safetensors, check_step_table, parse_json


def recursive_depth(value) -> int:
    if isinstance(value, dict):
        return 1 + max(map(recursive_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(recursive_depth, value), default=0)
    return 0


def random_value(rng: random.Random, budget: int):
    roll = rng.random()
    if budget == 0 or roll < 0.3:
        return rng.choice([1, "a", None, 2.5, True])
    items = [random_value(rng, budget - 1) for _ in range(rng.randint(0, 3))]
    return items if roll < 0.65 else {str(i): v for i, v in enumerate(items)}


def test_depth_equals_a_recursive_count():
    rng = random.Random(0)
    for _ in range(300):
        value = random_value(rng, 8)
        assert _depth(value) == recursive_depth(value), value


def test_json_depth_limit_is_exact():
    at_limit = "[" * 32 + "]" * 32
    assert recursive_depth(parse_json(at_limit, "f", expect=list)) == 32
    with pytest.raises(EntropyLabError, match="nested too deeply"):
        parse_json("[" * 33 + "]" * 33, "f", expect=list)
    with pytest.raises(EntropyLabError, match="nested too deeply"):  # beyond the parser's own stack
        parse_json("[" * 200_000 + "]" * 200_000, "f", expect=list)
    with pytest.raises(EntropyLabError, match="is not a JSON object"):
        parse_json("[1]", "f")


def test_safetensors_written_by_safetensors_pass_and_each_damage_is_named(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    tensors = {
        "a": torch.zeros(3, 5),
        "b": torch.ones(7, dtype=torch.bfloat16),
        "c": torch.arange(4, dtype=torch.int64),
        "d": torch.zeros(0, 2),  # an empty tensor: offsets begin == end
        "e": torch.ones(2, dtype=torch.bool),
    }
    save_file(tensors, path, metadata={"format": "pt"})
    check_safetensors(path)
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])

    def rewritten(edit) -> bytes:
        h = json.loads(json.dumps(header))
        edit(h)
        text = json.dumps(h).encode()
        return struct.pack("<Q", len(text)) + text + raw[8 + n :]

    cases = {
        "header length": raw[:8][::-1] + raw[8:],  # the length's bytes reversed: far beyond the file
        "lies outside": raw[:-1],  # the last tensor's bytes cut short
        "does not fill": rewritten(lambda h: h["a"].__setitem__("shape", [3, 6])),
        "no valid dtype": rewritten(lambda h: h["b"].__setitem__("shape", [-7])),
        "__metadata__": rewritten(lambda h: h.__setitem__("__metadata__", {"format": 1})),
    }
    for fragment, data in cases.items():
        path.write_bytes(data)
        with pytest.raises(EntropyLabError, match=fragment):
            check_safetensors(path)


def contract_records(n: int = 4) -> pd.DataFrame:
    """Records that keep the contract, by hand."""
    prob = np.linspace(0.1, 1.0, n)
    return pd.DataFrame(
        {
            **{c: np.arange(n, dtype=np.int64) for c in ("step", "update", "sample", "position", "token_id")},
            **{
                c: np.full(n, np.nan) for c in ("advantage", "ratio", "clip_indicator", "intervention_weight")
            },
            **{c: np.ones(n) for c in ("normalizer", "weight", "lr", "delta_logit_linear")},
            "prob": prob,
            "logprob": np.log(prob),
            "surprisal": -np.log(prob),
            "entropy_before": np.zeros(n),
            "entropy_after": np.full(n, 2.0),
            "collision": np.full(n, -0.3),
            "delta_entropy": np.full(n, 2.0),
            **{
                c: np.zeros(n)
                for c in (
                    "omega_paper",
                    "omega_sampled_logit",
                    "omega_softmax",
                    "omega_logit_grad",
                    "omega_covariance",
                )
            },
        }
    )


def test_record_bounds_hold_within_their_slack_and_not_beyond():
    validate_records(contract_records())
    for column, value, ok in [
        ("prob", 1 + RANGE_SLACK / 2, True),
        ("prob", 1 + 2 * RANGE_SLACK, False),
        ("entropy_before", -RANGE_SLACK / 2, True),
        ("entropy_before", -2 * RANGE_SLACK, False),
        ("entropy_after", np.log(2.0**32), True),
        ("entropy_after", 23.0, False),
        ("logprob", 0.01, False),
        ("delta_entropy", np.nan, False),
        ("omega_softmax", np.nan, True),  # not measured
        ("omega_softmax", np.inf, False),
        ("position", -1, False),
    ]:
        df = contract_records()
        df.loc[1, column] = value
        if ok:
            validate_records(df)
        else:
            with pytest.raises(EntropyLabError, match=repr(column)):
                validate_records(df)
    with pytest.raises(EntropyLabError, match="not integers"):
        validate_records(contract_records().astype({"step": float}))
    with pytest.raises(EntropyLabError, match="not floats"):
        validate_records(contract_records().astype({"weight": int}))


def test_step_tables_need_integer_unique_ascending_steps_and_numbers():
    good = pd.DataFrame({"step": [1, 2, 3], "loss": [0.5, np.nan, 1.0], "n": [1, 2, 3]})
    check_step_table(good, "m")
    check_step_table(pd.DataFrame(), "m")  # an absent table reads as empty
    for bad, fragment in [
        (good.assign(step=[1, 3, 2]), "ascending"),
        (good.assign(step=[1, 1, 2]), "ascending"),
        (good.assign(step=[1.0, 2.0, 3.0]), "not integers"),
        (good.assign(loss=["a", "b", "c"]), "not numbers"),
        (good.assign(flag=[True, False, True]), "not numbers"),
        (good.assign(loss=[0.0, np.inf, 1.0]), "infinite"),
        (good.drop(columns="step"), "no 'step' column"),
    ]:
        with pytest.raises(EntropyLabError, match=fragment):
            check_step_table(bad, "m")


def test_configuration_limits_at_their_edges():
    TrainConfig(seed=MAX_SEED).validate()
    with pytest.raises(EntropyLabError, match=str(MAX_SEED)):
        TrainConfig(seed=MAX_SEED + 1).validate()
    assert field_ranges()["seed"] == f"[0, {MAX_SEED}]"  # exact, not 9.22337e+18
    TrainConfig(prompts_per_step=2**20, samples_per_prompt=16, mini_batches=1).validate()  # 2**24 sequences
    with pytest.raises(EntropyLabError, match="sequences per step"):
        TrainConfig(prompts_per_step=2**20, samples_per_prompt=17).validate()
    # torch takes every seed the tracer derives from the largest one (reduced mod 2**64)
    torch.Generator().manual_seed((MAX_SEED * 1_000_003 + 10**9 * 1009 + 7) % 2**64)
    torch.Generator().manual_seed(MAX_SEED + 10_000 + 10**9)


def test_the_tracer_samples_positions_with_the_largest_seed():
    from tiny_lm import make_tiny_lm

    from entropy_lab.trace import EntropyTracer

    model = make_tiny_lm(seed=0)
    ids = torch.randint(0, 64, (2, 6))
    resp = torch.zeros(2, 6)
    resp[:, 3:] = 1
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with EntropyTracer(model, max_positions=3, seed=MAX_SEED).step(
        ids, None, resp, advantages=torch.tensor([1.0, -1.0]), optimizer=opt
    ) as step:
        model(input_ids=ids).logits.sum().backward()
        opt.step()
    assert len(step.records) == 3


def test_positions_check_is_exact_at_the_limit():
    from entropy_lab.rollout import check_positions

    class Config:
        max_position_embeddings = 64

    class Model:
        config = Config()

    check_positions(Model(), 48, 16)
    with pytest.raises(EntropyLabError, match="at most 15"):
        check_positions(Model(), 49, 16)
    with pytest.raises(EntropyLabError, match="shorter prompts"):
        check_positions(Model(), 64, 1)
