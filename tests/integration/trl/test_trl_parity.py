"""Parity of the project's compute_loss with TRL's own GRPO loss, through TRL's ``_compute_loss``.

For every TRL loss_type the project maps, a plain ``trl.GRPOTrainer`` and a ``TracedGRPOTrainer``
running the equivalent catalogue method compute the loss of the same prepared micro-batch
(random advantages, old log-probs perturbed so that both clip sides and the dual clip fire,
gradient accumulation over 2 micro-batches) on two copies of one tiny model: the losses and
every parameter gradient must agree.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")

from trl import GRPOTrainer  # noqa: E402
from trl_common import count_reward, dataset, grpo_args, tiny_model_dir  # noqa: E402

from entropy_lab.errors import EntropyLabError  # noqa: E402
from entropy_lab.integrations.trl import TracedGRPOTrainer  # noqa: E402

CASES = [
    # (TRL settings, catalogue method, method overrides)
    ({"loss_type": "grpo"}, "grpo", {}),
    ({"loss_type": "bnpo"}, "grpo", {}),
    ({"loss_type": "dr_grpo"}, "grpo", {}),
    ({"loss_type": "dapo"}, "grpo", {}),
    ({"loss_type": "luspo"}, "grpo", {}),
    ({"loss_type": "dapo", "epsilon_high": 0.28}, "clip-higher", {}),
    ({"loss_type": "dapo", "delta": 3.0}, "dual-clip", {}),
    ({"loss_type": "grpo", "beta": 0.001, "use_bias_correction_kl": False}, "kl", {}),
    # GRPOConfig values the user set win over the method's preset (warned), as TRL reads them
    ({"loss_type": "grpo", "epsilon": 0.05}, "grpo", {}),
    ({"loss_type": "dapo", "epsilon_high": 0.4}, "clip-higher", {}),
    ({"loss_type": "dapo", "epsilon": 0.1, "delta": 2.0}, "dual-clip", {}),
    ({"loss_type": "grpo", "beta": 0.02, "use_bias_correction_kl": False}, "kl", {}),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny"))


LOG_RATIOS = torch.tensor([-1.0, -0.1, 0.1, 0.22, 0.5, 1.3])
"""log r per token, cycled over positions: low clip (r 0.37), inside, between 1.2 and 1.28 (clip-higher
matters), high clip (1.65) and beyond the dual-clip bound 3 (3.67)."""


def _inputs(trainer, seed: int = 0) -> dict:
    """A prepared micro-batch as TRL's _prepare_inputs returns it (B=8, prompt 5, completion 6)."""
    g = torch.Generator().manual_seed(seed)
    B, P, C = 8, 5, 6
    V = trainer.model.config.vocab_size
    prompt_ids = torch.randint(4, V, (B, P), generator=g)
    completion_ids = torch.randint(4, V, (B, C), generator=g)
    lengths = torch.tensor([6, 4, 5, 2, 6, 6, 3, 5])
    completion_mask = (torch.arange(C)[None] < lengths[:, None]).long()
    inputs = {
        "prompt_ids": prompt_ids,
        "prompt_mask": torch.ones_like(prompt_ids),
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": torch.tensor([1.2, -0.7, 0.4, -1.5, 0.9, -1.1, 0.3, -0.2]),
        "num_items_in_batch": completion_mask.sum() * 3,  # a generation batch larger than this micro-batch
    }
    with torch.no_grad():
        ids = torch.cat([prompt_ids, completion_ids], 1)
        attn = torch.cat([inputs["prompt_mask"], completion_mask], 1)
        logps, _, _ = GRPOTrainer._get_per_token_logps_and_entropies(trainer, trainer.model, ids, attn, C)
    shift = (torch.arange(B)[:, None] + torch.arange(C)[None]) % len(LOG_RATIOS)  # (B, C)
    inputs["old_per_token_logps"] = logps - LOG_RATIOS[shift]
    if trainer.beta != 0.0:
        inputs["ref_per_token_logps"] = logps + torch.empty(B, C).uniform_(-0.5, 0.5, generator=g)
    return inputs


def _loss_and_grads(trainer, loss_fn, inputs):
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 2
    loss = loss_fn(trainer.model, inputs)
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params)
    return loss.detach(), grads


def _case_id(case) -> str:
    settings, method, _ = case
    extra = "".join(f"-{k}{v}" for k, v in settings.items() if k in ("epsilon", "epsilon_high", "delta"))
    return f"{settings['loss_type']}-{method}{extra}"


@pytest.mark.filterwarnings("ignore:method .* runs with GRPOConfig's")
@pytest.mark.parametrize("settings,method,overrides", CASES, ids=[_case_id(c) for c in CASES])
def test_compute_loss_matches_trl(model_dir, tmp_path, settings, method, overrides):
    args = grpo_args(tmp_path / "trl", gradient_accumulation_steps=2, **settings)
    trl_trainer = GRPOTrainer(
        model=str(model_dir),
        reward_funcs=count_reward,
        args=args,
        train_dataset=dataset(),
        processing_class=None,
    )
    ours = TracedGRPOTrainer(
        model=str(model_dir),
        reward_funcs=count_reward,
        args=grpo_args(tmp_path / "ours", gradient_accumulation_steps=2, **settings),
        train_dataset=dataset(),
        method=method,
        method_overrides=overrides,
    )
    inputs = _inputs(trl_trainer)
    loss_trl, g_trl = _loss_and_grads(trl_trainer, trl_trainer._compute_loss, inputs)
    loss_ours, g_ours = _loss_and_grads(ours, ours._compute_loss, inputs)
    assert float(loss_trl.abs()) > 1e-4  # a loss that is not trivially zero
    loss_diff = float((loss_trl - loss_ours).abs())
    grad_diff = max(float((a - b).abs().max()) for a, b in zip(g_trl, g_ours, strict=True))
    grad_scale = max(float(a.abs().max()) for a in g_trl)
    print(
        f"{settings} {method}: |dloss| {loss_diff:.2e}, max |dgrad| {grad_diff:.2e} (max |grad| {grad_scale:.2e})"
    )
    assert loss_diff <= 1e-6 * max(1.0, float(loss_trl.abs()))
    assert grad_diff <= 1e-5 * grad_scale


def test_users_epsilon_wins_over_the_preset_with_a_warning(model_dir, tmp_path):
    """epsilon=0.05 with method='grpo' (preset 0.2 / 0.2): TRL's 0.05 on both sides runs and is recorded."""
    from entropy_lab.errors import EntropyLabWarning

    with pytest.warns(EntropyLabWarning, match=r"epsilon=0.05 \(its preset: clip_eps_low=0.2\)") as record:
        t = TracedGRPOTrainer(
            model=str(model_dir), reward_funcs=count_reward, args=grpo_args(tmp_path, epsilon=0.05),
            train_dataset=dataset(), method="grpo",
        )  # fmt: skip
    ours = [str(w.message) for w in record if issubclass(w.category, EntropyLabWarning)]
    assert len(ours) == 1 and "epsilon_high (unset, so epsilon)=0.05" in ours[0]
    assert (t._el_cfg.clip_eps_low, t._el_cfg.clip_eps_high) == (0.05, 0.05)
    assert t._record_cfg.clip_eps_low == 0.05  # what config.json records


def test_clipping_fires_in_the_parity_batch(model_dir, tmp_path):
    """The parity batch exercises clipping: otherwise the comparison above would not test it."""
    t = GRPOTrainer(
        model=str(model_dir),
        reward_funcs=count_reward,
        args=grpo_args(tmp_path, delta=3.0),
        train_dataset=dataset(),
    )
    inputs = _inputs(t)
    with torch.no_grad():
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
        logps, _, _ = GRPOTrainer._get_per_token_logps_and_entropies(t, t.model, ids, attn, 6)
    r = (logps - inputs["old_per_token_logps"]).exp()  # (B, C)
    valid = inputs["completion_mask"].bool()
    pos, neg = valid & (inputs["advantages"][:, None] > 0), valid & (inputs["advantages"][:, None] < 0)
    assert (r[neg] > 3.0).any() and (r[neg] < 0.8).any() and (r[pos] > 1.28).any()
    assert ((r[pos] > 1.2) & (r[pos] < 1.28)).any()


@pytest.mark.parametrize(
    "method,settings", [("dual-clip", {}), ("clip-higher", {}), ("grpo", {"loss_type": "bnpo"})]
)
def test_parity_check_detects_a_different_loss(model_dir, tmp_path, method, settings):
    """The comparison can fail: a method that differs from TRL's settings gives other gradients."""
    kw = {"gradient_accumulation_steps": 2, "loss_type": "dapo"} | settings
    trl_trainer = GRPOTrainer(
        model=str(model_dir), reward_funcs=count_reward, args=grpo_args(tmp_path / "a", **{**kw, "loss_type": "dapo"}),
        train_dataset=dataset(),
    )  # fmt: skip
    ours = TracedGRPOTrainer(
        model=str(model_dir), reward_funcs=count_reward, args=grpo_args(tmp_path / "b", **kw),
        train_dataset=dataset(), method=method,
    )  # fmt: skip
    inputs = _inputs(trl_trainer)
    _, g_trl = _loss_and_grads(trl_trainer, trl_trainer._compute_loss, inputs)
    g_trl = [g.clone() for g in g_trl]
    _, g_ours = _loss_and_grads(ours, ours._compute_loss, inputs)
    assert max(float((a - b).abs().max()) for a, b in zip(g_trl, g_ours, strict=True)) > 1e-4


def test_unmapped_loss_type_is_one_clear_error(model_dir, tmp_path):
    with pytest.raises(EntropyLabError, match="loss_type 'cispo' has no counterpart"):
        TracedGRPOTrainer(
            model=str(model_dir), reward_funcs=count_reward, args=grpo_args(tmp_path, loss_type="cispo"),
            train_dataset=dataset(), method="steer",
        )  # fmt: skip


@pytest.mark.parametrize(
    "method,overrides,settings,match",
    [
        ("steer", {"steer_estimator": "softmax"}, {}, "needs collision"),
        ("unlikeliness", {}, {}, "cannot run inside TRL's loss"),
        ("steer", {}, {"top_entropy_quantile": 0.2}, "top_entropy_quantile"),
        ("steer", {"loss_agg": "token-mean"}, {}, r"cannot set loss_agg \(GRPOConfig's loss_type\)"),
        ("nope", {}, {}, "unknown method 'nope'"),
    ],
)
def test_methods_needing_what_trl_lacks_are_refused(model_dir, tmp_path, method, overrides, settings, match):
    with pytest.raises(EntropyLabError, match=match):
        TracedGRPOTrainer(
            model=str(model_dir), reward_funcs=count_reward, args=grpo_args(tmp_path, **settings),
            train_dataset=dataset(), method=method, method_overrides=overrides,
        )  # fmt: skip


def test_trl_version_outside_range_is_one_clear_error():
    from entropy_lab.integrations.trl import check_trl_version

    with pytest.raises(EntropyLabError, match=r"TRL 0.19.0 is outside the supported range >=1.16,<1.17"):
        check_trl_version("0.19.0")
    assert check_trl_version("1.16.0") == "1.16.0"
