"""entropy-lab losses through verl's own policy-loss registry and actor loss function.

Every loss is fetched with verl's ``get_policy_loss_fn`` and called with verl's ``ActorConfig``
as verl's ``ppo_loss`` calls it; the reference is the project's ``compute_loss`` with a
TrainConfig written out here, and, where verl has the same method, verl's own loss.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("verl")

from verl.trainer.ppo.core_algos import get_policy_loss_fn  # noqa: E402
from verl.workers.config import ActorConfig, PolicyLossConfig  # noqa: E402

from entropy_lab.errors import EntropyLabError  # noqa: E402
from entropy_lab.integrations import verl as ev  # noqa: E402
from entropy_lab.methods import resolve_config  # noqa: E402
from entropy_lab.objectives import LossInputs, compute_loss  # noqa: E402

B, T = 5, 7
AGG_MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


def make_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 3, 5, 1, 6])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()  # (B, T)
    logprob = (-torch.rand(B, T, generator=g) * 3).requires_grad_()  # (B, T)
    old = logprob.detach() + 0.4 * torch.randn(B, T, generator=g)  # ratios on both sides of the clip
    adv = torch.tensor([1.2, -0.7, 0.4, -1.5, 0.9])[:, None].expand(B, T).clone()  # (B, T)
    entropy = torch.rand(B, T, generator=g) * 2  # (B, T)
    return logprob, old, adv, mask, entropy


def actor_config(loss_mode: str, agg: str = "token-mean", **kw) -> ActorConfig:
    pl = {k: kw.pop(k) for k in list(kw) if k in PolicyLossConfig.__dataclass_fields__}
    return ActorConfig(
        strategy="fsdp",
        rollout_n=1,
        ppo_micro_batch_size_per_gpu=1,
        loss_agg_mode=agg,
        policy_loss=PolicyLossConfig(loss_mode=loss_mode, **pl),
        **kw,
    )


def call_verl(name: str, config: ActorConfig, logprob, old, adv, mask):
    """As verl's ppo_loss calls a registered policy loss."""
    fn = get_policy_loss_fn(name)
    loss, metrics = fn(
        old_log_prob=old,
        log_prob=logprob,
        advantages=adv,
        response_mask=mask.bool(),
        loss_agg_mode=config.loss_agg_mode,
        config=config,
        rollout_is_weights=None,
    )
    (grad,) = torch.autograd.grad(loss, logprob)
    return loss.detach(), grad, metrics


def call_project(cfg, logprob, old, adv, mask, entropy=None, num_tokens=None, num_seqs=None):
    out = compute_loss(
        LossInputs(
            logprob,
            old,
            adv,
            mask,
            entropy=entropy,
            old_entropy=entropy,
            num_tokens=num_tokens,
            num_seqs=num_seqs,
        ),
        cfg,
    )
    (grad,) = torch.autograd.grad(out.loss, logprob)
    return out.loss.detach(), grad


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("global_info", [False, True])
def test_ppo_equals_verl_vanilla_and_compute_loss(agg, global_info):
    logprob, old, adv, mask, _ = make_batch()
    config = actor_config("entropy_lab.ppo", agg, clip_ratio_high=0.28, clip_ratio_c=3.0)
    vanilla = actor_config("vanilla", agg, clip_ratio_high=0.28, clip_ratio_c=3.0)
    n_tok = n_seq = None
    if global_info:  # this rank holds part of a dp_size=2 mini-batch of 40 tokens and 8 sequences
        for c in (config, vanilla):
            c.global_batch_info.update(
                dp_size=2, batch_num_tokens=40, global_batch_size=8, loss_scale_factor=None
            )
        n_tok, n_seq = 20.0, 4.0
    ours = call_verl("entropy_lab.ppo", config, logprob, old, adv, mask)
    theirs = call_verl("vanilla", vanilla, logprob, old, adv, mask)
    cfg = resolve_config("grpo", dict(clip_eps_high=0.28, dual_clip_c=3.0, loss_agg=agg, max_new_tokens=T))
    project = call_project(cfg, logprob, old, adv, mask, num_tokens=n_tok, num_seqs=n_seq)
    close(ours[0], theirs[0])
    close(ours[1], theirs[1])
    close(ours[0], project[0])
    close(ours[1], project[1])
    assert ours[2]["actor/pg_clipfrac"] > 0  # the batch exercises the clip
    assert ours[2]["actor/pg_clipfrac"] == pytest.approx(theirs[2]["actor/pg_clipfrac"])


def test_kl_cov_equals_verl_kl_cov():
    logprob, old, adv, mask, _ = make_batch(1)
    kw = dict(kl_cov_ratio=0.2, ppo_kl_coef=0.5)
    ours = call_verl("entropy_lab.kl-cov", actor_config("entropy_lab.kl-cov", **kw), logprob, old, adv, mask)
    theirs = call_verl("kl_cov", actor_config("kl_cov", **kw), logprob, old, adv, mask)
    cfg = resolve_config("kl-cov", dict(kl_cov_ratio=0.2, kl_cov_coef=0.5, dual_clip_c=3.0))
    close(ours[0], theirs[0])
    close(ours[1], theirs[1])
    close(ours[0], call_project(cfg, logprob, old, adv, mask)[0])
    assert ours[2]["entropy_lab/kl_cov/frac_penalised"] > 0


def with_dual_clip_binding(old, adv, mask):
    """``old`` lowered at some negative-advantage tokens so their ratio exceeds verl's clip_ratio_c = 3."""
    old = old.clone()
    old[adv < 0] -= 1.6  # ratios times e^1.6 ~ 5
    return old


@pytest.mark.parametrize("clip_ratio_c", [None, 10.0])  # None: verl's default 3, binding on this batch
def test_clip_cov_equals_verl_clip_cov(clip_ratio_c):
    logprob, old, adv, mask, _ = make_batch(2)
    old = with_dual_clip_binding(old, adv, mask)
    r = (logprob.detach() - old).exp()
    assert bool(((r > 3) & (adv < 0) & (mask > 0)).any())  # a dual clip at 3 would bind
    # verl's clip_cov applies no dual clip, whatever clip_ratio_c says; neither does entropy_lab.clip-cov.
    kw = dict(clip_cov_ratio=0.2, clip_cov_lb=0.05, clip_cov_ub=5.0)
    if clip_ratio_c is not None:
        kw["clip_ratio_c"] = clip_ratio_c
    torch.manual_seed(7)
    ours = call_verl(
        "entropy_lab.clip-cov", actor_config("entropy_lab.clip-cov", **kw), logprob, old, adv, mask
    )
    torch.manual_seed(7)
    theirs = call_verl("clip_cov", actor_config("clip_cov", **kw), logprob, old, adv, mask)
    assert ours[2]["entropy_lab/clip_cov/frac_detached"] > 0
    close(ours[0], theirs[0])
    close(ours[1], theirs[1])
    cfg = resolve_config("clip-cov", dict(clip_cov_ratio=0.2, clip_cov_lb=0.05, dual_clip_c=None))
    torch.manual_seed(7)
    close(ours[0], call_project(cfg, logprob, old, adv, mask)[0])


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_ppo_equals_verl_vanilla_at_verls_defaults_where_the_dual_clip_binds(agg):
    logprob, old, adv, mask, _ = make_batch(4)
    old = with_dual_clip_binding(old, adv, mask)
    ours = call_verl("entropy_lab.ppo", actor_config("entropy_lab.ppo", agg), logprob, old, adv, mask)
    theirs = call_verl("vanilla", actor_config("vanilla", agg), logprob, old, adv, mask)
    close(ours[0], theirs[0])
    close(ours[1], theirs[1])
    assert ours[2]["actor/pg_clipfrac_lower"] > 0  # the dual clip bound


@pytest.mark.parametrize(
    "objective,method,extra",
    [
        ("w-reinforce", "w-reinforce", {}),
        ("fork-tokens", "fork-tokens", {}),
        ("entropy-adv", "entropy-adv", {}),
        ("steer", "steer", {}),
        ("steer", "steer", {"steer_estimator": "sampled-logit", "steer_map": "linear"}),
    ],
)
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum-norm"])
def test_entropy_lab_losses_equal_compute_loss(objective, method, extra, agg, monkeypatch):
    logprob, old, adv, mask, entropy = make_batch(3)
    if extra:
        monkeypatch.setenv(ev.OVERRIDES_ENV, ",".join(f"{k}={v}" for k, v in extra.items()))
    config = actor_config(f"entropy_lab.{objective}", agg, clip_ratio_high=0.28, clip_ratio_c=10.0)
    config.global_batch_info.update(
        dp_size=1, batch_num_tokens=None, global_batch_size=None, loss_scale_factor=12
    )
    with ev.extra_inputs(entropy=entropy):
        ours = call_verl(f"entropy_lab.{objective}", config, logprob, old, adv, mask)
    cfg = resolve_config(
        method, dict(clip_eps_high=0.28, dual_clip_c=10.0, loss_agg=agg, max_new_tokens=12, **extra)
    )
    project = call_project(cfg, logprob, old, adv, mask, entropy=entropy)
    close(ours[0], project[0])
    close(ours[1], project[1])
    plain = call_project(
        resolve_config("grpo", dict(clip_eps_high=0.28, dual_clip_c=10.0, loss_agg=agg, max_new_tokens=12)),
        logprob,
        old,
        adv,
        mask,
    )
    assert not torch.allclose(ours[1], plain[1])  # the intervention changed the gradient


def test_entropy_needing_loss_without_actor_loss_is_one_clear_error():
    logprob, old, adv, mask, _ = make_batch()
    with pytest.raises(EntropyLabError, match="policy-loss registry does not pass.*actor_loss"):
        call_verl("entropy_lab.steer", actor_config("entropy_lab.steer"), logprob, old, adv, mask)


def test_steer_softmax_estimator_is_refused(monkeypatch):
    logprob, old, adv, mask, entropy = make_batch()
    monkeypatch.setenv(ev.OVERRIDES_ENV, "steer_estimator=softmax")
    with (
        ev.extra_inputs(entropy=entropy),
        pytest.raises(EntropyLabError, match="collision.*does not compute"),
    ):
        call_verl("entropy_lab.steer", actor_config("entropy_lab.steer"), logprob, old, adv, mask)


def test_bad_inputs_are_one_clear_error(monkeypatch):
    logprob, old, adv, mask, _ = make_batch()
    with pytest.raises(EntropyLabError, match="token-sum"):
        call_verl("entropy_lab.ppo", actor_config("entropy_lab.ppo", "token-sum"), logprob, old, adv, mask)
    fn = get_policy_loss_fn("entropy_lab.ppo")
    with pytest.raises(EntropyLabError, match="rollout correction"):
        fn(old, logprob, adv, mask.bool(), "token-mean", actor_config("entropy_lab.ppo"), torch.ones(B, T))
    monkeypatch.setenv(ev.OVERRIDES_ENV, "clip_eps_high=0.3")
    with pytest.raises(
        EntropyLabError, match=r"clip_eps_high \(actor.clip_ratio_high\), which verl's config decides"
    ):
        call_verl("entropy_lab.ppo", actor_config("entropy_lab.ppo"), logprob, old, adv, mask)
    monkeypatch.setenv(ev.OVERRIDES_ENV, "no_such_key=1")
    with pytest.raises(EntropyLabError, match="ENTROPY_LAB_VERL_SET: unknown config key"):
        call_verl("entropy_lab.ppo", actor_config("entropy_lab.ppo"), logprob, old, adv, mask)


def test_unsupported_verl_version_registers_refusing_losses():
    ev.check_verl_version("0.9.1")
    with pytest.raises(EntropyLabError, match=r"verl 0\.10\.0 is outside the range"):
        ev.check_verl_version("0.10.0")
    registry: dict = {}
    names = ev.register(registry, version="0.8.2")
    assert sorted(registry) == sorted(names) == sorted(ev.verl_loss_names())
    with pytest.raises(EntropyLabError, match=r"verl 0\.8\.2 is outside the range"):
        registry["entropy_lab.ppo"]()


def _no_padding_batch(logprob, old, adv, mask, entropy, prompt_lens):
    """verl's actor data (left-padded prompts, right-padded responses) and no-padding model output."""
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu

    P = int(max(prompt_lens))
    resp_lens = mask.sum(-1).long()
    prompt_mask = (
        torch.arange(P)[None, :] >= (P - torch.tensor(prompt_lens))[:, None]
    ).long()  # left padding
    attention_mask = torch.cat([prompt_mask, mask.long()], dim=1)  # (B, P + T)
    lp_vals, ent_vals = [], []
    for i in range(B):
        n = prompt_lens[i] + int(resp_lens[i])
        # value at unpadded position j belongs to token j + 1 (verl's left shift)
        pos = torch.arange(int(resp_lens[i])) + prompt_lens[i] - 1
        lp_vals.append(torch.zeros(n).index_put((pos,), logprob[i, : int(resp_lens[i])]))
        ent_vals.append(torch.zeros(n).index_put((pos,), entropy[i, : int(resp_lens[i])]))
    lengths = torch.tensor([len(v) for v in lp_vals])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    model_output = {
        "log_probs": torch.nested.nested_tensor_from_jagged(torch.cat(lp_vals), offsets=offsets),
        "entropy": torch.nested.nested_tensor_from_jagged(torch.cat(ent_vals), offsets=offsets),
    }
    data = TensorDict(
        {
            "prompts": torch.zeros(B, P, dtype=torch.long),
            "responses": torch.zeros(B, T, dtype=torch.long),
            "attention_mask": attention_mask,
            "response_mask": mask.long(),
            "old_log_probs": old,
            "advantages": adv,
        },
        batch_size=[B],
    )
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=int(mask.sum()), global_batch_size=B)
    return model_output, data


@pytest.mark.parametrize("objective,method", [("steer", "steer"), ("fork-tokens", "fork-tokens")])
def test_actor_loss_hands_verl_entropy_to_the_loss(objective, method):
    """verl's actor loss function (ppo_loss) with verl's no-padding model output and data layout."""
    logprob, old, adv, mask, entropy = make_batch(4)
    entropy = entropy.requires_grad_()
    model_output, data = _no_padding_batch(logprob, old, adv, mask, entropy, prompt_lens=[2, 3, 1, 3, 2])
    config = actor_config(
        f"entropy_lab.{objective}", clip_ratio_high=0.28, clip_ratio_c=10.0, calculate_entropy=True
    )
    loss, metrics = ev.actor_loss(config, model_output, data)
    (grad,) = torch.autograd.grad(loss, logprob)
    cfg = resolve_config(method, dict(clip_eps_high=0.28, dual_clip_c=10.0, max_new_tokens=T))
    ref_loss, ref_grad = call_project(cfg, logprob, old, adv, mask, entropy=entropy.detach())
    close(loss.detach(), ref_loss)
    close(grad, ref_grad)
    assert "entropy_lab/loss/pg" not in metrics and "actor/pg_loss" in metrics


def test_verl_discovers_the_plugin_from_its_entry_point():
    """A fresh ``import verl`` (no entropy_lab import) registers the losses; disabling plugins removes them."""
    code = (
        "import sys, verl\n"
        "from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY\n"
        "print(sorted(k for k in POLICY_LOSS_REGISTRY if k.startswith('entropy_lab.')))\n"
        "print('entropy_lab.integrations.verl' in sys.modules)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("VERL_USE_EXTERNAL_PLUGINS", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    names, loaded = out.stdout.strip().splitlines()[-2:]
    assert names == str(sorted(ev.verl_loss_names()))
    assert loaded == "True"
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="verl.plugins")}
    assert eps.get("entropy_lab") == "entropy_lab.integrations.verl"


def test_install_actor_loss_on_a_verl_trainer_config():
    """From verl's own generated PPO config: the installed loss function carries the actor config and pickles."""
    import pickle
    from pathlib import Path
    from types import SimpleNamespace

    import verl
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(Path(verl.__file__).parent / "trainer" / "config" / "_generated_ppo_trainer.yaml")
    cfg.actor_rollout_ref.actor.policy_loss.loss_mode = "entropy_lab.steer"
    cfg.actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu = 2
    sent = []
    trainer = SimpleNamespace(config=cfg, actor_rollout_wg=SimpleNamespace(set_loss_fn=sent.append))
    with pytest.raises(EntropyLabError, match="calculate_entropy=True"):
        ev.install_actor_loss(trainer)
    cfg.actor_rollout_ref.actor.calculate_entropy = True
    ev.install_actor_loss(trainer)
    (fn,) = sent
    assert fn.func is ev.actor_loss
    assert fn.keywords["config"].policy_loss.loss_mode == "entropy_lab.steer"
    assert pickle.loads(pickle.dumps(fn)).func is ev.actor_loss  # Ray ships it to the workers
