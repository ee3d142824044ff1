"""Token-level divergence baselines: forward/reverse KL, GKD's generalized JSD, skew KL/RKL, TVD."""

import inspect
import random
from dataclasses import dataclass, replace
from typing import Literal, Optional

import torch
from jsonargparse.typing import ClosedUnitInterval, PositiveFloat, PositiveInt

from pbkd_lightning import losses
from pbkd_lightning.config import validate_fields
from pbkd_lightning.losses import SparseTeacher
from pbkd_lightning.objectives.base import OBJECTIVE_KEY, Objective

DIVERGENCES = tuple(losses.ROW_DIVERGENCES)
"""Every divergence of :mod:`pbkd_lightning.losses`, by the name of its public function there (a new one in the loss
module is a choice here, in the config and in X-KD's ``kd``)."""
Divergence = Literal[DIVERGENCES]

PARAMETER_NAMES = {name: keyword for name in DIVERGENCES for keyword in ("beta", "alpha")
                   if keyword in inspect.signature(getattr(losses, name)).parameters}
"""The divergences that take a parameter, and its keyword in :mod:`pbkd_lightning.losses` (β or α)."""


def divergence_parameter(name: str, beta: float, skew: float) -> float:
    """The parameter ``name`` takes: β for the generalized JSD, ``skew`` (α) for the skew divergences, else 0."""
    return {"beta": beta, "alpha": skew}.get(PARAMETER_NAMES.get(name), 0.0)


def divergence_loss(name: str, student_logits, teacher, beta: float, skew: float, temperature: float,
                    scale_by_temperature: bool, chunk_size: Optional[int] = None):
    """One of the chunked divergences of :mod:`pbkd_lightning.losses` over R scored rows.

    Args:
        student_logits: ``(R, V)``.
        teacher: dense logits ``(R, V)`` or a :class:`SparseTeacher` with ``(R, k)`` fields.
    """
    if name not in DIVERGENCES:
        raise ValueError(f"unknown divergence {name!r}; choose one of {list(DIVERGENCES)}")
    as_batch = SparseTeacher(*(t[None] for t in teacher)) if isinstance(teacher, SparseTeacher) else teacher[None]
    labels = torch.zeros(student_logits.shape[:1], dtype=torch.long, device=student_logits.device)[None]
    extra = {PARAMETER_NAMES[name]: divergence_parameter(name, beta, skew)} if name in PARAMETER_NAMES else {}
    return getattr(losses, name)(student_logits[None], as_batch, labels, temperature=temperature, chunk_size=chunk_size,
                                 scale_by_temperature=scale_by_temperature, **extra)


@dataclass
class DivergenceKD(Objective):
    """White-box KD by a token-level divergence between the teacher's and the student's distributions.

    Off-policy batches are the data's teacher sequences (or, with ``seq_kd``, sequences sampled from the
    teacher model); with probability ``on_policy_fraction`` (GKD's λ) a batch is instead sampled from the
    current student on the same prompts, and the teacher scores those tokens. Every mean is over the
    tokens actually scored in that batch.
    """

    needs_teacher_logits = True

    divergence: Divergence = "forward_kl"
    """Which divergence: the name of its function in :mod:`pbkd_lightning.losses` (``DIVERGENCES``); the generalized
    JSD takes ``beta``, the skew divergences ``skew``."""
    beta: ClosedUnitInterval = 0.5
    """Generalized JSD only: β in [0, 1]; 0 is forward KL and 1 reverse KL, exactly."""
    skew: ClosedUnitInterval = 0.1
    """Skew KL / skew reverse KL only: α in [0, 1] (DistiLLM: 0.1)."""
    temperature: PositiveFloat = 1.0
    """Both distributions are softened by it inside the loss (a cached teacher needs 1)."""
    scale_by_temperature: bool = False
    """Multiply the loss by T²."""
    on_policy_fraction: ClosedUnitInterval = 0.0
    """GKD's λ in [0, 1]: the share of batches sampled from the current student."""
    seq_kd: bool = False
    """Off-policy batches are sampled from the teacher model instead of the data's teacher responses."""
    chunk_size: Optional[PositiveInt] = None
    """Scored tokens per chunk of the loss; None: about 1M logits and at least 32 tokens a chunk (fused: 4M, or 8M
    and at most 160 rows where forward KL or the JSD work in place; `losses.fused_divergence`)."""
    fused: bool = True
    """Project the scored rows to logits inside the loss, a chunk at a time (``losses.fused_divergence``), so
    neither model's ``R × V`` logits are held; where a model's logits are not its head's plain projection (FSDP2,
    soft-capped logits), the unfused loss is used."""
    seed: int = 0
    """Seed of the on-policy draws."""

    def __post_init__(self):
        validate_fields(self, OBJECTIVE_KEY)
        self._draws = random.Random(self.seed)
        self._on_policy = False

    def term_units(self) -> dict[str, str]:
        scored = "sample_tokens" if self._on_policy or self.seq_kd else "teacher_tokens"
        return {"divergence": scored, "scored_tokens": "sum"}

    @property
    def needs_teacher_on_samples(self) -> bool:
        return self.on_policy_fraction > 0 or self.seq_kd

    def prepare_student_batch(self, players, batch):
        """GKD's λ: this share of batches is replaced by fresh samples of the current student (``seq_kd``: the
        off-policy batches are samples of the teacher model), drawn once for the whole step."""
        on_policy = self.on_policy_fraction > 0 and self._draws.random() < self.on_policy_fraction
        self._on_policy = on_policy  # logged by the step's micro-batches
        if on_policy or self.seq_kd:
            samples = players.sample(batch.prompts, model=None if on_policy else players.teacher)
            return replace(batch, samples=samples, group_size=1, old_logprobs=None)
        return batch

    def student_loss(self, players, batch, share, critic_trust=None) -> dict:
        sampled = batch.samples is not None
        sequences = batch.samples if sampled else batch.teacher
        student = players.head_rows(sequences) if self.fused else None
        if student is not None:
            parameter = divergence_parameter(self.divergence, self.beta, self.skew)
            loss = losses.fused_divergence(self.divergence, student, players.teacher_head_rows(sequences), parameter,
                                           self.temperature, self.chunk_size, self.scale_by_temperature)
            scored = student.hidden.shape[0]
        else:
            _, logits = players.rows(sequences)
            loss = divergence_loss(self.divergence, logits, players.teacher_rows(sequences), self.beta, self.skew,
                                   self.temperature, self.scale_by_temperature, self.chunk_size)
            scored = logits.shape[0]
        terms = {"loss": loss * share("sample_tokens" if sampled else "teacher_tokens"), "divergence": loss.detach(),
                 "on_policy": torch.tensor(float(self._on_policy)), "scored_tokens": torch.tensor(float(scored))}
        return terms
