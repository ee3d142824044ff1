"""Turning prompt/response text into padded tensors.

Layout of one sequence: ``prompt tokens + response tokens + eos``, right-padded.
``response_mask`` marks the response tokens and the eos (what the model is trained to emit).
"""

from dataclasses import dataclass

import torch


def render_prompt(tokenizer, prompt: str) -> str:
    """The prompt as the model expects it: through its chat template when the tokenizer has one."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return prompt


@dataclass
class Encoder:
    """Tokenises prompt/response pairs with one tokenizer and fixed limits."""

    tokenizer: object
    max_prompt_tokens: int
    max_response_tokens: int

    def encode(self, prompt: str, response: str) -> tuple[list[int], int]:
        """Returns ``(ids, prompt_length)``. A long prompt keeps its end (the question); a long response its start."""
        prompt_ids = self.tokenizer(render_prompt(self.tokenizer, prompt), add_special_tokens=False)["input_ids"]
        prompt_ids = prompt_ids[-self.max_prompt_tokens :]
        response_ids = self.tokenizer(response, add_special_tokens=False)["input_ids"][: self.max_response_tokens]
        return prompt_ids + response_ids + [self.tokenizer.eos_token_id], len(prompt_ids)

    def prompt_length(self, prompt: str) -> int:
        return len(self.tokenizer(render_prompt(self.tokenizer, prompt), add_special_tokens=False)["input_ids"])

    def batch(self, prompts: list[str], responses: list[str]) -> dict[str, torch.Tensor]:
        """``input_ids``, ``attention_mask``, ``response_mask``: each ``(N, T)``."""
        encoded = [self.encode(p, r) for p, r in zip(prompts, responses)]
        width = max(len(ids) for ids, _ in encoded)
        input_ids = torch.full((len(encoded), width), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
        response_mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, (ids, prompt_length) in enumerate(encoded):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
            response_mask[row, prompt_length : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}


def scored_positions(sequences: dict) -> torch.Tensor:
    """``(N, T-1)`` bool: positions 1..T-1 that hold a response token (what a model is scored on)."""
    return sequences["response_mask"][:, 1:].bool()


def scored_actions(sequences: dict) -> torch.Tensor:
    """``(R,)`` the response tokens, row-major: the action taken at each scored state."""
    return sequences["input_ids"][:, 1:][scored_positions(sequences)]


def scatter_old_logprobs(per_sample: list[list[float]], response_mask: torch.Tensor) -> torch.Tensor:
    """Place each sample's response-token log-probabilities at their positions: ``(N, T-1)``."""
    target = response_mask[:, 1:].bool()
    out = torch.zeros(target.shape, dtype=torch.float32)
    out[target] = torch.tensor([value for row in per_sample for value in row], dtype=torch.float32)
    return out


def gather_response_logprobs(logprobs: torch.Tensor, response_mask: torch.Tensor) -> list[list[float]]:
    """The inverse of :func:`scatter_old_logprobs`, one list per row."""
    target = response_mask[:, 1:].bool()
    return [row[mask].tolist() for row, mask in zip(logprobs.float().cpu(), target.cpu())]


@dataclass
class StudentCollate:
    """Batches of prompt groups for the student step.

    Each item: ``prompt``, ``teacher`` and, for on-policy objectives, ``samples`` (K texts)
    with ``old_logprobs``. Sequences are laid out prompt-major: the K samples of a prompt are adjacent.
    """

    student: Encoder
    critic: Encoder | None = None
    teacher_cache: object | None = None
    """A :class:`~pbkd_lightning.data.teacher_cache.TeacherCache` of the teacher sequences (white-box), or None."""

    def __call__(self, items: list[dict]) -> dict:
        batch = {"teacher": self.student.batch([i["prompt"] for i in items], [i["teacher"] for i in items])}
        batch["prompts"] = [i["prompt"] for i in items]
        if self.teacher_cache is not None:
            batch["teacher"]["teacher_topk"] = self.teacher_cache.flat([i["row"] for i in items], batch["teacher"]["response_mask"])
        if "samples" in items[0]:
            prompts = [i["prompt"] for i in items for _ in i["samples"]]
            responses = [s for i in items for s in i["samples"]]
            batch["samples"] = self.student.batch(prompts, responses)
            batch["samples"]["old_logprobs"] = scatter_old_logprobs(
                [lp for i in items for lp in i["old_logprobs"]], batch["samples"]["response_mask"]
            )
            batch["group_size"] = len(items[0]["samples"])
            if self.critic is not None:
                batch["critic_samples"] = self.critic.batch(prompts, responses)
        return batch


@dataclass
class CriticCollate:
    """Batches of (prompt, teacher response, student response, preference) for the critic step."""

    critic: Encoder
    teacher_cache: object | None = None
    """As in :class:`StudentCollate`."""
    steps: int = 1
    """Critic steps per student step: more than one gives a list of that many batches, each padded on its own."""

    def __call__(self, items: list[dict]) -> dict | list[dict]:
        if self.steps > 1:
            size = -(-len(items) // self.steps)
            return [self.batch(items[begin : begin + size]) for begin in range(0, len(items), size)]
        return self.batch(items)

    def batch(self, items: list[dict]) -> dict:
        prompts = [i["prompt"] for i in items]
        batch = {
            "teacher": self.critic.batch(prompts, [i["teacher"] for i in items]),
            "student": self.critic.batch(prompts, [i["student"] for i in items]),
            "preference": torch.tensor([i["preference"] for i in items], dtype=torch.long),
        }
        if self.teacher_cache is not None:
            batch["teacher"]["teacher_topk"] = self.teacher_cache.flat([i["row"] for i in items], batch["teacher"]["response_mask"])
        return batch


def collate_records(items: list[dict]) -> list[dict]:
    """Validation and prediction batches stay as records: the step generates from their prompts."""
    return items
