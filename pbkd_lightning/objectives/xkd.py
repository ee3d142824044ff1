"""X-KD: experiential knowledge distillation with an AVRIL-style reward posterior (DESIGN.md §3)."""

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from jsonargparse.typing import ClosedUnitInterval, NonNegativeFloat, PositiveFloat
from torch import nn

from pbkd_lightning.config import validate_fields
from pbkd_lightning.losses import avril_terms, next_token_values, rows_to_positions
from pbkd_lightning.objectives.base import OBJECTIVE_KEY, Objective
from pbkd_lightning.objectives.divergence import DIVERGENCES, divergence_loss

KD = Literal[("nll",) + DIVERGENCES]


class RewardPosteriorHead(nn.Module):
    """(μ_t, log σ_t) of the reward at each state: a linear map of the student's last hidden state.

    Zero-initialised: the posterior starts at the prior N(0, 1).
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 2)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(R, H)`` → ``(μ (R,), log σ (R,))`` in float32; log σ is clamped to [-5, 5] for stability."""
        out = self.linear(hidden.to(self.linear.weight.dtype)).float()
        return out[:, 0], out[:, 1].clamp(-5.0, 5.0)


@dataclass
class XKD(Objective):
    """Per scored token of the teacher's sequences:
    ``ℓ_KD + KL(N(μ_t, σ_t²) ‖ N(0, 1)) − λ · log N(Q_t − γ·Q_{t+1}; μ_t, σ_t)``, with
    ``Q_t = q_scale · log π_θ(a_t | s_t)`` and ``Q_{t+1} = 0`` after the last token (the eos ends the episode).

    ``kd: nll`` is sequence-level X-KD (ℓ_KD = −log π_θ(y_t)); a divergence name is divergence-based
    X-KD (ℓ_KD = that divergence between the teacher model's and the student's distributions, which
    needs ``model.teacher``). As in the AVRIL reference code nothing is detached: the reward head's
    step (its own optimizer) and the student's step minimise the same objective, each moving only
    its own parameters; the student's gradient flows through Q and through the head's input.
    """

    needs_critic = True
    critic_uses_pairs = False
    critic_ranks_pairs = False  # the posterior explains the student's own Q, it is not a preference model

    kd: KD = "nll"
    """``nll`` (sequence-level) or one of the divergences (divergence-based; needs a teacher model)."""
    td_weight: NonNegativeFloat = 1.0
    """λ, the weight of the TD log-likelihood."""
    gamma: ClosedUnitInterval = 1.0
    """Discount γ in the TD ``Q_t − γ·Q_{t+1}``."""
    q_scale: PositiveFloat = 1.0
    """Q_t = q_scale · log π_θ(a_t | s_t)."""
    beta: ClosedUnitInterval = 0.5
    """Generalized JSD's β (``kd: generalized_jsd``)."""
    skew: ClosedUnitInterval = 0.1
    """Skew KL/RKL's α."""
    temperature: PositiveFloat = 1.0
    """The divergence's temperature."""

    def __post_init__(self):
        validate_fields(self, OBJECTIVE_KEY)

    def term_units(self) -> dict[str, str]:
        return {name: "teacher_tokens" for name in ("kd", "avril", "xkd/kl", "xkd/td_nll", "xkd/mu_mean", "xkd/sigma_mean")}

    @property
    def needs_teacher_logits(self) -> bool:
        return self.kd != "nll"

    def build_critic(self, players) -> nn.Module:
        return RewardPosteriorHead(players.student.config.hidden_size).to(players.device)

    def _avril(self, players, sequences, hidden, logits):
        mask, actions = sequences.scored_positions, sequences.scored_actions
        log_pi = F.log_softmax(logits.float(), dim=-1)
        q = rows_to_positions(self.q_scale * log_pi.gather(-1, actions[:, None]).squeeze(-1), mask)
        td = q - self.gamma * next_token_values(q, mask)
        mu, log_sigma = players.critic(hidden)
        return avril_terms(rows_to_positions(mu, mask), rows_to_positions(log_sigma, mask), td, mask, self.td_weight), log_pi, actions

    def critic_loss(self, players, batch, share) -> dict:
        hidden, logits = players.rows(batch.teacher)  # the student is frozen by toggle_optimizer here
        terms, _, _ = self._avril(players, batch.teacher, hidden, logits)
        return {"loss": terms["loss"] * share("teacher_tokens"), **{f"xkd/{k}": v.detach() for k, v in terms.items() if k != "loss"}}

    def student_loss(self, players, batch, share, critic_trust=None) -> dict:
        sequences = batch.teacher
        hidden, logits = players.rows(sequences)
        avril, log_pi, actions = self._avril(players, sequences, hidden, logits)
        if self.kd == "nll":
            kd = -log_pi.gather(-1, actions[:, None]).mean() if actions.numel() else log_pi.sum() * 0.0
        else:
            kd = divergence_loss(self.kd, logits, players.teacher_rows(sequences), self.beta, self.skew, self.temperature, False)
        loss = (kd + avril["loss"]) * share("teacher_tokens")
        return {"loss": loss, "kd": kd.detach(), "avril": avril["loss"].detach()}
