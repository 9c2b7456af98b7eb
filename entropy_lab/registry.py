"""One registry type for every kind of named thing (estimators, objectives, methods, tasks ...).

A ``Registry`` is a dict of name -> entry that refuses duplicate names and answers an
unknown name with one error listing the valid ones (verl's policy-loss registry style)::

    OBJECTIVES = Registry("objective")
    @OBJECTIVES.register("ppo")
    def ppo(...): ...
    OBJECTIVES["nope"]   # EntropyLabError: unknown objective 'nope'; valid: ppo
    OBJECTIVES["pop"]    # EntropyLabError: unknown objective 'pop' (did you mean 'ppo'?); valid: ppo
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from entropy_lab.errors import EntropyLabError, did_you_mean

T = TypeVar("T")


class Registry(dict[str, T]):
    """name -> entry for one kind of thing."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def add(self, name: str, entry: T) -> T:
        """Register ``entry`` under ``name``; a name already taken is an error."""
        if name in self:
            raise EntropyLabError(f"{self.kind} {name!r} is already registered")
        self[name] = entry
        return entry

    def remove(self, name: str) -> T:
        """Unregister ``name`` and return its entry; an unknown name is an error listing the valid ones."""
        entry = self[name]
        del self[name]
        return entry

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of ``add``."""
        return lambda entry: self.add(name, entry)

    def __missing__(self, name: str):
        hint = did_you_mean(name, self) if isinstance(name, str) else ""
        raise EntropyLabError(f"unknown {self.kind} {name!r}{hint}; valid: {', '.join(self) or '(none)'}")
