"""Pure loss functions (pbkd_lightning/losses.py): Bradley–Terry, the critic's Lagrangian, the clipped surrogate,
sampling logits, white-box PbKD's moment matching and Q-induced returns, sparse teachers, X-KD's AVRIL terms and
MiniLLM's advantages. The token-level divergences are in test_divergences.py."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from pbkd_lightning import losses
from pbkd_lightning.losses import (SparseTeacher, avril_terms, dense_teacher_probs, future_rewards, moment_matching_gap,
                                   next_token_values, q_induced_returns)


def test_masked_mean_ignores_masked_and_is_zero_when_all_masked():
    values = torch.tensor([[1.0, 2.0, 100.0]])
    assert losses.masked_mean(values, torch.tensor([[1, 1, 0]])) == pytest.approx(1.5)
    empty = losses.masked_mean(values, torch.zeros(1, 3))
    assert empty == 0 and not torch.isnan(empty)


@pytest.mark.parametrize("chunk", [1, 3, 4096])
def test_token_logprobs_matches_log_softmax(chunk):
    torch.manual_seed(0)
    logits, targets = torch.randn(2, 5, 11), torch.randint(11, (2, 5))
    naive = F.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    torch.testing.assert_close(losses.token_logprobs(logits, targets, chunk_size=chunk), naive)


def test_token_logprobs_runs_float32_on_bf16_logits():
    out = losses.token_logprobs(torch.randn(1, 3, 7).bfloat16(), torch.tensor([[0, 1, 2]]))
    assert out.dtype == torch.float32


def test_bradley_terry_matches_naive_formula_and_gradcheck():
    torch.manual_seed(0)
    chosen, rejected = torch.randn(6, dtype=torch.double), torch.randn(6, dtype=torch.double)
    naive = -torch.log(torch.sigmoid(chosen - rejected)).mean()
    torch.testing.assert_close(losses.bradley_terry(chosen, rejected), naive)
    assert torch.autograd.gradcheck(
        losses.bradley_terry, (chosen.clone().requires_grad_(), rejected.clone().requires_grad_())
    )


def test_bradley_terry_is_stable_for_large_gaps():
    loss = losses.bradley_terry(torch.tensor([-1000.0]), torch.tensor([1000.0]))
    assert torch.isfinite(loss) and loss == pytest.approx(2000.0)


def test_critic_lagrangian_matches_naive_formula():
    torch.manual_seed(1)
    r_t, r_s = torch.randn(5, dtype=torch.double), torch.randn(5, dtype=torch.double)
    pref = torch.tensor([1, 1, -1, 0, 1])
    teacher_pair = torch.tensor([True, True, True, True, False])  # the last one is a sample-vs-sample pair
    beta, l2 = 0.7, 0.05
    decided = pref != 0
    margin = (pref * (r_t - r_s))[decided]
    bt = -torch.log(torch.sigmoid(margin)).mean()
    gap = r_t[:4].mean() - r_s[:4].mean()
    naive = -gap + beta * bt + l2 * 0.5 * ((r_t**2).mean() + (r_s**2).mean())
    terms = losses.critic_lagrangian(r_t, r_s, pref, teacher_pair, beta, l2)
    torch.testing.assert_close(terms["loss"], naive)
    torch.testing.assert_close(terms["bt"], bt)
    torch.testing.assert_close(terms["gap"], gap)
    assert torch.autograd.gradcheck(
        lambda a, b: losses.critic_lagrangian(a, b, pref, teacher_pair, beta, l2)["loss"],
        (r_t.clone().requires_grad_(), r_s.clone().requires_grad_()),
    )


def test_sample_pairs_enter_bradley_terry_but_not_the_gap():
    """Defect 1 of the rollouts issue: a sample pair's reward difference must not count as J(π_T) − J(π_θ)."""
    teacher_pairs = losses.critic_lagrangian(torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([1]),
                                             torch.tensor([True]), beta=1.0, l2=0.0)
    with_sample_pair = losses.critic_lagrangian(torch.tensor([1.0, 9.0]), torch.tensor([0.0, -9.0]), torch.tensor([1, 1]),
                                                torch.tensor([True, False]), beta=1.0, l2=0.0)
    assert with_sample_pair["gap"].item() == pytest.approx(teacher_pairs["gap"].item()) == pytest.approx(1.0)
    assert with_sample_pair["bt"].item() < teacher_pairs["bt"].item()  # the confident sample pair lowers the mean BT


def test_critic_lagrangian_ascends_the_gap():
    r_t = torch.zeros(4, requires_grad=True)
    r_s = torch.zeros(4, requires_grad=True)
    losses.critic_lagrangian(r_t, r_s, torch.ones(4), torch.ones(4, dtype=torch.bool), beta=1.0, l2=0.0)["loss"].backward()
    assert (r_t.grad < 0).all() and (r_s.grad > 0).all()  # descent on the loss raises r(y_T), lowers r(y_S)


def test_group_advantages_centres_each_group():
    rewards = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 10.0])
    adv = losses.group_advantages(rewards, 3)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]))
    normed = losses.group_advantages(rewards, 3, normalize=True)
    assert normed[:3].std(unbiased=False) == pytest.approx(1.0, abs=1e-4)
    assert torch.isfinite(normed).all()


def naive_clipped(logp, old, adv, mask, eps):
    total, count = 0.0, 0
    for i in range(len(logp)):
        for t in range(len(logp[0])):
            if mask[i][t]:
                ratio = math.exp(logp[i][t] - old[i][t])
                total += min(ratio * adv[i], min(max(ratio, 1 - eps), 1 + eps) * adv[i])
                count += 1
    return -total / count


def test_clipped_surrogate_matches_naive_formula():
    torch.manual_seed(2)
    logp, old = torch.randn(3, 4) * 0.3, torch.randn(3, 4) * 0.3
    adv, mask = torch.randn(3), torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 1, 1, 0]])
    loss, _ = losses.clipped_surrogate(logp, old, adv, mask, 0.2)
    expected = naive_clipped(logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), 0.2)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("advantage, log_ratio", [(1.0, math.log(1.5)), (-1.0, math.log(0.5))])
def test_clipped_surrogate_has_zero_gradient_outside_the_clip_region(advantage, log_ratio):
    logp = torch.tensor([[log_ratio]], requires_grad=True)
    loss, clip_frac = losses.clipped_surrogate(logp, torch.zeros(1, 1), torch.tensor([advantage]), torch.ones(1, 1), 0.2)
    loss.backward()
    assert logp.grad.item() == 0.0 and clip_frac.item() == 1.0


def test_clipped_surrogate_has_gradient_inside_the_clip_region():
    logp = torch.zeros(1, 1, requires_grad=True)
    loss, clip_frac = losses.clipped_surrogate(logp, torch.zeros(1, 1), torch.tensor([2.0]), torch.ones(1, 1), 0.2)
    loss.backward()
    assert logp.grad.item() == pytest.approx(-2.0) and clip_frac.item() == 0.0


def test_kl_to_reference_is_zero_for_identical_policies_and_exact_otherwise():
    torch.manual_seed(3)
    student, reference = torch.randn(4, 6, dtype=torch.double), torch.randn(4, 6, dtype=torch.double)
    assert losses.kl_to_reference(student, student).item() == pytest.approx(0.0, abs=1e-12)
    p, logp, logq = student.softmax(-1), student.log_softmax(-1), reference.log_softmax(-1)
    exact = (p * (logp - logq)).sum(-1).mean()
    assert losses.kl_to_reference(student, reference).item() == pytest.approx(exact.item(), rel=1e-10)


def test_kl_to_reference_has_the_gradient_of_kl_student_to_reference():
    """Defect 5: the old per-token k3 estimator's expected gradient was that of KL(π_ref ‖ π_θ). On an exact
    5-action distribution the new term's gradient is ∇ KL(π_θ ‖ π_ref), and differs from the other direction's."""
    torch.manual_seed(4)
    logits, reference = torch.randn(1, 5, dtype=torch.double, requires_grad=True), torch.randn(1, 5, dtype=torch.double)
    losses.kl_to_reference(logits, reference).backward()
    target = logits.detach().clone().requires_grad_()
    p = target.softmax(-1)
    (p * (target.log_softmax(-1) - reference.log_softmax(-1))).sum().backward()
    torch.testing.assert_close(logits.grad, target.grad)
    other = logits.detach().clone().requires_grad_()
    (reference.softmax(-1) * (reference.log_softmax(-1) - other.log_softmax(-1))).sum().backward()
    assert (other.grad - logits.grad).abs().max() > 1e-3


def test_sampling_logits_follow_temperature_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    torch.testing.assert_close(losses.sampling_logits(logits, temperature=0.5), logits / 0.5)
    assert losses.sampling_logits(logits, top_k=2).isinf().tolist() == [[True, True, False, False]]
    # nucleus 0.6: 0.4 + 0.3 ≥ 0.6, so the two least likely tokens go (Hugging Face's TopPLogitsWarper rule)
    kept = losses.sampling_logits(logits, top_p=0.6).isfinite().tolist()
    assert kept == [[False, False, True, True]]
    from transformers import TopPLogitsWarper, TopKLogitsWarper

    torch.manual_seed(5)
    wide = torch.randn(8, 50)
    torch.testing.assert_close(losses.sampling_logits(wide, top_p=0.8), TopPLogitsWarper(0.8)(None, wide.clone()))
    torch.testing.assert_close(losses.sampling_logits(wide, top_k=7), TopKLogitsWarper(7)(None, wide.clone()))


def test_policy_logprobs_are_the_log_softmax_of_the_sampling_logits():
    torch.manual_seed(6)
    logits, actions = torch.randn(5, 9), torch.randint(9, (5,))
    expected = (logits / 0.7).log_softmax(-1).gather(-1, actions[:, None]).squeeze(-1)
    torch.testing.assert_close(losses.policy_logprobs(logits, actions, temperature=0.7), expected)


def test_sequence_nll_is_mean_over_scored_tokens():
    logprobs = torch.tensor([[-1.0, -3.0, -100.0]])
    assert losses.sequence_nll(logprobs, torch.tensor([[1, 1, 0]])).item() == pytest.approx(2.0)


# ---------------------------------------------------------------------------- white-box PbKD and sparse teachers
def test_moment_matching_gap_matches_a_loop_over_states_and_actions():
    torch.manual_seed(0)
    q, p_t, p_s = torch.randn(5, 7), F.softmax(torch.randn(5, 7), -1), F.softmax(torch.randn(5, 7), -1)
    naive = sum(sum((p_t[s, a] - p_s[s, a]) * q[s, a] for a in range(7)) for s in range(5)) / 5
    assert moment_matching_gap(q, p_t, p_s).item() == pytest.approx(naive.item(), abs=1e-6)
    assert moment_matching_gap(q, p_t, p_t).item() == pytest.approx(0.0, abs=1e-7)  # same policy: no gap
    assert moment_matching_gap(q[:0], p_t[:0], p_s[:0]).item() == 0.0  # no state scored: 0, not NaN


def test_q_induced_returns_match_the_per_token_formula_with_a_terminal_state():
    q_taken = torch.tensor([[9.0, 1.0, 2.0, 3.0, 9.0]])
    values = torch.tensor([[9.0, 0.5, 1.0, 1.5, 9.0]])
    mask = torch.tensor([[0, 1, 1, 1, 0]])  # prompt position, three response tokens, padding
    gamma = 0.9
    # r_t = Q(s_t, a_t) − γ V(s_{t+1}); after the last response token (eos) the state is terminal (V = 0)
    expected = (1.0 - gamma * 1.0) + (2.0 - gamma * 1.5) + (3.0 - 0.0)
    assert q_induced_returns(q_taken, values, mask, gamma).item() == pytest.approx(expected)


def test_a_sparse_teacher_with_every_token_densifies_exactly():
    torch.manual_seed(0)
    logits = torch.randn(4, 6)
    logprobs = F.log_softmax(logits, -1)
    full = SparseTeacher(*logprobs.topk(6, -1), torch.zeros(4))
    assert torch.allclose(dense_teacher_probs(full, 6), F.softmax(logits, -1), atol=1e-6)
    top, ids = logprobs.topk(2, -1)
    sparse = dense_teacher_probs(SparseTeacher(top, ids, 1 - top.exp().sum(-1)), 6)
    assert torch.allclose(sparse.sum(-1), torch.ones(4), atol=1e-6)  # leftover spread over the other 4 tokens
    assert torch.allclose(sparse.gather(-1, ids), top.exp())


# ---------------------------------------------------------------------------- X-KD's AVRIL terms
def test_avril_loss_matches_torch_distributions():
    torch.manual_seed(0)
    mu, log_sigma, td = torch.randn(3, 5), 0.5 * torch.randn(3, 5), torch.randn(3, 5)
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0], [0, 0, 1, 1, 1]])
    posterior = Normal(mu, log_sigma.exp())
    kl = kl_divergence(posterior, Normal(torch.zeros_like(mu), torch.ones_like(mu)))
    td_nll = -posterior.log_prob(td)
    keep = mask.bool()
    for weight in (1.0, 0.3):
        terms = avril_terms(mu, log_sigma, td, mask, td_weight=weight)
        assert terms["kl"].item() == pytest.approx(kl[keep].mean().item(), abs=1e-5)
        assert terms["td_nll"].item() == pytest.approx(td_nll[keep].mean().item(), abs=1e-5)
        assert terms["loss"].item() == pytest.approx((kl[keep] + weight * td_nll[keep]).mean().item(), abs=1e-5)
    assert terms["sigma_mean"].item() == pytest.approx(log_sigma.exp()[keep].mean().item(), abs=1e-6)
    # the prior itself costs nothing in KL
    zero = avril_terms(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2))
    assert zero["kl"].item() == 0.0 and zero["td_nll"].item() == pytest.approx(0.5 * math.log(2 * math.pi))


def test_the_last_token_has_a_terminal_successor():
    q = torch.tensor([[5.0, -1.0, -2.0, -3.0, 7.0]])
    mask = torch.tensor([[0, 1, 1, 1, 0]])  # a prompt position, three response tokens (the last is eos), padding
    assert next_token_values(q, mask).tolist() == [[0.0, -2.0, -3.0, 0.0, 0.0]]


# ---------------------------------------------------------------------------- MiniLLM's advantages
def test_minillm_advantages_by_hand():
    rewards = torch.tensor([[9.0, 1.0, 2.0, 4.0, 9.0]])
    mask = torch.tensor([[0, 1, 1, 1, 0]])
    gamma = 0.5
    # t=1: (r2 + γ r3) / 2 tokens after it; t=2: r3 / 1; t=3 (last): 0
    expected = [0.0, (2.0 + 0.5 * 4.0) / 2, 4.0, 0.0, 0.0]
    assert future_rewards(rewards, mask, gamma)[0].tolist() == pytest.approx(expected)
    assert future_rewards(rewards, mask, gamma, normalize=False)[0].tolist() == pytest.approx([0.0, 4.0, 4.0, 0.0, 0.0])
