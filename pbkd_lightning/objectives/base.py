"""What every objective provides to DistillationModule."""

from torch import Tensor


class Objective:
    """How one method scores a batch; the module owns the models, optimizers and logging.

    ``student_loss`` and ``critic_loss`` return a dict of scalar tensors with a ``loss`` key;
    every other key is logged under ``student/`` or ``critic/``.
    """

    needs_samples: bool = False
    """The student step uses K samples per prompt from the current student (on-policy)."""
    needs_critic: bool = False
    """There is a reward model with its own optimizer and a critic step."""
    critic_warmup_steps: int = 0
    """Training batches with a critic step only, before the first student step."""

    def student_loss(self, module, batch: dict) -> dict[str, Tensor]:
        raise NotImplementedError

    def critic_loss(self, module, batch: dict) -> dict[str, Tensor]:
        raise NotImplementedError(f"{type(self).__name__} has no critic")

    def uses_reference(self, module) -> bool:
        """Whether a frozen copy of the initial student is needed (KL to it, or an implicit reward)."""
        return False

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"
