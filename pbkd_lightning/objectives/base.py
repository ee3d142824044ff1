"""What every objective provides to DistillationModule, and how its means stay exact under accumulation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from pbkd_lightning.data.generation import sample_rollouts
from pbkd_lightning.sequences import PairBatch, StudentBatch


OBJECTIVE_KEY = "model.objective.init_args."
"""Where an objective's settings live in the config: its field errors name the full key."""


def batch_units(batch: Union[StudentBatch, PairBatch]) -> dict[str, Tensor]:
    """The counts an objective's means are taken over, for one (micro-)batch.

    Student batches: ``prompts``, ``teacher_tokens`` (scored tokens of the teacher sequences), ``sample_tokens``.
    Pair batches: ``pairs``, ``teacher_pairs``, ``decided_pairs`` (preference ≠ 0), ``chosen_tokens``,
    ``rejected_tokens``, ``pair_tokens`` (both sides).
    """
    if isinstance(batch, PairBatch):
        chosen, rejected = batch.chosen.num_scored.float(), batch.rejected.num_scored.float()
        return {
            "pairs": torch.tensor(float(len(batch)), device=batch.preference.device),
            "teacher_pairs": batch.teacher_pair.sum().float(),
            "decided_pairs": (batch.preference != 0).sum().float(),
            "chosen_tokens": chosen, "rejected_tokens": rejected, "pair_tokens": chosen + rejected,
        }
    units = {"prompts": torch.tensor(float(len(batch)), device=batch.teacher.input_ids.device),
             "teacher_tokens": batch.teacher.num_scored.float()}
    units["sample_tokens"] = batch.samples.num_scored.float() if batch.samples is not None else torch.zeros_like(units["prompts"])
    return units


@dataclass
class Share:
    """This micro-batch's share of the whole step, per unit: ``local count × world size / total count``.

    The totals are summed over every micro-batch of the step and over every data-parallel rank. An objective
    multiplies each mean it computes on a micro-batch by its share of that mean's unit, so the summed gradient is
    that of one mean over the whole batch (data parallelism averages gradients over ranks, hence the world size),
    not a mean of per-micro-batch means.
    """

    local: dict[str, Tensor]
    totals: dict[str, Tensor]
    world_size: int = 1

    def __call__(self, unit: str) -> Tensor:
        return self.local[unit] * self.world_size / self.totals[unit].clamp(min=1.0)

    @classmethod
    def whole(cls, batch) -> "Share":
        """A batch that is the whole step on one process: every share is 1 (or 0 for an empty unit)."""
        units = batch_units(batch)
        return cls(units, units, 1)


def micro_batches(batch, size: Optional[int]) -> list:
    """``batch`` split into consecutive pieces of ``size`` items (prompts with all their samples, or pairs)."""
    if not size or size >= len(batch):
        return [batch]
    return [batch.select(range(begin, min(begin + size, len(batch)))) for begin in range(0, len(batch), size)]


def accumulate_gradients(
    compute: Callable, batch, micro_batch_size: Optional[int], backward: Callable,
    reduce_sum: Optional[Callable] = None, world_size: int = 1, term_units: Optional[dict[str, str]] = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Forward and backward ``batch`` in micro-batches, each loss weighted by its :class:`Share` of the whole step.

    Args:
        compute: ``compute(micro_batch, share) -> terms`` with a ``loss`` key (an objective's loss).
        backward: called on each micro-batch's loss (``LightningModule.manual_backward``).
        reduce_sum: sums a tensor over the data-parallel ranks (None: one process).
        world_size: the data-parallel ranks, whose gradients the strategy averages.
        term_units: the unit each logged term is a mean over (``sum``: a count, summed); others are weighted by items.

    Returns:
        ``(loss, terms)``: this rank's summed loss (the whole batch's mean on one process) and every other term
        as this rank's mean over its unit (a micro-batch with no teacher pair adds nothing to ``reward_gap``).
    """
    pieces = micro_batches(batch, micro_batch_size)
    counts = [batch_units(piece) for piece in pieces]
    whole = len(pieces) == 1  # the usual step: no sums of counts, every term logged as computed
    totals = counts[0] if whole else {unit: sum(c[unit] for c in counts) for unit in counts[0]}
    mine = dict(totals)  # this rank's counts, for the logged means
    term_units = term_units or {}
    if reduce_sum is not None and world_size > 1:  # one collective for every unit
        names = sorted(totals)
        totals = dict(zip(names, reduce_sum(torch.stack([totals[n] for n in names]))))
    loss_sum, logged = None, {}
    for piece, local in zip(pieces, counts):
        terms = dict(compute(piece, Share(local, totals, world_size)))
        loss = terms.pop("loss")
        if loss.requires_grad:
            backward(loss)
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
        if whole:  # each term is already this rank's mean over its unit (a masked mean of an empty unit is 0)
            logged = {name: value.detach().float() for name, value in terms.items()}
            continue
        for name, value in terms.items():
            unit = term_units.get(name)
            weight = 1.0 if unit == "sum" else local[unit] / mine[unit].clamp(min=1.0) if unit else len(piece) / len(batch)
            logged[name] = logged.get(name, 0.0) + weight * value.detach().float()
    return loss_sum, logged


class Objective:
    """How one method scores a batch; the module owns the models, optimizers and logging.

    ``student_loss`` and ``critic_loss`` receive the :class:`~pbkd_lightning.players.Players`, a typed batch and
    its :class:`Share`, and return a dict of scalar tensors with a ``loss`` key; every other key is logged under
    ``student/`` or ``critic/``.
    """

    picked_by_class_path = True  # saved in hyperparameters as {"class_path", "init_args"} (see config.plain)
    needs_samples: bool = False
    """The student step uses K samples per prompt from the current student (on-policy)."""
    needs_critic: bool = False
    """There is a critic (reward model, Q-head, reward posterior) with its own optimizer and step."""
    critic_uses_pairs: bool = True
    """The critic step trains on the buffer's preference pairs (else on the student's batch)."""
    critic_ranks_pairs: bool = True
    """The critic's :meth:`sequence_reward` ranks responses: held-out preference accuracy is measured."""
    critic_warmup_steps: int = 0
    """Training batches with a critic step only, before the first student step."""
    critic_steps: int = 1
    """Critic optimizer steps per training batch (each on its own batch of pairs)."""
    critic_takes_sample_pairs: bool = False
    """The critic can train on sample-vs-sample pairs (``data.sample_pairs``): it reads both sides as responses."""
    supports_sharding: bool = True
    """Runs under FSDP2 (``ModelParallelStrategy``): every rank makes the same number of forward passes."""
    needs_teacher_logits: bool = False
    """White-box: the loss needs the teacher's token distributions (``model.teacher``)."""

    @property
    def needs_teacher_on_samples(self) -> bool:
        """The teacher must score sequences the teacher-logit cache cannot hold (fresh samples)."""
        return False

    def rollout(self, players, prompts: list[str], num_samples: int, config, batch_size: int, max_prompt_tokens: int):
        """The iteration's K samples per prompt: ``(rollouts, stats)`` as :func:`sample_rollouts` returns them.
        Default: from the current student."""
        return sample_rollouts(players.student, players.tokenizer, prompts, config, num_samples, batch_size,
                               max_prompt_tokens, players.vocabulary)

    def term_units(self) -> dict[str, str]:
        """The unit (a key of :func:`batch_units`, or ``sum``) each logged term is a mean over, so terms logged from
        micro-batches combine into the whole batch's mean. Terms not named are weighted by items."""
        return {}

    def check_sampling(self, config) -> None:
        """Refuse sampling settings this objective's policy losses cannot describe (default: any are fine)."""

    def build_critic(self, players):
        """The critic module, when it is not black-box PbKD's reward model (None: the module builds that)."""
        return None

    def sequence_reward(self, players, sequences) -> Tensor:
        """The critic's reward of each sequence, ``(N,)``: used for held-out preference accuracy."""
        return players.reward_model_score(sequences)

    def prepare_student_batch(self, players, batch: StudentBatch) -> StudentBatch:
        """Complete the step's batch before it is split into micro-batches (e.g. sample on-policy sequences)."""
        return batch

    def student_loss(self, players, batch: StudentBatch, share: Share, critic_trust: Optional[float] = None) -> dict[str, Tensor]:
        raise NotImplementedError

    def critic_loss(self, players, batch, share: Share) -> dict[str, Tensor]:
        raise NotImplementedError(f"{type(self).__name__} has no critic")

    def uses_reference(self, critic_kind: str, critic_from_teacher: bool) -> bool:
        """Whether a frozen copy of the initial student is needed (KL to it, or an implicit reward)."""
        return False
