"""Reward models for black-box PbKD: a scalar head on a backbone, or an implicit reward from an LM copy."""

from dataclasses import dataclass
from typing import Literal

import torch
from jsonargparse.typing import PositiveFloat
from torch import Tensor, nn

from pbkd_lightning.config import validate_fields
from pbkd_lightning.losses import rows_to_positions, token_logprobs
from pbkd_lightning.models.rows import project_positions


@dataclass
class CriticConfig:
    """The reward model of black-box PbKD."""

    kind: Literal["scalar", "implicit"] = "implicit"
    """``scalar``: a linear head on a backbone's last hidden state (the paper's). ``implicit``: a trainable
    LM copy scored by ``scale · mean log(π_φ/π_ref)`` over the response (learned far faster in the prototype)."""
    init: Literal["student", "teacher", "scratch"] = "student"
    """Start from the (warmed-up) student's weights, from the teacher model's (``model.teacher``, not quantized;
    the reward model then reads the teacher's tokenizer, and an implicit reward's reference is the frozen teacher),
    or from a fresh model of the student's architecture."""
    pooling: Literal["last", "mean"] = "last"
    """Scalar head only: the last non-pad token's hidden state, or the mean over response tokens."""
    scale: PositiveFloat = 10.0
    """Implicit reward only: the factor on the mean log-ratio."""

    def __post_init__(self):
        validate_fields(self)


def response_token_logprobs(lm: nn.Module, input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor) -> Tensor:
    """log p(token_t | tokens_<t) under ``lm`` at the scored tokens t ≥ 1 (``loss_mask[:, 1:]``), 0 elsewhere:
    ``(N, T-1)`` float32.

    The head projects the scored rows only: an implicit reward, its reference and the warm-up's NLL never form
    logits at prompt or padding positions (``N × T × V``, gigabytes at a real vocabulary).
    """
    positions = loss_mask[:, 1:].bool()
    _, logits = project_positions(lm, input_ids, attention_mask, positions)
    positions = positions.to(logits.device)
    taken = input_ids.to(logits.device)[:, 1:][positions]
    values = token_logprobs(logits[None], taken[None])[0]
    return rows_to_positions(values, positions)


class ScalarReward(nn.Module):
    """r_φ(x, y) = w · h, with h the backbone's last hidden state at the last non-pad token
    (``pooling="last"``) or averaged over the response tokens (``pooling="mean"``)."""

    def __init__(self, backbone: nn.Module, hidden_size: int, pooling: str = "last"):
        super().__init__()
        if pooling not in ("last", "mean"):
            raise ValueError(f"`pooling` must be 'last' or 'mean', got {pooling!r}")
        self.backbone, self.pooling = backbone, pooling
        self.head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.head.weight)  # start from r = 0 everywhere: no preference before data
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor, **_) -> Tensor:
        """Args: ``(N, T)`` each, loss_mask over the scored positions. Returns ``(N,)``."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (N, T, H)
        if self.pooling == "last":
            last = attention_mask.sum(dim=1) - 1  # right padding: last real token
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        else:
            weights = loss_mask.to(hidden.dtype)[..., None]
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return self.head(pooled.to(self.head.weight.dtype)).squeeze(-1).float()


class ImplicitReward(nn.Module):
    """r_φ(x, y) = scale · mean over response tokens of (log π_φ(y_t) − log π_ref(y_t)).

    π_φ is a trainable copy of a language model; π_ref is frozen and not owned here (its
    log-probabilities are passed in), so it never enters the critic's optimizer.
    """

    def __init__(self, lm: nn.Module, scale: float = 10.0):
        super().__init__()
        self.lm, self.scale = lm, scale

    def forward(self, input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor, ref_logprobs: Tensor) -> Tensor:
        """``ref_logprobs``: ``(N, T-1)`` log π_ref of tokens 1..T-1. Returns ``(N,)``."""
        logprobs = response_token_logprobs(self.lm, input_ids, attention_mask, loss_mask)
        mask = loss_mask[:, 1:].to(logprobs.dtype)
        return self.scale * ((logprobs - ref_logprobs) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
