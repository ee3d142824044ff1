"""Held-out preference and ranking accuracy of a critic, as torchmetrics ``Metric``s (correct under DDP: their
states are sums, reduced across ranks by torchmetrics itself)."""

from typing import Callable, Optional

import torch
from torch import nn
from torchmetrics import Metric

from pbkd_lightning.data.labelers import label_pair, sample_pairs


class PairAgreement(Metric):
    """The share of pairs whose reward margin has the sign of their label (a zero margin agrees with nothing)."""

    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state("agree", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, margin: torch.Tensor, label: torch.Tensor) -> None:
        """``margin``: ``(P,)`` r(first) − r(second); ``label``: ``(P,)`` +1 when the first is preferred, −1 when not."""
        self.agree += (margin * label > 0).sum().float()
        self.total += float(margin.numel())

    def compute(self) -> torch.Tensor:
        """The agreement over every rank's pairs; NaN when no rank saw a pair."""
        return self.agree / self.total if self.total > 0 else torch.tensor(float("nan"), device=self.agree.device)


class HeldoutPreferences(nn.Module):
    """Does the critic rank held-out (teacher, current student) pairs as the labeler does (``all`` and per task),
    and, where prompts have references, a prompt's own samples as the task's verifier does (``ranking``, what the
    student's group advantages rely on)? Ties of the labeler don't count."""

    def __init__(self, tasks: list[str]):
        super().__init__()
        self.all, self.ranking = PairAgreement(), PairAgreement()
        self.per_task = nn.ModuleDict({task: PairAgreement() for task in tasks})

    @torch.no_grad()
    def update(self, records: list[dict], samples: list[list[str]], labeler: str,
               score: Callable[[list[tuple[int, str]]], Optional[torch.Tensor]]) -> None:
        """``samples[i]``: the K student samples for ``records[i]``; ``score(texts)`` gives the critic's reward of each
        ``(record index, response)`` (every distinct text is scored once; it is called on every rank, also with an
        empty list, since a sharded critic must run as many forwards on each)."""
        pairs = [(i, s, label_pair(labeler, r, r["teacher"], s)) for i, (r, group) in enumerate(zip(records, samples))
                 for s in group]
        pairs = [pair for pair in pairs if pair[2] != 0]
        rankings = [(i, better, worse) for i, (r, group) in enumerate(zip(records, samples)) if r.get("reference") is not None
                    for better, worse in sample_pairs(r, group)]
        texts = sorted({(i, records[i]["teacher"]) for i, _, _ in pairs} | {(i, s.strip()) for i, s, _ in pairs}
                       | {(i, s) for i, b, w in rankings for s in (b, w)})
        rewards = score(texts)
        if not texts:
            return
        reward = dict(zip(texts, rewards))
        if pairs:
            margin = torch.stack([reward[(i, records[i]["teacher"])] - reward[(i, s.strip())] for i, s, _ in pairs])
            label = torch.tensor([lab for _, _, lab in pairs], device=margin.device, dtype=margin.dtype)
            self.all.update(margin, label)
            tasks = [records[i].get("task", "text") for i, _, _ in pairs]
            for task in set(tasks):
                rows = torch.tensor([t == task for t in tasks], device=margin.device)
                self.per_task[task].update(margin[rows], label[rows])
        if rankings:
            margin = torch.stack([reward[(i, b)] - reward[(i, w)] for i, b, w in rankings])
            self.ranking.update(margin, torch.ones_like(margin))
