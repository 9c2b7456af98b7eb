"""Verifiable tasks: the built-in ``countdown`` and ``arithmetic``, and verl-format Parquet data.

``get_task(name, **kwargs)`` builds a registered built-in task; ``load_dataset_task(path,
tokenizer)`` builds a task over a Parquet file. Importing this package registers the
built-in tasks.
"""

from entropy_lab.tasks.arithmetic import ArithmeticTask  # registers "arithmetic"
from entropy_lab.tasks.base import TASKS, Problem, Task, get_task, register_task
from entropy_lab.tasks.countdown import CountdownTask  # registers "countdown"
from entropy_lab.tasks.math_data import DatasetTask, load_dataset_task, math_reward

__all__ = [
    "TASKS",
    "ArithmeticTask",
    "CountdownTask",
    "DatasetTask",
    "Problem",
    "Task",
    "get_task",
    "load_dataset_task",
    "math_reward",
    "register_task",
]
