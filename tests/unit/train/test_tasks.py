"""Built-in tasks (countdown, arithmetic), the task registry and the character tokenizer."""

from __future__ import annotations

import json
import re
import time
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from entropy_lab.errors import EntropyLabError
from entropy_lab.tasks import TASKS, Problem, Task, get_task, register_task
from entropy_lab.tasks.countdown import CountdownTask, evaluate, solutions
from entropy_lab.tokenizer import SPECIAL_TOKENS, build_char_tokenizer


@pytest.fixture(scope="module")
def countdown() -> CountdownTask:
    return get_task("countdown")


@pytest.fixture(scope="module")
def p14(countdown: CountdownTask) -> Problem:
    return countdown.make_problem([3, 4, 2], 14)


# --------------------------------------------------------------------------- countdown: parser


@pytest.mark.parametrize(
    ("text", "value", "numbers"),
    [
        ("1+2*3", Fraction(7), [1, 2, 3]),
        ("(1+2)*3", Fraction(9), [1, 2, 3]),
        ("1-2-3", Fraction(-4), [1, 2, 3]),  # left-associative
        ("8/4/2", Fraction(1), [8, 4, 2]),
        ("8/3", Fraction(8, 3), [8, 3]),  # exact, not floor or float
        (" 12 * ( 3 - 1 ) ", Fraction(24), [12, 3, 1]),
    ],
)
def test_evaluate_hand_cases(text: str, value: Fraction, numbers: list[int]) -> None:
    assert evaluate(text) == (value, numbers)


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "1+",
        "(1+2",
        "1+2)",
        "()",
        "-1+2",
        "1**2",
        "1//2",
        "2^3",
        "03+1",
        "1/0",
        "1/(2-2)",
        "x",
        "1 2",
    ],
)
def test_evaluate_rejects(text: str) -> None:
    assert evaluate(text) is None


def test_solutions_hand_case() -> None:
    expected = {"3*4+2", "4*3+2", "2+3*4", "2+4*3", "(3+4)*2", "(4+3)*2", "2*(3+4)", "2*(4+3)"}
    assert set(solutions((3, 4, 2), 14)) == expected
    assert solutions((2, 2, 2), 6) == ("2*2+2", "2+2*2", "2+2+2")  # duplicates collapse
    assert solutions((3, 4, 2), 12) == ()
    assert solutions((9, 8, 7), 9) == tuple(sorted(solutions((9, 8, 7), 9)))


# --------------------------------------------------------------------------- countdown: reward


def test_countdown_format(countdown: CountdownTask, p14: Problem) -> None:
    assert p14.prompt == "3 4 2>14:"
    assert p14.answer == "14"
    assert p14.meta == {"numbers": [3, 4, 2], "target": 14}
    json.dumps(p14.meta)
    assert 12 <= countdown.max_new_tokens <= 16


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("3*4+2", 1.0),
        ("2+4*3", 1.0),
        ("(3+4)*2", 1.0),
        ("((3*4))+2", 1.0),  # redundant parentheses are fine
        (" 3 * 4 + 2 ", 1.0),  # spaces are fine
        ("3+4+2", 0.0),  # wrong value
        ("3*4-2", 0.0),
        ("4*4-2", 0.0),  # 4 reused, 3 missing
        ("3*4+2+2-2", 0.0),  # 2 reused
        ("3*4*2/2+2", 0.0),
        ("3*4", 0.0),  # 2 missing
        ("3*4+2+0", 0.0),  # extra number
        ("3*4+2*1", 0.0),
        ("14", 0.0),
        ("3*4+2/(4-4)", 0.0),  # division by zero
        ("3/0", 0.0),
        ("3*4+2=14", 0.0),  # trailing text
        ("3*4+2 and more", 0.0),
        ("3*4+2)", 0.0),  # unbalanced
        ("(3*4+2", 0.0),
        ("-3*-4+2", 0.0),  # unary minus is not in the grammar
        ("03*4+2", 0.0),  # leading zero
        ("abc", 0.0),
        ("", 0.0),
        ("   ", 0.0),
        ("99999999999999999999*99999999999999999999", 0.0),
        ("(" * 100_000, 0.0),
        ("1+" * 50_000 + "1", 0.0),
        ("9" * 100_000, 0.0),
        ("3*4+2" + " " * 100_000, 0.0),  # over the length cap before stripping
    ],
)
def test_countdown_reward_hand_cases(
    countdown: CountdownTask, p14: Problem, completion: str, expected: float
) -> None:
    start = time.perf_counter()
    assert countdown.reward(p14, completion) == expected
    assert time.perf_counter() - start < 0.5


def test_countdown_reward_malformed_problem(countdown: CountdownTask) -> None:
    assert countdown.reward(Problem(prompt="?", answer="?", meta={}), "1+2") == 0.0


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), config=st.sampled_from([{}, {"num_count": 4, "max_number": 12}]))
def test_every_demonstration_and_solution_scores_one(seed: int, config: dict) -> None:
    task = get_task("countdown", **config)
    rng = np.random.default_rng(seed)
    for problem in task.sample(3, rng):
        target, numbers = problem.meta["target"], problem.meta["numbers"]
        assert task.min_target <= target <= task.max_target
        assert len(numbers) == task.num_count
        assert all(task.min_number <= x <= task.max_number for x in numbers)
        demo = task.demonstration(problem, rng)
        assert task.reward(problem, demo) == 1.0
        assert len(demo) <= task.max_new_tokens
        assert set(problem.prompt + demo) <= set(task.alphabet())
        for solution in solutions(tuple(numbers), target):
            assert task.reward(problem, solution) == 1.0


def test_demonstrations_are_diverse(countdown: CountdownTask, p14: Problem) -> None:
    rng = np.random.default_rng(0)
    demos = [countdown.demonstration(p14, rng) for _ in range(300)]
    assert set(demos) == set(solutions((3, 4, 2), 14))  # all 8 solutions appear
    counts = np.array([demos.count(s) for s in set(demos)])
    assert counts.min() > 15  # roughly uniform (expected 37.5 each)


def test_demonstrations_diverse_on_sampled_problems(countdown: CountdownTask) -> None:
    problems = countdown.sample(200, np.random.default_rng(1))
    n_solutions = [len(solutions(tuple(p.meta["numbers"]), p.meta["target"])) for p in problems]
    assert np.mean(np.array(n_solutions) >= 2) > 0.8  # most problems have several answers


def test_countdown_sample_is_seeded_and_well_formed(countdown: CountdownTask) -> None:
    a = countdown.sample(50, np.random.default_rng(7))
    b = countdown.sample(50, np.random.default_rng(7))
    assert a == b
    assert all(re.fullmatch(r"[1-9] [1-9] [1-9]>\d{1,2}:", p.prompt) for p in a)


@pytest.mark.parametrize("name", ["countdown", "arithmetic"])
def test_eval_problems_deterministic_and_held_out(name: str) -> None:
    task = get_task(name)
    first = task.eval_problems(100)
    assert first == get_task(name).eval_problems(100)  # fresh instance, same list
    assert task.eval_problems(40) == first[:40]  # a prefix of a longer list
    key = (
        (lambda p: task._key(p.meta["numbers"], p.meta["target"]))
        if name == "countdown"
        else (lambda p: p.prompt)
    )
    eval_keys = {key(p) for p in first}
    assert len(eval_keys) == len(first)  # distinct while the split allows
    train_keys = {key(p) for p in task.sample(3_000, np.random.default_rng(0))}
    assert not eval_keys & train_keys


def test_eval_problems_beyond_split_size_repeat() -> None:
    task = get_task("countdown", max_number=3, max_target=9)  # tiny problem space
    problems = task.eval_problems(50)
    assert len(problems) == 50
    assert all(task.reward(p, task.demonstration(p, np.random.default_rng(0))) == 1.0 for p in problems)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_count": 0},
        {"min_number": 5, "max_number": 2},
        {"min_target": 9, "max_target": 1},
        {"eval_fraction": 1.0},
    ],
)
def test_countdown_bad_parameters(kwargs: dict) -> None:
    with pytest.raises(EntropyLabError):
        get_task("countdown", **kwargs)


def test_countdown_unreachable_targets() -> None:
    task = get_task("countdown", max_number=2, min_target=500, max_target=600)
    with pytest.raises(EntropyLabError, match="widen"):
        task.sample(1, np.random.default_rng(0))


# --------------------------------------------------------------------------- arithmetic


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("68", 1.0),
        (" 68", 1.0),
        ("68=", 1.0),  # trailing text after the leading number is ignored
        ("68+1", 1.0),
        ("6", 0.0),
        ("680", 0.0),
        ("-68", 0.0),
        ("", 0.0),
        ("=68", 0.0),
        ("abc", 0.0),
        ("9" * 100_000, 0.0),
    ],
)
def test_arithmetic_reward(completion: str, expected: float) -> None:
    task = get_task("arithmetic")
    problem = task.make_problem(23, "+", 45)
    assert problem.prompt == "23+45=" and problem.answer == "68"
    assert task.reward(problem, completion) == expected


@pytest.mark.parametrize("ops", ["+", "+-*"])
def test_arithmetic_demonstrations(ops: str) -> None:
    task = get_task("arithmetic", ops=ops)
    rng = np.random.default_rng(3)
    for problem in task.sample(200, rng) + task.eval_problems(20):
        demo = task.demonstration(problem, rng)
        assert task.reward(problem, demo) == 1.0
        assert int(demo) >= 0
        assert set(problem.prompt + demo) <= set(task.alphabet())
        assert len(demo) <= task.max_new_tokens


# --------------------------------------------------------------------------- registry


def test_registry_contents() -> None:
    assert {"countdown", "arithmetic"} <= set(TASKS)
    assert isinstance(get_task("countdown"), Task)
    assert get_task("countdown", num_count=4).num_count == 4
    assert get_task("arithmetic").name == "arithmetic"


def test_unknown_task_lists_valid_names() -> None:
    with pytest.raises(EntropyLabError) as info:
        get_task("no-such-task")
    assert "countdown" in str(info.value) and "arithmetic" in str(info.value)


def test_duplicate_and_invalid_registration_refused() -> None:
    with pytest.raises(EntropyLabError, match="already registered"):

        @register_task("countdown")
        class Again(CountdownTask):
            pass

    assert TASKS["countdown"] is CountdownTask
    with pytest.raises(EntropyLabError):
        register_task("not-a-task")(dict)  # type: ignore[arg-type]
    assert "not-a-task" not in TASKS


def test_registering_a_new_task() -> None:
    try:

        @register_task("test-constant")
        class Constant(Task):
            max_new_tokens = 1

            def sample(self, n, rng):
                return [Problem("q", "a", {})] * n

            def eval_problems(self, n):
                return self.sample(n, None)

            def reward(self, problem, completion):
                return float(completion == problem.answer)

        task = get_task("test-constant")
        assert task.name == "test-constant"
        with pytest.raises(NotImplementedError):
            task.demonstration(Problem("q", "a", {}), np.random.default_rng(0))
    finally:
        TASKS.pop("test-constant", None)


# --------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("name", ["countdown", "arithmetic"])
def test_tokenizer_round_trip(name: str, tmp_path) -> None:
    task = get_task(name)
    tok = build_char_tokenizer(task.alphabet())
    assert [tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token] == list(SPECIAL_TOKENS)
    assert [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id] == [0, 1, 2, 3]
    assert len(tok) == len(SPECIAL_TOKENS) + len(set(task.alphabet()))
    assert not tok.chat_template

    rng = np.random.default_rng(0)
    texts = [p.prompt + task.demonstration(p, rng) for p in task.sample(20, rng)]
    texts.append(task.alphabet()[::-1] * 2)
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(text)  # one token per character
        assert tok.decode(ids) == text
        framed = [tok.bos_token_id, *ids, tok.eos_token_id, tok.pad_token_id]
        assert tok.decode(framed, skip_special_tokens=True) == text
        assert loaded(text, add_special_tokens=False)["input_ids"] == ids
        assert loaded.decode(framed, skip_special_tokens=True) == text
    assert loaded.get_vocab() == tok.get_vocab()
    assert loaded.eos_token_id == tok.eos_token_id and loaded.pad_token_id == tok.pad_token_id


def test_tokenizer_ids_deterministic_and_unknowns() -> None:
    a = build_char_tokenizer("0123456789+=")
    assert a.get_vocab() == build_char_tokenizer("=+9876543210").get_vocab()  # order-independent
    assert a.convert_tokens_to_ids(["+", "0", "="]) == [4, 5, 15]
    assert a("7?x\n", add_special_tokens=False)["input_ids"] == [12, 3, 3, 3]
    with pytest.raises(EntropyLabError):
        build_char_tokenizer("")


def test_tokenizer_keeps_spaces_and_newlines() -> None:
    tok = build_char_tokenizer(" \n12")
    text = "  1 \n2  "  # leading, trailing and repeated spaces, a newline
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == text
