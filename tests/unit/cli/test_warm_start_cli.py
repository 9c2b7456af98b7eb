"""`entropy-lab warm-start`: where the warm starts come from, a rebuild and its export, Ctrl-C."""

import functools
import json

from typer.testing import CliRunner

from entropy_lab import models
from entropy_lab.cli.app import app
from entropy_lab.models import WarmStartSpec

runner = CliRunner()
SPEC = WarmStartSpec(batch_size=8, max_steps=4, check_every=2, probe_prompts=4, target_pass=1.1)


def invoke(*args):
    return runner.invoke(app, ["warm-start", *map(str, args)])


def test_without_a_cache_the_shipped_warm_start_is_used_and_identical_to_itself(isolated_cache):
    result = invoke("--task", "arithmetic", "--quiet")
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if "arithmetic" in line)
    assert "shipped" in row and "identical" in row
    assert not isolated_cache.exists()


def test_export_without_a_cached_warm_start_is_one_error_line(isolated_cache, tmp_path):
    result = invoke("--task", "countdown", "--export", tmp_path / "assets")
    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: there is no cached warm start") and "--rebuild" in line
    assert not (tmp_path / "assets").exists()


def test_a_rebuild_trains_into_the_cache_and_exports_it(isolated_cache, tmp_path, monkeypatch, tiny_spec):
    for name in ("warm_start", "locate_warm_start", "export_warm_start"):
        monkeypatch.setattr(models, name, functools.partial(getattr(models, name), spec=SPEC, arch=tiny_spec))
    result = invoke("--task", "arithmetic", "--rebuild", "--export", tmp_path / "assets", "--quiet")
    assert result.exit_code == 0, result.output
    assert "built now" in result.output
    (record,) = (tmp_path / "assets").glob("arithmetic-*.json")
    info = json.loads(next((isolated_cache / "warmstart").glob("arithmetic-*/info.json")).read_text())
    assert json.loads(record.read_text())["sha256"] == info["sha256"]
    assert record.with_suffix(".safetensors").is_file()
    again = invoke("--task", "arithmetic", "--quiet")  # the rebuilt one now comes first
    row = next(line for line in again.output.splitlines() if "arithmetic" in line)
    assert "user cache" in row and info["sha256"][:12] in row


def test_ctrl_c_in_a_rebuild_says_how_to_continue(isolated_cache, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "warm_start", interrupted)
    result = invoke("--task", "countdown", "--rebuild", "--quiet")
    assert result.exit_code == 130
    assert "entropy-lab warm-start --task countdown --rebuild" in result.output
