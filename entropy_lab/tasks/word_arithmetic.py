"""Word arithmetic: one- and two-step calculations asked in English, for a pretrained chat model.

The built-in task for real (pretrained, instruction-tuned) models. Its prompts are English
sentences rendered with the model's own chat template, so it needs the model's tokenizer
and refuses the embedded character-level policy, which cannot read them. Its difficulty
is sized for SmolLM2-135M-Instruct sampled at temperature 1 (on-policy: the trainer
optimises the untempered softmax): measured apart, one-step questions reach a sampled
pass@1 of 0.60 (near the top of the useful [0.15, 0.7]) and two-step ones 0.19 (near the
bottom); the even mix starts at 0.33, so a GRPO group of four often holds a right and a
wrong answer.

Format (chat messages, then the template's generation prompt):

    system      Solve the problem. Write the final number on the last line as "Answer: <number>".
    user        Start with 12. Add 7, then subtract 5. What number do you get?
    assistant   12 + 7 = 19, and 19 - 5 = 14.\\nAnswer: 14       (a fixed worked example)
    user        Start with 6. Multiply by 3, then add 2. What number do you get?
    completion  "6 * 3 = 18, and 18 + 2 = 20.\\nAnswer: 20"

A one-step problem ("What is 6 times 3?") gets the one-step example "What is 12 plus 7?"
instead: behind the two-step example, one-step questions scored about 0.05 instead of
0.60 (the model copies the second step).

Problems: the number of steps is drawn from ``steps`` (default: 1 or 2, evenly), then a
chain of that length from ``CHAINS``, asked in one fixed wording. Addends lie in
[2, max_operand], factors in [2, max_factor]; a one-step subtraction or division undoes
an addition or product (``(x + y) - y``, ``(x * y) / y``); a second step adds a number
in [2, max_operand] or subtracts one below the running value. Every answer is a positive
integer, computed left to right.

Reward: 1 when the value of the last non-empty ``Answer:`` line (``last_answer_line`` of
``math_data``, which strips ``$`` delimiters and a final period) is an integer literal,
optionally led by ``$`` and followed by words ("18", "18 apples"), equal to the answer; 0
otherwise: another expression on that line ("6 * 3 = 18"), a wrong number, or no
``Answer:`` line at all (malformed).

Held-out split: a problem's key is its chain and numbers ("add-sub:3,6,2"). A fifth of
the keys are held out (only 160 one-step calculations exist), and the evaluation list
alternates one- and two-step problems as the training draws mix them.

Preset (``PRETRAINED_DEFAULTS``; ``entropy_lab.presets`` applies it when ``--model`` is
given without ``--dataset``, to every setting neither the user nor the method sets; the
CLI prints what it applied and config.json records it). Measured with
SmolLM2-135M-Instruct (Q4_1 GGUF dequantised to fp32), one thread of a shared 2-core CPU:

- temperature 1.0: sampled pass@1 0.33 and pass@4 0.56 at the start on 64 held-out
  problems; 42% of the groups of four have mixed rewards (14% all right). It is also
  on-policy: rollouts sample the softmax the trainer optimises.
- max_new_tokens 40: 99% of the correct answers take at most 38 tokens; 5% of all
  responses reach 40 tokens (2% reach 64).
- samples_per_prompt 4, prompts_per_step 8: 32 sequences of about 165 tokens (the
  prompt, with its worked example, is about 125); the rollout takes ~25 s.
- lr 1e-5 (AdamW): one update on such a batch lowers response entropy by 2.6% (0.787 to
  0.766 nats; mean |change| per token 0.05) and stays first-order: the change to first
  order in the actual logit change (``delta_logit_linear``) correlates 0.98 per token
  with the measured one (3e-6: 0.9% and 0.997).
  At 5e-5 one update lowers it by 9.4% and the sampled tokens' mean log-probability
  drops 0.2 nats. Five steps at 1e-5 took the rollout entropy from 0.79 to 0.40 nats.
- micro_batch_size 8: fp32 logits of 8 x 160 tokens over the 49,152-token vocabulary
  take 0.25 GB and the process peaks near 7 GB; a whole batch of 32 in one backward was
  killed for memory on the shared 23 GB machine.
- eval_prompts 32, eval_k 4 (an evaluation samples 160 responses); trace_every 5: a step
  takes ~2 min at one thread (rollout ~25 s, the rollout policy's no-grad forward ~30 s,
  four micro-batch forward/backward passes ~60 s), a traced one ~15% longer.

Simplifications: the instruction and the two worked examples are fixed (their 12 lies
outside the default addend range, so they are no problem of either split); a second step
never multiplies or divides; tokenizers without a chat template get the message
contents joined by newlines, and templates that reject a system message get the
instruction at the head of each user message.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np

from entropy_lab.errors import EntropyLabError
from entropy_lab.tasks.base import GeneratedTask, Problem, draw_split, register_task
from entropy_lab.tasks.math_data import last_answer_line

INSTRUCTION = 'Solve the problem. Write the final number on the last line as "Answer: <number>".'
EXAMPLES: dict[int, tuple[str, str]] = {
    1: ("What is 12 plus 7?", "12 + 7 = 19.\nAnswer: 19"),
    2: (
        "Start with 12. Add 7, then subtract 5. What number do you get?",
        "12 + 7 = 19, and 19 - 5 = 14.\nAnswer: 14",
    ),
}
"""The worked example (question, answer) shown before a problem of each step count."""

APPLY: dict[str, Callable[[int, int], int]] = {
    "add": lambda v, x: v + x,
    "sub": lambda v, x: v - x,
    "mul": lambda v, x: v * x,
    "div": lambda v, x: v // x,  # exact: the dividend is drawn as a multiple of the divisor
}
SYMBOL = {"add": "+", "sub": "-", "mul": "*", "div": "/"}

ONE_STEP = {
    "add": "What is {a} plus {b}?",
    "sub": "What is {a} minus {b}?",
    "mul": "What is {a} times {b}?",
    "div": "What is {a} divided by {b}?",
}
"""The question of each one-step calculation, over its numbers ``a`` and ``b``."""
TWO_STEP = "Start with {a}. {first}, then {second}. What number do you get?"
"""The question of a two-step calculation, over ``a`` and the two steps' verb phrases."""
STEP_PHRASE = {"add": "add {x}", "sub": "subtract {x}", "mul": "multiply by {x}"}

CHAINS: tuple[tuple[str, ...], ...] = (
    ("add",),
    ("sub",),
    ("mul",),
    ("div",),
    ("add", "add"),
    ("add", "sub"),
    ("mul", "add"),
    ("mul", "sub"),
)
"""Every calculation, as its operations applied left to right to the first number."""

_ANSWER_VALUE = re.compile(r"\$?\s*(-?\d{1,12})(?:\s+[A-Za-z][A-Za-z ]*)?")


def render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The prompt text of ``messages`` through ``tokenizer``'s chat template, with its generation prompt.

    Args:
        tokenizer: A Hugging Face tokenizer; without a chat template the contents are joined by newlines.
        messages: Chat messages ``{role, content}``, a system message first.

    Returns:
        The rendered prompt. A template that rejects the system message gets its content
        at the head of every user message instead.
    """
    if not getattr(tokenizer, "chat_template", None):
        return "\n".join(m["content"] for m in messages)
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:  # jinja's TemplateError, e.g. "System role not supported"
        if messages[0]["role"] != "system":
            raise
        head, rest = messages[0]["content"], messages[1:]
        folded = [{**m, "content": f"{head}\n{m['content']}"} if m["role"] == "user" else m for m in rest]
        return tokenizer.apply_chat_template(folded, tokenize=False, add_generation_prompt=True)


def question(chain: tuple[str, ...], numbers: tuple[int, ...]) -> str:
    """The English question of ``chain`` over ``numbers``: "What is 6 times 3?"."""
    if len(chain) == 1:
        return ONE_STEP[chain[0]].format(a=numbers[0], b=numbers[1])
    first = STEP_PHRASE[chain[0]].format(x=numbers[1]).capitalize()
    return TWO_STEP.format(a=numbers[0], first=first, second=STEP_PHRASE[chain[1]].format(x=numbers[2]))


def worked_solution(chain: tuple[str, ...], numbers: tuple[int, ...]) -> tuple[str, int]:
    """(the calculation written out step by step, its value): ``"3 + 6 = 9, and 9 - 2 = 7."``, 7."""
    value, parts = numbers[0], []
    for op, x in zip(chain, numbers[1:], strict=True):
        new = APPLY[op](value, x)
        parts.append(f"{value} {SYMBOL[op]} {x} = {new}")
        value = new
    return ", and ".join(parts) + ".", value


@register_task("word-arithmetic")
class WordArithmeticTask(GeneratedTask):
    """One- and two-step arithmetic asked in English, in the model's chat template (see the module docstring)."""

    eval_seed = 20_251_204  # fixed seed of the held-out list
    takes_tokenizer = True
    PRETRAINED_DEFAULTS: ClassVar[dict[str, Any]] = {
        "temperature": 1.0,
        "max_new_tokens": 40,
        "samples_per_prompt": 4,
        "prompts_per_step": 8,
        "lr": 1e-5,
        "micro_batch_size": 8,
        "eval_prompts": 32,
        "eval_k": 4,
        "trace_every": 5,
    }

    def __init__(
        self,
        tokenizer: Any = None,
        max_operand: int = 9,
        max_factor: int = 5,
        steps: tuple[int, ...] = (1, 2),
        eval_fraction: float = 0.2,
        max_new_tokens: int = 40,
    ) -> None:
        if tokenizer is None:
            raise EntropyLabError(
                "task 'word-arithmetic' needs a pretrained chat model (--model): its English prompts "
                "are beyond the embedded character-level policy"
            )
        if max_operand < 2 or max_factor < 2:
            raise EntropyLabError(
                f"word-arithmetic needs max_operand >= 2 and max_factor >= 2, got {max_operand}, {max_factor}."
            )
        if not steps or set(steps) - {1, 2}:
            raise EntropyLabError(
                f"word-arithmetic steps must be a non-empty subset of (1, 2), got {steps!r}."
            )
        if not 0.0 < eval_fraction < 1.0:
            raise EntropyLabError(f"word-arithmetic eval_fraction must be in (0, 1), got {eval_fraction}.")
        self.tokenizer = tokenizer
        self.max_operand = max_operand
        self.max_factor = max_factor
        self.steps = tuple(sorted(set(steps)))
        self.eval_fraction = eval_fraction
        self.max_new_tokens = max_new_tokens

    def draw_numbers(self, chain: tuple[str, ...], rng: np.random.Generator) -> tuple[int, ...]:
        """The numbers of a problem of ``chain``: the first step's two, then one per further step."""
        hi = self.max_factor if chain[0] in ("mul", "div") else self.max_operand
        x, y = (int(v) for v in rng.integers(2, hi + 1, size=2))
        numbers: tuple[int, ...] = {"add": (x, y), "sub": (x + y, y), "mul": (x, y), "div": (x * y, y)}[
            chain[0]
        ]
        value = APPLY[chain[0]](*numbers)
        for op in chain[1:]:
            # a subtraction stays below the running value, so every answer is positive
            x = int(rng.integers(2, self.max_operand + 1)) if op == "add" else int(rng.integers(1, value))
            numbers, value = (*numbers, x), APPLY[op](value, x)
        return numbers

    def make_problem(self, chain: tuple[str, ...], numbers: tuple[int, ...]) -> Problem:
        """The problem of ``chain`` over ``numbers``, rendered for the model."""
        text = question(chain, numbers)
        example = EXAMPLES[len(chain)]
        messages = [
            {"role": "system", "content": INSTRUCTION},
            {"role": "user", "content": example[0]},
            {"role": "assistant", "content": example[1]},
            {"role": "user", "content": text},
        ]
        meta = {"chain": "-".join(chain), "numbers": list(numbers), "question": text}
        answer = worked_solution(chain, numbers)[1]
        return Problem(prompt=render_chat(self.tokenizer, messages), answer=str(answer), meta=meta)

    def _draw_one(self, rng: np.random.Generator) -> tuple[str, Problem]:
        return self._draw_steps(self.steps[int(rng.integers(len(self.steps)))], rng)

    def _draw_steps(self, n_steps: int, rng: np.random.Generator) -> tuple[str, Problem]:
        """One random problem of ``n_steps`` steps and its split key."""
        chains = [c for c in CHAINS if len(c) == n_steps]
        chain = chains[int(rng.integers(len(chains)))]
        numbers = self.draw_numbers(chain, rng)
        return f"{'-'.join(chain)}:{','.join(map(str, numbers))}", self.make_problem(chain, numbers)

    def eval_problems(self, n: int) -> list[Problem]:
        """The first ``n`` of a fixed held-out list that alternates the step counts, as training draws
        them evenly; unique within each step count until its held-out calculations run out."""
        per_steps = -(-n // len(self.steps))
        lists = [
            draw_split(
                functools.partial(self._draw_steps, s),
                per_steps,
                np.random.default_rng([self.eval_seed, s]),
                self._held_out,
                want_held_out=True,
                unique=True,
            )
            for s in self.steps
        ]
        return [lists[i % len(lists)][i // len(lists)] for i in range(n)]

    def reward(self, problem: Problem, completion: str) -> float:
        found = last_answer_line(completion)
        match = _ANSWER_VALUE.fullmatch(found[1]) if found else None
        if match is None:
            return 0.0
        try:
            return 1.0 if int(match.group(1)) == int(problem.answer) else 0.0
        except ValueError:  # a malformed Problem.answer
            return 0.0

    def demonstration(self, problem: Problem, rng: np.random.Generator) -> str:
        chain = tuple(problem.meta["chain"].split("-"))
        text, value = worked_solution(chain, tuple(problem.meta["numbers"]))
        return f"{text}\nAnswer: {value}"
