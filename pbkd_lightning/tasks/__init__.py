"""Built-in tasks: each generates records from a seed and scores a prediction against its reference.

A task is anything with ``name``, ``generate(n, seed) -> list[dict]`` and
``score(prediction, reference) -> float`` in [0, 1]. Records are
``{"task", "prompt", "reference"}``; the reference is also the program teacher's response.
"""

from pbkd_lightning.tasks.arithmetic import ArithmeticTask
from pbkd_lightning.tasks.reversal import ReversalTask



class TextTask(ReversalTask):
    """Records of your own without a built-in task: scored by ROUGE-L F1, never generated."""

    name = "text"

    def generate(self, n: int, seed: int) -> list[dict]:
        raise ValueError("the 'text' task scores records of your own; it cannot generate any")


TASKS = {task.name: task for task in (ArithmeticTask(), ReversalTask(), TextTask())}


def get_task(name: str):
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; built-in tasks: {sorted(TASKS)}") from None


__all__ = ["TASKS", "get_task", "ArithmeticTask", "ReversalTask"]
