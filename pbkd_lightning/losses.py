"""Pure tensor functions for the distillation objectives: no Lightning, no I/O.

Conventions: ``N`` sequences, ``T`` positions, ``V`` vocabulary. A ``mask`` is 1.0 where a
token is scored and 0.0 elsewhere; every mean is over the tokens actually scored, and a
mask with no scored token gives 0 (not NaN).
"""

import torch
import torch.nn.functional as F
from torch import Tensor


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` where ``mask`` is set; 0 when nothing is set.

    Args:
        values: any shape.
        mask: same shape as ``values`` (bool or float).
    """
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def token_logprobs(logits: Tensor, targets: Tensor, chunk_size: int = 4096) -> Tensor:
    """log p(target) for each position, in float32, chunked over tokens.

    Only ``chunk_size × V`` float32 values exist at once, so a bf16 ``N × T × V`` logits
    tensor is never copied whole to float32.

    Args:
        logits: ``(N, T, V)``, already aligned with ``targets`` (position t predicts targets[:, t]).
        targets: ``(N, T)`` token ids.

    Returns:
        ``(N, T)`` float32 log-probabilities.

    >>> token_logprobs(torch.zeros(1, 2, 4), torch.tensor([[0, 3]])).exp()
    tensor([[0.2500, 0.2500]])
    """
    N, T, V = logits.shape  # sequences, positions, vocabulary
    flat_logits, flat_targets = logits.reshape(N * T, V), targets.reshape(N * T)
    pieces = []
    for start in range(0, N * T, chunk_size):
        chunk = flat_logits[start : start + chunk_size].float()
        picked = chunk.gather(-1, flat_targets[start : start + chunk_size, None]).squeeze(-1)
        pieces.append(picked - torch.logsumexp(chunk, dim=-1))
    return torch.cat(pieces).reshape(N, T)


def sequence_nll(logprobs: Tensor, mask: Tensor) -> Tensor:
    """Negative log-likelihood per scored token (the SFT / SeqKD loss).

    Args:
        logprobs: ``(N, T)`` from :func:`token_logprobs`.
        mask: ``(N, T)``.
    """
    return -masked_mean(logprobs, mask)


def bradley_terry(reward_chosen: Tensor, reward_rejected: Tensor, weight: Tensor | None = None) -> Tensor:
    """Bradley–Terry negative log-likelihood ``-log σ(r_w - r_l)``, averaged over pairs.

    Args:
        reward_chosen: ``(P,)`` rewards of the preferred responses.
        reward_rejected: ``(P,)`` rewards of the other responses.
        weight: optional ``(P,)``; pairs with weight 0 (ties) do not count.

    >>> bradley_terry(torch.tensor([0.0]), torch.tensor([0.0]))
    tensor(0.6931)
    """
    losses = F.softplus(reward_rejected - reward_chosen)  # = -log σ(r_w - r_l), stable for large gaps
    if weight is None:
        return losses.mean() if losses.numel() else losses.sum()
    return masked_mean(losses, weight)


def critic_lagrangian(
    reward_teacher: Tensor,
    reward_student: Tensor,
    preference: Tensor,
    beta: float,
    l2: float,
) -> dict[str, Tensor]:
    """The black-box PbKD critic loss (minimised, i.e. gradient ascent on the Lagrangian).

    ``loss = -(mean r(y_T) - mean r(y_S)) + β·BT + λ·mean(r²)``, where BT is taken over the
    pairs the labeler decided: preference +1 means the teacher's response is preferred,
    -1 the student's, 0 a tie (left out of BT).

    Args:
        reward_teacher: ``(P,)`` r_φ(x, y_T).
        reward_student: ``(P,)`` r_φ(x, y_S).
        preference: ``(P,)`` in {-1, 0, +1}.
        beta: weight of the Bradley–Terry term (the Lagrange multiplier of the confidence set).
        l2: weight of the L2 term that bounds the otherwise unbounded gap.

    Returns:
        ``loss``, ``gap``, ``bt`` and ``l2`` terms (``l2`` unweighted).
    """
    gap = reward_teacher.mean() - reward_student.mean()
    sign = preference.to(reward_teacher.dtype)
    chosen_minus_rejected = sign * (reward_teacher - reward_student)
    bt = bradley_terry(chosen_minus_rejected, torch.zeros_like(chosen_minus_rejected), weight=sign.abs())
    l2_term = 0.5 * (reward_teacher.pow(2).mean() + reward_student.pow(2).mean())
    return {"loss": -gap + beta * bt + l2 * l2_term, "gap": gap, "bt": bt, "l2": l2_term}


def group_advantages(rewards: Tensor, group_size: int, normalize: bool = False, eps: float = 1e-6) -> Tensor:
    """Advantage of each sample over the mean of the K samples drawn for the same prompt.

    Args:
        rewards: ``(B * K,)`` grouped prompt-major (the K samples of a prompt are adjacent).
        group_size: K.
        normalize: also divide by the group's standard deviation (amplifies a noisy critic).

    Returns:
        ``(B * K,)``.

    >>> group_advantages(torch.tensor([1.0, 3.0, 0.0, 0.0]), 2)
    tensor([-1.,  1.,  0.,  0.])
    """
    grouped = rewards.reshape(-1, group_size)  # (B, K)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if normalize:
        centred = centred / (grouped.std(dim=1, keepdim=True, unbiased=False) + eps)
    return centred.reshape(-1)


def clipped_surrogate(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_eps: float
) -> tuple[Tensor, Tensor]:
    """PPO's clipped surrogate, as a loss: ``-mean_t min(ρ_t A, clip(ρ_t, 1-ε, 1+ε) A)``.

    Outside the clip region on the side the advantage favours, the gradient is zero.

    Args:
        logprobs: ``(N, T)`` log π_θ of the sampled tokens (with grad).
        old_logprobs: ``(N, T)`` log π_old of the same tokens (no grad).
        advantages: ``(N,)`` per sequence or ``(N, T)`` per token.
        mask: ``(N, T)`` the sampled response tokens.
        clip_eps: ε in (0, 1).

    Returns:
        ``(loss, clip_fraction)``: the fraction of scored tokens whose ratio was clipped.
    """
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * advantages
    loss = -masked_mean(torch.minimum(unclipped, clipped), mask)
    clip_fraction = masked_mean(((ratio - 1.0).abs() > clip_eps).float(), mask)
    return loss, clip_fraction.detach()


def kl_to_reference(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Estimate of KL(π_θ ‖ π_ref) on tokens sampled from π_θ, per scored token.

    Uses the non-negative, unbiased estimator ``exp(d) - d - 1`` with ``d = log π_ref - log π_θ``.

    Args:
        logprobs, ref_logprobs, mask: ``(N, T)``.
    """
    delta = ref_logprobs - logprobs
    return masked_mean(torch.exp(delta) - delta - 1.0, mask)
