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

    def sample(self, module, prompts: list[str], num_samples: int, config, batch_size: int, max_prompt_tokens: int):
        """The iteration's K samples per prompt: ``(responses, stats)`` as ``data.generation.generate`` returns
        them. Default: from the current student."""
        from pbkd_lightning.data.generation import generate

        return generate(module.student, module.tokenizer, prompts, config, num_samples, batch_size, max_prompt_tokens)

    def build_critic(self, module):
        """The critic module, when it is not black-box PbKD's reward model (None: the module builds that)."""
        return None

    def sequence_reward(self, module, sequences: dict) -> Tensor:
        """The critic's reward of each sequence, ``(N,)``: used for held-out preference accuracy."""
        return module.reward_model_score(sequences)

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
