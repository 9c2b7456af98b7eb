"""The verl plugin's settings, checked without verl: the dual clip per loss at verl's defaults,
``ENTROPY_LAB_VERL_SET``'s refusals and the warning when the plugin cannot import.

verl itself (0.9.1) needs Ray and tensordict to import, so these tests stand in a two-module
``verl`` (its version and an empty policy-loss registry) for the plugin to register into, and an
actor config with verl 0.9.1's ``ActorConfig`` defaults (clip_ratio 0.2, clip_ratio_c 3). The
comparison with verl's own ``clip_cov`` / ``vanilla`` losses is in ``test_verl_losses.py`` (run
where verl is installed). The reference here is the project's ``compute_loss`` with the
TrainConfig each loss must resolve to.
"""

from __future__ import annotations

import importlib
import sys
import types
import warnings

import pytest
import torch

from entropy_lab.errors import EntropyLabError, EntropyLabWarning
from entropy_lab.methods import resolve_config
from entropy_lab.objectives import LossInputs, compute_loss

B, T = 4, 6


def _stub_verl(monkeypatch, registry: bool = True) -> dict:
    """A ``verl`` with a version and (unless ``registry`` is False) an empty POLICY_LOSS_REGISTRY."""
    reg: dict = {}
    verl = types.ModuleType("verl")
    verl.__version__ = "0.9.1"  # type: ignore[attr-defined]
    core = types.ModuleType("verl.trainer.ppo.core_algos")
    if registry:
        core.POLICY_LOSS_REGISTRY = reg  # type: ignore[attr-defined]
    for name, mod in {
        "verl": verl,
        "verl.trainer": types.ModuleType("verl.trainer"),
        "verl.trainer.ppo": types.ModuleType("verl.trainer.ppo"),
        "verl.trainer.ppo.core_algos": core,
    }.items():
        monkeypatch.setitem(sys.modules, name, mod)
    _forget_plugin()
    return reg


def _forget_plugin() -> None:
    """Drop the plugin's modules, so the next import runs against the verl then in sys.modules."""
    for name in [m for m in sys.modules if m.startswith("entropy_lab.integrations.verl")]:
        del sys.modules[name]
    vars(importlib.import_module("entropy_lab.integrations")).pop("verl", None)


@pytest.fixture
def plugin(monkeypatch):
    try:
        import verl  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("verl is installed: test_verl_losses.py covers the real one")
    reg = _stub_verl(monkeypatch)
    ev = importlib.import_module("entropy_lab.integrations.verl")
    yield ev, reg
    _forget_plugin()


class ActorConfig(dict):
    """verl 0.9.1's ActorConfig defaults, read as the plugin reads them (attributes and ``get``)."""

    def __init__(self, **kw):
        values = dict(clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.2, clip_ratio_c=3.0) | kw
        super().__init__(values)
        self.__dict__.update(values)
        self.policy_loss = types.SimpleNamespace(
            clip_cov_ratio=kw.get("clip_cov_ratio", 0.0002), clip_cov_lb=1.0, clip_cov_ub=5.0,
            kl_cov_ratio=0.0002, ppo_kl_coef=0.1,
        )  # fmt: skip
        self.global_batch_info: dict = {}


def dual_clip_batch():
    """(logprob, old, adv, mask): negative-advantage tokens with ratio above 3, where a dual clip binds."""
    g = torch.Generator().manual_seed(0)
    mask = (torch.arange(T)[None] < torch.tensor([6, 4, 5, 3])[:, None]).float()  # (B, T)
    logprob = (-torch.rand(B, T, generator=g) * 2).requires_grad_()  # (B, T)
    log_r = torch.tensor([[0.1, -0.3, 1.5, 0.05, 1.3, -0.1]]).expand(B, T)  # r up to 4.5
    old = logprob.detach() - log_r
    adv = torch.tensor([0.8, -1.1, 0.5, -0.6])[:, None].expand(B, T).clone()  # (B, T)
    r = log_r.exp()
    assert bool(((r > 3) & (adv < 0) & (mask > 0)).any())
    return logprob, old, adv, mask


def project(cfg, logprob, old, adv, mask, entropy=None):
    out = compute_loss(LossInputs(logprob=logprob, old_logprob=old, advantages=adv, mask=mask, entropy=entropy,
                                  old_entropy=entropy), cfg)  # fmt: skip
    (grad,) = torch.autograd.grad(out.loss, logprob)
    return out.loss.detach(), grad


EXPECTED_DUAL_CLIP = {
    "ppo": 3.0, "steer": 3.0, "fork-tokens": 3.0, "w-reinforce": 3.0, "entropy-adv": 3.0,
    "clip-cov": None, "kl-cov": None,
}  # fmt: skip
"""The dual clip each loss applies at verl's defaults: verl's vanilla reads clip_ratio_c; clip_cov and
kl_cov read none."""


@pytest.mark.parametrize("objective", sorted(EXPECTED_DUAL_CLIP))
def test_every_loss_at_verls_defaults_where_the_dual_clip_binds(plugin, objective):
    ev, registry = plugin
    assert sorted(registry) == sorted(ev.verl_loss_names())
    logprob, old, adv, mask = dual_clip_batch()
    entropy = torch.rand(B, T, generator=torch.Generator().manual_seed(1)) * 2
    entropy[[1, 3], 2] = 10.0  # the dual-clip tokens are among fork-tokens' top-entropy ones
    method = ev.OBJECTIVE_METHODS[objective]
    overrides = dict(
        loss_agg="token-mean",
        kl_coef=0.0,
        entropy_coef=0.0,
        max_new_tokens=T,
        clip_eps_low=0.2,
        clip_eps_high=0.2,
    )
    if objective == "clip-cov":
        overrides |= dict(
            clip_cov_ratio=1.0, clip_cov_lb=-1e9, clip_cov_ub=1e9
        )  # every unclipped token: no draw
    config = ActorConfig(**({"clip_cov_ratio": 1.0} if objective == "clip-cov" else {}))
    if objective == "clip-cov":
        config.policy_loss.clip_cov_lb, config.policy_loss.clip_cov_ub = -1e9, 1e9
    if objective == "kl-cov":
        overrides |= dict(kl_cov_ratio=0.0002, kl_cov_coef=0.1)
    with ev.extra_inputs(entropy=entropy):
        loss, _ = registry[ev.PREFIX + objective](old, logprob, adv, mask, "token-mean", config)
    (grad,) = torch.autograd.grad(loss, logprob)
    cfg = ev.train_config(objective, config, "token-mean", T)
    assert cfg.dual_clip_c == EXPECTED_DUAL_CLIP[objective]
    ref = resolve_config(method, {**overrides, "dual_clip_c": EXPECTED_DUAL_CLIP[objective]})
    ref_loss, ref_grad = project(ref, logprob, old, adv, mask, entropy)
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-8)
    if objective != "kl-cov":  # (kl-cov has no clip at all) the other choice would give another loss here
        other = 3.0 if EXPECTED_DUAL_CLIP[objective] is None else None
        other_loss, _ = project(
            resolve_config(method, {**overrides, "dual_clip_c": other}), logprob, old, adv, mask, entropy
        )
        assert float((other_loss - ref_loss).abs()) > 1e-3


@pytest.mark.parametrize(
    "value,match",
    [
        ("objective=ppo", r"objective \(policy_loss.loss_mode"),
        ("method=steer", r"method \(policy_loss.loss_mode"),
        ("lr=1e-5", r"lr \(actor.optim.lr\)"),
        ("steps=10", r"steps \(trainer.total_training_steps\)"),
        ("clip_eps_high=0.3", r"clip_eps_high \(actor.clip_ratio_high\)"),
        ("steer_lambda_min=0.7,steer_lambda_min=0.8", "steer_lambda_min more than once"),
        ("trace_every=5", "no verl policy loss reads"),
        ("cov_selection=global", "only per-call selection is possible"),
        ("no_such_key=1", "ENTROPY_LAB_VERL_SET: unknown config key"),
    ],
)
def test_env_overrides_refuse_what_verl_decides(plugin, monkeypatch, value, match):
    ev, _ = plugin
    monkeypatch.setenv(ev.OVERRIDES_ENV, value)
    with pytest.raises(EntropyLabError, match=match) as err:
        ev.train_config("steer", ActorConfig(), "token-mean", T)
    assert "\n" not in str(err.value)


def test_env_overrides_of_the_methods_own_parameters_apply(plugin, monkeypatch):
    ev, _ = plugin
    monkeypatch.setenv(ev.OVERRIDES_ENV, "steer_lambda_min=0.7,steer_map=linear")
    cfg = ev.train_config("steer", ActorConfig(), "token-mean", T)
    assert (cfg.steer_lambda_min, cfg.steer_map, cfg.dual_clip_c) == (0.7, "linear", 3.0)
    assert ev.train_config("clip-cov", ActorConfig(), "token-mean", T).cov_selection == "per-call"


def test_a_plugin_that_cannot_import_warns_when_verl_imports_it(monkeypatch):
    try:
        import verl  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("verl is installed")
    _stub_verl(monkeypatch, registry=False)  # verl's registry cannot be imported
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImportError):
            importlib.import_module("entropy_lab.integrations.verl")
    messages = [str(w.message) for w in caught if issubclass(w.category, EntropyLabWarning)]
    assert len(messages) == 1 and "no entropy_lab.* policy loss is registered" in messages[0]
    assert "POLICY_LOSS_REGISTRY" in messages[0]
    _forget_plugin()
