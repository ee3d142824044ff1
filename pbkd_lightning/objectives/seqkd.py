"""SeqKD / vanilla black-box KD: supervised fine-tuning on the teacher's responses."""

from pbkd_lightning.losses import sequence_nll
from pbkd_lightning.objectives.base import Objective


class SeqKD(Objective):
    """Minimise −log π_θ(y_T | x) per teacher token; no critic, no sampling."""

    def student_loss(self, module, batch: dict) -> dict:
        teacher = batch["teacher"]
        nll = sequence_nll(module.student_logprobs(teacher), teacher["response_mask"][:, 1:])
        return {"loss": nll, "nll_teacher": nll.detach()}
