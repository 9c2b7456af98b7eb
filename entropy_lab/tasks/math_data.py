"""Real RLVR data: verl-format Parquet prompts scored by a math-aware verifier.

Reading (``load_dataset_task``): one row per prompt, with columns ``prompt`` (a list of
chat messages ``{role, content}``) and ``reward_model`` (``{ground_truth, style}``), as
verl's RL datasets store them; ``data_source``, ``ability`` and ``extra_info`` are
optional and copied into ``Problem.meta``. The prompt text is
``tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)``
when the tokenizer has a chat template, else the message contents joined by newlines.

Scoring (``math_reward``): the final answer is the last ``\\boxed{...}`` (nested braces
handled; ``\\fbox`` too) or the last ``Answer: ...`` line (DAPO style), whichever comes
later in the completion. It scores 1 when, after light normalisation (whitespace, ``$``,
trailing period, ``\\dfrac``/``\\tfrac``, ``\\left``/``\\right``), it equals the ground
truth as a string. When both are plain decimal literals (``-1.5``, ``4.5e33``) they are
compared as exact rationals (so ``34.0`` equals ``34``, ``1.60`` equals ``1.6``, and no
rounding tolerance applies); otherwise both are wrapped in ``\\boxed{}``, parsed by math-verify (Hugging Face, ``parse`` /
``verify``) and compared.

Timeouts: math-verify 0.9 bounds each ``parse`` and ``verify`` comparison with
``signal.alarm`` (``MATH_VERIFY_TIMEOUT_S`` seconds here; a timeout counts as "not
equal"), which only works in the main thread: elsewhere it raises ValueError, and
disabling it (``timeout_seconds=None``) lets inputs such as ``10^{10^{10^{10}}}`` hang.
So in the main thread math-verify runs in-process with its alarms (which replace the
SIGALRM handler during a call and cancel any alarm the caller had pending); from any
other thread the comparison goes to one child Python process (POSIX: ``select`` on its
pipe), where it runs in a main thread with its alarms; a child silent for
``WORKER_TIMEOUT_S`` is killed and replaced.
The string and plain-number shortcuts never reach math-verify.

Simplifications: answers that only appear in prose ("the answer is 5") score 0; the
bare ``\\boxed 5`` form is not recognised; ``4.5e33`` is rewritten as
``4.5\\times10^{33}`` before parsing (math-verify reads the ``e`` as Euler's number);
``eval_problems(n)`` is the first n rows (benchmarks repeat problems), fewer when the
file is shorter; ``sample`` draws rows uniformly with replacement and does not avoid them.
Known limitation inherited from math-verify: it rounds floats to 6 decimals, so on its
path (any side not a plain literal) magnitudes below 5e-7 all compare equal
(``2\\times10^{-20}`` matches ``1e-20``).

References: verl (Sheng et al., 2024) data format; DAPO (Yu et al., 2025) answer format;
math-verify, https://github.com/huggingface/Math-Verify.
"""

from __future__ import annotations

import atexit
import functools
import json
import math
import os
import re
import select
import subprocess
import sys
import threading
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
from math_verify.errors import TimeoutException

from entropy_lab.errors import EntropyLabError
from entropy_lab.tasks.base import Problem, Task

MATH_VERIFY_TIMEOUT_S = 2
"""Seconds allowed per math-verify parse or comparison (signal.alarm, so a whole number)."""
MAX_ANSWER_CHARS = 1_000
"""Extracted answers longer than this score 0 without being parsed."""
WORKER_TIMEOUT_S = 60
"""Last-resort limit on one request to the worker process (its math-verify alarms come first)."""
REQUIRED_COLUMNS = ("prompt", "reward_model")
OPTIONAL_COLUMNS = ("data_source", "ability", "extra_info")

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_LINE = re.compile(r"answer\s*:[ \t]*([^\n]*)", re.IGNORECASE)
_SCIENTIFIC = re.compile(r"^([-+]?\d+(?:\.\d+)?)[eE]([-+]?\d+)$")
_PLAIN_NUMBER = re.compile(r"^[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d{1,3})?$")  # exponent capped
_SIZING = re.compile(r"\\(?:left|right)(?![A-Za-z])")  # \left( but not \leftarrow
_BRACE_STEP = {"{": 1, "}": -1}
_EXTRACTION = (LatexExtractionConfig(), ExprExtractionConfig())


# --------------------------------------------------------------------------- answer extraction


def last_boxed(text: str) -> tuple[int, str] | None:
    """(start, content) of the last well-formed ``\\boxed{...}`` in ``text``, or None.

    Braces are counted, so nested groups (``\\boxed{\\frac{1}{2}}``) are kept whole. Only
    the last 8 openings are tried, which bounds the work on adversarial text.
    """
    for match in list(_BOXED.finditer(text))[-8:][::-1]:
        depth, i = 1, match.end()
        while i < len(text) and depth:
            depth += _BRACE_STEP.get(text[i], 0)
            i += 1
        if depth == 0:
            return match.start(), text[match.end() : i - 1]
    return None


def _unwrap(answer: str) -> str:
    """Strip whitespace, math delimiters and a trailing period around an ``Answer:`` value."""
    answer = answer.strip().rstrip(".").rstrip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if len(answer) >= len(left) + len(right) and answer.startswith(left) and answer.endswith(right):
            answer = answer[len(left) : len(answer) - len(right)].strip()
            break
    return answer.rstrip(".").strip()


def last_answer_line(text: str) -> tuple[int, str] | None:
    """(start, value) of the last non-empty ``Answer: ...`` line (case-insensitive), or None."""
    for match in reversed(list(_ANSWER_LINE.finditer(text))):
        value = _unwrap(match.group(1))
        if value:
            return match.start(), value
    return None


def extract_final_answer(text: str) -> str | None:
    """The final answer of a completion: the later of its last ``\\boxed{}`` and last ``Answer:`` line."""
    found = [f for f in (last_boxed(text), last_answer_line(text)) if f is not None]
    return max(found)[1].strip() if found else None


# --------------------------------------------------------------------------- verification


def _normalise(answer: str) -> str:
    """A light canonical form for the exact-string shortcut."""
    answer = answer.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    answer = _SIZING.sub("", answer)
    return "".join(answer.split()).lstrip("$").rstrip("$.")


def _plain_number(answer: str) -> Fraction | None:
    """The exact value of a plain integer, decimal or scientific literal such as ``-1.5e-3``; else None."""
    answer = answer.strip().lstrip("$").rstrip("$.")
    return Fraction(answer) if _PLAIN_NUMBER.match(answer) else None


def _parse(answer: str) -> list[Any]:
    """math-verify's parse of ``answer`` as boxed LaTeX (or a plain expression); [] on failure."""
    answer = answer.strip().lstrip("$").rstrip("$.")  # stray math delimiters, a final period
    sci = _SCIENTIFIC.match(answer)
    if sci:
        answer = f"{sci.group(1)}\\times10^{{{sci.group(2)}}}"
    return parse(
        "\\boxed{" + answer + "}", extraction_config=_EXTRACTION, parsing_timeout=MATH_VERIFY_TIMEOUT_S
    )


@functools.lru_cache(maxsize=65_536)
def _parse_gold(ground_truth: str) -> tuple[Any, ...]:
    # Cached: a ground truth is parsed once however many completions are scored against it.
    return tuple(_parse(ground_truth))


def _math_verify_equal(ground_truth: str, answer: str) -> bool:
    """math-verify's verdict. Must run in a main thread: its timeouts are ``signal.alarm``."""
    gold = list(_parse_gold(ground_truth))
    pred = _parse(answer)
    return bool(gold and pred and verify(gold, pred, timeout_seconds=MATH_VERIFY_TIMEOUT_S))


_WORKER_SOURCE = """
import json, sys
from entropy_lab.tasks.math_data import _math_verify_equal
for line in sys.stdin:
    try:
        ok = _math_verify_equal(*json.loads(line))
    except BaseException:
        ok = False
    print(json.dumps(bool(ok)), flush=True)
"""


class _VerifyWorker:
    """One child Python process answering ``_math_verify_equal`` requests, a JSON line each way.

    A plain subprocess rather than multiprocessing's spawn, which would re-run the user's
    unguarded ``__main__`` script in the child. Calls are serialised by a lock; a child
    that does not answer within ``WORKER_TIMEOUT_S`` is killed and replaced on the next call.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[str] | None = None

    def _start(self) -> subprocess.Popen[str]:
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])  # importable even when not installed
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        return subprocess.Popen(
            [sys.executable, "-c", _WORKER_SOURCE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
            env=env,
        )

    def equal(self, ground_truth: str, answer: str) -> bool:
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._proc = self._start()
            proc = self._proc
            assert proc.stdin is not None and proc.stdout is not None
            try:
                proc.stdin.write(json.dumps([ground_truth, answer]) + "\n")
                proc.stdin.flush()
                ready, _, _ = select.select([proc.stdout], [], [], WORKER_TIMEOUT_S)
                if not ready:
                    raise TimeoutError
                return json.loads(proc.stdout.readline()) is True
            except (OSError, ValueError, TimeoutError):
                proc.kill()
                proc.wait()
                self._proc = None
                return False

    def close(self) -> None:
        """End the child (at interpreter exit): closing its stdin ends its read loop."""
        with self._lock:
            if self._proc is not None and self._proc.poll() is None and self._proc.stdin is not None:
                self._proc.stdin.close()
                try:
                    self._proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
            if self._proc is not None and self._proc.stdout is not None:
                self._proc.stdout.close()
            self._proc = None


_worker = _VerifyWorker()
atexit.register(_worker.close)


def math_reward(completion: str, ground_truth: str) -> float:
    """1.0 when the completion's final answer equals ``ground_truth`` mathematically, else 0.0. Never raises."""
    try:
        answer = extract_final_answer(completion)
        if not answer or len(answer) > MAX_ANSWER_CHARS:
            return 0.0
        if _normalise(answer) == _normalise(ground_truth):
            return 1.0
        gold_number, answer_number = _plain_number(ground_truth), _plain_number(answer)
        if gold_number is not None and answer_number is not None:
            # Exact: math-verify's rounding to 6 decimals would equate 1.3e-27 and 2.9e-19.
            return 1.0 if gold_number == answer_number else 0.0
        if threading.current_thread() is threading.main_thread():
            return 1.0 if _math_verify_equal(ground_truth, answer) else 0.0
        return 1.0 if _worker.equal(ground_truth, answer) else 0.0
    except (Exception, TimeoutException):  # TimeoutException derives from BaseException
        return 0.0


# --------------------------------------------------------------------------- Parquet loading


def _jsonable(value: Any) -> Any:
    """Plain Python (JSON-serialisable) copy of values read from Parquet (numpy arrays and scalars)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _messages(cell: Any) -> list[dict[str, str]] | None:
    """The chat messages of one ``prompt`` cell, or None when it is not a list of {role, content}."""
    if isinstance(cell, str):  # tolerated: a bare prompt string is one user message
        return [{"role": "user", "content": cell}]
    if not isinstance(cell, (list, tuple, np.ndarray)) or len(cell) == 0:
        return None
    out = []
    for message in cell:
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            return None
        out.append({"role": str(message.get("role") or "user"), "content": message["content"]})
    return out


def _ground_truth(cell: Any) -> str | None:
    if not isinstance(cell, dict) or cell.get("ground_truth") is None:
        return None
    gt = cell["ground_truth"]
    return gt if isinstance(gt, str) else str(_jsonable(gt))


class DatasetTask(Task):
    """Prompts and ground truths from one verl-format Parquet file, scored by ``math_reward``."""

    def __init__(self, path: str | Path, tokenizer: Any = None, max_new_tokens: int = 1024) -> None:
        self.path = Path(path)
        self.name = f"parquet:{self.path.stem}"
        self.max_new_tokens = max_new_tokens
        self.tokenizer = tokenizer
        frame = _read_frame(self.path)

        self._messages: list[list[dict[str, str]]] = []
        self._answers: list[str] = []
        for i, (prompt, reward_model) in enumerate(zip(frame["prompt"], frame["reward_model"], strict=True)):
            messages, gt = _messages(prompt), _ground_truth(reward_model)
            if messages is None:
                raise EntropyLabError(
                    f"Dataset {self.path}: row {i} has a 'prompt' that is not a list of {{role, content}} messages."
                )
            if gt is None:
                raise EntropyLabError(f"Dataset {self.path}: row {i} has no reward_model.ground_truth.")
            self._messages.append(messages)
            self._answers.append(gt)
        if not self._answers:
            raise EntropyLabError(f"Dataset {self.path} has no rows.")
        self._extra = {c: frame[c].tolist() for c in OPTIONAL_COLUMNS if c in frame.columns}
        self._styles = [_jsonable(r.get("style")) for r in frame["reward_model"]]
        self._prompts: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self._answers)

    def render(self, messages: list[dict[str, str]]) -> str:
        """The prompt text for ``messages``: the tokenizer's chat template, else contents joined by newlines."""
        if self.tokenizer is not None and getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "\n".join(m["content"] for m in messages)

    def problem(self, row: int) -> Problem:
        """The problem of row ``row`` (rendered once, then cached)."""
        if row not in self._prompts:
            self._prompts[row] = self.render(self._messages[row])
        meta: dict[str, Any] = {"row": row, "style": self._styles[row]}
        meta.update({c: _jsonable(values[row]) for c, values in self._extra.items()})
        return Problem(prompt=self._prompts[row], answer=self._answers[row], meta=meta)

    def sample(self, n: int, rng: np.random.Generator) -> list[Problem]:
        return [self.problem(int(i)) for i in rng.integers(len(self), size=n)]

    def eval_problems(self, n: int) -> list[Problem]:
        return [self.problem(i) for i in range(min(n, len(self)))]

    def reward(self, problem: Problem, completion: str) -> float:
        return math_reward(completion, problem.answer)


def _read_frame(path: Path) -> pd.DataFrame:
    """The file's table, with a clear error when it is missing, unreadable or lacks required columns."""
    if not path.is_file():
        raise EntropyLabError(f"Dataset file {path} does not exist.")
    try:
        frame = pd.read_parquet(path)
    except Exception as err:
        raise EntropyLabError(f"Dataset file {path} could not be read as Parquet ({err}).") from err
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise EntropyLabError(
            f"Dataset file {path} lacks the column(s) {', '.join(missing)} of the verl format "
            f"(it has: {', '.join(map(str, frame.columns)) or 'none'})."
        )
    return frame


def load_dataset_task(path: str | Path, tokenizer: Any = None, *, max_new_tokens: int = 1024) -> DatasetTask:
    """A task over the verl-format Parquet file at ``path``; ``tokenizer`` supplies the chat template."""
    return DatasetTask(path, tokenizer=tokenizer, max_new_tokens=max_new_tokens)
