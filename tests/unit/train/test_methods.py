"""The methods catalogue: names, published defaults, resolution and validation."""

from __future__ import annotations

import math

import pytest
import torch

from entropy_lab.config import TrainConfig
from entropy_lab.errors import EntropyLabError
from entropy_lab.methods import METHODS, Method, get_method, register_method, resolve_config, validate_config
from entropy_lab.objectives import LossInputs, compute_loss, prepare_context, required_inputs

NAMES = [
    "grpo",
    "dr-grpo",
    "rloo",
    "clip-higher",
    "dual-clip",
    "kl",
    "entropy-bonus",
    "clip-cov",
    "kl-cov",
    "fork-tokens",
    "w-reinforce",
    "entropy-adv",
    "unlikeliness",
    "steer",
    "adaptive-entropy",
    "entropy-target",
]


def test_catalogue_names_and_entries():
    assert list(METHODS) == NAMES
    for m in METHODS.values():
        assert isinstance(m, Method) and m.changes and m.reference


@pytest.mark.parametrize(
    "name, expected",
    [
        (
            "grpo",
            dict(
                objective="ppo",
                advantage="grpo",
                loss_agg="token-mean",
                clip_eps_low=0.2,
                clip_eps_high=0.2,
                dual_clip_c=None,
            ),
        ),
        ("dr-grpo", dict(advantage="grpo-no-std", loss_agg="seq-mean-token-sum-norm")),
        ("rloo", dict(advantage="rloo")),
        ("clip-higher", dict(clip_eps_high=0.28, clip_eps_low=0.2)),
        ("dual-clip", dict(dual_clip_c=3.0)),
        ("kl", dict(kl_coef=0.001, kl_estimator="k3")),
        ("entropy-bonus", dict(entropy_coef=0.001)),
        ("clip-cov", dict(objective="clip-cov", clip_cov_ratio=2e-4, clip_cov_lb=1.0, clip_cov_ub=5.0)),
        ("kl-cov", dict(objective="kl-cov", kl_cov_ratio=2e-3, kl_cov_coef=1.0)),
        ("fork-tokens", dict(objective="fork-tokens", fork_rho=0.2)),
        ("w-reinforce", dict(objective="w-reinforce", w_reinforce_lambda=0.1)),
        ("entropy-adv", dict(objective="entropy-adv", entropy_adv_alpha=0.4, entropy_adv_kappa=2.0)),
        ("unlikeliness", dict(unlikeliness_beta=0.25, advantage="grpo")),
        (
            "steer",
            dict(
                objective="steer",
                dual_clip_c=10.0,
                clip_eps_low=0.2,
                clip_eps_high=0.28,
                steer_lambda_min=0.8,
                steer_map="exp",
                steer_estimator="paper",
                steer_norm="call",
                steer_signed=False,
                loss_agg="token-mean",
            ),
        ),
    ],
)
def test_published_defaults(name, expected):
    cfg = resolve_config(name)
    assert cfg.method == name
    for key, value in expected.items():
        assert getattr(cfg, key) == value, key


def test_overrides_apply_after_the_preset_and_base_is_kept():
    base = TrainConfig(lr=3e-6, kl_coef=0.002)
    cfg = resolve_config("steer", {"steer_lambda_min": 0.7, "steer_map": "linear"}, base=base)
    assert (cfg.steer_lambda_min, cfg.steer_map, cfg.lr, cfg.kl_coef, cfg.dual_clip_c) == (
        0.7,
        "linear",
        3e-6,
        0.002,
        10.0,
    )
    assert base.objective == "ppo"  # not mutated
    assert resolve_config("clip-higher", {"clip_eps_high": 0.3}).clip_eps_high == 0.3


def test_unknown_names_and_keys():
    with pytest.raises(EntropyLabError, match="valid: grpo, dr-grpo, rloo"):
        resolve_config("ppo2")
    with pytest.raises(EntropyLabError, match="unknown config key"):
        resolve_config("grpo", {"learning_rate": 1.0})
    with pytest.raises(EntropyLabError, match="do not override 'method'"):
        resolve_config("grpo", {"method": "steer"})
    assert resolve_config("grpo", {"method": "grpo"}).method == "grpo"
    with pytest.raises(EntropyLabError, match="already registered"):
        register_method(Method("grpo", "x", {}, "y"))
    with pytest.raises(EntropyLabError, match="unknown config key"):
        register_method(Method("new", "x", {"nope": 1}, "y"))
    assert get_method("steer").defaults["objective"] == "steer"


@pytest.mark.parametrize(
    "key, value, listed",
    [
        ("objective", "ppo2", "ppo, clip-cov"),
        ("advantage", "gae", "grpo, grpo-no-std, rloo"),
        ("loss_agg", "mean", "token-mean, seq-mean-token-mean"),
        ("kl_estimator", "k4", "k1, k2, k3"),
        ("steer_map", "cos", "exp, linear"),
        ("steer_norm", "epoch", "call, batch"),
        ("steer_estimator", "logit-grad", "paper, sampled-logit, softmax, covariance"),
    ],
)
def test_enum_fields_are_validated_in_one_line(key, value, listed):
    with pytest.raises(EntropyLabError) as err:
        resolve_config("grpo", {key: value})
    message = str(err.value)
    assert "\n" not in message and key in message and listed in message


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"dual_clip_c": 0.5}, "dual_clip_c"),
        ({"fork_rho": 1.5}, "fork_rho"),
        ({"steer_lambda_min": 0.0}, "steer_lambda_min"),
        ({"steer_lambda_min": 0.9, "steer_lambda_max": 0.85}, "steer_lambda_max"),
        ({"clip_cov_lb": 6.0}, "clip_cov_lb"),
    ],
)
def test_ranges_are_validated(overrides, match):
    with pytest.raises(EntropyLabError, match=match):
        resolve_config("grpo", overrides)
    assert validate_config(TrainConfig()) == TrainConfig()


@pytest.mark.parametrize("name", NAMES)
def test_every_method_runs_one_loss_call(name):
    cfg = resolve_config(name)
    g = torch.Generator().manual_seed(0)
    b, t = 4, 5
    old = torch.rand(b, t, generator=g).clamp(min=0.05).log()
    lp = (old + 0.1 * torch.randn(b, t, generator=g)).requires_grad_(True)
    available = {
        "entropy": torch.rand(b, t, generator=g).requires_grad_(cfg.entropy_coef > 0),
        "old_entropy": torch.rand(b, t, generator=g),
        "collision": 0.1 * torch.rand(b, t, generator=g),
        "ref_logprob": old + 0.05,
    }
    extra = {k: v for k, v in available.items() if k in required_inputs(cfg)}
    adv = torch.randn(b, 1, generator=g).expand(b, t).contiguous()
    inputs = LossInputs(lp, old, adv, torch.ones(b, t), generator=g, **extra)
    inputs.context = prepare_context(inputs, cfg)
    out = compute_loss(inputs, cfg)
    out.loss.backward()
    assert math.isfinite(out.loss.item()) and lp.grad is not None and bool(torch.isfinite(lp.grad).all())
