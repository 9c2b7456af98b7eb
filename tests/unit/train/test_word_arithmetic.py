"""The word-arithmetic task (prompts, answers, reward, split) and its pretrained-model preset."""

from __future__ import annotations

import dataclasses
import json
import re
import string
from fractions import Fraction

import numpy as np
import pytest
from typer.testing import CliRunner

from entropy_lab import presets
from entropy_lab.cli.app import app
from entropy_lab.config import TrainConfig
from entropy_lab.errors import EntropyLabError
from entropy_lab.methods import METHODS, Method, resolve_config
from entropy_lab.models import build_tiny_policy
from entropy_lab.tasks import TASKS, Problem, build_task, get_task
from entropy_lab.tasks import word_arithmetic as wa
from entropy_lab.tokenizer import build_char_tokenizer
from entropy_lab.trainer import Trainer

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
NO_SYSTEM = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}<|assistant|>"
)
PRESET = wa.WordArithmeticTask.PRETRAINED_DEFAULTS


def chat_tokenizer(template: str | None = TEMPLATE):
    tok = build_char_tokenizer(string.printable)
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def task() -> wa.WordArithmeticTask:
    return get_task("word-arithmetic", tokenizer=chat_tokenizer())


def key(p: Problem) -> tuple:
    return p.meta["chain"], tuple(p.meta["numbers"])


# --------------------------------------------------------------------------- problems


def reference_answer(question: str) -> Fraction:
    """The question's value read from its English alone: numbers in order, operations from their words."""
    numbers = [Fraction(int(n)) for n in re.findall(r"\d+", question)]
    words = re.findall(r"plus|minus|times|divided by|[Aa]dd|subtract|[Mm]ultiply by", question)
    ops = {"plus": "+", "add": "+", "minus": "-", "subtract": "-", "times": "*", "multiply by": "*"}
    value = numbers[0]
    for word, x in zip(words, numbers[1:], strict=True):
        op = ops.get(word.lower(), "/")
        value = value + x if op == "+" else value - x if op == "-" else value * x if op == "*" else value / x
    return value


def test_every_chain_is_drawn_and_its_answer_matches_the_question(task) -> None:
    problems = task.sample(2_000, np.random.default_rng(0))
    assert {p.meta["chain"] for p in problems} == {"-".join(c) for c in wa.CHAINS}
    for p in problems:
        value = reference_answer(p.meta["question"])
        assert value.denominator == 1 and value > 0, p.meta["question"]  # exact division, positive
        assert Fraction(int(p.answer)) == value, p.meta["question"]


@pytest.mark.parametrize(
    ("chain", "numbers", "question", "answer"),
    [
        (("add",), (3, 6), "What is 3 plus 6?", "9"),
        (("sub",), (9, 6), "What is 9 minus 6?", "3"),
        (("mul",), (4, 5), "What is 4 times 5?", "20"),
        (("div",), (20, 5), "What is 20 divided by 5?", "4"),
        (("add", "add"), (2, 3, 4), "Start with 2. Add 3, then add 4. What number do you get?", "9"),
        (("add", "sub"), (3, 6, 2), "Start with 3. Add 6, then subtract 2. What number do you get?", "7"),
        (("mul", "add"), (4, 3, 5), "Start with 4. Multiply by 3, then add 5. What number do you get?", "17"),
        (
            ("mul", "sub"),
            (5, 2, 9),
            "Start with 5. Multiply by 2, then subtract 9. What number do you get?",
            "1",
        ),
    ],
)
def test_hand_written_problems(task, chain, numbers, question: str, answer: str) -> None:
    p = task.make_problem(chain, numbers)
    assert (p.meta["question"], p.answer) == (question, answer)
    assert task.reward(p, task.demonstration(p, np.random.default_rng(0))) == 1.0


def test_prompt_is_the_chat_template_of_instruction_example_and_question(task) -> None:
    one = task.make_problem(("mul",), (6, 3)).prompt
    assert one == (
        f"<|system|>{wa.INSTRUCTION}\n<|user|>What is 12 plus 7?\n<|assistant|>12 + 7 = 19.\nAnswer: 19\n"
        "<|user|>What is 6 times 3?\n<|assistant|>"
    )
    two = task.make_problem(("add", "sub"), (3, 6, 2)).prompt
    assert two.startswith(f"<|system|>{wa.INSTRUCTION}\n<|user|>Start with 12. Add 7, then subtract 5.")
    assert two.endswith(
        "<|user|>Start with 3. Add 6, then subtract 2. What number do you get?\n<|assistant|>"
    )


def test_prompt_without_a_template_or_without_a_system_role() -> None:
    plain = build_task("word-arithmetic", chat_tokenizer(None)).make_problem(("add",), (3, 6)).prompt
    assert plain == f"{wa.INSTRUCTION}\nWhat is 12 plus 7?\n12 + 7 = 19.\nAnswer: 19\nWhat is 3 plus 6?"
    folded = build_task("word-arithmetic", chat_tokenizer(NO_SYSTEM)).make_problem(("add",), (3, 6)).prompt
    assert folded == (
        f"<|user|>{wa.INSTRUCTION}\nWhat is 12 plus 7?\n<|assistant|>12 + 7 = 19.\nAnswer: 19\n"
        f"<|user|>{wa.INSTRUCTION}\nWhat is 3 plus 6?\n<|assistant|>"
    )


def test_deterministic_given_the_seed() -> None:
    a, b = (get_task("word-arithmetic", tokenizer=chat_tokenizer()) for _ in range(2))
    draw = [(p.prompt, p.answer) for p in a.sample(50, np.random.default_rng(7))]
    assert draw == [(p.prompt, p.answer) for p in b.sample(50, np.random.default_rng(7))]
    assert draw != [(p.prompt, p.answer) for p in b.sample(50, np.random.default_rng(8))]
    assert a.eval_problems(64) == b.eval_problems(64)
    assert a.eval_problems(64)[:20] == a.eval_problems(20)  # a fixed list: n only cuts it


def test_held_out_calculations_never_train_and_the_eval_mix_alternates(task) -> None:
    held = task.eval_problems(64)
    trained = {key(p) for p in task.sample(3_000, np.random.default_rng(1))}
    assert not {key(p) for p in held} & trained
    assert [len(p.meta["numbers"]) - 1 for p in held] == [1, 2] * 32
    assert len({key(p) for p in held}) == 64


# --------------------------------------------------------------------------- reward


@pytest.mark.parametrize(
    ("completion", "reward"),
    [
        ("6 * 3 = 18.\nAnswer: 18", 1.0),  # right
        ("Answer: 18 apples", 1.0),  # a unit in words
        ("answer: $18.", 1.0),  # case, a dollar sign, a final period
        ("Answer: $18$", 1.0),  # math delimiters
        ("Answer: 17\nno, wait.\nAnswer: 18", 1.0),  # the last Answer line counts
        ("Answer: 18\nAnswer: 17", 0.0),
        ("6 * 3 = 17.\nAnswer: 17", 0.0),  # wrong
        ("Answer: -18", 0.0),
        ("Answer: 18.5", 0.0),
        ("Answer: 180", 0.0),
        ("Answer: 6 * 3 = 18", 0.0),  # an expression, not a number
        ("Answer: eighteen", 0.0),
        ("6 * 3 = 18", 0.0),  # malformed: no Answer line
        ("The answer is 18.", 0.0),
        ("Answer:", 0.0),
        ("", 0.0),
    ],
)
def test_reward_scores_right_wrong_and_malformed(task, completion: str, reward: float) -> None:
    assert task.reward(Problem(prompt="", answer="18"), completion) == reward


def test_reward_never_raises_on_a_malformed_problem(task) -> None:
    assert task.reward(Problem(prompt="", answer="not a number"), "Answer: 3") == 0.0


def test_demonstrations_score_one(task) -> None:
    rng = np.random.default_rng(3)
    assert all(task.reward(p, task.demonstration(p, rng)) == 1.0 for p in task.sample(200, rng))


# --------------------------------------------------------------------------- refusals


def test_refuses_the_embedded_policy_in_one_line(tmp_path) -> None:
    with pytest.raises(EntropyLabError, match="needs a pretrained chat model") as err:
        get_task("word-arithmetic")
    assert "\n" not in str(err.value)
    cfg = resolve_config("grpo", {"task": "word-arithmetic", "device": "cpu"})
    with pytest.raises(EntropyLabError, match="--model"):
        Trainer(cfg, tmp_path / "run").setup()  # before any warm start or run directory
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "kwargs", [{"max_operand": 1}, {"max_factor": 1}, {"steps": (3,)}, {"steps": ()}, {"eval_fraction": 1.0}]
)
def test_bad_settings_are_one_line_errors(kwargs: dict) -> None:
    with pytest.raises(EntropyLabError):
        get_task("word-arithmetic", tokenizer=chat_tokenizer(), **kwargs)


def test_build_task_passes_the_tokenizer_only_to_tasks_that_take_one() -> None:
    tok = chat_tokenizer()
    assert build_task("word-arithmetic", tok).tokenizer is tok
    assert build_task("arithmetic", tok).name == "arithmetic"


# --------------------------------------------------------------------------- the preset


def test_preset_fills_what_is_unset_and_records_it() -> None:
    cfg = presets.resolve_with_preset("grpo", {"model": "/m", "task": "word-arithmetic"})
    assert {k: getattr(cfg, k) for k in PRESET} == PRESET
    assert cfg.preset_applied.split() == list(PRESET)
    line = presets.describe(cfg)
    assert "\n" not in line and all(f"{k}={getattr(cfg, k)}" in line for k in PRESET)


def test_preset_never_replaces_a_given_setting() -> None:
    given = {"model": "/m", "task": "word-arithmetic", "lr": 3e-6, "max_new_tokens": 64}
    cfg = presets.resolve_with_preset("grpo", given)
    assert (cfg.lr, cfg.max_new_tokens) == (3e-6, 64)
    assert cfg.preset_applied.split() == [k for k in PRESET if k not in given]
    assert cfg.samples_per_prompt == PRESET["samples_per_prompt"]


def test_method_preset_wins_over_the_task_preset() -> None:
    METHODS.add("tmp-cool", Method("tmp-cool", "sampling at 0.7", {"temperature": 0.7}))
    try:
        cfg = presets.resolve_with_preset("tmp-cool", {"model": "/m", "task": "word-arithmetic"})
    finally:
        METHODS.remove("tmp-cool")
    assert cfg.temperature == 0.7 and "temperature" not in cfg.preset_applied.split()


@pytest.mark.parametrize(
    "overrides",
    [
        {"task": "word-arithmetic"},  # no model: the embedded policy (refused later)
        {"model": "/m", "task": "countdown"},  # a task without a preset
        {"model": "/m", "task": "word-arithmetic", "dataset": "d.parquet"},  # a dataset run
    ],
)
def test_no_preset_without_a_model_or_for_other_runs(overrides: dict) -> None:
    cfg = presets.resolve_with_preset("grpo", overrides)
    assert cfg.preset_applied == "" and presets.describe(cfg) == ""
    assert cfg.to_dict() == resolve_config("grpo", overrides).to_dict()


def test_preset_applied_cannot_be_set() -> None:
    with pytest.raises(EntropyLabError, match="preset_applied"):
        presets.resolve_with_preset("grpo", {"preset_applied": "lr"})


def test_every_task_preset_is_a_valid_config_and_documented() -> None:
    for cls in TASKS.values():
        TrainConfig().replace(**cls.PRETRAINED_DEFAULTS).validate()
    assert all(k in (wa.__doc__ or "") for k in PRESET)


def test_cli_prints_and_records_the_preset(tmp_path, tiny_spec) -> None:
    tok = chat_tokenizer()
    model_dir = tmp_path / "chat"
    # chat-templated prompts of character tokens run to ~1200 positions (rotary: no weights depend on it)
    build_tiny_policy(tok, dataclasses.replace(tiny_spec, max_position_embeddings=2048)).save_pretrained(
        model_dir
    )
    tok.save_pretrained(model_dir)
    given = dict(
        prompts_per_step=2,
        samples_per_prompt=2,
        max_new_tokens=3,
        micro_batch_size=2,
        eval_prompts=2,
        eval_k=1,
    )
    sets = [f"--set={k}={v}" for k, v in {**given, "trace_every": 1, "device": "cpu"}.items()]
    args = [
        "train",
        "--model",
        model_dir,
        "--task",
        "word-arithmetic",
        "--steps",
        1,
        *sets,
        "--out",
        tmp_path / "run",
    ]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    assert record["preset_applied"].split() == ["temperature", "lr"]
    assert record["lr"] == PRESET["lr"] and record["max_new_tokens"] == 3
    assert "preset for a pretrained model: temperature=1.0, lr=1e-05 (" in " ".join(result.output.split())


def test_cli_without_a_model_fails_in_one_line(tmp_path) -> None:
    result = CliRunner().invoke(app, ["train", "--task", "word-arithmetic", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "needs a pretrained chat model" in result.output
