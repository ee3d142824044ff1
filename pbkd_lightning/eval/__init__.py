"""Scoring student responses on held-out prompts."""

from collections import defaultdict

from pbkd_lightning.tasks import get_task


def score_responses(records: list[dict], responses: list[str]) -> list[tuple[str, float]]:
    """``(task name, score in [0, 1])`` for each response, scored against its record's reference."""
    scored = []
    for record, response in zip(records, responses):
        if record.get("reference") is None:
            continue
        task = get_task(record.get("task", "text"))
        scored.append((task.name, task.score(response, record)))
    return scored


def mean_scores(scored: list[tuple[str, float]]) -> dict[str, float]:
    """Mean score per task, plus ``mean`` over the tasks."""
    by_task = defaultdict(list)
    for task, score in scored:
        by_task[task].append(score)
    means = {task: sum(values) / len(values) for task, values in sorted(by_task.items())}
    if means:
        means["mean"] = sum(means.values()) / len(means)
    return means
