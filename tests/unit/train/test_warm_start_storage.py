"""A warm start in training checkpoints itself and resumes; exported assets load as the cached one."""

import hashlib
import json

import pytest
import torch

from entropy_lab.errors import EntropyLabError, EntropyLabWarning
from entropy_lab.models import WarmStartSpec, export_warm_start, load_policy, locate_warm_start, warm_start
from entropy_lab.tasks import get_task

# 7 steps, a pass@1 check at 3 and 6 that never stops it, a checkpoint every 2 steps
SPEC = WarmStartSpec(batch_size=8, max_steps=7, check_every=3, probe_prompts=4, target_pass=1.1)


class Crash(Exception):
    pass


def crash_at(step: int, seen: list):
    def progress(info):
        s = info["step"]
        seen.append(s)
        if s == step:
            raise Crash

    return progress


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name, value in sa.items():
        assert torch.equal(value, sb[name]), name


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_spec):
    """The uninterrupted tiny warm start (no checkpoint written: every step > max_steps)."""
    cache = tmp_path_factory.mktemp("reference")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ENTROPY_LAB_CACHE", str(cache))
        model, tok, info = warm_start(get_task("arithmetic"), SPEC, tiny_spec, checkpoint_every=100)
    return model, info, cache


def test_a_killed_warm_start_resumes_from_its_checkpoint_to_the_uninterrupted_weights(
    reference, isolated_cache, tiny_spec
):
    ref_model, ref_info, _ = reference
    task = get_task("arithmetic")
    seen: list = []
    with pytest.raises(Crash):  # killed in step 5, after the step-4 checkpoint and the step-3 check
        warm_start(task, SPEC, tiny_spec, progress=crash_at(5, seen), checkpoint_every=2)
    found = locate_warm_start(task, SPEC, tiny_spec)
    assert found.source == "build"  # nothing is cached as done
    ckpt = isolated_cache / "warmstart" / f"{found.name}.resume.pt"
    state = torch.load(ckpt, weights_only=True)
    assert state["step"] == 4 and state["info"]["steps"] == 3

    resumed: list = []
    model, _, info = warm_start(
        task, SPEC, tiny_spec, progress=lambda info: resumed.append(info["step"]), checkpoint_every=2
    )
    assert resumed == [5, 6, 7]  # continued after the checkpoint, not from step 1
    assert_same_weights(model, ref_model)
    assert info["sha256"] == ref_info["sha256"] and info["pass@1"] == ref_info["pass@1"]
    assert info["steps"] == ref_info["steps"] == 7
    assert not ckpt.exists()  # the finished warm start leaves no checkpoint behind


def test_a_damaged_checkpoint_is_set_aside_and_the_warm_start_begins_again(
    reference, isolated_cache, tiny_spec
):
    ref_model, _, _ = reference
    task = get_task("arithmetic")
    found = locate_warm_start(task, SPEC, tiny_spec)
    ckpt = isolated_cache / "warmstart" / f"{found.name}.resume.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"not a checkpoint")
    seen: list = []
    with pytest.warns(EntropyLabWarning, match="cannot be read"):
        model, _, _ = warm_start(task, SPEC, tiny_spec, progress=lambda info: seen.append(info["step"]))
    assert seen[0] == 1
    assert_same_weights(model, ref_model)
    assert (ckpt.parent / (ckpt.name + ".damaged")).read_bytes() == b"not a checkpoint"  # kept, not deleted


def test_an_exported_asset_is_found_after_the_cache_and_loads_as_the_cached_weights(
    reference, tmp_path, monkeypatch, tiny_spec
):
    ref_model, ref_info, cache = reference
    task = get_task("arithmetic")
    monkeypatch.setenv("ENTROPY_LAB_CACHE", str(cache))
    assets = tmp_path / "assets"
    record_path = export_warm_start(task, assets, SPEC, tiny_spec)
    record = json.loads(record_path.read_text())
    weights = record_path.with_name(record["file"])
    assert record["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest() == ref_info["sha256"]
    assert record["steps"] == 7 and record["seed"] == SPEC.seed and record["pass@1"] == ref_info["pass@1"]
    assert locate_warm_start(task, SPEC, tiny_spec, assets).source == "cache"  # a rebuilt one comes first

    monkeypatch.setenv("ENTROPY_LAB_CACHE", str(tmp_path / "empty"))
    assert locate_warm_start(task, SPEC, tiny_spec, assets).source == "shipped"
    torch.manual_seed(7)
    rng = torch.get_rng_state()
    model, tok, info = warm_start(task, SPEC, tiny_spec, asset_dir=assets, progress=pytest.fail)
    assert torch.equal(torch.get_rng_state(), rng)
    assert info["asset"] == str(record_path) and info["pass@1"] == ref_info["pass@1"]
    assert_same_weights(model, ref_model)
    ids = torch.tensor([tok("12+34=", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref_model(input_ids=ids).logits)
    assert not (tmp_path / "empty" / "warmstart").exists()  # loading a shipped asset writes nothing

    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")  # one byte changed
    with pytest.raises(EntropyLabError, match="does not match the SHA-256") as err:
        warm_start(task, SPEC, tiny_spec, asset_dir=assets)
    assert "\n" not in str(err.value)


def test_export_refuses_without_a_cached_warm_start_and_never_replaces_a_foreign_file(
    reference, tmp_path, monkeypatch, tiny_spec
):
    _, _, cache = reference
    task = get_task("arithmetic")
    monkeypatch.setenv("ENTROPY_LAB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(EntropyLabError, match="no cached warm start"):
        export_warm_start(task, tmp_path / "assets", SPEC, tiny_spec)
    monkeypatch.setenv("ENTROPY_LAB_CACHE", str(cache))
    name = locate_warm_start(task, SPEC, tiny_spec).name
    foreign = tmp_path / "assets" / f"{name}.json"
    foreign.parent.mkdir()
    foreign.write_text('{"mine": true}')
    with pytest.raises(EntropyLabError, match="not a warm start entropy-lab wrote"):
        export_warm_start(task, tmp_path / "assets", SPEC, tiny_spec)
    assert foreign.read_text() == '{"mine": true}'


def test_the_cached_entry_still_loads_as_a_model_directory(reference):
    ref_model, ref_info, _ = reference
    model, _ = load_policy(ref_info["cache_dir"])
    assert_same_weights(model, ref_model)
