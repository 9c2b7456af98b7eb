"""The one flat training configuration.

Every method of the catalogue (``entropy_lab.methods``) is a preset of overrides over
these fields, and ``--set key=value`` overrides compose on top. Defaults are the
published ones where a paper gives one (cited per field); the rest are sized so the
built-in default runs on a 2-core CPU.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, fields

from entropy_lab.errors import EntropyLabError


@dataclass
class TrainConfig:
    # --- what is trained on -------------------------------------------------
    method: str = "grpo"
    """Name of the method preset these settings came from (recorded, not re-applied)."""
    task: str = "countdown"
    """Built-in task name (``entropy_lab.tasks``); ignored when ``dataset`` is set."""
    dataset: str | None = None
    """Path to a verl-format Parquet file (prompt, reward_model.ground_truth)."""
    model: str | None = None
    """Local Hugging Face model directory; None uses the embedded warm-started tiny policy."""
    seed: int = 0
    """Seed for rollouts, initialisation and position sampling."""

    # --- rollout ------------------------------------------------------------
    steps: int = 150
    """Number of RL steps (one rollout batch each)."""
    prompts_per_step: int = 32
    """Prompts drawn per step."""
    samples_per_prompt: int = 8
    """Group size G: responses sampled per prompt (GRPO, Shao et al. 2024)."""
    temperature: float = 1.0
    """Sampling temperature of rollouts."""
    top_p: float = 1.0
    """Nucleus sampling threshold of rollouts."""
    max_new_tokens: int = 16
    """Maximum response length in tokens."""

    # --- optimisation -------------------------------------------------------
    optimizer: str = "adamw"
    """adamw, or sgd: the plain step the first-order estimators model (then raise lr a lot)."""
    lr: float = 1e-3
    """Learning rate (sized for AdamW on the tiny default policy; use ~1e-6 for real 0.5B+ models)."""
    weight_decay: float = 0.0
    """Decoupled (AdamW) or L2 (SGD) weight decay."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up, in optimizer updates."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    ppo_epochs: int = 1
    """Passes over each rollout batch."""
    mini_batches: int = 1
    """Optimizer updates per epoch (the rollout batch is split into this many)."""
    micro_batch_size: int = 0
    """Sequences per forward/backward within a mini-batch (gradient accumulation); 0 = whole mini-batch."""

    # --- advantage and loss -------------------------------------------------
    advantage: str = "grpo"
    """Advantage estimator: grpo (group mean/std), grpo-no-std (Dr. GRPO), rloo."""
    loss_agg: str = "token-mean"
    """Aggregation: token-mean, seq-mean-token-mean, seq-mean-token-sum, seq-mean-token-sum-norm."""
    objective: str = "ppo"
    """Per-token objective (registry name in ``entropy_lab.objectives``)."""
    clip_eps_low: float = 0.2
    """PPO lower clip epsilon (Schulman et al. 2017)."""
    clip_eps_high: float = 0.2
    """PPO upper clip epsilon; 0.28 is clip-higher (DAPO, Yu et al. 2025)."""
    dual_clip_c: float | None = None
    """Dual-clip bound c on negative-advantage terms (Ye et al. 2020: 3; STEER runs: 10); None disables."""
    kl_coef: float = 0.0
    """Coefficient of the KL-to-reference loss (GRPO: 0.001); 0 disables and loads no reference."""
    kl_estimator: str = "k3"
    """KL estimator: k1, k2 or k3 (low-variance, Schulman 2020)."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient (loss -= coef * aggregated entropy)."""
    clip_cov_ratio: float = 2e-4
    """Clip-Cov: fraction of tokens detached (Cui et al. 2025)."""
    clip_cov_lb: float = 1.0
    """Clip-Cov: lower bound of the covariance band."""
    clip_cov_ub: float = 5.0
    """Clip-Cov: upper bound of the covariance band."""
    kl_cov_ratio: float = 2e-3
    """KL-Cov: fraction of tokens penalised (Cui et al. 2025)."""
    kl_cov_coef: float = 1.0
    """KL-Cov: penalty coefficient on |logp - logp_old|."""
    fork_rho: float = 0.2
    """Fork tokens: fraction of highest-entropy tokens that keep gradient (Wang et al. 2025)."""
    w_reinforce_lambda: float = 0.1
    """W-REINFORCE: scale of positive-advantage terms (Zhu et al. 2025)."""
    entropy_adv_alpha: float = 0.4
    """Entropy advantage: alpha in A + min(alpha * H, |A| / kappa) (Cheng et al. 2025)."""
    entropy_adv_kappa: float = 2.0
    """Entropy advantage: kappa in A + min(alpha * H, |A| / kappa)."""
    unlikeliness_beta: float = 0.0
    """Unlikeliness reward: beta in R * (1 - beta * (G - rank) / G) among correct samples (He et al. 2025); 0 disables."""
    steer_map: str = "exp"
    """STEER weight map: exp or linear (Hao et al. 2025)."""
    steer_lambda_min: float = 0.8
    """STEER: smallest weight (exp and linear maps); the paper recommends 0.7, the release uses 0.8."""
    steer_lambda_max: float = 1.2
    """STEER: largest weight of the linear map."""
    steer_estimator: str = "paper"
    """STEER: which estimator gives |omega| (any name in ``entropy_lab.theory.ESTIMATORS`` but logit-grad, which needs the gradient it would weight)."""
    steer_norm: str = "call"
    """STEER: normalise the map over one loss call (as released) or over the whole rollout batch."""
    steer_signed: bool = False
    """STEER: damp only tokens whose predicted change is negative (entropy-lowering)."""

    # --- tracing, evaluation, checkpoints -----------------------------------
    trace_every: int = 5
    """Trace every k-th step's updates (0: never)."""
    trace_max_positions: int = 0
    """Trace at most this many response tokens per update, sampled (0: all)."""
    eval_every: int = 25
    """Evaluate every k steps (0: never); the last step is always evaluated."""
    eval_prompts: int = 64
    """Prompts per evaluation."""
    eval_k: int = 4
    """Samples per evaluation prompt for unbiased pass@k, k = 1..eval_k."""
    checkpoint_every: int = 50
    """Checkpoint every k steps (0: only at the end)."""
    device: str = "auto"
    """auto, cpu or cuda."""
    dtype: str = "auto"
    """auto (bf16 autocast on GPU, fp32 on CPU), float32 or bfloat16."""
    trace_jvp: bool = False
    """Also record the jvp estimators (omega_jvp, omega_jvp_entropy) in traced steps: the logit change
    J . dtheta the optimizer's actual step predicts, by one forward-mode pass (about 3x a forward)."""
    controller: str = "none"
    """Entropy controller consulted before each optimizer step (``entropy_lab.controllers``): none,
    adaptive-entropy or entropy-target."""
    entropy_target: float = 0.2
    """Target token-mean entropy (nats) of the controllers (Skywork-OR1, He et al. 2025: tgt-ent 0.2)."""
    adaptive_entropy_delta: float = 0.005
    """adaptive-entropy: step of the entropy-bonus coefficient per update (Skywork-OR1: 0.005)."""
    entropy_target_kappa: float = 0.1
    """entropy-target: fraction of the gap to the target closed per update, dH* = kappa (H_target - H)."""
    entropy_target_scale_min: float = 0.0
    """entropy-target: smallest scale of either advantage-signed part of the update (0: drop it)."""
    entropy_target_scale_max: float = 2.0
    """entropy-target: largest scale of either part (2: at most double it)."""

    def replace(self, **overrides) -> TrainConfig:
        """A copy with ``overrides`` applied; unknown keys are one error naming the valid ones."""
        unknown = sorted(set(overrides) - {f.name for f in fields(self)})
        if unknown:
            valid = ", ".join(f.name for f in fields(self))
            raise EntropyLabError(f"unknown config key(s) {', '.join(unknown)}; valid keys: {valid}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def field_docs() -> dict[str, str]:
    """Field name -> its docstring (read from the source, so help text has one source of truth)."""
    import ast
    import inspect
    import itertools

    tree = ast.parse(inspect.getsource(TrainConfig))
    body = tree.body[0].body
    docs = {}
    for node, nxt in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
        ):
            docs[node.target.id] = str(nxt.value.value)
    return docs


def parse_value(key: str, text: str):
    """Parse ``--set key=text`` into the field's type; a bad value is one clear error."""
    hints = typing.get_type_hints(TrainConfig)
    if key not in hints:
        valid = ", ".join(f.name for f in fields(TrainConfig))
        raise EntropyLabError(f"unknown config key {key!r}; valid keys: {valid}")
    hint = hints[key]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = type(None) in typing.get_args(hint)
    base = args[0] if args else hint
    if optional and text.lower() in ("none", "null", ""):
        return None
    try:
        if base is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        return base(text)
    except ValueError:
        raise EntropyLabError(f"config key {key!r} expects {base.__name__}, got {text!r}") from None


def parse_overrides(pairs: list[str]) -> dict:
    """['lr=1e-5', 'steer_map=linear'] -> {'lr': 1e-05, 'steer_map': 'linear'}."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise EntropyLabError(f"--set expects key=value, got {pair!r}")
        key, text = pair.split("=", 1)
        out[key.strip()] = parse_value(key.strip(), text.strip())
    return out
