"""White-box PbKD ("MM PbKD"): a Q-head over the vocabulary, moment matching through the
performance-difference lemma with the teacher's probabilities, plus preference consistency."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jsonargparse.typing import ClosedUnitInterval, NonNegativeFloat, NonNegativeInt, OpenUnitInterval
from torch import nn

from pbkd_lightning.config import validate_fields
from pbkd_lightning.losses import (
    bradley_terry,
    clipped_surrogate,
    dense_teacher_probs,
    moment_matching_gap,
    q_induced_returns,
    rows_to_positions,
)
from pbkd_lightning.objectives.base import OBJECTIVE_KEY, Objective


class QHead(nn.Module):
    """Q_ψ(s, ·) over the vocabulary: a linear map of the student's last hidden state at s.

    Initialised to zero, so the critic starts with no opinion (G = 0) and learns it from the gap.
    """

    def __init__(self, hidden_size: int, vocabulary: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, vocabulary)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(R, H)`` hidden states (detached from the student) → ``(R, V)`` float32 Q-values."""
        return self.linear(hidden.to(self.linear.weight.dtype)).float()


@dataclass
class WhiteBoxPbKD(Objective):
    """MM PbKD (DESIGN.md §2).

    Critic (ascent, Q-head only): ``max_ψ G − β·BT(R_ψ) − λ_q·mean_s Σ_a Q²``, where
    ``G = (1 − α_on)·G(teacher states) + α_on·G(student states)`` and
    ``G(states) = mean_s Σ_a (p_T(a|s) − π_θ(a|s)) Q_ψ(s, a)``; ``R_ψ(y) = Σ_t Q_ψ(s_t, a_t) − γ V_ψ(s_{t+1})``
    with ``V_ψ(s) = Σ_a π_θ(a|s) Q_ψ(s, a)`` scores the preference pairs.

    Student (descent, student only, Q frozen): ``(1 − α_on)·G(teacher states)`` exactly over the vocabulary
    (only ``−Σ_a π_θ Q`` depends on θ), plus ``α_on`` times the clipped surrogate on the K samples with the
    per-token advantage ``Q_ψ(s, a) − V_ψ(s)``, plus ``nll_coef · NLL(y_T)``.
    """

    needs_samples = True
    needs_critic = True
    needs_teacher_logits = True

    beta: NonNegativeFloat = 1.0
    """Weight β of the Bradley–Terry term on the Q-induced sequence rewards."""
    q_l2: NonNegativeFloat = 0.5
    """Weight λ_q of ``mean_s Σ_a Q(s, a)²``; the gap's optimum is then ``Q = (p_T − π_θ) / (2λ_q)``."""
    gamma: ClosedUnitInterval = 1.0
    """Discount γ in the induced reward ``Q(s_t, a_t) − γ·V(s_{t+1})``."""
    alpha_on: ClosedUnitInterval = 0.5
    """Weight of the student's own states (its K samples) against the teacher's sequences."""
    clip_eps: OpenUnitInterval = 0.2
    """PPO clip ε of the on-policy term."""
    nll_coef: NonNegativeFloat = 1.0
    """Weight α of an NLL anchor on the teacher's responses (0: pure moment matching, which drove the default's
    student from 0.385 to 0.159: Adam follows the small, noisy gap gradient)."""
    critic_warmup_steps: NonNegativeInt = 64
    """Training batches with a critic step only, before the student moves."""

    def __post_init__(self):
        validate_fields(self, OBJECTIVE_KEY)

    def term_units(self) -> dict[str, str]:
        return {"gap": "chosen_tokens", "gap_off": "chosen_tokens", "gap_on": "rejected_tokens", "bt": "decided_pairs",
                "pref_acc": "decided_pairs", "l2": "pair_tokens", "policy_value_off": "teacher_tokens",
                "nll_teacher": "teacher_tokens", "pg_loss": "sample_tokens", "clip_frac": "sample_tokens",
                "advantage_abs": "sample_tokens"}

    @property
    def needs_teacher_on_samples(self) -> bool:
        return self.alpha_on > 0  # the critic's G on student states needs p_T there

    def build_critic(self, players) -> nn.Module:
        return QHead(players.student.config.hidden_size, players.vocabulary).to(players.device)

    # ------------------------------------------------------------------ pieces
    def _critic_view(self, players, sequences, with_teacher: bool):
        """Q (with grad to ψ), π_θ (no grad) and, if asked, p_T at the scored rows of ``sequences``."""
        with torch.no_grad():
            hidden, logits = players.rows(sequences)
            student_probs = F.softmax(logits.float(), dim=-1)
        teacher_probs = dense_teacher_probs(players.teacher_rows(sequences), logits.shape[-1]) if with_teacher else None
        return players.critic(hidden), student_probs, teacher_probs

    def _returns(self, q: torch.Tensor, student_probs: torch.Tensor, sequences) -> torch.Tensor:
        mask, actions = sequences.scored_positions, sequences.scored_actions
        q_taken = q.gather(-1, actions[:, None]).squeeze(-1)
        values = (student_probs * q).sum(-1)
        return q_induced_returns(rows_to_positions(q_taken, mask), rows_to_positions(values, mask), mask, self.gamma)

    def sequence_reward(self, players, sequences) -> torch.Tensor:
        q, student_probs, _ = self._critic_view(players, sequences, with_teacher=False)
        return self._returns(q, student_probs, sequences)

    # ------------------------------------------------------------------ the two players
    def critic_loss(self, players, batch, share) -> dict:
        teacher_seqs, student_seqs, preference = batch.chosen, batch.rejected, batch.preference
        q_t, pi_t, p_t = self._critic_view(players, teacher_seqs, with_teacher=True)
        q_s, pi_s, p_s = self._critic_view(players, student_seqs, with_teacher=self.alpha_on > 0)
        gap_off = moment_matching_gap(q_t, p_t, pi_t)
        gap_on = moment_matching_gap(q_s, p_s, pi_s) if self.alpha_on > 0 else torch.zeros_like(gap_off)
        gap = (1.0 - self.alpha_on) * gap_off + self.alpha_on * gap_on
        margin = self._returns(q_t, pi_t, teacher_seqs) - self._returns(q_s, pi_s, student_seqs)
        sign = preference.to(margin.dtype)
        bt = bradley_terry(sign * margin, torch.zeros_like(margin), weight=sign.abs())
        l2 = torch.cat([q_t, q_s]).pow(2).sum(-1).mean()
        loss = (-(1.0 - self.alpha_on) * gap_off * share("chosen_tokens") - self.alpha_on * gap_on * share("rejected_tokens")
                + self.beta * bt * share("decided_pairs") + self.q_l2 * l2 * share("pair_tokens"))
        decided = sign != 0
        return {
            "loss": loss,
            "gap": gap.detach(), "gap_off": gap_off.detach(), "gap_on": gap_on.detach(), "bt": bt.detach(),
            "l2": l2.detach(), "pref_acc": ((torch.sign(margin) == sign) & decided).sum() / decided.sum().clamp(min=1),
        }

    def student_loss(self, players, batch, share, critic_trust=None) -> dict:
        teacher_seqs, samples = batch.teacher, batch.samples
        hidden, logits = players.rows(teacher_seqs)
        with torch.no_grad():
            q = players.critic(hidden.detach())
        log_pi = F.log_softmax(logits.float(), dim=-1)
        policy_value = (log_pi.exp() * q).sum(-1).mean()  # G(teacher states) = const − this
        nll = -log_pi.gather(-1, teacher_seqs.scored_actions[:, None]).mean()
        loss = (-(1.0 - self.alpha_on) * policy_value + self.nll_coef * nll) * share("teacher_tokens")
        terms = {"policy_value_off": policy_value.detach(), "nll_teacher": nll.detach()}
        if self.alpha_on > 0:
            hidden_s, logits_s = players.rows(samples)
            sample_mask, actions = samples.scored_positions, samples.scored_actions
            with torch.no_grad():
                q_s = players.critic(hidden_s.detach())
                advantages = q_s.gather(-1, actions[:, None]).squeeze(-1) - (F.softmax(logits_s.float(), -1) * q_s).sum(-1)
            logprobs = players.policy_logprobs(samples, logits_s)
            pg, clip_frac = clipped_surrogate(logprobs, batch.old_logprobs, rows_to_positions(advantages, sample_mask),
                                              sample_mask, self.clip_eps)
            loss = loss + self.alpha_on * pg * share("sample_tokens")
            terms.update(pg_loss=pg.detach(), clip_frac=clip_frac, advantage_abs=advantages.abs().mean())
        terms["loss"] = loss
        return terms
