"""Verifiable tasks: the built-in ``countdown``, ``arithmetic`` and ``word-arithmetic``, and verl-format Parquet data.

``get_task(name, **kwargs)`` builds a registered built-in task, ``build_task(name, tokenizer)``
one for a pretrained model (tasks that render prompts with its chat template get its
tokenizer); ``load_dataset_task(path, tokenizer)`` builds a task over a Parquet file.
Importing this package registers the built-in tasks.
"""

from entropy_lab.tasks.arithmetic import ArithmeticTask  # registers "arithmetic"
from entropy_lab.tasks.base import TASKS, Problem, Task, build_task, get_task, register_task
from entropy_lab.tasks.countdown import CountdownTask  # registers "countdown"
from entropy_lab.tasks.math_data import DatasetTask, load_dataset_task, math_reward
from entropy_lab.tasks.word_arithmetic import WordArithmeticTask  # registers "word-arithmetic"

__all__ = [
    "TASKS",
    "ArithmeticTask",
    "CountdownTask",
    "DatasetTask",
    "Problem",
    "Task",
    "WordArithmeticTask",
    "build_task",
    "get_task",
    "load_dataset_task",
    "math_reward",
    "register_task",
]
