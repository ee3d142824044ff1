"""Black-box PbKD: a reward model trained by ascent on the min-max Lagrangian, a student by clipped descent."""

import torch
from jsonargparse.typing import NonNegativeFloat, NonNegativeInt, OpenUnitInterval

from pbkd_lightning.config import check
from pbkd_lightning.losses import (
    clipped_surrogate,
    critic_lagrangian,
    group_advantages,
    kl_to_reference,
    sequence_nll,
)
from pbkd_lightning.objectives.base import Objective


class BlackBoxPbKD(Objective):
    """Preference-based KD with a text-only teacher (DESIGN.md §1).

    Critic: minimise ``−(mean r(y_T) − mean r(y_S)) + β·BT + λ_r·mean(r²)``.
    Student: PPO-style clipped surrogate on K samples per prompt with the advantage
    ``r − mean of the prompt's K rewards`` (optionally divided by their std), plus
    ``kl_coef · KL(π_θ ‖ π_ref)`` and ``nll_coef · NLL(y_T)``.
    """

    needs_samples = True
    needs_critic = True

    def __init__(
        self,
        beta: NonNegativeFloat = 1.0,
        reward_l2: NonNegativeFloat = 0.3,
        clip_eps: OpenUnitInterval = 0.2,
        kl_coef: NonNegativeFloat = 0.0,
        nll_coef: NonNegativeFloat = 1.0,
        normalize_advantages: bool = False,
        critic_warmup_steps: NonNegativeInt = 64,
    ):
        """
        Args:
            beta: weight β of the Bradley–Terry term in the critic's Lagrangian.
            reward_l2: weight λ_r of ``mean(r²)``; bounds the otherwise unbounded gap term.
            clip_eps: PPO clip ε, in (0, 1).
            kl_coef: weight of KL(π_θ ‖ π_ref) to the student as it was at the start of fit.
            nll_coef: weight α of the NLL anchor on the teacher's responses.
            normalize_advantages: divide advantages by the group's std (amplifies a noisy critic).
            critic_warmup_steps: training batches with a critic step only, before the student moves.
        """
        for name in ("beta", "reward_l2", "kl_coef", "nll_coef"):
            check(name, NonNegativeFloat, locals()[name])
        check("clip_eps", OpenUnitInterval, clip_eps)
        check("critic_warmup_steps", NonNegativeInt, critic_warmup_steps)
        self.beta, self.reward_l2, self.clip_eps = float(beta), float(reward_l2), float(clip_eps)
        self.kl_coef, self.nll_coef = float(kl_coef), float(nll_coef)
        self.normalize_advantages, self.critic_warmup_steps = normalize_advantages, int(critic_warmup_steps)

    def uses_reference(self, module) -> bool:
        return self.kl_coef > 0 or module.critic_config.kind == "implicit"

    def critic_loss(self, module, batch: dict) -> dict:
        reward_teacher, reward_student = module.reward(batch["teacher"]), module.reward(batch["student"])
        preference = batch["preference"]
        terms = critic_lagrangian(reward_teacher, reward_student, preference, self.beta, self.reward_l2)
        decided = preference != 0
        agree = (torch.sign(reward_teacher - reward_student) == preference.to(reward_teacher.dtype)) & decided
        terms = {k: v if k == "loss" else v.detach() for k, v in terms.items()}
        terms["reward_gap"] = terms.pop("gap")
        terms["pref_acc"] = agree.sum() / decided.sum().clamp(min=1)
        return terms

    def student_loss(self, module, batch: dict) -> dict:
        samples = batch["samples"]
        mask = samples["response_mask"][:, 1:]
        with torch.no_grad():
            rewards = module.reward(batch.get("critic_samples", samples))
            advantages = group_advantages(rewards, batch["group_size"], self.normalize_advantages)
        logprobs = module.student_logprobs(samples)
        pg_loss, clip_frac = clipped_surrogate(logprobs, samples["old_logprobs"], advantages, mask, self.clip_eps)
        loss = pg_loss
        terms = {"pg_loss": pg_loss.detach(), "clip_frac": clip_frac, "reward_mean": rewards.mean()}
        if self.kl_coef > 0:
            kl = kl_to_reference(logprobs, module.reference_logprobs(samples), mask)
            loss = loss + self.kl_coef * kl
            terms["kl_ref"] = kl.detach()
        teacher = batch["teacher"]
        with torch.set_grad_enabled(self.nll_coef > 0 and torch.is_grad_enabled()):
            nll = sequence_nll(module.student_logprobs(teacher), teacher["response_mask"][:, 1:])
        if self.nll_coef > 0:
            loss = loss + self.nll_coef * nll
        terms["nll_teacher"] = nll.detach()
        terms["loss"] = loss
        return terms
