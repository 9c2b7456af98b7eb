"""The embedded policy: warm start caching and RNG hygiene, and the real loading path."""

import torch

from entropy_lab.models import WarmStartSpec, load_policy, warm_start
from entropy_lab.tasks import get_task

SPEC = WarmStartSpec(batch_size=8, max_steps=3, check_every=2, probe_prompts=4, target_pass=1.1)


def test_warm_start_is_cached_and_leaves_the_global_rng_alone(tmp_path, monkeypatch, tiny_spec):
    monkeypatch.setenv("ENTROPY_LAB_CACHE", str(tmp_path))
    task = get_task("arithmetic")
    torch.manual_seed(123)
    state = torch.get_rng_state()
    model, tok, info = warm_start(task, SPEC, tiny_spec)
    assert torch.equal(torch.get_rng_state(), state)  # a run must not depend on the cache state
    assert info["steps"] == 3 and 0 <= info["pass@1"] <= 1 and info["entropy"] > 0
    again, tok2, info2 = warm_start(task, SPEC, tiny_spec)  # from the cache
    assert info2 == info
    for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    text = "12+34="
    assert (
        tok2(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    )


def test_character_tokenizer_survives_a_model_directory(tmp_path, tiny_spec):
    """AutoTokenizer would pick the model type's tokenizer class; spaces must still be tokens."""
    from entropy_lab.models import build_tiny_policy
    from entropy_lab.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer(get_task("countdown").alphabet())
    build_tiny_policy(tok, tiny_spec).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    _, loaded = load_policy(tmp_path)
    text = "3 4 2>14:"
    assert (
        loaded(text, add_special_tokens=False)["input_ids"]
        == tok(text, add_special_tokens=False)["input_ids"]
    )
    assert loaded.decode(loaded(text, add_special_tokens=False)["input_ids"]) == text
