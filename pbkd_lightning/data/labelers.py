"""Labelers decide which of two responses to a prompt is preferred.

A label is +1 (the teacher's response preferred), -1 (the student's) or 0 (a tie: no
preference information, left out of the Bradley–Terry term and of preference accuracy).
"""

from pbkd_lightning.tasks import get_task

LABELERS = ("teacher", "verifier")


def label_pair(labeler: str, record: dict, teacher: str, student: str) -> int:
    """Label one pair.

    ``teacher``: the teacher is always preferred (the paper's choice), except when both texts
    are identical. ``verifier``: the response the task scores higher is preferred; equal scores tie.
    """
    if teacher.strip() == student.strip():
        return 0
    if labeler == "teacher":
        return 1
    if labeler == "verifier":
        task, reference = get_task(record.get("task", "text")), record.get("reference")
        if reference is None:
            raise ValueError("the verifier labeler needs a 'reference' on every prompt")
        teacher_score, student_score = task.score(teacher, reference), task.score(student, reference)
        return (teacher_score > student_score) - (teacher_score < student_score)
    raise ValueError(f"unknown labeler {labeler!r}; choose one of {LABELERS}")
