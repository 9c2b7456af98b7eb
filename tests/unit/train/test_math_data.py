"""verl-format Parquet loading and the math-verify reward, on real rows from ../shared/data."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from entropy_lab.errors import EntropyLabError
from entropy_lab.tasks import DatasetTask, load_dataset_task, math_reward
from entropy_lab.tasks.math_data import _math_verify_equal, extract_final_answer
from entropy_lab.tokenizer import build_char_tokenizer

# The shared folder beside the repository checkout (read-only; never copied into the repo).
DATA = Path(__file__).resolve().parents[4] / "shared" / "data"
ROWS_CHECKED = 50


def _data_task(name: str) -> DatasetTask:
    path = DATA / f"{name}.parquet"
    if not path.is_file():
        pytest.skip(f"{path} is not available")
    return load_dataset_task(path)


@pytest.fixture(scope="module")
def dapo() -> DatasetTask:
    return _data_task("DAPO-Math-17k")


@pytest.fixture(scope="module")
def math500() -> DatasetTask:
    return _data_task("math500")


# --------------------------------------------------------------------------- loading real data


def test_load_dapo(dapo: DatasetTask) -> None:
    assert len(dapo) == 17_398
    assert dapo.name == "parquet:DAPO-Math-17k"
    problem = dapo.eval_problems(1)[0]
    assert "\\boxed{Answer}" in problem.prompt  # DAPO's instruction, rendered without a template
    assert problem.answer == "34"
    assert problem.meta["data_source"] == "math_dapo" and problem.meta["row"] == 0
    json.dumps(problem.meta)


def test_load_math500(math500: DatasetTask) -> None:
    assert len(math500) == 500
    first = math500.eval_problems(3)
    assert [p.meta["row"] for p in first] == [0, 1, 2]
    assert first[0].prompt == "If $2^8=4^x$, what is the value of $x$?"
    assert first[0].answer == "4"
    assert len(math500.eval_problems(10_000)) == 500  # capped at the file's length
    for p in first:
        json.dumps(p.meta)


def test_sample_is_seeded(dapo: DatasetTask) -> None:
    a = dapo.sample(8, np.random.default_rng(5))
    assert a == dapo.sample(8, np.random.default_rng(5))
    assert len({p.meta["row"] for p in a}) > 1


def test_chat_template_applied(math500: DatasetTask) -> None:
    tok = build_char_tokenizer("abc")
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    task = load_dataset_task(math500.path, tokenizer=tok)
    assert task.eval_problems(1)[0].prompt == "<|user|>If $2^8=4^x$, what is the value of $x$?\n<|assistant|>"
    plain = load_dataset_task(math500.path, tokenizer=build_char_tokenizer("abc"))  # no template: joined text
    assert plain.eval_problems(1)[0].prompt == math500.eval_problems(1)[0].prompt


# --------------------------------------------------------------------------- reward on real rows


@pytest.mark.parametrize("name", ["DAPO-Math-17k", "math500"])
def test_ground_truth_scores_one(name: str) -> None:
    task = _data_task(name)
    failures = []
    for problem in task.eval_problems(ROWS_CHECKED):
        gt = problem.answer
        for completion in (f"Let me think.\nSo the result is \\boxed{{{gt}}}.", f"Working...\nAnswer: {gt}"):
            if task.reward(problem, completion) != 1.0:
                failures.append((problem.meta["row"], gt, completion))
        if not _math_verify_equal(gt, gt):  # math-verify itself, past the string shortcut
            failures.append((problem.meta["row"], gt, "math-verify"))
    assert not failures, failures


@pytest.mark.parametrize("name", ["DAPO-Math-17k", "math500"])
def test_wrong_answer_scores_zero(name: str) -> None:
    task = _data_task(name)
    checked = 0
    for problem in task.eval_problems(ROWS_CHECKED):
        if problem.answer.lstrip("-").isdigit():
            wrong = str(int(problem.answer) + 1)
            assert task.reward(problem, f"\\boxed{{{wrong}}}") == 0.0, problem.answer
            assert task.reward(problem, f"Answer: {wrong}") == 0.0, problem.answer
            checked += 1
    assert checked >= 20


def test_math500_non_numeric_wrong_answers(math500: DatasetTask) -> None:
    # Each row's ground truth offered as the answer to the previous row (none are equivalent).
    problems = [p for p in math500.eval_problems(100) if not p.answer.lstrip("-").isdigit()]
    for prev, problem in zip(problems, problems[1:], strict=False):
        assert math500.reward(problem, f"\\boxed{{{prev.answer}}}") == 0.0, (problem.answer, prev.answer)


# --------------------------------------------------------------------------- verifier hand cases


@pytest.mark.parametrize(
    ("completion", "ground_truth"),
    [
        ("The answer is \\boxed{0.5}", "\\frac{1}{2}"),
        ("\\boxed{\\dfrac{1}{2}}", "0.5"),
        ("\\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}"),
        ("Answer: 1/2", "\\frac{1}{2}"),
        ("Answer: $\\frac12$", "0.5"),
        ("Answer: $34$.", "34"),
        ("\\boxed{34.0}", "34"),
        ("\\boxed{[-2, 7]}", "[-2,7]"),
        ("Answer: 2125", "2,125"),
        ("\\boxed{4.5\\times 10^{33}}", "4.5e33"),
        ("\\boxed{3x+x^3-6}", "x^3+3x-6"),
        ("\\boxed{\\frac{\\sqrt{3}}{3}}", "\\frac{1}{\\sqrt{3}}"),
        ("\\boxed{\\text{Evelyn}}", "Evelyn"),
        ("first \\boxed{3}, then corrected: \\boxed{\\frac{1}{\\left(2\\right)}}", "\\frac{1}{2}"),
        ("\\boxed{7}\nAnswer: 5", "5"),  # the later of the two wins
        ("Answer: 7\n\\boxed{5}", "5"),
        ("\\boxed{5} and a broken \\boxed{6", "5"),  # unbalanced last box: the previous one
    ],
)
def test_equivalent_forms_score_one(completion: str, ground_truth: str) -> None:
    assert math_reward(completion, ground_truth) == 1.0


@pytest.mark.parametrize(
    ("completion", "ground_truth"),
    [
        ("\\boxed{1/3}", "0.5"),
        ("\\boxed{2.88e-19}", "1.325e-27"),  # math-verify alone would round both to 0
        ("Answer: 35", "34"),
        ("\\boxed{4064257}", "4064256"),  # large integers compare exactly, not within a tolerance
        ("Answer: 2126", "2,125"),
        ("\\boxed{\\leftarrow}", "\\rightarrow"),
        ("\\boxed{5}\nAnswer: 7", "5"),
        ("The answer is 34.", "34"),  # prose only: no final-answer marker
        ("", "34"),
        ("\\boxed{}", "34"),
        ("Answer:", "34"),
        ("\\boxed{", "34"),
        ("}}}{{{\\boxed{{{", "34"),
        ("\\boxed{\\frac{1}{0}}", "34"),
        ("\x00\xff\ufffd garbage \\boxed{\\left(}", "34"),
        ("\\boxed{" + "9" * 5_000 + "}", "34"),
        ("blah " * 200_000, "34"),
    ],
)
def test_wrong_or_garbage_scores_zero(completion: str, ground_truth: str) -> None:
    start = time.perf_counter()
    assert math_reward(completion, ground_truth) == 0.0
    assert time.perf_counter() - start < 1.5


def test_extraction_handles_nested_braces() -> None:
    assert extract_final_answer("x \\boxed{\\frac{a^{2}}{\\sqrt{b}}} y") == "\\frac{a^{2}}{\\sqrt{b}}"
    assert extract_final_answer("\\fbox{12}") == "12"
    assert extract_final_answer("ANSWER: $\\pi$.") == "\\pi"
    assert extract_final_answer("nothing here") is None


def test_pathological_answer_times_out_to_zero() -> None:
    # sympy would not finish this; math-verify's alarm stops it (MATH_VERIFY_TIMEOUT_S per step).
    start = time.perf_counter()
    assert math_reward("\\boxed{10^{10^{10^{10}}}}", "5") == 0.0
    assert time.perf_counter() - start < 15


def test_reward_from_a_worker_thread() -> None:
    # signal.alarm is main-thread only; other threads use a child process that keeps the alarms.
    results: list[float] = []
    cases = [
        ("\\boxed{0.5}", "\\frac{1}{2}"),
        ("\\boxed{\\frac{1}{3}}", "\\frac{1}{2}"),
        ("\\boxed{(x+1)^{10000}}", "5"),
    ]
    thread = threading.Thread(target=lambda: results.extend(math_reward(c, g) for c, g in cases))
    start = time.perf_counter()
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert results == [1.0, 0.0, 0.0]
    assert time.perf_counter() - start < 30


# --------------------------------------------------------------------------- bad files


def test_missing_file_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "nope.parquet"
    with pytest.raises(EntropyLabError, match="nope.parquet.*does not exist"):
        load_dataset_task(path)


def test_missing_columns_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.parquet"
    pd.DataFrame({"data_source": ["x"], "prompt": [[{"role": "user", "content": "hi"}]]}).to_parquet(path)
    with pytest.raises(EntropyLabError) as info:
        load_dataset_task(path)
    message = str(info.value)
    assert "bad.parquet" in message and "reward_model" in message and "prompt," not in message


def test_not_parquet_and_bad_rows(tmp_path: Path) -> None:
    text = tmp_path / "text.parquet"
    text.write_text("not parquet")
    with pytest.raises(EntropyLabError, match="could not be read as Parquet"):
        load_dataset_task(text)
    rows = tmp_path / "rows.parquet"
    pd.DataFrame(
        {
            "prompt": [[{"role": "user", "content": "1+1?"}], [{"role": "user", "content": "2+2?"}]],
            "reward_model": [{"ground_truth": "2", "style": "rule"}, {"ground_truth": None, "style": "rule"}],
        }
    ).to_parquet(rows)
    with pytest.raises(EntropyLabError, match="row 1 has no reward_model.ground_truth"):
        load_dataset_task(rows)


def test_minimal_file_and_no_demonstrations(tmp_path: Path) -> None:
    path = tmp_path / "mini.parquet"
    pd.DataFrame(
        {
            "prompt": [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"}]],
            "reward_model": [{"ground_truth": "2", "style": "rule"}],
        }
    ).to_parquet(path)
    task = load_dataset_task(path, max_new_tokens=64)
    problem = task.eval_problems(5)[0]
    assert problem.prompt == "Be brief.\n1+1?" and problem.answer == "2"
    assert task.max_new_tokens == 64
    assert task.reward(problem, "Answer: 2") == 1.0
    with pytest.raises(NotImplementedError):
        task.demonstration(problem, np.random.default_rng(0))
    with pytest.raises(NotImplementedError):
        task.alphabet()
