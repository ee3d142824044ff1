"""Black-box PbKD: a reward model trained by ascent on the min-max Lagrangian, a student by clipped descent."""

from dataclasses import dataclass
from typing import Literal

import torch
from jsonargparse.typing import NonNegativeFloat, NonNegativeInt, OpenUnitInterval, PositiveInt

from pbkd_lightning.config import AboveHalfBelowOne, validate_fields
from pbkd_lightning.losses import (
    clipped_surrogate,
    critic_lagrangian,
    group_advantages,
    kl_to_reference,
)
from pbkd_lightning.objectives.base import OBJECTIVE_KEY, Objective


@dataclass
class BlackBoxPbKD(Objective):
    """Preference-based KD with a text-only teacher (DESIGN.md §1).

    Critic: minimise ``−(mean r(y_T) − mean r(y_S)) + β·BT + λ_r·mean(r²)``, the gap over teacher-vs-sample
    pairs only (it estimates J(π_T, r) − J(π_θ, r)), BT over every decided pair (sample-vs-sample pairs too).
    Student: PPO-style clipped surrogate on K samples per prompt with the advantage
    ``r − mean of the prompt's K rewards`` (optionally divided by their std), plus
    ``kl_coef · KL(π_θ ‖ π_ref)`` and ``nll_coef · NLL(y_T)``. The surrogate's weight is the critic's trust
    (``critic_trust``), decided from its latest held-out preference accuracy.
    """

    needs_samples = True
    needs_critic = True
    critic_takes_sample_pairs = True

    beta: NonNegativeFloat = 1.0
    """Weight β of the Bradley–Terry term in the critic's Lagrangian."""
    reward_l2: NonNegativeFloat = 0.3
    """Weight λ_r of ``mean(r²)``; bounds the otherwise unbounded gap term (optimum r = ±1/λ_r)."""
    clip_eps: OpenUnitInterval = 0.2
    """PPO clip ε, in (0, 1)."""
    kl_coef: NonNegativeFloat = 0.0
    """Weight of KL(π_θ ‖ π_ref) to the student as it was at the start of fit, exact over the vocabulary at the
    sampled states (temperature 1)."""
    nll_coef: NonNegativeFloat = 1.0
    """Weight α of the NLL anchor on the teacher's responses."""
    normalize_advantages: bool = False
    """Divide advantages by the group's std (amplifies a noisy critic)."""
    critic_warmup_steps: NonNegativeInt = 64
    """Training batches with a critic step only, before the student moves."""
    critic_steps: PositiveInt = 1
    """Critic optimizer steps per training batch, each on its own batch of pairs."""
    critic_trust: Literal["always", "gate", "scale"] = "always"
    """How the surrogate is weighted by the reward model's latest held-out preference accuracy ``a`` (measured at
    each validation; none yet counts as chance): ``always`` 1; ``gate`` 1 when ``a ≥ trust_threshold``, else 0
    (the step is then the NLL anchor alone); ``scale`` ``clamp((a − 0.5) / (trust_threshold − 0.5), 0, 1)``."""
    trust_threshold: AboveHalfBelowOne = 0.9
    """The accuracy at which the critic is fully trusted, in (0.5, 1)."""

    def __post_init__(self):
        validate_fields(self, OBJECTIVE_KEY)

    def term_units(self) -> dict[str, str]:
        return {"reward_gap": "teacher_pairs", "bt": "decided_pairs", "pref_acc": "decided_pairs", "l2": "pairs",
                "pg_loss": "sample_tokens", "clip_frac": "sample_tokens", "kl_ref": "sample_tokens",
                "nll_teacher": "teacher_tokens"}

    def uses_reference(self, critic_kind: str, critic_from_teacher: bool) -> bool:
        return self.kl_coef > 0 or (critic_kind == "implicit" and not critic_from_teacher)

    def critic_loss(self, players, batch, share) -> dict:
        reward_chosen, reward_rejected = players.reward_model_score(batch.chosen), players.reward_model_score(batch.rejected)
        preference, teacher_pair = batch.preference, batch.teacher_pair
        terms = critic_lagrangian(reward_chosen, reward_rejected, preference, teacher_pair, self.beta, self.reward_l2)
        # Each mean weighted by this micro-batch's share of its unit: the step's gradient is that of the whole batch.
        loss = -terms["gap"] * share("teacher_pairs") + self.beta * terms["bt"] * share("decided_pairs") \
            + self.reward_l2 * terms["l2"] * share("pairs")
        decided = preference != 0
        agree = (torch.sign(reward_chosen - reward_rejected) == preference.to(reward_chosen.dtype)) & decided
        logged = {k: v.detach() for k, v in terms.items() if k != "loss"}
        logged["reward_gap"] = logged.pop("gap")  # J(π_T, r) − J(π_θ, r), from teacher pairs only
        logged["pref_acc"] = agree.sum() / decided.sum().clamp(min=1)
        return {"loss": loss, **logged}

    def trust(self, heldout_acc) -> float:
        """The surrogate's weight given the critic's latest held-out preference accuracy (None: not measured yet)."""
        if self.critic_trust == "always":
            return 1.0
        accuracy = 0.5 if heldout_acc is None else heldout_acc
        if self.critic_trust == "gate":
            return float(accuracy >= self.trust_threshold)
        return min(1.0, max(0.0, (accuracy - 0.5) / (self.trust_threshold - 0.5)))

    def student_loss(self, players, batch, share, critic_trust=None) -> dict:
        """``critic_trust``: the reward model's latest held-out preference accuracy (None: not measured yet)."""
        samples = batch.samples
        mask = samples.scored_positions
        trust = self.trust(critic_trust)
        terms = {"critic_trust": torch.tensor(trust)}
        loss = torch.zeros((), device=samples.input_ids.device)
        # An untrusted critic costs no reward or policy forward pass, unless the KL term needs the student's rows.
        if trust > 0 or self.kl_coef > 0:
            _, logits = players.rows(samples)
        if trust > 0:
            with torch.no_grad():
                rewards = players.reward_model_score(batch.critic_samples if batch.critic_samples is not None else samples)
                advantages = group_advantages(rewards, batch.group_size, self.normalize_advantages)
            logprobs = players.policy_logprobs(samples, logits)
            pg_loss, clip_frac = clipped_surrogate(logprobs, batch.old_logprobs, advantages, mask, self.clip_eps)
            loss = loss + trust * pg_loss * share("sample_tokens")
            terms.update(pg_loss=pg_loss.detach(), clip_frac=clip_frac, reward_mean=rewards.mean())
        if self.kl_coef > 0:
            kl = kl_to_reference(logits, players.reference_rows(samples))
            loss = loss + self.kl_coef * kl * share("sample_tokens")
            terms["kl_ref"] = kl.detach()
        with torch.set_grad_enabled(self.nll_coef > 0 and torch.is_grad_enabled()):
            nll = players.nll(batch.teacher)
        if self.nll_coef > 0:
            loss = loss + self.nll_coef * nll * share("teacher_tokens")
        terms["nll_teacher"] = nll.detach()
        terms["loss"] = loss
        return terms
