import math

import pytest
import torch
import torch.nn.functional as F

from pbkd_lightning import losses


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
    beta, l2 = 0.7, 0.05
    decided = pref != 0
    margin = (pref * (r_t - r_s))[decided]
    bt = -torch.log(torch.sigmoid(margin)).mean()
    naive = -(r_t.mean() - r_s.mean()) + beta * bt + l2 * 0.5 * ((r_t**2).mean() + (r_s**2).mean())
    terms = losses.critic_lagrangian(r_t, r_s, pref, beta, l2)
    torch.testing.assert_close(terms["loss"], naive)
    torch.testing.assert_close(terms["bt"], bt)
    assert torch.autograd.gradcheck(
        lambda a, b: losses.critic_lagrangian(a, b, pref, beta, l2)["loss"],
        (r_t.clone().requires_grad_(), r_s.clone().requires_grad_()),
    )


def test_critic_lagrangian_ascends_the_gap():
    r_t = torch.zeros(4, requires_grad=True)
    r_s = torch.zeros(4, requires_grad=True)
    losses.critic_lagrangian(r_t, r_s, torch.ones(4), beta=1.0, l2=0.0)["loss"].backward()
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


def test_kl_to_reference_is_zero_for_identical_policies_and_positive_otherwise():
    logp = torch.log(torch.tensor([[0.2, 0.5]]))
    mask = torch.ones(1, 2)
    assert losses.kl_to_reference(logp, logp, mask).item() == pytest.approx(0.0)
    assert losses.kl_to_reference(logp, logp - 0.5, mask).item() > 0


def test_kl_estimator_is_unbiased_for_the_true_kl():
    torch.manual_seed(3)
    p_logits, q_logits = torch.randn(6), torch.randn(6)
    p, logp, logq = p_logits.softmax(0), p_logits.log_softmax(0), q_logits.log_softmax(0)
    samples = torch.multinomial(p, 200_000, replacement=True)
    estimate = losses.kl_to_reference(logp[samples][None], logq[samples][None], torch.ones(1, samples.numel()))
    assert estimate.item() == pytest.approx((p * (logp - logq)).sum().item(), rel=0.03)


def test_sequence_nll_is_mean_over_scored_tokens():
    logprobs = torch.tensor([[-1.0, -3.0, -100.0]])
    assert losses.sequence_nll(logprobs, torch.tensor([[1, 1, 0]])).item() == pytest.approx(2.0)
