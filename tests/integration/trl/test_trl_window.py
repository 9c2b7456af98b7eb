"""The traced step's batch (``TracedStepBatch``) against hand-built tensors, and the import gate.

Two micro-batches of different widths (prompt 2 + completion 2, and prompt 1 + completion 4, with a
tool mask and per-token advantages) go to a recording stand-in for the tracer: the padded ids,
masks, advantages and old log-probs it receives, and where an annotation lands, are written out
by hand below.
"""

from __future__ import annotations

import contextlib
import math
import subprocess
import sys

import pytest
import torch

pytest.importorskip("trl")

from entropy_lab.errors import EntropyLabError  # noqa: E402
from entropy_lab.integrations.trl.window import MicroRows, TracedStepBatch  # noqa: E402

PAD = 9


class _Step:
    def __init__(self):
        self.annotations: list[tuple[list[int], dict]] = []
        self.records = "records"

    def annotate(self, rows, **values):
        self.annotations.append((rows, values))


class _Tracer:
    """Records what ``step`` was given; its step context yields a ``_Step``."""

    def __init__(self):
        self.calls: list[tuple[tuple, dict]] = []
        self.exited = 0

    @contextlib.contextmanager
    def step(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        try:
            yield _Step()
        finally:
            self.exited += 1


def _micro_batches(old: bool = True) -> list[dict]:
    a = {
        "prompt_ids": torch.tensor([[1, 2], [3, 4]]),
        "prompt_mask": torch.tensor([[1, 1], [0, 1]]),
        "completion_ids": torch.tensor([[5, 6], [7, 0]]),
        "completion_mask": torch.tensor([[1, 1], [1, 0]]),
        "advantages": torch.tensor([0.5, -1.0]),
        "old_per_token_logps": torch.tensor([[-0.1, -0.2], [-0.3, 0.0]]),
    }
    b = {
        "prompt_ids": torch.tensor([[8]]),
        "prompt_mask": torch.tensor([[1]]),
        "completion_ids": torch.tensor([[1, 2, 3, 4]]),
        "completion_mask": torch.tensor([[1, 1, 1, 0]]),
        "tool_mask": torch.tensor([[1, 0, 1, 1]]),
        "advantages": torch.tensor([[2.0, 3.0, 4.0, 5.0]]),
    }
    if old:
        b["old_per_token_logps"] = torch.tensor([[-1.0, -2.0, -3.0, -4.0]])
    return [a, b]


def test_micro_rows_name_the_fields_of_one_micro_batch():
    rows = MicroRows.from_batch(_micro_batches()[1])
    assert rows.input_ids.tolist() == [[8, 1, 2, 3, 4]]
    assert rows.attention_mask.tolist() == [[1, 1, 1, 1, 0]]
    assert rows.response_mask.tolist() == [[0, 1, 0, 1, 0]]  # completion mask times tool mask
    assert rows.prompt_len == 1
    assert rows.advantages.tolist() == [[2.0, 3.0, 4.0, 5.0]]
    assert MicroRows.from_batch(_micro_batches()[0]).advantages.tolist() == [[0.5, 0.5], [-1.0, -1.0]]


def test_step_batch_pads_micro_batches_to_one_batch():
    tracer = _Tracer()
    window = TracedStepBatch(_micro_batches(), step=4, update=1, tracer=tracer, pad_id=PAD)
    ((args, kwargs),) = tracer.calls
    ids, attn, resp = args
    assert ids.tolist() == [[1, 2, 5, 6, PAD], [3, 4, 7, 0, PAD], [8, 1, 2, 3, 4]]
    assert attn.tolist() == [[1, 1, 1, 1, 0], [0, 1, 1, 0, 0], [1, 1, 1, 1, 0]]
    assert resp.tolist() == [[0, 0, 1, 1, 0], [0, 0, 1, 0, 0], [0, 1, 0, 1, 0]]
    assert kwargs["advantages"].dtype == torch.float64
    assert kwargs["advantages"].tolist() == [
        [0, 0, 0.5, 0.5, 0], [0, 0, -1.0, -1.0, 0], [0, 2.0, 3.0, 4.0, 5.0]
    ]  # fmt: skip
    assert torch.equal(
        kwargs["old_logprobs"],
        torch.tensor(
            [[0, 0, -0.1, -0.2, 0], [0, 0, -0.3, 0.0, 0], [0, -1.0, -2.0, -3.0, -4.0]], dtype=torch.float32
        ).double(),
    )
    assert (kwargs["step"], kwargs["update"]) == (4, 1)
    assert window.offsets == [0, 2] and window.prompt_len == [2, 1] and window.width == 5

    window.micro = 1
    window.annotate(normalizer=torch.tensor([[10.0, 20.0, 30.0, 40.0]]))
    ((rows, values),) = window.traced.annotations
    assert rows == [2]
    got = values["normalizer"].tolist()[0]
    assert math.isnan(got[0]) and got[1:] == [10.0, 20.0, 30.0, 40.0]

    assert window.close() == "records" and tracer.exited == 1


def test_micro_rows_name_the_rows_of_the_current_micro_batch_only():
    window = TracedStepBatch(_micro_batches(), step=1, update=0, tracer=_Tracer(), pad_id=PAD)
    first = torch.tensor(
        [[1, 2, 5, 6], [3, 4, 7, 0]]
    )  # micro-batch 0, its own width (prompt 2 + completion 2)
    assert window.micro_rows(first) is None  # no micro-batch is being computed yet
    window.micro = 0
    assert window.micro_rows(first) == [0, 1]
    assert window.micro_rows(first.flip(0)) is None  # other rows
    window.micro = 1
    assert window.micro_rows(torch.tensor([[8, 1, 2, 3, 4]])) == [2]
    assert window.micro_rows(first) is None


def test_old_logprobs_on_some_micro_batches_only_is_one_clear_error():
    with pytest.raises(EntropyLabError, match="old log-probs for some micro-batches"):
        TracedStepBatch(_micro_batches(old=False), step=1, update=0, tracer=_Tracer(), pad_id=PAD)


@pytest.mark.parametrize(
    "fake, message",
    [
        ("sys.modules['trl'] = None", "EntropyLabError: TRL is not installed"),
        (
            "m = types.ModuleType('trl'); m.__version__ = '0.19.0'; sys.modules['trl'] = m",
            "EntropyLabError: TRL 0.19.0 is outside the supported range >=1.16,<1.17",
        ),
    ],
)
def test_package_checks_trl_before_importing_it(fake, message):
    """A missing or unsupported TRL (a stand-in without GRPOTrainer) ends in the gate's one line."""
    code = f"import sys, types; {fake}; import entropy_lab.integrations.trl"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith(f"entropy_lab.errors.{message}")
