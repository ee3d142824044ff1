"""Collating buffer items into the typed batches of :mod:`pbkd_lightning.sequences`."""

from dataclasses import dataclass

import torch

from pbkd_lightning.sequences import Encoder, PairBatch, Rollout, SequenceBatch, StudentBatch, scatter_logprobs


def _attach_cache(batch: SequenceBatch, rows: list, teacher_cache) -> SequenceBatch:
    batch.rows = rows
    if teacher_cache is not None and all(row is not None for row in rows):
        batch.teacher_topk = teacher_cache.flat(rows, batch.loss_mask)
    return batch


@dataclass
class StudentCollate:
    """Batches of prompt groups for the student step.

    Each item: ``prompt``, ``teacher``, ``row`` and, for on-policy objectives, ``rollouts`` (K
    :class:`~pbkd_lightning.sequences.Rollout`). Samples are laid out prompt-major, their tokens as sampled.
    """

    student: Encoder
    critic: Encoder | None = None
    """The critic's encoder when its tokenizer is not the student's (the samples' text is then re-tokenised for it)."""
    teacher_cache: object | None = None
    """A :class:`~pbkd_lightning.data.teacher_cache.TeacherCache` of the teacher sequences (white-box), or None."""

    def __call__(self, items: list[dict]) -> StudentBatch:
        prompts = [i["prompt"] for i in items]
        teacher = self.student.batch(prompts, [i["teacher"] for i in items], [i.get("teacher_ended", True) for i in items])
        teacher = _attach_cache(teacher, [i.get("row") for i in items], self.teacher_cache)
        batch = StudentBatch(prompts, teacher)
        if "rollouts" in items[0]:
            sample_prompts = [i["prompt"] for i in items for _ in i["rollouts"]]
            rollouts = [r for i in items for r in i["rollouts"]]
            batch.samples = self.student.batch(sample_prompts, rollouts)
            batch.old_logprobs = scatter_logprobs([r.logprobs for r in rollouts], batch.samples)
            batch.group_size = len(items[0]["rollouts"])
            if self.critic is not None:
                batch.critic_samples = self.critic.batch(sample_prompts, [r.text for r in rollouts], [r.ended for r in rollouts])
        return batch


@dataclass
class CriticCollate:
    """Batches of preference pairs for the critic step: each item has ``prompt``, ``chosen`` and ``rejected``
    (a text or a :class:`~pbkd_lightning.sequences.Rollout`), ``preference``, ``teacher_pair`` and ``row`` (the
    chosen teacher sequence's place in the teacher cache)."""

    critic: Encoder
    teacher_cache: object | None = None
    """As in :class:`StudentCollate`."""
    steps: int = 1
    """Critic steps per student step: more than one gives a list of that many batches, each padded on its own."""
    sampled_tokens: bool = True
    """The critic reads the student's tokenizer: samples are used as sampled; else their text is re-tokenised."""

    def __call__(self, items: list[dict]) -> PairBatch | list[PairBatch]:
        if self.steps > 1:
            size = -(-len(items) // self.steps)
            return [self.batch(items[begin : begin + size]) for begin in range(0, len(items), size)]
        return self.batch(items)

    def _side(self, prompts: list[str], responses: list, ended: list[bool]) -> SequenceBatch:
        if not self.sampled_tokens:  # another tokenizer: the text, re-tokenised, with the rollout's own eos flag
            ended = [r.ended if isinstance(r, Rollout) else e for r, e in zip(responses, ended)]
            responses = [r.text if isinstance(r, Rollout) else r for r in responses]
        return self.critic.batch(prompts, responses, ended)

    def batch(self, items: list[dict]) -> PairBatch:
        prompts = [i["prompt"] for i in items]
        chosen = self._side(prompts, [i["chosen"] for i in items], [i.get("chosen_ended", True) for i in items])
        chosen = _attach_cache(chosen, [i.get("row") for i in items], self.teacher_cache)
        return PairBatch(
            chosen,
            self._side(prompts, [i["rejected"] for i in items], [True] * len(items)),
            torch.tensor([i["preference"] for i in items], dtype=torch.long),
            torch.tensor([bool(i["teacher_pair"]) for i in items], dtype=torch.bool),
        )


def collate_records(items: list[dict]) -> list[dict]:
    """Validation and prediction batches stay as records: the step generates from their prompts."""
    return items
