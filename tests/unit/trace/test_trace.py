"""EntropyTracer on Hugging Face models: exactness, accumulation, padding, dropout, hooks, errors."""

import contextlib
import copy
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from torch.optim.optimizer import _global_optimizer_pre_hooks

from entropy_lab.errors import EntropyLabError
from entropy_lab.records import COLUMNS, load_records
from entropy_lab.stats import gather_logprobs
from entropy_lab.trace import EntropyTracer

B, T, P = 6, 12, 5  # rows, length, prompt length


def batch(vocab=64, seed=0, left_pad=False):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    attn = torch.ones(B, T, dtype=torch.long)
    resp = torch.zeros(B, T, dtype=torch.long)
    resp[:, P:] = 1
    lengths = torch.tensor([T, T - 3, T - 1, T - 4, T, T - 2])
    for b, L in enumerate(lengths.tolist()):
        pad = T - L
        if left_pad:  # pad on the left: shift the real tokens right
            ids[b] = torch.cat([torch.zeros(pad, dtype=torch.long), ids[b, :L]])
            attn[b, :pad] = 0
            resp[b] = 0
            resp[b, pad + P :] = 1
        else:
            ids[b, L:] = 0
            attn[b, L:] = 0
            resp[b, L:] = 0
    adv = torch.randn(B, generator=g)
    return ids, attn, resp, adv


def pg_loss(logits, ids, resp, adv, n_tokens):
    lp = gather_logprobs(logits[:, :-1], ids[:, 1:])  # (b, T-1)
    mask = resp[:, 1:].float()
    return -(adv[:, None] * lp * mask).sum() / n_tokens


def naive_entropy(model, ids, attn, rows, pos):
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn).logits.double()
    logp = logits[rows, pos - 1].log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


@pytest.fixture
def sgd_update(make_tiny_lm):
    """``sgd_update(seed, lr=0.1, config=None, **step_kw)``: a context manager yielding the open step.

    It traces one SGD step of ``make_tiny_lm(seed=seed)`` on ``batch(seed=seed)`` with the full-batch
    token-mean ``pg_loss``; the test's body runs after ``opt.step()``, inside the traced step.
    """

    @contextlib.contextmanager
    def update(seed: int, lr: float = 0.1, config: dict | None = None, **step_kw):
        model = make_tiny_lm(seed=seed)
        ids, attn, resp, adv = batch(seed=seed)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        with EntropyTracer(model, config=config).step(ids, attn, resp, advantages=adv, **step_kw) as step:
            pg_loss(model(input_ids=ids, attention_mask=attn).logits, ids, resp, adv, resp.sum()).backward()
            opt.step()
            yield step

    return update


@pytest.mark.parametrize("left_pad", [False, True])
def test_delta_entropy_matches_independent_recomputation(left_pad, make_tiny_lm):
    model = make_tiny_lm()
    ids, attn, resp, adv = batch(left_pad=left_pad)
    before = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with EntropyTracer(model).step(ids, attn, resp, advantages=adv) as step:
        out = model(input_ids=ids, attention_mask=attn)
        pg_loss(out.logits, ids, resp, adv, resp.sum()).backward()
        opt.step()
    df = step.records
    assert list(df.columns) == [*COLUMNS, "omega_paper_appendix"]  # contract, then registered extras
    assert len(df) == int(resp.sum())
    rows, pos = torch.tensor(df["sample"].to_numpy()), torch.tensor(df["position"].to_numpy())
    h0 = naive_entropy(before, ids, attn, rows, pos).numpy()
    h1 = naive_entropy(model, ids, attn, rows, pos).numpy()
    np.testing.assert_allclose(df.entropy_before, h0, atol=1e-5)
    np.testing.assert_allclose(df.entropy_after, h1, atol=1e-5)
    np.testing.assert_allclose(df.delta_entropy, h1 - h0, atol=1e-5)
    assert np.abs(df.delta_entropy).max() > 1e-4  # the step did move entropy
    assert (df.lr == 1e-2).all()  # read from the optimizer
    assert np.isfinite(df.omega_logit_grad).all()
    assert (df.normalizer == int(resp.sum())).all()


def test_gradient_accumulation_equals_one_batch(make_tiny_lm):
    ids, attn, resp, adv = batch(seed=1)
    n_tok = resp.sum()
    results = []
    for micro in (B, 2):
        model = make_tiny_lm(seed=3)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        with EntropyTracer(model).step(ids, attn, resp, advantages=adv) as step:
            for s in range(0, B, micro):
                sl = slice(s, s + micro)
                logits = model(input_ids=ids[sl], attention_mask=attn[sl]).logits
                pg_loss(logits, ids[sl], resp[sl], adv[sl], n_tok).backward()
            opt.step()
        results.append(step.records)
    full, acc = results
    for col in ("entropy_before", "delta_entropy", "omega_logit_grad", "omega_softmax", "delta_logit_linear"):
        np.testing.assert_allclose(full[col], acc[col], atol=1e-6, rtol=1e-5, err_msg=col)


def test_logit_grad_equals_softmax_for_weighted_logprob_loss_with_sgd(sgd_update):
    with sgd_update(seed=4, lr=0.1) as step:
        pass
    df = step.records
    np.testing.assert_allclose(df.omega_logit_grad, df.omega_softmax, rtol=1e-4, atol=1e-9)


def test_dropout_measures_both_sides_in_eval_mode(make_tiny_lm):
    model = make_tiny_lm(dropout=0.3, family="gpt2")
    model.train()
    ids, attn, resp, adv = batch(seed=5)
    before = copy.deepcopy(model).eval()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with EntropyTracer(model).step(ids, attn, resp, advantages=adv) as step:
        pg_loss(model(input_ids=ids, attention_mask=attn).logits, ids, resp, adv, resp.sum()).backward()
        opt.step()
    assert model.training  # the mode is restored
    df = step.records
    rows, pos = torch.tensor(df["sample"].to_numpy()), torch.tensor(df["position"].to_numpy())
    np.testing.assert_allclose(df.entropy_before, naive_entropy(before, ids, attn, rows, pos), atol=1e-5)
    np.testing.assert_allclose(df.entropy_after, naive_entropy(model.eval(), ids, attn, rows, pos), atol=1e-5)


def test_sampled_positions_are_exact_and_reproducible(make_tiny_lm):
    ids, attn, resp, adv = batch(seed=6)
    full_model, model = make_tiny_lm(seed=6), make_tiny_lm(seed=6)
    frames = []
    for m, cap in ((full_model, None), (model, 7)):
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        with EntropyTracer(m, max_positions=cap, seed=1).step(ids, attn, resp, advantages=adv) as step:
            pg_loss(m(input_ids=ids, attention_mask=attn).logits, ids, resp, adv, resp.sum()).backward()
            opt.step()
        frames.append(step.records)
    full, sampled = frames
    assert len(sampled) == 7
    merged = sampled.merge(full, on=["sample", "position"], suffixes=("", "_full"))
    assert len(merged) == 7
    np.testing.assert_allclose(merged.delta_entropy, merged.delta_entropy_full, atol=1e-6)
    np.testing.assert_allclose(merged.omega_logit_grad, merged.omega_logit_grad_full, rtol=1e-5, atol=1e-9)


def test_rows_never_forwarded_are_measured_before_the_step(make_tiny_lm):
    model = make_tiny_lm(seed=7)
    ids, attn, resp, adv = batch(seed=7)
    before = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with EntropyTracer(model).step(ids, attn, resp, advantages=adv) as step:
        pg_loss(
            model(input_ids=ids[:2], attention_mask=attn[:2]).logits, ids[:2], resp[:2], adv[:2], 10
        ).backward()
        opt.step()
    df = step.records
    rows, pos = torch.tensor(df["sample"].to_numpy()), torch.tensor(df["position"].to_numpy())
    np.testing.assert_allclose(df.entropy_before, naive_entropy(before, ids, attn, rows, pos), atol=1e-5)
    assert df.loc[df["sample"] >= 2, "omega_logit_grad"].isna().all()  # no gradient reached them
    assert df.loc[df["sample"] < 2, "omega_logit_grad"].notna().all()


def test_zero_advantages_give_zero_deltas_and_a_warning(make_tiny_lm):
    model = make_tiny_lm(seed=8)
    ids, attn, resp, _ = batch(seed=8)
    adv = torch.zeros(B)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with pytest.warns(UserWarning, match="unchanged"):
        with EntropyTracer(model).step(ids, attn, resp, advantages=adv) as step:
            pg_loss(model(input_ids=ids, attention_mask=attn).logits, ids, resp, adv, resp.sum()).backward()
            opt.step()
    df = step.records
    assert len(df) == int(resp.sum())
    assert (df.delta_entropy == 0).all() and (df.delta_logit_linear == 0).all()
    assert (df.omega_softmax == 0).all()


def _hook_count(model):
    return len(model._forward_hooks) + len(_global_optimizer_pre_hooks)


def test_hooks_removed_after_exception_and_when_nested(make_tiny_lm):
    model = make_tiny_lm(seed=9)
    ids, attn, resp, adv = batch(seed=9)
    base = _hook_count(model)
    with pytest.raises(RuntimeError, match="boom"):
        with EntropyTracer(model).step(ids, attn, resp, advantages=adv):
            model(input_ids=ids, attention_mask=attn)
            raise RuntimeError("boom")
    assert _hook_count(model) == base
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with EntropyTracer(model).step(ids, attn, resp, advantages=adv) as outer:
        with EntropyTracer(model, max_positions=3).step(ids, attn, resp, advantages=adv) as inner:
            assert _hook_count(model) == base + 4
            pg_loss(model(input_ids=ids, attention_mask=attn).logits, ids, resp, adv, resp.sum()).backward()
            opt.step()
        assert _hook_count(model) == base + 2
    assert _hook_count(model) == base
    merged = inner.records.merge(outer.records, on=["sample", "position"], suffixes=("", "_o"))
    np.testing.assert_allclose(merged.delta_entropy, merged.delta_entropy_o, atol=1e-6)


def test_bad_inputs_give_one_clear_error(make_tiny_lm):
    model = make_tiny_lm(seed=10)
    ids, attn, resp, adv = batch(seed=10)
    tracer = EntropyTracer(model)
    cases = [
        (dict(attention_mask=attn[:, :-1]), "attention_mask must have shape"),
        (dict(response_mask=torch.zeros_like(resp)), "selects no tokens"),
        (dict(advantages=torch.zeros(B + 1)), "advantages must have shape"),
        (dict(old_logprobs=torch.zeros(B)), "old_logprobs must have shape"),
    ]
    for override, message in cases:
        kw = dict(attention_mask=attn, response_mask=resp, advantages=adv) | override
        with pytest.raises(EntropyLabError, match=message):
            with tracer.step(ids, kw.pop("attention_mask"), kw.pop("response_mask"), **kw):
                pass
    with pytest.raises(EntropyLabError, match="output embeddings"):
        EntropyTracer(model.model)  # the base model has no LM head
    with torch.no_grad():
        model.lm_head.weight[5] = float("nan")  # every position's logits now hold a NaN
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(EntropyLabError, match=r"NaN/\+inf .* at sample 0, position 5"):
        with tracer.step(ids, attn, resp, advantages=adv):
            model(input_ids=ids, attention_mask=attn)
            opt.step()


def test_records_save_and_load_with_config(tmp_path, sgd_update):
    with sgd_update(seed=11, lr=0.1, config={"method": "grpo", "lr": 0.1}, step=3, update=1) as step:
        step.annotate(clip_indicator=torch.ones(B, T), intervention_weight=torch.full((B, T), 0.5))
    step.save(tmp_path / "t.parquet")
    df, cfg = load_records(tmp_path / "t.parquet")
    assert cfg == {"method": "grpo", "lr": 0.1}
    assert (df["step"] == 3).all() and (df["update"] == 1).all()
    assert (df.intervention_weight == 0.5).all()
    np.testing.assert_allclose(df.weight, df.ratio * df.advantage * 0.5 / df.normalizer)
    pd.testing.assert_frame_equal(df, step.records)
    df.drop(columns=["omega_paper"]).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(EntropyLabError, match="lacks trace column"):
        load_records(tmp_path / "bad.parquet")


def test_no_optimizer_step_warns(make_tiny_lm):
    model = make_tiny_lm(seed=12)
    ids, attn, resp, adv = batch(seed=12)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with EntropyTracer(model).step(ids, attn, resp, advantages=adv) as step:
            pass
    assert any("no optimizer step" in str(w.message) for w in caught)
    assert (step.records.delta_entropy == 0).all()


def test_post_update_nan_names_the_right_token():
    from entropy_lab.tabular import TabularPolicy

    model = TabularPolicy(7, max_states=32, dtype=torch.float32)
    ids = torch.tensor([[1, 2, 3, 4], [1, 5, 6, 2], [3, 3, 3, 3]])
    resp = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1]])
    state = model.state_ids(ids)[1, 2]  # logits at (sample 1, position 2) predict position 3
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(EntropyLabError, match="post-update logits .* at sample 1, position 3"):
        with EntropyTracer(model).step(ids, None, resp, advantages=torch.ones(3)):
            model(input_ids=ids).logits.sum().backward()
            opt.step()
            with torch.no_grad():
                model.head.weight[state] = float("nan")  # the update broke one state


def test_take_rows_is_a_view_for_a_run_of_rows_and_a_copy_otherwise():
    from entropy_lab.trace import take_rows

    x = torch.arange(20.0).reshape(10, 2)
    run = take_rows(x, torch.tensor([3, 4, 5]))
    assert torch.equal(run, x[3:6]) and run.data_ptr() == x[3].data_ptr()
    scattered = take_rows(x, torch.tensor([5, 3, 4]))
    assert torch.equal(scattered, x[[5, 3, 4]]) and scattered.data_ptr() != x[5].data_ptr()
    assert take_rows(x, torch.tensor([], dtype=torch.long)).shape == (0, 2)


def test_annotations_scalar_rows_and_shape_errors(sgd_update):
    with sgd_update(seed=13, lr=0.1) as step:
        step.annotate(intervention_weight=0.5)  # every row
        step.annotate(rows=[1, 2], intervention_weight=0.25, clip_indicator=torch.zeros(2, T))
        with pytest.raises(EntropyLabError, match="must be \\(rows, T\\)"):
            step.annotate(rows=[1], normalizer=torch.ones(2, T))
        with pytest.raises(EntropyLabError, match="unknown annotation"):
            step.annotate(weight=1.0)
    df = step.records
    rows12 = df["sample"].isin([1, 2])
    assert (df.loc[rows12, "intervention_weight"] == 0.25).all() and (
        df.loc[~rows12, "intervention_weight"] == 0.5
    ).all()
    assert (df.loc[rows12, "clip_indicator"] == 0).all() and (df.loc[~rows12, "clip_indicator"] == 1).all()
    assert (df.loc[rows12, "weight"] == 0).all()


def test_given_optimizer_is_hooked_instead_of_the_global_pre_step_hook(make_tiny_lm):
    model = make_tiny_lm(seed=14)
    ids, attn, resp, adv = batch(seed=14)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    other = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.3)
    n_global = len(_global_optimizer_pre_hooks)
    with EntropyTracer(model).step(ids, attn, resp, advantages=adv, optimizer=opt) as step:
        assert len(_global_optimizer_pre_hooks) == n_global and len(opt._optimizer_step_pre_hooks) == 1
        pg_loss(model(input_ids=ids, attention_mask=attn).logits, ids, resp, adv, resp.sum()).backward()
        other.step()  # another optimizer's step is not the traced one
        opt.step()
    assert len(opt._optimizer_step_pre_hooks) == 0
    assert step.n_optimizer_steps == 1 and (step.records.lr == 0.1).all()
    # The global fallback counts every optimizer's step: the other one's learning rate is read.
    model2 = make_tiny_lm(seed=14)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match="2 optimizer steps"):
        with EntropyTracer(model2).step(ids, attn, resp, advantages=adv) as fallback:
            pg_loss(model2(input_ids=ids, attention_mask=attn).logits, ids, resp, adv, resp.sum()).backward()
            other.step()
            opt2.step()
    assert (fallback.records.lr == 0.3).all()
    pd.testing.assert_series_equal(fallback.records.delta_entropy, step.records.delta_entropy)
