"""The players an objective scores with: student, critic, frozen reference and teacher, as small scoring calls.

An objective receives a :class:`Players` and typed batches, never the LightningModule, so each method can be
unit-tested on tiny models or bare tensors without a Trainer.
"""

from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from pbkd_lightning.data.generation import GenerationConfig, sample_rollouts
from pbkd_lightning.losses import HeadRows, policy_logprobs, rows_to_positions
from pbkd_lightning.models.critic import ImplicitReward, response_token_logprobs
from pbkd_lightning.models.rows import project_positions
from pbkd_lightning.parallel import is_sharded
from pbkd_lightning.sequences import Encoder, SequenceBatch


REFERENCE_CACHE_SEQUENCES = 400_000
"""Sequences whose log π_ref :meth:`Players.reference_logprobs` keeps; emptied when full. At 100 tokens a sequence:
~160 MB of float32 values on the reference's device (more when batches pad: each kept row is a view of its batch's
padded row) and ~0.3 GB of host memory for their 16-byte keys and tensor views (measured: 706 bytes a sequence; keys
of the tokens themselves took 2 GB at vocabulary 151,936)."""


def _sequence_keys(ids: Tensor, scored: Tensor, lengths: list[int]) -> list[bytes]:
    """One 16-byte digest per (right-padded) row of its first ``lengths`` tokens and which of them are scored: the
    kept reference log-probs' keys (a tuple of the tokens cost kilobytes of host memory a sequence)."""
    tokens, flags = ids.to(torch.int64).cpu().numpy(), scored.to(torch.uint8).cpu().numpy()  # 9 bytes a token: unambiguous
    keys = []
    for row, length in enumerate(lengths):
        digest = hashlib.blake2b(tokens[row, :length].tobytes(), digest_size=16)
        digest.update(flags[row, :length].tobytes())
        keys.append(digest.digest())
    return keys


def _first_rows(keys: list[bytes], cache: dict) -> dict:
    """The first row of each key ``cache`` does not hold: ``{key: row}`` in row order."""
    first = {}
    for row, key in enumerate(keys):
        if key not in cache:
            first.setdefault(key, row)
    return first


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@dataclass
class Players:
    """Models and the settings that define the student's policy.

    ``sampling`` is the distribution samples are drawn from (``data.generation``): π_old is recorded under it and
    :meth:`policy_logprobs` scores π_θ under it, so the PPO ratio starts at 1.
    """

    student: nn.Module
    tokenizer: object
    sampling: GenerationConfig
    encoder: Encoder
    """Encodes the student's sequences (sampled on-policy batches, teacher samples)."""
    generation_batch_size: int = 64
    critic: Optional[nn.Module] = None
    critic_tokenizer: object = None
    reference: Optional[nn.Module] = None
    """The frozen initial student."""
    teacher: Optional[nn.Module] = None
    """The frozen teacher model (white-box), or None (black-box, or training from the teacher cache)."""
    implicit_reference: Optional[nn.Module] = None
    """π_ref of an implicit reward model: the frozen student, or the teacher when the reward model is its copy."""
    vocabulary: Optional[int] = None
    """Logit columns shared with the teacher (white-box); None: all of the student's."""
    _plain_heads: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary, repr=False)
    """model -> whether its logits are its head's plain projection of the last hidden states (checked once)."""
    _reference_logprobs: dict = field(default_factory=dict, repr=False)
    """A 16-byte digest of a sequence's real tokens and its scored positions (:func:`_sequence_keys`) -> log π_ref of
    its tokens 1.., 0 off the scored ones (see :meth:`reference_logprobs`)."""

    @property
    def device(self) -> torch.device:
        return _device(self.student)

    # ------------------------------------------------------------------ the student
    def rows(self, sequences: SequenceBatch, lm: Optional[nn.Module] = None) -> tuple[Tensor, Tensor]:
        """The student's (or ``lm``'s) last hidden states and logits at the scored positions only.

        Row r is the state before the r-th scored token, in row-major order of ``sequences.scored_positions``;
        the vocabulary projection never sees prompt or padding positions.

        Returns:
            ``(hidden (R, H), logits (R, V))``, logits cropped to :attr:`vocabulary`.
        """
        hidden, logits = scored_rows(lm if lm is not None else self.student, sequences)
        return hidden, logits[:, : self.vocabulary] if self.vocabulary else logits

    def head_rows(self, sequences: SequenceBatch, lm: Optional[nn.Module] = None) -> Optional[HeadRows]:
        """The student's (or ``lm``'s) last hidden states at the scored rows with the head weight that projects them,
        for :func:`~pbkd_lightning.losses.fused_divergence`: no logit is formed here.

        None where the model's logits are not a plain linear projection of them (no head module, a head sharded
        by FSDP2, soft-capped or scaled logits: checked once per model against its own forward); use :meth:`rows`.
        """
        lm = lm if lm is not None else self.student
        head = lm.get_output_embeddings()
        plain = self._plain_heads.get(lm)
        if plain is None:
            if not sequences.scored_positions.any():  # nothing to check against yet
                return None
            plain = self._plain_heads[lm] = _is_plain_head(lm, head, sequences)
        if not plain:
            return None
        hidden = scored_hidden(lm, sequences)
        vocabulary = self.vocabulary or head.weight.shape[0]
        bias = head.bias[:vocabulary] if head.bias is not None else None
        return HeadRows(hidden, head.weight[:vocabulary], bias)

    @torch.no_grad()
    def teacher_head_rows(self, sequences: SequenceBatch):
        """The teacher at the rows of :meth:`head_rows`, for the fused loss: its cached top-k, its :class:`HeadRows`
        (when it shares the student's device), or its dense logits (:meth:`teacher_rows`) where its head is not plain or the teacher
        sits on another device (its whole head weight would move every step)."""
        if sequences.teacher_topk is not None or self.teacher is None or _device(self.teacher) != self.device:
            return self.teacher_rows(sequences)
        rows = self.head_rows(sequences, self.teacher)
        return rows if rows is not None else self.teacher_rows(sequences)

    def policy_logprobs(self, sequences: SequenceBatch, logits: Optional[Tensor] = None) -> Tensor:
        """log π_θ of the scored tokens under the sampling distribution, at their positions: ``(N, T-1)``, with grad.

        ``logits``: the scored rows of :meth:`rows`, when the caller has them already."""
        if logits is None:
            _, logits = self.rows(sequences)
        s = self.sampling
        taken = policy_logprobs(logits, sequences.scored_actions, s.temperature, s.top_k, s.top_p)
        return rows_to_positions(taken, sequences.scored_positions)

    def nll(self, sequences: SequenceBatch, logits: Optional[Tensor] = None) -> Tensor:
        """Mean −log π_θ per scored token (temperature 1): the SFT / SeqKD loss."""
        if logits is None:
            _, logits = self.rows(sequences)
        if logits.shape[0] == 0:
            return logits.sum() * 0.0
        return F.cross_entropy(logits.float(), sequences.scored_actions)

    # ------------------------------------------------------------------ frozen models
    @torch.no_grad()
    def reference_rows(self, sequences: SequenceBatch) -> Tensor:
        """The frozen initial student's logits at the scored rows: ``(R, V)``."""
        return self.rows(sequences, self.reference)[1]

    @torch.no_grad()
    def teacher_rows(self, sequences: SequenceBatch):
        """The teacher's distribution at the rows of :meth:`rows`: dense logits ``(R, V)``, or the cached top-k
        (a :class:`~pbkd_lightning.losses.SparseTeacher` with ``(R, k)`` fields) for teacher sequences."""
        if sequences.teacher_topk is not None:
            return sequences.teacher_topk
        if self.teacher is None:
            raise RuntimeError("the teacher is not in memory (training from its cache) but a batch needs it")
        _, rows = scored_rows(self.teacher, sequences)  # the teacher's head sees the scored rows only, as the student's
        return rows[:, : self.vocabulary].float().to(self.device)

    # ------------------------------------------------------------------ the critic
    def reward_model_score(self, sequences: SequenceBatch) -> Tensor:
        """r_φ(x, y) of black-box PbKD's reward model for each sequence: ``(N,)``."""
        ref = self.reference_logprobs(sequences) if isinstance(self.critic, ImplicitReward) else None
        return self.critic(sequences.input_ids, sequences.attention_mask, sequences.loss_mask, ref_logprobs=ref)

    def forget_reference_logprobs(self) -> None:
        self._reference_logprobs.clear()

    @torch.no_grad()
    def reference_logprobs(self, sequences: SequenceBatch) -> Tensor:
        """log π_ref of the scored tokens 1..T-1 of each (right-padded) sequence, ``(N, T-1)``, 0 elsewhere.

        π_ref is frozen, so a sequence's are computed once and kept: the critic draws the same pairs in several of its
        steps, a teacher response is in all of its prompt's pairs, and the student step scores the samples the critic
        trained on. The module forgets them at each epoch's start. A sharded reference (whose ranks must all run the
        same forwards) or left padding is scored whole each time. A sequence is kept by its tokens and which of them
        are scored (its values are the scored tokens' alone)."""
        model, ids, mask, scored = self.implicit_reference, sequences.input_ids, sequences.attention_mask, sequences.loss_mask
        if is_sharded(model) or not bool((mask[:, :-1] >= mask[:, 1:]).all()):
            return response_token_logprobs(model, ids, mask, scored).to(self.device)  # it moves them to the model
        if ids.shape[0] == 0:
            return torch.zeros(0, ids.shape[1] - 1, device=self.device)
        cache = self._reference_logprobs
        lengths = mask.sum(1).tolist()
        keys = _sequence_keys(ids, scored, lengths)
        first = _first_rows(keys, cache)
        if first:  # the unseen rows as they are in this batch (a batch seen for the first time: exactly its forward)
            if len(cache) + len(first) > REFERENCE_CACHE_SEQUENCES:
                cache.clear()
                first = _first_rows(keys, cache)  # this batch's rows that were kept are gone too
            rows = list(first.values())
            index = torch.tensor(rows, device=ids.device)
            computed = response_token_logprobs(model, ids[index], mask[index], scored[index])
            for key, row, values in zip(first, rows, computed):
                cache[key] = values[: max(lengths[row] - 1, 0)]
        out = torch.zeros(ids.shape[0], ids.shape[1] - 1, dtype=cache[keys[0]].dtype, device=_device(model))
        for row, key in enumerate(keys):
            out[row, : max(lengths[row] - 1, 0)] = cache[key]
        return out.to(self.device)

    # ------------------------------------------------------------------ sampling within a step
    def sample(self, prompts: list[str], model: Optional[nn.Module] = None) -> SequenceBatch:
        """One sample per prompt from the student (or ``model``) at the sampling settings, as sampled (on-policy
        batches of GKD, teacher samples of ``seq_kd``)."""
        model = model if model is not None else self.student
        rollouts, _ = sample_rollouts(model, self.tokenizer, prompts, self.sampling, 1, self.generation_batch_size,
                                      self.encoder.max_prompt_tokens, self.vocabulary)
        return self.encoder.batch(prompts, [group[0] for group in rollouts]).to(self.device)


def scored_hidden(lm: nn.Module, sequences: SequenceBatch) -> Tensor:
    """``lm``'s last hidden states at ``sequences``' scored positions, ``(R, H)``: :func:`scored_rows` with the head
    fed no row at all."""
    return scored_rows(lm, sequences, project=False)[0]


_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale", "logit_softcapping")
"""Model config fields by which a model's forward changes its head's logits (Gemma 2/3, Cohere, Granite, ...)."""


def _is_plain_head(lm: nn.Module, head: Optional[nn.Module], sequences: SequenceBatch) -> bool:
    """Whether ``lm``'s logits at ``sequences``' scored rows are ``head``'s linear map of its last hidden states."""
    if not isinstance(head, nn.Linear) or not head.weight.is_floating_point():  # no head module, or a quantized one
        return False
    if isinstance(head.weight, DTensor) or head.weight.device.type == "meta":  # sharded by FSDP2, or offloaded
        return False
    config = getattr(lm, "config", None)
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS):
        return False  # soft-capped or scaled logits: a small first batch could pass the numeric check below
    with torch.no_grad():
        hidden, logits = scored_rows(lm, sequences)
        projected = F.linear(hidden, head.weight, head.bias)
    return projected.shape == logits.shape and bool(torch.allclose(projected.float(), logits.float(), rtol=1e-3, atol=1e-3))


def scored_rows(lm: nn.Module, sequences: SequenceBatch, project: bool = True) -> tuple[Tensor, Tensor]:
    """``lm``'s last hidden states and logits at ``sequences``' scored positions only, on ``lm``'s device:
    ``(R, H)``, ``(R, V)``. The vocabulary projection never sees a prompt or padding position, so no
    ``N × T × V`` logits exist; with ``project=False`` it sees no row (the logits are ``(0, V)``)."""
    return project_positions(lm, sequences.input_ids, sequences.attention_mask, sequences.scored_positions, project)
