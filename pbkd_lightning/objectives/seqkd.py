"""SeqKD / vanilla black-box KD: supervised fine-tuning on the teacher's responses."""

from dataclasses import dataclass

from pbkd_lightning.objectives.base import Objective


@dataclass
class SeqKD(Objective):
    """Minimise −log π_θ(y_T | x) per teacher token; no critic, no sampling."""

    def term_units(self) -> dict[str, str]:
        return {"nll_teacher": "teacher_tokens"}

    def student_loss(self, players, batch, share, critic_trust=None) -> dict:
        nll = players.nll(batch.teacher)
        return {"loss": nll * share("teacher_tokens"), "nll_teacher": nll.detach()}
