"""The methods catalogue (README, Methods): each method is a preset over ``TrainConfig``.

``resolve_config(method, overrides, base)`` applies the preset to ``base`` (default:
``TrainConfig()``), then the user's overrides, sets ``cfg.method`` and validates the
enum-like fields. Presets name the three fields that define the algorithm (objective,
advantage, loss_agg) plus their own parameters; every other field of ``base`` is kept, so
``--set`` overrides compose freely (e.g. ``steer`` with ``kl_coef=0.001``).

Defaults are the published ones; where a paper is silent the choice is stated in ``changes``:
- unlikeliness beta 0.25: ``rank_penalty=0.25`` in the release script of He et al. 2025
  (AndreHe02/rewarding-unlikely-release, ``examples/lean/grpo.sh``).
- steer: the release settings (dual clip c = 10, eps 0.2 / 0.28, lambda_min 0.8, exp map,
  ``paper`` estimator, per-call normalisation, token-mean); the paper recommends lambda_min 0.7.

References are listed per method.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from entropy_lab import steer
from entropy_lab.advantages import ADVANTAGES
from entropy_lab.aggregation import AGG_MODES
from entropy_lab.config import TrainConfig
from entropy_lab.controllers import CONTROLLERS
from entropy_lab.errors import EntropyLabError
from entropy_lab.objectives import KL_ESTIMATORS, OBJECTIVES
from entropy_lab.optim import OPTIMIZERS
from entropy_lab.registry import Registry


@dataclass(frozen=True)
class Method:
    name: str
    changes: str
    """What the method changes relative to GRPO, one line."""
    defaults: dict = field(default_factory=dict)
    """TrainConfig overrides of the preset."""
    reference: str = ""


METHODS: Registry[Method] = Registry("method")


def register_method(method: Method) -> Method:
    unknown = sorted(set(method.defaults) - set(TrainConfig.__dataclass_fields__))
    if unknown:
        raise EntropyLabError(f"method {method.name!r} sets unknown config key(s) {', '.join(unknown)}")
    return METHODS.add(method.name, method)


get_method = METHODS.__getitem__


def _preset(objective: str = "ppo", advantage: str = "grpo", loss_agg: str = "token-mean", **params) -> dict:
    return {"objective": objective, "advantage": advantage, "loss_agg": loss_agg, **params}


for _m in (
    Method(
        "grpo",
        "PPO-clip, group mean/std advantage, token-mean",
        _preset(clip_eps_low=0.2, clip_eps_high=0.2),
        "Shao et al. 2024, arXiv 2402.03300",
    ),
    Method(
        "dr-grpo",
        "no std in the advantage; per-sequence token sum over num_seqs * max_new_tokens",
        _preset(advantage="grpo-no-std", loss_agg="seq-mean-token-sum-norm"),
        "Liu et al. 2025, arXiv 2503.20783",
    ),
    Method(
        "rloo", "leave-one-out baseline", _preset(advantage="rloo"), "Ahmadian et al. 2024, arXiv 2402.14740"
    ),
    Method(
        "clip-higher",
        "upper clip eps 0.28",
        _preset(clip_eps_high=0.28),
        "Yu et al. 2025 (DAPO), arXiv 2503.14476",
    ),
    Method(
        "dual-clip",
        "negative-advantage loss bounded by -A c, c = 3 (STEER runs use 10)",
        _preset(dual_clip_c=3.0),
        "Ye et al. 2020, arXiv 1912.09729",
    ),
    Method(
        "kl",
        "KL to the reference policy in the loss, k3 estimator, coef 0.001",
        _preset(kl_coef=0.001, kl_estimator="k3"),
        "Shao et al. 2024, arXiv 2402.03300; Schulman 2020 (k3)",
    ),
    Method(
        "entropy-bonus",
        "minus 0.001 times the aggregated entropy",
        _preset(entropy_coef=0.001),
        "entropy regularisation (Williams & Peng 1991; Mnih et al. 2016)",
    ),
    Method(
        "clip-cov",
        "detach a random max(1, ratio N) of tokens with covariance in (lb, ub)",
        _preset(objective="clip-cov", clip_cov_ratio=2e-4, clip_cov_lb=1.0, clip_cov_ub=5.0),
        "Cui et al. 2025, arXiv 2505.22617",
    ),
    Method(
        "kl-cov",
        "|logp - logp_old| penalty on the top max(1, ratio N) covariance tokens; unclipped surrogate as published",
        _preset(objective="kl-cov", kl_cov_ratio=2e-3, kl_cov_coef=1.0),
        "Cui et al. 2025, arXiv 2505.22617",
    ),
    Method(
        "fork-tokens",
        "gradient only on the top 20% tokens by entropy",
        _preset(objective="fork-tokens", fork_rho=0.2),
        "Wang et al. 2025 ('Beyond the 80/20 rule'), arXiv 2506.01939",
    ),
    Method(
        "w-reinforce",
        "positive-advantage terms scaled by 0.1",
        _preset(objective="w-reinforce", w_reinforce_lambda=0.1),
        "Zhu et al. 2025, arXiv 2506.01347",
    ),
    Method(
        "entropy-adv",
        "A + min(0.4 H_detached, |A| / 2) per token",
        _preset(objective="entropy-adv", entropy_adv_alpha=0.4, entropy_adv_kappa=2.0),
        "Cheng et al. 2025, arXiv 2506.14758",
    ),
    Method(
        "unlikeliness",
        "correct rewards times 1 - beta (G - rank) / G, likeliest correct most penalised; beta 0.25 (release script)",
        _preset(unlikeliness_beta=0.25),
        "He et al. 2025, arXiv 2506.02355",
    ),
    Method(
        "steer",
        "per-token weight from |omega_paper| (exp map, lambda_min 0.8) on dual-clip (c = 10) PPO with eps_high 0.28",
        _preset(
            objective="steer",
            clip_eps_low=0.2,
            clip_eps_high=0.28,
            dual_clip_c=10.0,
            steer_map="exp",
            steer_lambda_min=0.8,
            steer_estimator="paper",
            steer_norm="call",
            steer_signed=False,
        ),
        "Hao et al. 2025, arXiv 2510.10150 (release: github.com/zz-haooo/STEER)",
    ),
    Method(
        "adaptive-entropy",
        "entropy bonus with a coefficient raised/lowered by 0.005 per update when entropy is below/above 0.2",
        _preset(controller="adaptive-entropy", entropy_target=0.2, adaptive_entropy_delta=0.005),
        "He et al. 2025 (Skywork-OR1), arXiv 2505.22312",
    ),
    Method(
        "entropy-target",
        "scales of the A>0 / A<0 update parts chosen by JVP prediction so entropy moves toward 0.2 "
        "(kappa 0.1, scales in [0, 2])",
        _preset(
            controller="entropy-target",
            entropy_target=0.2,
            entropy_target_kappa=0.1,
            entropy_target_scale_min=0.0,
            entropy_target_scale_max=2.0,
        ),
        "entropy-lab (target 0.2 as Skywork-OR1; kappa and bounds chosen here)",
    ),
):
    register_method(_m)


# --- validation ----------------------------------------------------------------------------------


def registered_choices() -> dict[str, list[str]]:
    """Config field -> the registered names it accepts."""
    return {
        "optimizer": list(OPTIMIZERS),
        "objective": list(OBJECTIVES),
        "advantage": list(ADVANTAGES),
        "loss_agg": list(AGG_MODES),
        "kl_estimator": list(KL_ESTIMATORS),
        "steer_map": list(steer.STEER_MAPS),
        "steer_norm": list(steer.STEER_NORMS),
        "steer_estimator": steer.valid_estimators(),
        "controller": list(CONTROLLERS),
    }


def validate_config(cfg: TrainConfig) -> TrainConfig:
    """Check the registered names, then every field's type and range; one error line on failure."""
    for key, valid in registered_choices().items():
        value = getattr(cfg, key)
        if value not in valid:
            raise EntropyLabError(f"config key {key!r} got {value!r}; valid: {', '.join(valid)}")
    return cfg.validate()  # types and ranges, from the fields' own annotations


def resolve_config(
    method: str, overrides: dict | None = None, base: TrainConfig | None = None
) -> TrainConfig:
    """``base`` (default TrainConfig()) + the method's preset + ``overrides``, with ``method`` set; validated."""
    preset = get_method(method)
    overrides = dict(overrides or {})
    if overrides.get("method", method) != method:
        raise EntropyLabError(
            f"the method is chosen by name ({method!r}); do not override 'method' to {overrides['method']!r}"
        )
    overrides.pop("method", None)
    cfg = (base or TrainConfig()).replace(**preset.defaults).replace(**overrides).replace(method=method)
    return validate_config(cfg)
