"""Arithmetic: one binary operation on small integers, a fast task for tests.

Format (every character is one token):

    prompt      "23+45="
    completion  "68"

Reward 1 when the completion's leading integer (optional surrounding whitespace,
optional minus sign, at most 30 digits) equals the answer; what follows it is ignored.

Simplifications: subtraction orders its operands so results are never negative; the
held-out split hashes the prompt, so "23+45=" and "45+23=" are different problems.
"""

from __future__ import annotations

import re

import numpy as np

from entropy_lab.errors import EntropyLabError
from entropy_lab.tasks.base import GeneratedTask, Problem, register_task

_LEADING_INT = re.compile(r"\s*(-?\d{1,30})(?!\d)")


@register_task("arithmetic")
class ArithmeticTask(GeneratedTask):
    """``a op b =`` with a, b in [min_operand, max_operand] and op drawn from ``ops``."""

    eval_seed = 20_251_011  # fixed seed of the held-out list

    def __init__(
        self,
        min_operand: int = 0,
        max_operand: int = 99,
        ops: str = "+",
        eval_fraction: float = 0.1,
        max_new_tokens: int | None = None,
    ) -> None:
        if not 0 <= min_operand <= max_operand:
            raise EntropyLabError(
                f"arithmetic needs 0 <= min_operand <= max_operand, got {min_operand}, {max_operand}."
            )
        if not ops or set(ops) - set("+-*"):
            raise EntropyLabError(f"arithmetic ops must be a non-empty subset of '+-*', got {ops!r}.")
        if not 0.0 < eval_fraction < 1.0:
            raise EntropyLabError(f"arithmetic eval_fraction must be in (0, 1), got {eval_fraction}.")
        self.min_operand = min_operand
        self.max_operand = max_operand
        self.ops = "".join(sorted(set(ops), key="+-*".index))
        self.eval_fraction = eval_fraction
        largest = max_operand * max_operand if "*" in self.ops else 2 * max_operand
        self.max_new_tokens = max_new_tokens if max_new_tokens is not None else len(str(largest)) + 2

    def make_problem(self, a: int, op: str, b: int) -> Problem:
        """The problem ``a op b =``."""
        result = a + b if op == "+" else a - b if op == "-" else a * b
        return Problem(prompt=f"{a}{op}{b}=", answer=str(result), meta={"a": a, "b": b, "op": op})

    def _draw_one(self, rng: np.random.Generator) -> tuple[str, Problem]:
        a, b = (int(x) for x in rng.integers(self.min_operand, self.max_operand + 1, size=2))
        op = self.ops[int(rng.integers(len(self.ops)))]
        if op == "-" and a < b:
            a, b = b, a
        problem = self.make_problem(a, op, b)
        return problem.prompt, problem

    def reward(self, problem: Problem, completion: str) -> float:
        match = _LEADING_INT.match(completion[:64])
        if match is None:
            return 0.0
        try:
            return 1.0 if int(match.group(1)) == int(problem.answer) else 0.0
        except ValueError:  # a malformed Problem.answer
            return 0.0

    def demonstration(self, problem: Problem, rng: np.random.Generator) -> str:
        return problem.answer

    def alphabet(self) -> str:
        return "0123456789=" + self.ops
