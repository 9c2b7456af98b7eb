"""The task contract and the one task registry.

A task turns a random generator into prompts (``Problem``), scores completions with a
verifiable reward in [0, 1], and, for built-in tasks, writes correct completions for a
supervised warm start. The registry follows verl's policy-loss registry: one decorator
to add an entry, one getter that lists the valid names when it fails, duplicates refused.

Simplifications:

- Held-out evaluation problems are separated from training draws by a stable hash of a
  problem key (``is_held_out``), so no state has to be shared between ``sample`` and
  ``eval_problems`` and the split survives restarts. Python's ``hash`` is salted per
  process, so CRC32 is used instead.
"""

from __future__ import annotations

import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import numpy as np

from entropy_lab.errors import EntropyLabError
from entropy_lab.registry import Registry


@dataclass(frozen=True)
class Problem:
    """One prompt with its verifiable answer."""

    prompt: str
    """The text fed to the model, already rendered (chat template applied for datasets)."""
    answer: str
    """Ground truth as a string (countdown: the target; any valid expression scores 1)."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Anything else the reward or analyses need; JSON-serialisable."""


class Task(ABC):
    """A source of prompts with a verifiable reward."""

    name: str
    """Registry name (set by ``register_task``; dataset tasks name themselves)."""
    max_new_tokens: int
    """A sensible response length budget for this task, in tokens."""
    takes_tokenizer: ClassVar[bool] = False
    """Whether the constructor takes the model's tokenizer (prompts rendered with its chat template)."""
    PRETRAINED_DEFAULTS: ClassVar[dict[str, Any]] = {}
    """TrainConfig field -> value for a pretrained ``--model`` on this task, applied where the user
    gave nothing (``entropy_lab.presets``); {} for tasks without one."""

    @abstractmethod
    def sample(self, n: int, rng: np.random.Generator) -> list[Problem]:
        """Draw ``n`` training problems with ``rng`` (never from the held-out set where feasible)."""

    @abstractmethod
    def eval_problems(self, n: int) -> list[Problem]:
        """The first ``n`` problems of a fixed, deterministic held-out list."""

    @abstractmethod
    def reward(self, problem: Problem, completion: str) -> float:
        """Score in [0, 1] of ``completion`` (text after the prompt, without EOS). Never raises."""

    def demonstration(self, problem: Problem, rng: np.random.Generator) -> str:
        """A correct completion for ``problem``, drawn with ``rng`` (built-in tasks only)."""
        raise NotImplementedError(f"task {self.name!r} has no demonstrations")

    def alphabet(self) -> str:
        """Every character that prompts and completions of this task can contain (built-in tasks only)."""
        raise NotImplementedError(f"task {self.name!r} has no closed alphabet")


TASKS: Registry[type[Task]] = Registry("task")
"""The registry: task name -> task class."""

_T = TypeVar("_T", bound=type[Task])


def register_task(name: str) -> Callable[[_T], _T]:
    """Class decorator adding a ``Task`` subclass to ``TASKS`` under ``name``; refuses duplicates."""

    def decorate(cls: _T) -> _T:
        if not (isinstance(cls, type) and issubclass(cls, Task)):
            raise EntropyLabError(f"register_task({name!r}) needs a Task subclass, got {cls!r}.")
        TASKS.add(name, cls)
        cls.name = name
        return cls

    return decorate


def get_task(name: str, **kwargs: Any) -> Task:
    """Instantiate the task registered as ``name`` with ``kwargs``."""
    return TASKS[name](**kwargs)


def build_task(name: str, tokenizer: Any) -> Task:
    """The task registered as ``name`` for a model whose tokenizer is ``tokenizer``.

    Args:
        name: A registered task name.
        tokenizer: The model's tokenizer; passed on only to tasks that render their prompts
            with it (``Task.takes_tokenizer``), the others ignore it.

    Returns:
        The task with its default settings.
    """
    cls = TASKS[name]
    factory: Callable[..., Task] = cls  # the subclass's own signature takes ``tokenizer``
    return factory(tokenizer=tokenizer) if cls.takes_tokenizer else factory()


class GeneratedTask(Task):
    """A built-in task that draws problems from a generator, split into training and held-out
    problems by a stable hash of each problem's key (``is_held_out``).

    Subclasses set ``eval_fraction`` and ``eval_seed`` and implement ``_draw_one(rng) -> (key, Problem)``.
    """

    eval_fraction: float
    eval_seed: int

    @abstractmethod
    def _draw_one(self, rng: np.random.Generator) -> tuple[str, Problem]:
        """One random problem and the key that decides its split."""

    def _held_out(self, key: str) -> bool:
        return is_held_out(key, self.eval_fraction)

    def sample(self, n: int, rng: np.random.Generator) -> list[Problem]:
        return draw_split(self._draw_one, n, rng, self._held_out, want_held_out=False, unique=False)

    def eval_problems(self, n: int) -> list[Problem]:
        rng = np.random.default_rng(self.eval_seed)
        return draw_split(self._draw_one, n, rng, self._held_out, want_held_out=True, unique=True)


def is_held_out(key: str, fraction: float) -> bool:
    """Whether the problem identified by ``key`` belongs to the held-out evaluation split."""
    return zlib.crc32(key.encode("utf-8")) % 10_000 < round(fraction * 10_000)


def draw_split(
    draw_one: Callable[[np.random.Generator], tuple[str, Problem]],
    n: int,
    rng: np.random.Generator,
    held_out: Callable[[str], bool],
    want_held_out: bool,
    unique: bool,
    max_tries: int = 2_000,
) -> list[Problem]:
    """Draw ``n`` problems on one side of the split by rejection.

    ``draw_one`` returns (key, problem). With ``unique``, keys repeat only once a run of
    ``max_tries`` draws found nothing new (the split is exhausted); from then on draws
    are taken as they come. Raises when no draw
    at all lands on the wanted side, which means the task parameters leave that side empty.
    """
    out: list[Problem] = []
    seen: set[str] = set()
    while len(out) < n:
        fallback: Problem | None = None
        for _ in range(max_tries):
            key, problem = draw_one(rng)
            if held_out(key) != want_held_out:
                continue
            if not unique or key not in seen:
                seen.add(key)
                out.append(problem)
                break
            fallback = fallback or problem
        else:
            if fallback is None:
                side = "held-out" if want_held_out else "training"
                raise EntropyLabError(
                    f"No {side} problem found in {max_tries} draws; widen the task's ranges "
                    "or change its eval_fraction."
                )
            out.append(fallback)
            unique = False  # exhausted: the remaining draws repeat problems without searching again
    return out
