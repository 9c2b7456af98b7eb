"""The one registry type behind estimators, objectives, methods, tasks and the rest."""

import pytest

from entropy_lab.errors import EntropyLabError
from entropy_lab.registry import Registry


def test_register_get_and_errors():
    reg = Registry("widget")
    reg.register("a")(1)
    reg.add("b", 2)
    assert reg["a"] == 1 and list(reg) == ["a", "b"] and reg.get("zzz") is None
    with pytest.raises(EntropyLabError, match="widget 'a' is already registered"):
        reg.add("a", 3)
    with pytest.raises(EntropyLabError, match=r"unknown widget 'c'; valid: a, b"):
        reg["c"]
    assert reg["a"] == 1  # a refused duplicate leaves the entry in place
