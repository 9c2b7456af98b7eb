"""The command line itself: --version, "did you mean", --help defaults (in-process, no training)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from entropy_lab import __version__
from entropy_lab.cli.app import app
from entropy_lab.errors import EntropyLabError, did_you_mean
from entropy_lab.registry import Registry

runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"entropy-lab {__version__}"


def test_did_you_mean_offers_close_names_only():
    assert did_you_mean("stear", ["grpo", "steer", "rloo"]) == " (did you mean 'steer'?)"
    assert did_you_mean("zzzz", ["grpo", "steer"]) == ""
    things = Registry("thing")
    things.add("clip-higher", 1)
    with pytest.raises(
        EntropyLabError, match=r"unknown thing 'clip-hihger' \(did you mean 'clip-higher'\?\); valid"
    ):
        things["clip-hihger"]


def test_train_help_shows_the_default_run_directory():
    result = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    out_line = next(line for line in result.output.splitlines() if "--out" in line)
    assert "runs/<method>" in out_line, result.output
