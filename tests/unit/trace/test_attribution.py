"""Layer attribution of the jvp prediction: ground truths (one moving group, the sum, finite differences)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_jvp import _batch, _pg_loss

from entropy_lab.config import TrainConfig
from entropy_lab.errors import EntropyLabError
from entropy_lab.records import attribution_columns
from entropy_lab.stats import token_stats
from entropy_lab.studies.float64 import true_float64
from entropy_lab.trace import EntropyTracer
from entropy_lab.trace.attribution import layer_groups, parse_attribution
from entropy_lab.trace.probes import shifted_parameters
from entropy_lab.update_predict import predict_update

GROUPS = ["embedding", "block0.attn", "block0.mlp", "block1.attn", "block1.mlp", "norms", "lm_head"]


def _model(make_tiny_lm, **kw):
    return make_tiny_lm(vocab_size=48, seed=3, tie_word_embeddings=True, **kw).double().eval()


def _loss(model, ids, resp, adv):
    return _pg_loss(model(input_ids=ids).logits, ids, resp, adv)


def _warm_adamw(model, ids, resp, adv, steps=2):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    for _ in range(steps):
        opt.zero_grad()
        _loss(model, ids, resp, adv).backward()
        opt.step()
    return opt


def _traced(model, opt, ids, resp, adv, **kw):
    with EntropyTracer(model, jvp=True, attribution="layer", **kw).step(
        ids, None, resp, advantages=adv, optimizer=opt
    ) as st:
        opt.zero_grad()
        _loss(model, ids, resp, adv).backward()
        opt.step()
    return st.records


def test_groups_of_a_tied_qwen2_split_the_shared_embedding_by_use(make_tiny_lm):
    model = _model(make_tiny_lm)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    groups = layer_groups(model)
    assert list(groups) == GROUPS
    assert groups["lm_head"] == ["lm_head.weight"] and groups["embedding"] == ["model.embed_tokens.weight"]
    assert "model.layers.1.self_attn.q_proj.weight" in groups["block1.attn"]
    assert (
        "model.norm.weight" in groups["norms"] and "model.layers.0.input_layernorm.weight" in groups["norms"]
    )
    slots = [s for g in groups.values() for s in g]
    assert len(slots) == len(set(slots))


def test_groups_of_gpt2(make_tiny_lm):
    groups = layer_groups(make_tiny_lm("gpt2"))
    assert list(groups) == [
        "embedding",
        "block0.attn",
        "block0.mlp",
        "block1.attn",
        "block1.mlp",
        "norms",
        "lm_head",
    ]
    assert set(groups["embedding"]) == {"transformer.wte.weight", "transformer.wpe.weight"}


def test_parts_sum_to_the_jvp_prediction_under_adamw(make_tiny_lm):
    model = _model(make_tiny_lm)
    ids, resp, adv = _batch(48, B=6, T=10, P=3, seed=2)
    opt = _warm_adamw(model, ids, resp, adv)
    with true_float64(model):  # Qwen2's norms and rotary angles otherwise compute in float32
        df = _traced(model, opt, ids, resp, adv)
    parts = attribution_columns(df.columns, "layer")
    assert list(parts) == GROUPS
    total = df[list(parts.values())].sum(axis=1).to_numpy()
    jvp = df["omega_jvp"].to_numpy()
    np.testing.assert_allclose(total, jvp, rtol=1e-6, atol=1e-6 * np.abs(jvp).max())
    assert np.abs(total - jvp).max() <= 1e-10 * np.abs(jvp).max()  # exact in float64, not just 1e-6
    # every group moves the tokens here (no zero column), and no single group explains everything
    for column in parts.values():
        assert np.abs(df[column]).max() > 0
        assert not np.allclose(df[column], jvp)


def test_one_trainable_group_carries_the_whole_prediction(make_tiny_lm):
    model = _model(make_tiny_lm)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("model.layers.1.mlp."))
    ids, resp, adv = _batch(48, B=6, T=10, P=3, seed=2)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    df = _traced(model, opt, ids, resp, adv)
    parts = attribution_columns(df.columns, "layer")
    assert np.abs(df["omega_jvp"]).max() > 0
    np.testing.assert_allclose(df[parts["block1.mlp"]], df["omega_jvp"], rtol=1e-10, atol=0)
    for group, column in parts.items():
        if group != "block1.mlp":
            assert (df[column] == 0).all(), group


@pytest.mark.parametrize("group", ["block0.mlp", "norms", "block1.attn"])
def test_a_group_part_is_the_finite_difference_along_that_group(make_tiny_lm, group):
    model = _model(make_tiny_lm)
    with true_float64(model):  # finite differences at eps = 1e-4 need float64 round-off
        _finite_difference_check(model, group)


def _finite_difference_check(model, group):
    ids, resp, adv = _batch(48, B=6, T=10, P=3, seed=2)
    opt = _warm_adamw(model, ids, resp, adv)
    # The step about to be taken, restricted to the group's parameters (none of them tied).
    opt.zero_grad()
    _loss(model, ids, resp, adv).backward()
    params = {id(model.get_parameter(s)) for s in layer_groups(model)[group]}
    update = {p: d for p, d in predict_update(opt).items() if id(p) in params}
    b, t = resp.bool().nonzero(as_tuple=True)

    def entropy_at(eps):
        with shifted_parameters(model, update, eps), torch.no_grad():
            return token_stats(model(input_ids=ids).logits[b, t - 1]).entropy.double()

    eps = 1e-4
    fd = ((entropy_at(eps) - entropy_at(-eps)) / (2 * eps)).numpy()  # (n,)
    df = _traced(model, opt, ids, resp, adv)
    assert (df["sample"].to_numpy() == b.numpy()).all() and (df["position"].to_numpy() == t.numpy()).all()
    part = df[f"attr_layer:{group}"].to_numpy()
    assert np.abs(part).max() > 0
    np.testing.assert_allclose(part, fd, rtol=1e-5, atol=1e-7 * np.abs(fd).max())


def test_attribution_setting_is_validated():
    assert parse_attribution("none") == () and parse_attribution(None) == ()
    assert parse_attribution("layer") == ("layer",)
    with pytest.raises(EntropyLabError, match="valid: layer"):
        parse_attribution("layers")
    with pytest.raises(EntropyLabError, match="trace_attribution"):
        TrainConfig(trace_attribution="bogus").validate()
    assert TrainConfig(trace_attribution="layer").to_dict()["trace_attribution"] == "layer"


def test_trainer_records_the_setting_and_the_columns(
    tiny_policy_dir, tmp_path, isolated_cache, dense_reward, small_config
):
    from entropy_lab.records import load_records
    from entropy_lab.runs import RunDir
    from entropy_lab.trainer import Trainer

    cfg = small_config("grpo", tiny_policy_dir, steps=1, trace_jvp=True, trace_attribution="layer")
    Trainer(cfg, tmp_path / "run").train()
    (f,) = RunDir(tmp_path / "run").trace_files()
    df, meta = load_records(f)
    assert meta["trace_attribution"] == "layer"
    parts = attribution_columns(df.columns, "layer")
    assert {"embedding", "block0.attn", "block0.mlp", "norms", "lm_head"} == set(parts)
    total = df[list(parts.values())].sum(axis=1)
    # float32 training: the parts add up to omega_jvp to float32 round-off
    np.testing.assert_allclose(total, df["omega_jvp"], rtol=0, atol=1e-5 * np.abs(df["omega_jvp"]).max())
