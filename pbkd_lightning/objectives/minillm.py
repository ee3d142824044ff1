"""MiniLLM: policy gradient on the reverse KL to the teacher (Gu et al., "MiniLLM")."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jsonargparse.typing import ClosedUnitInterval, NonNegativeFloat, OpenUnitInterval

from pbkd_lightning.config import validate_fields
from pbkd_lightning.data.generation import sample_mixed_rollouts
from pbkd_lightning.losses import future_rewards, reverse_kl, rows_to_positions
from pbkd_lightning.objectives.base import OBJECTIVE_KEY, Objective


@dataclass
class MiniLLM(Objective):
    """Minimise KL(π_θ ‖ p_T) over the student's own sequences.

    Each iteration the data module samples K responses per prompt from the teacher-mixed policy
    ``p̃ = mix · p_T + (1 − mix) · π_old`` (``teacher_mix``, 0.2 in the paper) and keeps log π_old;
    the student then takes PPO steps on them. Per sampled token t with reward ``r_t = log p_T(y_t) − log π_θ(y_t)``:

    - long-term term: the clipped surrogate (``clip_eps``) with the length-normalised discounted
      advantage ``A_t = Σ_{t'>t} γ^(t'−t−1) r_t' / (#tokens after t)``, each token weighted by the
      importance weight ``w_t = π_old(y_t) / p̃(y_t)`` of mixed sampling (at most 1 / (1 − mix));
    - single-step term: ``KL(π_θ(·|s_t) ‖ p_T(·|s_t))`` exactly over the vocabulary at every sampled
      state (the chunked :func:`~pbkd_lightning.losses.reverse_kl`, unweighted: see docs/design.md);
    - ``lm_coef`` × NLL of the data's teacher responses, standing in for the paper's pre-training
      corpus loss (the embedded default has no corpus, so it is off by default).
    """

    supports_sharding = False  # teacher-mixed sampling stops when this rank's samples end, not every rank's

    needs_samples = True
    needs_teacher_logits = True

    teacher_mix: ClosedUnitInterval = 0.2
    """Share of the teacher in the sampling distribution (the paper: 0.2)."""
    gamma: ClosedUnitInterval = 1.0
    """Discount γ of the long-term return."""
    clip_eps: OpenUnitInterval = 0.2
    """PPO clip ε."""
    single_step: bool = True
    """Add the exact single-step reverse KL (the paper's variance reduction)."""
    length_normalize: bool = True
    """Divide the long-term return by the number of tokens it sums."""
    lm_coef: NonNegativeFloat = 0.0
    """Weight of the language-modelling loss (here on the data's teacher responses)."""

    def __post_init__(self):
        validate_fields(self, OBJECTIVE_KEY)

    def term_units(self) -> dict[str, str]:
        return {name: "sample_tokens" for name in ("long_term", "reward_mean", "importance_weight", "clip_frac",
                                                   "single_step_rkl")} | {"lm_loss": "teacher_tokens"}

    @property
    def needs_teacher_on_samples(self) -> bool:
        return True

    def check_sampling(self, config) -> None:
        if config.top_p < 1 or config.top_k:
            raise ValueError("MiniLLM samples from a mixture of teacher and student: a token may fall outside the "
                             "student's own top-k / nucleus, where π_old is 0; set `data.generation.top_p: 1` and "
                             "`data.generation.top_k: 0`")
        if config.temperature not in (0.0, 1.0):
            raise ValueError("MiniLLM's importance weights π_old / p̃ rebuild the mixture from the teacher at temperature "
                             f"1; `data.generation.temperature` must be 1 (or 0, greedy), got {config.temperature}")

    def rollout(self, players, prompts, num_samples, config, batch_size, max_prompt_tokens):
        return sample_mixed_rollouts(players.student, players.teacher, players.tokenizer, prompts, config, num_samples,
                                     batch_size, max_prompt_tokens, self.teacher_mix, players.vocabulary)

    def student_loss(self, players, batch, share, critic_trust=None) -> dict:
        samples = batch.samples
        mask, actions = samples.scored_positions, samples.scored_actions
        _, logits = players.rows(samples)
        teacher_logits = players.teacher_rows(samples)
        # π_θ as the sampler describes it (temperature), the same columns as π_old; the teacher at temperature 1.
        taken = players.policy_logprobs(samples, logits)[mask]
        with torch.no_grad():
            teacher_taken = F.log_softmax(teacher_logits.float(), dim=-1).gather(-1, actions[:, None]).squeeze(-1)
            old = batch.old_logprobs[mask]
            mixed = torch.logaddexp(teacher_taken + torch.log(torch.tensor(self.teacher_mix).clamp(min=1e-12)),
                                    old + torch.log1p(torch.tensor(-self.teacher_mix)))
            weights = (old - mixed).exp()  # π_old / p̃ ≤ 1 / (1 − mix)
            rewards = rows_to_positions(teacher_taken - taken.detach(), mask)
            advantages = future_rewards(rewards, mask, self.gamma, self.length_normalize)[mask]
        ratio = (taken - old).exp()
        surrogate = torch.minimum(ratio * advantages, ratio.clamp(1 - self.clip_eps, 1 + self.clip_eps) * advantages)
        long_term = -(weights * surrogate).mean() if surrogate.numel() else surrogate.sum()
        loss = long_term * share("sample_tokens")
        terms = {"long_term": long_term.detach(), "reward_mean": rewards.sum() / mask.sum().clamp(min=1),
                 "importance_weight": weights.mean() if weights.numel() else weights.sum(),
                 "clip_frac": ((ratio - 1).abs() > self.clip_eps).float().mean().detach() if ratio.numel() else ratio.sum()}
        if self.single_step:
            labels = torch.zeros(1, logits.shape[0], dtype=torch.long, device=logits.device)
            single = reverse_kl(logits[None], teacher_logits[None], labels)
            loss = loss + single * share("sample_tokens")
            terms["single_step_rkl"] = single.detach()
        if self.lm_coef > 0:
            lm = players.nll(batch.teacher)
            loss = loss + self.lm_coef * lm * share("teacher_tokens")
            terms["lm_loss"] = lm.detach()
        terms["loss"] = loss
        return terms
