"""Built-in tasks: each draws prompt records from a seed and scores a prediction for a record.

A task has ``name``, ``record(rng) -> dict`` (one random prompt record: ``{"task", "prompt", "reference"}``; the
reference is also the task program teacher's response), ``generate(n, seed)`` and
``score(prediction, record) -> float`` in [0, 1]; :func:`split_prompts` draws a task's held-out prompts and a
disjoint training pool.
"""

import random

from pbkd_lightning.tasks.arithmetic import ArithmeticTask
from pbkd_lightning.tasks.distinct import DistinctTask
from pbkd_lightning.tasks.reversal import ReversalTask


class TextTask(ReversalTask):
    """Records of your own without a built-in task: scored by ROUGE-L F1, never generated."""

    name = "text"

    def record(self, rng: random.Random) -> dict:
        raise ValueError("the 'text' task scores records of your own; it cannot generate any")


TASKS = {task.name: task for task in (ArithmeticTask(), ReversalTask(), DistinctTask(), TextTask())}
BUILT_IN = ("arithmetic", "reversal", "distinct")


def get_task(name: str):
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; built-in tasks: {sorted(TASKS)}") from None


def split_prompts(task, train_size: int, val_size: int, seed: int) -> tuple[list[dict], list[dict]]:
    """``(train, held_out)``: ``val_size`` distinct held-out prompts (drawn with ``seed + 1``), then ``train_size``
    distinct training prompts (drawn with ``seed``) none of which is held out."""
    held_out = _distinct(task, val_size, random.Random(seed + 1), set())
    return _distinct(task, train_size, random.Random(seed), {r["prompt"] for r in held_out}), held_out


def _distinct(task, count: int, rng: random.Random, taken: set) -> list[dict]:
    records, seen, draws = [], set(taken), 0
    while len(records) < count:
        draws += 1
        if draws > 20 * count + 1000:
            raise ValueError(f"task {task.name!r} has too few distinct prompts for {count} (+ {len(taken)} held out); "
                             "lower `data.train_size` or `data.val_size`")
        record = task.record(rng)
        if record["prompt"] not in seen:
            seen.add(record["prompt"])
            records.append(record)
    return records


__all__ = ["TASKS", "BUILT_IN", "get_task", "split_prompts", "ArithmeticTask", "DistinctTask", "ReversalTask"]
