"""Pure tensor functions for the distillation objectives: no Lightning, no I/O.

Conventions: ``N`` sequences, ``T`` positions, ``V`` vocabulary. A ``mask`` is 1.0 where a
token is scored and 0.0 elsewhere; every mean is over the tokens actually scored, and a
mask with no scored token gives 0 (not NaN).
"""

import math
from typing import NamedTuple, Optional

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
    if not pieces:  # no position at all (e.g. no scored row): an empty result, still in the graph
        return flat_logits.float().sum(-1).reshape(N, T)
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
    reward_chosen: Tensor,
    reward_rejected: Tensor,
    preference: Tensor,
    teacher_pair: Tensor,
    beta: float,
    l2: float,
) -> dict[str, Tensor]:
    """The black-box PbKD critic loss (minimised, i.e. gradient ascent on the Lagrangian).

    ``loss = -gap + β·BT + λ·mean(r²)``. The gap ``mean r(y_T) − mean r(y_S)`` estimates
    J(π_T, r) − J(π_θ, r), so it is taken over teacher pairs only (teacher response vs student sample);
    BT is taken over every pair the labeler decided (sample-vs-sample pairs included): preference +1
    means ``chosen`` is preferred, −1 ``rejected``, 0 a tie (left out of BT).

    Args:
        reward_chosen: ``(P,)`` r_φ(x, chosen) (the teacher's response in a teacher pair).
        reward_rejected: ``(P,)`` r_φ(x, rejected) (the student sample in a teacher pair).
        preference: ``(P,)`` in {-1, 0, +1}.
        teacher_pair: ``(P,)`` bool, the pairs that are (teacher, student sample).
        beta: weight of the Bradley–Terry term (the Lagrange multiplier of the confidence set).
        l2: weight of the L2 term that bounds the otherwise unbounded gap.

    Returns:
        ``loss``, ``gap``, ``bt`` and ``l2`` terms (``l2`` unweighted).

    >>> r = critic_lagrangian(torch.tensor([2.0, 5.0]), torch.tensor([0.0, 1.0]), torch.tensor([1, 1]),
    ...                       torch.tensor([True, False]), beta=0.0, l2=0.0)
    >>> float(r["gap"])  # the sample pair (5 vs 1) is not part of the teacher-student gap
    2.0
    """
    gap = masked_mean(reward_chosen - reward_rejected, teacher_pair)
    sign = preference.to(reward_chosen.dtype)
    chosen_minus_rejected = sign * (reward_chosen - reward_rejected)
    bt = bradley_terry(chosen_minus_rejected, torch.zeros_like(chosen_minus_rejected), weight=sign.abs())
    l2_term = 0.5 * (reward_chosen.pow(2).mean() + reward_rejected.pow(2).mean())
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


def sampling_logits(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """The logits of the distribution a sampler draws from: divided by ``temperature`` (0 means greedy, whose
    token probabilities are those of temperature 1), then everything outside the ``top_k`` largest and outside
    the nucleus of mass ``top_p`` set to −inf (the rule of Hugging Face's warpers: sorted ascending, a token is
    dropped when the mass up to and including it is ≤ 1 − top_p; the most likely token is always kept).

    The sampler and the training loss both call this, so π_old and π_θ describe the same distribution.

    Args:
        logits: ``(..., V)``.

    >>> sampling_logits(torch.tensor([[0.0, 1.0, 2.0]]), top_k=2).isinf().tolist()
    [[True, False, False]]
    """
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=False)
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= 1.0 - top_p
        drop[..., -1] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def policy_logprobs(logits: Tensor, actions: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """log π(action) under the sampling distribution of :func:`sampling_logits`, in float32: ``(R,)``.

    Args:
        logits: ``(R, V)`` scored rows.
        actions: ``(R,)`` the tokens taken.
    """
    log_pi = F.log_softmax(sampling_logits(logits.float(), temperature, top_k, top_p), dim=-1)
    return log_pi.gather(-1, actions[:, None]).squeeze(-1)


def kl_to_reference(student_rows: Tensor, reference_rows: Tensor, chunk_size: int | None = None) -> Tensor:
    """KL(π_θ ‖ π_ref) at each scored state, exactly over the vocabulary, averaged over the states.

    (A per-token estimator on sampled tokens such as ``exp(d) − d − 1`` has the expected gradient of
    KL(π_ref ‖ π_θ), the other direction; the exact sum has the gradient of the divergence its name gives.)

    Args:
        student_rows: ``(R, V)`` the student's logits at the scored states (with grad).
        reference_rows: ``(R, V)`` the frozen reference's logits there.
    """
    labels = torch.zeros(1, student_rows.shape[0], dtype=torch.long, device=student_rows.device)
    return reverse_kl(student_rows[None], reference_rows[None], labels, chunk_size=chunk_size)


# ---------------------------------------------------------------------------- white-box PbKD (Q-head)
#
# These take the R scored states of a batch as rows (the response positions, gathered), so the
# ``R × V`` tensors exist once each and the prompt and padding positions never reach the vocabulary.


def rows_to_positions(values: Tensor, mask: Tensor) -> Tensor:
    """Place R row values at the set positions of an ``(N, T)`` bool mask (row-major), zeros elsewhere.

    >>> rows_to_positions(torch.tensor([1.0, 2.0]), torch.tensor([[False, True], [True, False]]))
    tensor([[0., 1.],
            [2., 0.]])
    """
    return torch.zeros(mask.shape, dtype=values.dtype, device=values.device).masked_scatter(mask, values)


def dense_teacher_probs(teacher, vocabulary: int) -> Tensor:
    """p_T over the vocabulary from dense logits ``(R, V)`` or a :class:`SparseTeacher` with ``(R, k)`` fields.

    A sparse teacher's leftover mass is spread evenly over the tokens outside its top k (the cache
    keeps no more than that); with k = V it is exact.

    Returns:
        ``(R, V)`` float32 probabilities.
    """
    if not isinstance(teacher, SparseTeacher):
        return F.softmax(teacher.float(), dim=-1)
    k = teacher.indices.shape[-1]
    probs = torch.zeros(*teacher.indices.shape[:-1], vocabulary, device=teacher.logprobs.device)
    if k < vocabulary:
        probs += (teacher.leftover.float() / (vocabulary - k))[..., None]
    return probs.scatter(-1, teacher.indices, teacher.logprobs.float().exp())


def moment_matching_gap(q_values: Tensor, teacher_probs: Tensor, student_probs: Tensor) -> Tensor:
    """The performance-difference form of the moment-matching gap, exact over the vocabulary:
    ``G = mean_s Σ_a (p_T(a|s) − π_θ(a|s)) · Q(s, a)``.

    Args:
        q_values: ``(R, V)`` Q_ψ(s, ·) at R scored states.
        teacher_probs: ``(R, V)`` p_T(·|s).
        student_probs: ``(R, V)`` π_θ(·|s).

    Returns:
        The mean over the R states (0 when R = 0).

    >>> moment_matching_gap(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.5]]))
    tensor(0.5000)
    """
    per_state = ((teacher_probs - student_probs) * q_values).sum(-1)
    return per_state.mean() if per_state.numel() else per_state.sum()


def q_induced_returns(q_taken: Tensor, state_values: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """Sequence rewards induced by a Q-function: ``R(y) = Σ_t Q(s_t, a_t) − γ·V(s_{t+1})`` over scored tokens.

    The state after the last scored token (the eos) is terminal: its value is 0.

    Args:
        q_taken: ``(N, T)`` Q(s_t, a_t) of the token taken at t.
        state_values: ``(N, T)`` V(s_t) = Σ_a π_θ(a|s_t) Q(s_t, a).
        mask: ``(N, T)`` the scored (response) positions, contiguous per row.
        gamma: discount γ.

    Returns:
        ``(N,)``.

    >>> q_induced_returns(torch.tensor([[2.0, 3.0]]), torch.tensor([[1.0, 1.5]]), torch.ones(1, 2))
    tensor([3.5000])
    """
    mask = mask.to(q_taken.dtype)
    next_values = torch.cat([(state_values * mask)[:, 1:], torch.zeros_like(state_values[:, :1])], dim=1)
    return ((q_taken - gamma * next_values) * mask).sum(1)


# ---------------------------------------------------------------------------- MiniLLM


def future_rewards(rewards: Tensor, mask: Tensor, gamma: float = 1.0, normalize: bool = True) -> Tensor:
    """MiniLLM's long-term advantage: for each scored position t, ``Σ_{t' > t} γ^(t'−t−1) r_t'``,
    divided by the number of scored positions after t when ``normalize`` (0 at the last one).

    Args:
        rewards: ``(N, T)`` per-token rewards (e.g. ``log p_T(y_t) − log π_θ(y_t)``).
        mask: ``(N, T)`` scored positions.
        gamma: discount γ.
        normalize: length normalisation (MiniLLM's default).

    Returns:
        ``(N, T)``, 0 at unscored positions.

    >>> future_rewards(torch.tensor([[1.0, 2.0, 4.0]]), torch.ones(1, 3))
    tensor([[3., 4., 0.]])
    """
    mask = mask.to(rewards.dtype)
    rewards = rewards * mask
    future = torch.zeros_like(rewards[:, 0])
    remaining = torch.zeros_like(rewards[:, 0])
    out = torch.zeros_like(rewards)
    for t in range(rewards.shape[1] - 1, -1, -1):
        out[:, t] = future / remaining.clamp(min=1.0) if normalize else future
        # what position t - 1 sees: this token's reward plus the discounted rest
        future = rewards[:, t] + gamma * future
        remaining = remaining + mask[:, t]
    return out * mask


# ---------------------------------------------------------------------------- X-KD (AVRIL reward posterior)


def next_token_values(q: Tensor, mask: Tensor) -> Tensor:
    """Q_{t+1} for each scored position t: the next position's value while it is still scored, else 0.

    The last scored token of a sequence (the eos) ends the episode, so its successor is terminal
    and contributes 0: its TD target is Q_t itself.

    Args:
        q, mask: ``(N, T)``.

    >>> next_token_values(torch.tensor([[1.0, 2.0, 3.0, 9.0]]), torch.tensor([[1, 1, 1, 0]]))
    tensor([[2., 3., 0., 0.]])
    """
    mask = mask.to(q.dtype)
    following = torch.cat([(q * mask)[:, 1:], torch.zeros_like(q[:, :1])], dim=1)
    return following * mask


def avril_terms(mu: Tensor, log_sigma: Tensor, td: Tensor, mask: Tensor, td_weight: float = 1.0) -> dict[str, Tensor]:
    """AVRIL's per-token objective with a Gaussian reward posterior N(μ_t, σ_t²) and a N(0, 1) prior:
    ``KL(N(μ, σ²) ‖ N(0, 1)) − λ · log N(td; μ, σ)``, averaged over scored tokens.

    ``KL = ½(μ² + σ² − 1) − log σ``; ``−log N(td; μ, σ) = ½ log 2π + log σ + (td − μ)² / (2σ²)``.

    Args:
        mu, log_sigma: ``(N, T)`` the reward head's outputs.
        td: ``(N, T)`` the temporal difference ``Q_t − γ·Q_{t+1}`` the reward should explain.
        mask: ``(N, T)`` scored tokens.
        td_weight: λ.

    Returns:
        ``loss`` (KL + λ·td_nll), ``kl``, ``td_nll``, ``mu_mean`` and ``sigma_mean`` (the last two detached).
    """
    sigma = log_sigma.exp()
    kl = 0.5 * (mu.pow(2) + sigma.pow(2) - 1.0) - log_sigma
    td_nll = 0.5 * math.log(2 * math.pi) + log_sigma + 0.5 * ((td - mu) / sigma).pow(2)
    kl_mean, td_mean = masked_mean(kl, mask), masked_mean(td_nll, mask)
    return {
        "loss": kl_mean + td_weight * td_mean, "kl": kl_mean, "td_nll": td_mean,
        "mu_mean": masked_mean(mu, mask).detach(), "sigma_mean": masked_mean(sigma, mask).detach(),
    }


# ---------------------------------------------------------------------------- token-level divergences
#
# Each divergence compares the teacher's distribution p_T with the student's p_S at every scored
# token and returns the mean over scored tokens. The teacher is dense logits ``(N, T, V)`` or a
# :class:`SparseTeacher` (top-k log-probabilities, their token ids and the leftover mass); a sparse
# teacher is compared on k + 1 bins (the k tokens and "everything else"), which equals the dense
# form when k = V. Work is done chunk by chunk over tokens in float32 and the gradient with
# respect to the student's logits is computed inside the forward pass, so the extra memory is one
# gradient buffer plus ``chunk_size × V`` float32 temporaries, never ``N × T × V`` float32 copies.


class SparseTeacher(NamedTuple):
    """A teacher distribution kept as its top-k tokens per position.

    Attributes:
        logprobs: ``(N, T, k)`` log p_T of the k tokens (at temperature 1).
        indices: ``(N, T, k)`` their token ids.
        leftover: ``(N, T)`` probability mass of all other tokens, ``1 − Σ exp(logprobs)``.
    """

    logprobs: Tensor
    indices: Tensor
    leftover: Tensor


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Σ p (log p − log q) over the last dim; terms with p = 0 are 0 (not NaN)."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def _mixture(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """log(w·a + (1 − w)·b) from log a and log b (w = 0 or 1: the one side, where log 0 has no float)."""
    if weight_a in (0.0, 1.0):
        return (log_a if weight_a == 1.0 else log_b).clone()
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def _forward_kl_rows(log_t: Tensor, log_s: Tensor, _: float) -> Tensor:
    return _kl(log_t, log_s)


def _reverse_kl_rows(log_t: Tensor, log_s: Tensor, _: float) -> Tensor:
    return _kl(log_s, log_t)


def _jsd_rows(log_t: Tensor, log_s: Tensor, beta: float) -> Tensor:
    if beta == 0.0:  # the endpoints are the KL directions exactly, not a vanishing interpolation
        return _kl(log_t, log_s)
    if beta == 1.0:
        return _kl(log_s, log_t)
    log_m = _mixture(log_t, log_s, beta)
    return beta * _kl(log_t, log_m) + (1.0 - beta) * _kl(log_s, log_m)


def _skew_kl_rows(log_t: Tensor, log_s: Tensor, alpha: float) -> Tensor:
    return _kl(log_t, _mixture(log_t, log_s, alpha))


def _skew_reverse_kl_rows(log_t: Tensor, log_s: Tensor, alpha: float) -> Tensor:
    return _kl(log_s, _mixture(log_s, log_t, alpha))


def _tvd_rows(log_t: Tensor, log_s: Tensor, _: float) -> Tensor:
    return 0.5 * (log_t.exp() - log_s.exp()).abs().sum(-1)


def _row_log_probs(student_rows: Tensor, teacher, rows: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """(log p_T, log p_S) of a chunk of scored rows, in float32, on the vocabulary or on k + 1 bins."""
    dtype = torch.promote_types(student_rows.dtype, torch.float32)  # float32 at least (float64 stays, for gradcheck)
    log_s = F.log_softmax(student_rows.to(dtype) / temperature, dim=-1)
    if isinstance(teacher, SparseTeacher):
        indices = teacher.indices.reshape(-1, teacher.indices.shape[-1])[rows]
        top_t = teacher.logprobs.reshape(-1, teacher.logprobs.shape[-1])[rows].to(dtype)
        # Leftover masses are floored at the smallest normal number on both sides, so that rounding
        # (k = V leaves ~1e-16 on one side and 0 on the other) gives a negligible term, not inf or NaN.
        tiny = torch.finfo(dtype).tiny
        rest_t = teacher.leftover.reshape(-1)[rows].to(dtype).clamp(min=tiny).log()
        top_s = log_s.gather(-1, indices)
        rest_s = (1.0 - top_s.exp().sum(-1)).clamp(min=tiny).log()  # the student's mass outside the top k
        return torch.cat([top_t, rest_t[:, None]], -1), torch.cat([top_s, rest_s[:, None]], -1)
    log_t = F.log_softmax(teacher.reshape(-1, teacher.shape[-1])[rows].to(dtype) / temperature, dim=-1)
    return log_t, log_s


def _hand_on(grads, grad_output: Tensor, what: str) -> tuple:
    """Gradients a loss filled in its forward, scaled in place by the upstream gradient and handed on: no second
    copy, hence one backward pass only (``grads`` is None once handed on)."""
    if grads is None:
        raise RuntimeError(f"{what} supports one backward pass (retain_graph reuse is not supported)")
    if not bool(grad_output == 1):
        for grad in grads:
            if grad is not None:
                grad.mul_(grad_output.to(grad.dtype))
    return grads


class _ChunkedDivergence(torch.autograd.Function):
    """Mean divergence over scored rows; d loss / d student logits is filled chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, student_logits, teacher, rows, row_fn, parameter, temperature, chunk_size, scale):
        V = student_logits.shape[-1]
        flat = student_logits.reshape(-1, V)
        needs_grad = student_logits.requires_grad
        grad = torch.zeros_like(flat) if needs_grad else None
        total = torch.zeros((), dtype=torch.promote_types(flat.dtype, torch.float32), device=flat.device)
        count = max(1, rows.numel())
        for start in range(0, rows.numel(), chunk_size):
            chunk_rows = rows[start : start + chunk_size]
            chunk = flat[chunk_rows].detach().requires_grad_(needs_grad)
            with torch.enable_grad():
                log_t, log_s = _row_log_probs(chunk, teacher, chunk_rows, temperature)
                loss = row_fn(log_t, log_s, parameter).sum() * (scale / count)
            if needs_grad:
                grad[chunk_rows] = torch.autograd.grad(loss, chunk)[0].to(grad.dtype)
            total += loss.detach()
        # Kept as an attribute, not saved for backward: backward hands this very buffer on (scaled in
        # place), so the peak holds one N × V gradient, not two; hence backward can run only once.
        ctx.grad, ctx.shape = grad, student_logits.shape
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        (grad,), ctx.grad = _hand_on(None if ctx.grad is None else (ctx.grad,), grad_output, "a chunked divergence"), None
        return grad.reshape(ctx.shape), None, None, None, None, None, None, None


DEFAULT_CHUNK_ELEMENTS = 1 << 20
"""Rows per chunk when ``chunk_size`` is None: about this many logits (4 MiB in float32) ...

With batch 4 × 512 on 2 CPU cores, 4M-logit chunks left 0.49× the naive peak memory at vocabulary
32,000 (the chunk's float32 temporaries rival the gradient buffer); 1M-logit chunks give 0.29×."""
MIN_CHUNK_ROWS = 32
"""... but at least this many rows: each chunk costs a few kernel launches, and at vocabulary 151,936
six-row chunks doubled the time for little memory."""


def _divergence(
    row_fn, parameter: float, student_logits: Tensor, teacher, labels: Tensor, temperature: float,
    chunk_size: int | None, scale_by_temperature: bool,
) -> Tensor:
    if chunk_size is None:
        chunk_size = max(MIN_CHUNK_ROWS, DEFAULT_CHUNK_ELEMENTS // student_logits.shape[-1])
    if temperature <= 0:
        raise ValueError(f"`temperature` must be > 0, got {temperature}")
    if isinstance(teacher, SparseTeacher) and temperature != 1.0:
        raise ValueError("a sparse (top-k) teacher holds temperature-1 probabilities; use temperature 1")
    rows = (labels.reshape(-1) != -100).nonzero().squeeze(-1)
    scale = temperature**2 if scale_by_temperature else 1.0
    return _ChunkedDivergence.apply(student_logits, teacher, rows, row_fn, parameter, temperature, chunk_size, scale)


def forward_kl(student_logits, teacher, labels, temperature=1.0, chunk_size=None, scale_by_temperature=False):
    """KL(p_T ‖ p_S) per scored token, averaged (the usual KD loss).

    Args:
        student_logits: ``(N, T, V)``.
        teacher: dense teacher logits ``(N, T, V)`` or a :class:`SparseTeacher`.
        labels: ``(N, T)``; positions equal to -100 are not scored.
        temperature: both distributions are softened by it (a sparse teacher needs 1).
        chunk_size: scored tokens per chunk; peak extra memory grows with chunk_size × V.
            None: about 1M logits per chunk and at least 32 rows (``DEFAULT_CHUNK_ELEMENTS``, ``MIN_CHUNK_ROWS``).
        scale_by_temperature: multiply by T² (keeps gradient size comparable across temperatures).

    Returns:
        The mean over scored tokens (0 when none is scored).
    """
    return _divergence(_forward_kl_rows, 0.0, student_logits, teacher, labels, temperature, chunk_size, scale_by_temperature)


def reverse_kl(student_logits, teacher, labels, temperature=1.0, chunk_size=None, scale_by_temperature=False):
    """KL(p_S ‖ p_T) per scored token, averaged (mode-seeking). Arguments as :func:`forward_kl`."""
    return _divergence(_reverse_kl_rows, 0.0, student_logits, teacher, labels, temperature, chunk_size, scale_by_temperature)


def generalized_jsd(student_logits, teacher, labels, beta=0.5, temperature=1.0, chunk_size=None, scale_by_temperature=False):
    """GKD's generalised Jensen–Shannon divergence ``β·KL(p_T ‖ M) + (1 − β)·KL(p_S ‖ M)``,
    ``M = β·p_T + (1 − β)·p_S``; β = 0 is computed as KL(p_T ‖ p_S) and β = 1 as KL(p_S ‖ p_T),
    exactly. Other arguments as :func:`forward_kl`.
    """
    _check_unit("beta", beta)
    return _divergence(_jsd_rows, float(beta), student_logits, teacher, labels, temperature, chunk_size, scale_by_temperature)


def skew_kl(student_logits, teacher, labels, alpha=0.1, temperature=1.0, chunk_size=None, scale_by_temperature=False):
    """DistiLLM's skew KL ``KL(p_T ‖ α·p_T + (1 − α)·p_S)``. Other arguments as :func:`forward_kl`."""
    _check_unit("alpha", alpha)
    return _divergence(_skew_kl_rows, float(alpha), student_logits, teacher, labels, temperature, chunk_size, scale_by_temperature)


def skew_reverse_kl(student_logits, teacher, labels, alpha=0.1, temperature=1.0, chunk_size=None, scale_by_temperature=False):
    """DistiLLM's skew reverse KL ``KL(p_S ‖ α·p_S + (1 − α)·p_T)``. Other arguments as :func:`forward_kl`."""
    _check_unit("alpha", alpha)
    return _divergence(_skew_reverse_kl_rows, float(alpha), student_logits, teacher, labels, temperature, chunk_size, scale_by_temperature)


def total_variation(student_logits, teacher, labels, temperature=1.0, chunk_size=None, scale_by_temperature=False):
    """Total variation distance ``½ Σ |p_T − p_S|`` per scored token, averaged. Arguments as :func:`forward_kl`."""
    return _divergence(_tvd_rows, 0.0, student_logits, teacher, labels, temperature, chunk_size, scale_by_temperature)


class HeadRows(NamedTuple):
    """A model's last hidden states at R scored rows and its output projection, standing for the logits
    ``hidden @ weight.T + bias`` without forming them.

    Attributes:
        hidden: ``(R, H)``.
        weight: ``(V, H)``: the head's rows of the vocabulary the loss compares.
        bias: ``(V,)`` or None.
    """

    hidden: Tensor
    weight: Tensor
    bias: Optional[Tensor] = None

    def logits(self, start: int = 0, stop: Optional[int] = None) -> Tensor:
        """Rows ``start:stop`` of the logits, ``(stop − start, V)``."""
        return F.linear(self.hidden[start:stop], self.weight, self.bias)


ROW_DIVERGENCES = {
    "forward_kl": _forward_kl_rows, "reverse_kl": _reverse_kl_rows, "generalized_jsd": _jsd_rows,
    "skew_kl": _skew_kl_rows, "skew_reverse_kl": _skew_reverse_kl_rows, "total_variation": _tvd_rows,
}
"""Each divergence of this module by name, as a function of one chunk's ``(log p_T, log p_S)`` and its parameter
(β of the generalized JSD, α of the skew divergences, unused by the others)."""


def _teacher_chunk(teacher, start: int, stop: int):
    """Rows ``start:stop`` of a teacher given as dense ``(R, V)`` logits, a :class:`SparseTeacher` with ``(R, k)``
    fields or :class:`HeadRows`: dense logits or a sparse teacher of those rows."""
    if isinstance(teacher, HeadRows):
        return teacher.logits(start, stop)
    if isinstance(teacher, SparseTeacher):
        return SparseTeacher(*(field[start:stop] for field in teacher))
    return teacher[start:stop]


def _masked_product(p: Tensor, log_ratio: Tensor, finite: bool = False) -> Tensor:
    """``p · log_ratio`` with 0 where p = 0 (not NaN), written into ``log_ratio``. ``finite``: both sides' logits
    are known finite, so every log-probability is finite and ``p = 0`` already gives 0 (the mask's two passes over
    the chunk, ~12% of the fused generalized JSD at 520 rows × 8,192, are skipped)."""
    return log_ratio.mul_(p) if finite else log_ratio.mul_(p).masked_fill_(p == 0, 0.0)


CLOSED_FORM_GRADIENTS = ("forward_kl", "reverse_kl", "generalized_jsd", "skew_kl", "skew_reverse_kl", "total_variation")
"""The divergences :func:`_dense_value_and_grad` differentiates by hand; any other row function of
:data:`ROW_DIVERGENCES` is fused through autograd (correct, with more ``chunk × V`` temporaries)."""


def _dense_value_and_grad(divergence: str, student_logits: Tensor, teacher_logits: Tensor, parameter: float,
                          temperature: float, finite: bool = False) -> tuple[Tensor, Tensor]:
    """Σ over a chunk's rows of a divergence between dense distributions and its gradient with respect to the
    student's logits, in closed form: a handful of ``chunk × V`` temporaries where autograd through the row
    functions keeps about fifteen.

    With ``u = z / τ``, ``p_S = softmax(u)`` and ``g = ∂D/∂p_S``, ``∂D/∂u = p_S ⊙ (g − Σ p_S g)``; forward KL's is
    ``p_S − p_T``. Checked against autograd of the naive formulas in ``tests/test_divergences.py``.
    """
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    scaled = (lambda z: z.to(dtype)) if temperature == 1.0 else (lambda z: z.to(dtype) / temperature)
    log_s, log_t = F.log_softmax(scaled(student_logits), -1), F.log_softmax(scaled(teacher_logits), -1)
    p_s, p_t = log_s.exp(), log_t.exp()
    if divergence == "generalized_jsd" and parameter in (0.0, 1.0):  # the endpoints are the KL directions exactly
        divergence = "forward_kl" if parameter == 0.0 else "reverse_kl"
    if divergence == "forward_kl":
        value = _masked_product(p_t, log_t - log_s, finite).sum()
        return value, p_s.sub_(p_t).div_(temperature)
    if divergence == "total_variation":
        value = 0.5 * (p_s - p_t).abs_().sum()
        g = (p_s - p_t).sign_().mul_(0.5)
    elif divergence == "reverse_kl":
        ratio = log_s - log_t
        rows = _masked_product(p_s, ratio.clone(), finite).sum(-1)
        value = rows.sum()
        return value, ratio.sub_(rows[:, None]).mul_(p_s).div_(temperature)
    elif divergence == "generalized_jsd":
        beta = parameter
        log_m = _mixture(log_t, log_s, beta)
        value = beta * _masked_product(p_t, log_t - log_m, finite).sum()
        ratio = log_m.neg_().add_(log_s)  # log p_S / M
        rows = _masked_product(p_s, ratio.clone(), finite).sum(-1)
        value = value + (1.0 - beta) * rows.sum()
        return value, ratio.sub_(rows[:, None]).mul_(p_s).mul_((1.0 - beta) / temperature)
    elif divergence == "skew_kl":
        alpha = parameter
        log_m = _mixture(log_t, log_s, alpha)
        value = _masked_product(p_t, log_t - log_m, finite).sum()
        g = log_m.neg_().add_(log_t).exp_().mul_(-(1.0 - alpha))  # −(1 − α) p_T / M
    elif divergence == "skew_reverse_kl":
        alpha = parameter
        log_m = _mixture(log_s, log_t, alpha)
        ratio = log_m.neg_().add_(log_s)  # log p_S / M
        value = _masked_product(p_s, ratio.clone(), finite).sum()
        g = ratio.sub_(ratio.exp().mul_(alpha))  # log(p_S / M) − α p_S / M (+ 1, which cancels)
    else:
        raise ValueError(f"unknown divergence {divergence!r}")
    centred = g.sub_((p_s * g).sum(-1, keepdim=True))
    return value, centred.mul_(p_s).div_(temperature)


def _project_into(out: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``hidden @ weight.T + bias`` written into ``out`` (rows × V): straight into it when the dtypes agree."""
    if out.dtype == hidden.dtype == weight.dtype and (bias is None or bias.dtype == out.dtype):
        if bias is None:
            return torch.mm(hidden, weight.T, out=out)
        return torch.addmm(bias, hidden, weight.T, out=out)
    return out.copy_(F.linear(hidden, weight, bias))


def _log_softmax_(logits: Tensor, scratch: Tensor, shift: float = 0.0) -> Tensor:
    """``log softmax(logits) + shift`` written over ``logits``, and ``softmax(logits)`` into ``scratch``: the
    exponentials go into the scratch buffer, so nothing of the chunk's size is allocated."""
    logits.sub_(logits.amax(-1, keepdim=True))
    torch.exp(logits, out=scratch)
    total = scratch.sum(-1, keepdim=True)
    logits.sub_(total.log().sub_(shift))
    scratch.div_(total)
    return logits


def _in_place_value_and_grad(divergence: str, student_logits: Tensor, teacher_logits: Tensor, scratch: Tensor,
                             parameter: float, temperature: float) -> tuple[Tensor, Tensor]:
    """:func:`_dense_value_and_grad` of forward KL or the generalized JSD (0 < β < 1) from finite logits, in the
    given buffers (``scratch``: one ``chunk × V`` buffer for forward KL, two for the JSD), all overwritten; the
    gradient is returned in one of them. Three buffers for forward KL and four for the JSD, where the general path
    allocates seven to nine fresh ones a chunk.

    Forward KL uses ``KL = Σ p_T (log p_T − z') + log Σ exp z'`` (``z'`` the student's max-shifted scaled logits),
    so the student's log-probabilities are never formed. The JSD keeps ``log β p_T`` and ``log (1 − β) p_S``,
    whose ``logaddexp`` is ``log M`` in log space (exact where both probabilities underflow), and recovers ``p_S``
    from ``log p_S − log M`` and ``log M``.
    """
    s, t = student_logits, teacher_logits
    if temperature != 1.0:
        s.div_(temperature)
        t.div_(temperature)
    if divergence == "forward_kl":
        p = scratch[0]
        _log_softmax_(t, p)  # t: log p_T, p: p_T
        s.sub_(s.amax(-1, keepdim=True))
        mass = p.sum(-1)  # Σ p_T: 1 up to rounding, kept so log Z is weighted as the formula weights it
        cross = t.sub_(s).mul_(p).sum(-1)  # Σ p_T (log p_T − z')
        torch.exp(s, out=t)
        student_total = t.sum(-1, keepdim=True)
        value = (cross + student_total.view(-1).log() * mass).sum()
        return value, t.div_(student_total).sub_(p).div_(temperature)
    beta = parameter  # generalized JSD, M = β p_T + (1 − β) p_S
    p, m = scratch
    log_b, log_1b = math.log(beta), math.log1p(-beta)
    _log_softmax_(t, p, log_b)  # t: log β p_T, p: p_T
    _log_softmax_(s, m, log_1b)  # s: log (1 − β) p_S
    torch.logaddexp(t, s, out=m)  # log M
    # the constants are taken off elementwise: Σ p (x − c) is not Σ p x − c where Σ p is 1 only up to rounding
    teacher_rows = t.sub_(m).sub_(log_b).mul_(p).sum(-1)  # KL(p_T ‖ M)
    s.sub_(m).sub_(log_1b)  # log (p_S / M)
    torch.add(s, m, out=p).exp_()  # p_S
    student_rows = torch.mul(p, s, out=t).sum(-1)  # KL(p_S ‖ M)
    value = beta * teacher_rows.sum() + (1.0 - beta) * student_rows.sum()
    return value, s.sub_(student_rows[:, None]).mul_(p).mul_((1.0 - beta) / temperature)


IN_PLACE_SCRATCH = {"forward_kl": 1, "generalized_jsd": 2}
"""The divergences :func:`_in_place_value_and_grad` takes, with the scratch buffers each needs beside the two
models' logits."""


def _in_place_buffers(divergence: str, teacher, weight: Tensor, parameter: float) -> int:
    """How many ``chunk × V`` buffers the fused loss reuses for this divergence and teacher: 0 where it takes the
    general path (a teacher given as logits or top-k, float16 that could overflow to -inf, the JSD's endpoints)."""
    if not isinstance(teacher, HeadRows) or divergence not in IN_PLACE_SCRATCH:
        return 0
    if torch.float16 in (weight.dtype, teacher.weight.dtype):
        return 0
    if torch.is_autocast_enabled(weight.device.type):  # products with out= are not autocast: keep autocast's dtype
        return 0
    if divergence == "generalized_jsd" and parameter in (0.0, 1.0):
        return 0
    return 2 + IN_PLACE_SCRATCH[divergence]


class _FusedProjectionDivergence(torch.autograd.Function):
    """Mean divergence over R rows, from the student's hidden states and head weight, a chunk of rows at a time.

    Forward projects a chunk, takes the divergence and its gradient with respect to the chunk's logits, and turns
    that at once into the gradients of the chunk's hidden states and of the weight (and bias), so no more than
    one chunk's logits of either model ever exist. Backward only scales what forward filled."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher, divergence, parameter, temperature, chunk_size, scale, in_place):
        rows, row_fn = hidden.shape[0], ROW_DIVERGENCES[divergence]
        wants = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
        accumulate = torch.promote_types(weight.dtype, torch.float32)  # Σ over chunks in float32 at least
        grad_hidden = torch.zeros_like(hidden) if wants[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=accumulate, device=weight.device) if wants[1] else None
        grad_bias = torch.zeros(bias.shape, dtype=accumulate, device=bias.device) if wants[2] else None
        total = torch.zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
        if in_place:  # `_in_place_buffers` of these inputs; made once and reused by every chunk: no fresh chunk × V allocation (nor its page faults)
            dtype = torch.promote_types(torch.promote_types(weight.dtype, teacher.weight.dtype), torch.float32)
            buffers = torch.empty((in_place, min(rows, chunk_size), weight.shape[0]), dtype=dtype, device=weight.device)
        for start in range(0, rows, chunk_size):
            stop = min(rows, start + chunk_size)
            chunk_hidden = hidden[start:stop].detach()
            if in_place:
                logits, teacher_rows, *scratch = buffers[:, : stop - start]
                with torch.no_grad():
                    _project_into(logits, chunk_hidden, weight, bias)
                    _project_into(teacher_rows, teacher.hidden[start:stop].detach(), teacher.weight, teacher.bias)
                value, grad_logits = _in_place_value_and_grad(divergence, logits, teacher_rows, scratch, parameter,
                                                              temperature)
                loss, grad_logits = value * (scale / max(1, rows)), grad_logits.mul_(scale / max(1, rows))
            else:
                with torch.no_grad():
                    logits = F.linear(chunk_hidden, weight, bias)
                    teacher_rows = _teacher_chunk(teacher, start, stop)
                if isinstance(teacher_rows, SparseTeacher) or divergence not in CLOSED_FORM_GRADIENTS:
                    # k + 1 bins through a gather, or a divergence without a closed form here: autograd of its row function
                    logits.requires_grad_(any(wants))
                    with torch.enable_grad():
                        log_t, log_s = _row_log_probs(logits, teacher_rows, torch.arange(stop - start, device=logits.device),
                                                      temperature)
                        loss = row_fn(log_t, log_s, parameter).sum() * (scale / max(1, rows))
                    grad_logits = torch.autograd.grad(loss, logits)[0] if any(wants) else None
                else:
                    # projected by both heads: finite logits, no -inf to mask (float16 could overflow to it)
                    finite = isinstance(teacher, HeadRows) and torch.float16 not in (logits.dtype, teacher_rows.dtype)
                    value, grad_logits = _dense_value_and_grad(divergence, logits, teacher_rows, parameter, temperature, finite)
                    del logits, teacher_rows
                    loss = value * (scale / max(1, rows))
                    grad_logits = grad_logits.mul_(scale / max(1, rows))
            if any(wants):
                grad_logits = grad_logits.to(weight.dtype)
                if grad_hidden is not None:
                    grad_hidden[start:stop] = (grad_logits @ weight).to(grad_hidden.dtype)
                if grad_weight is not None:
                    grad_weight.addmm_(grad_logits.T.to(accumulate), chunk_hidden.to(accumulate))
                if grad_bias is not None:
                    grad_bias += grad_logits.sum(0).to(accumulate)
            total += loss.detach()
        ctx.grads = (grad_hidden,
                     grad_weight.to(weight.dtype) if grad_weight is not None else None,
                     grad_bias.to(bias.dtype) if grad_bias is not None else None)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        grads, ctx.grads = _hand_on(ctx.grads, grad_output, "a fused divergence"), None
        return (*grads, None, None, None, None, None, None, None)


FUSED_CHUNK_ELEMENTS = 1 << 22
"""Rows per chunk of :func:`fused_divergence` when ``chunk_size`` is None, on its general path: about this many
logits (16 MiB in float32), at least ``MIN_CHUNK_ROWS`` rows. Larger than the unfused chunk because every chunk adds
its share to the whole ``V × H`` weight gradient, a pass over memory that small chunks repeat too often."""
FUSED_IN_PLACE_CHUNK_ELEMENTS = 1 << 23
"""The same where the fused loss works in its reused buffers (forward KL, the generalized JSD; three or four of
them): twice as many logits a chunk for the same memory as the general path's seven to nine fresh temporaries. At
1,792 rows × 151,936 (student 896 wide, teacher 1,536; 2 cores) forward KL took 19.0 s in 32-row chunks, 13.6 s in
64, 10.8 s in 128: the head's matrix products run faster on more rows, and the weight gradient is passed over
less often."""
FUSED_IN_PLACE_MAX_ROWS = 160
"""... but at most this many rows a chunk: past it the products gain little and the chunk's passes fall out of
cache. The generalized JSD at 520 rows × 8,192 (student 128 wide, teacher 256; 2 cores, best of 7): 61.5 ms in one
chunk, 53.4 ms in two, 38.4–41.8 ms in chunks of 87–174 rows; at 49,152: 311–321 ms in chunks of 87–130 rows,
335 ms in 174 and 351 ms in 260."""


def _fused_chunk_rows(rows: int, vocabulary: int, in_place: bool) -> int:
    """Rows per chunk: the element budget's (and on the in-place path at most ``FUSED_IN_PLACE_MAX_ROWS``), then
    evened out over the chunks it needs (520 rows at vocabulary 8,192 on the general path: two chunks of 260, not
    512 and 8)."""
    if in_place:
        most = max(MIN_CHUNK_ROWS, min(FUSED_IN_PLACE_MAX_ROWS, FUSED_IN_PLACE_CHUNK_ELEMENTS // vocabulary))
    else:
        most = max(MIN_CHUNK_ROWS, FUSED_CHUNK_ELEMENTS // vocabulary)
    chunks = max(1, -(-rows // most))
    return max(1, -(-rows // chunks))


def fused_divergence(
    divergence: str, student: HeadRows, teacher, parameter: float = 0.0, temperature: float = 1.0,
    chunk_size: Optional[int] = None, scale_by_temperature: bool = False,
) -> Tensor:
    """One of this module's divergences averaged over R scored rows, from the student's hidden states and head
    weight: the logits are projected a chunk at a time, so neither model's ``R × V`` logits are ever held.

    Equal to ``forward_kl(student.logits()[None], teacher[None], zeros((1, R)))`` and its siblings, gradients
    included (to the hidden states, the weight and the bias).

    Args:
        divergence: a key of :data:`ROW_DIVERGENCES`.
        student: the student's :class:`HeadRows` (gradients flow to its three tensors).
        teacher: :class:`HeadRows` (never differentiated), dense logits ``(R, V)`` or a :class:`SparseTeacher`
            with ``(R, k)`` fields.
        parameter: β of ``generalized_jsd``, α of ``skew_kl`` and ``skew_reverse_kl``, in [0, 1].
        temperature, scale_by_temperature: as :func:`forward_kl`.
        chunk_size: rows per chunk; None: about ``FUSED_CHUNK_ELEMENTS`` logits a chunk (``FUSED_IN_PLACE_CHUNK_ELEMENTS``
            and at most ``FUSED_IN_PLACE_MAX_ROWS`` rows where it works in place), evened out over the chunks.

    >>> _ = torch.manual_seed(0)
    >>> hidden, weight, teacher = torch.randn(3, 4), torch.randn(5, 4), torch.randn(3, 5)
    >>> fused = fused_divergence("forward_kl", HeadRows(hidden, weight), teacher, chunk_size=2)
    >>> bool(torch.isclose(fused, forward_kl((hidden @ weight.T)[None], teacher[None], torch.zeros(1, 3))))
    True
    """
    if divergence not in ROW_DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; choose one of {list(ROW_DIVERGENCES)}")
    if divergence in ("generalized_jsd", "skew_kl", "skew_reverse_kl"):
        _check_unit("beta" if divergence == "generalized_jsd" else "alpha", parameter)
    if temperature <= 0:
        raise ValueError(f"`temperature` must be > 0, got {temperature}")
    if isinstance(teacher, SparseTeacher) and temperature != 1.0:
        raise ValueError("a sparse (top-k) teacher holds temperature-1 probabilities; use temperature 1")
    in_place = _in_place_buffers(divergence, teacher, student.weight, float(parameter))
    if chunk_size is None:
        chunk_size = _fused_chunk_rows(student.hidden.shape[0], student.weight.shape[0], bool(in_place))
    scale = temperature**2 if scale_by_temperature else 1.0
    return _FusedProjectionDivergence.apply(student.hidden, student.weight, student.bias, teacher,
                                            divergence, float(parameter), temperature, chunk_size, scale, in_place)


def _check_unit(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"`{name}` must be in [0, 1], got {value}")
