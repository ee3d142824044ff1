"""Labelers decide which of two responses to a prompt is preferred.

A label is +1 (the teacher's response preferred), -1 (the student's) or 0 (a tie: no
preference information, left out of the Bradley–Terry term and of preference accuracy).
"""

from pbkd_lightning.tasks import get_task

LABELERS = ("teacher", "verifier", "both")


def label_pair(labeler: str, record: dict, teacher: str, student: str) -> int:
    """Label one pair.

    ``teacher``: the teacher is always preferred (the paper's choice), except when both texts
    are identical. ``verifier``: the response the task scores higher is preferred; equal scores tie.
    ``both``: the verifier where it decides, else the teacher (the paper's rule breaks the verifier's ties).
    """
    if labeler not in LABELERS:
        raise ValueError(f"unknown labeler {labeler!r}; choose one of {LABELERS}")
    if teacher.strip() == student.strip():
        return 0
    if labeler == "teacher":
        return 1
    verdict = verify(record, teacher, student)
    return verdict if verdict != 0 or labeler == "verifier" else 1


def verify(record: dict, first: str, second: str) -> int:
    """+1 when the task scores ``first`` higher than ``second``, -1 when lower, 0 when equal."""
    task = get_task(record.get("task", "text"))
    if record.get("reference") is None:
        raise ValueError("the verifier labeler needs a 'reference' on every prompt")
    first_score, second_score = task.score(first, record), task.score(second, record)
    return (first_score > second_score) - (first_score < second_score)


def sample_pairs(record: dict, samples: list[str]) -> list[tuple[str, str]]:
    """``(better, worse)`` for every two of a prompt's samples that the verifier tells apart: what the
    student step's group advantages compare, so the reward model learns to rank them too."""
    distinct = list(dict.fromkeys(s.strip() for s in samples))
    pairs = []
    for i, first in enumerate(distinct):
        for second in distinct[i + 1 :]:
            verdict = verify(record, first, second)
            if verdict:
                pairs.append((first, second) if verdict > 0 else (second, first))
    return pairs
