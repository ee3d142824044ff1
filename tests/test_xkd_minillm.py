"""X-KD's AVRIL loss, MiniLLM's advantages and teacher-mixed sampling, diversity metrics, and their configs."""

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from conftest import TINY_TEACHER, run_cli, scalars, tiny_args

from pbkd_lightning.eval.diversity import distinct_n, diversity, self_bleu
from pbkd_lightning.losses import avril_terms, future_rewards, next_token_values
from pbkd_lightning.objectives.base import Share


# ---------------------------------------------------------------------------- X-KD
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
    # so the TD target of the eos is Q_eos itself, and padding never leaks in


@pytest.fixture(scope="module")
def xkd_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("xkd")
    cli = run_cli("fit", *tiny_args(root, "--trainer.max_epochs=2", config="configs/xkd.yaml"))
    return root, cli


def test_xkd_gradients_reach_the_reward_head_and_the_student(xkd_run):
    _, cli = xkd_run
    module = cli.model
    batch = next(iter(cli.datamodule.train_dataloader()))
    share = Share.whole(batch)
    module.zero_grad(set_to_none=True)
    module.objective.student_loss(module.players, batch, share)["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.critic.parameters())
    assert module.student.get_input_embeddings().weight.grad.abs().sum() > 0
    module.zero_grad(set_to_none=True)
    module.objective.critic_loss(module.players, batch, share)["loss"].backward()
    assert all(p.grad.abs().sum() > 0 for p in module.critic.parameters())


def test_xkd_config_runs_two_epochs_and_logs_the_posterior(xkd_run):
    root, _ = xkd_run
    logged = scalars(root)
    for tag in ("xkd/mu_mean", "xkd/sigma_mean", "xkd/td_nll", "xkd/kl", "student/kd", "student/avril",
                "eval/arithmetic_score", "eval/distinct_2", "eval/self_bleu"):
        assert tag in logged, tag
    assert len(logged["eval/distinct_2"]) == 2
    assert "critic/heldout_pref_acc" not in logged  # the posterior is not a preference model


def test_divergence_based_xkd_uses_the_teacher_model(tmp_path):
    root = tmp_path / "run"
    cli = run_cli("fit", *tiny_args(root, *TINY_TEACHER, f"--model.teacher.cache_dir={root}/cache",
                                    "--model.objective.kd=generalized_jsd", "--trainer.max_epochs=2", config="configs/xkd.yaml"))
    assert cli.model.teacher is not None
    logged = scalars(root)
    assert {"xkd/mu_mean", "student/kd", "eval/self_bleu"} <= set(logged)


# ---------------------------------------------------------------------------- MiniLLM
def test_minillm_advantages_by_hand():
    rewards = torch.tensor([[9.0, 1.0, 2.0, 4.0, 9.0]])
    mask = torch.tensor([[0, 1, 1, 1, 0]])
    gamma = 0.5
    # t=1: (r2 + γ r3) / 2 tokens after it; t=2: r3 / 1; t=3 (last): 0
    expected = [0.0, (2.0 + 0.5 * 4.0) / 2, 4.0, 0.0, 0.0]
    assert future_rewards(rewards, mask, gamma)[0].tolist() == pytest.approx(expected)
    assert future_rewards(rewards, mask, gamma, normalize=False)[0].tolist() == pytest.approx([0.0, 4.0, 4.0, 0.0, 0.0])


def test_teacher_mixed_sampling_at_the_ends_is_each_model_alone():
    from pbkd_lightning.data.generation import GenerationConfig, generate, sample_mixed_rollouts
    from pbkd_lightning.models import ModelSpec, load_causal_lm

    student, tokenizer = load_causal_lm(ModelSpec(layers=1, hidden=32, heads=2, init_seed=0))
    teacher, _ = load_causal_lm(ModelSpec(layers=1, hidden=32, heads=2, init_seed=1))
    prompts, greedy = ["ab cd\n", "Reverse: x y z\n", "q"], GenerationConfig(max_new_tokens=8, temperature=0.0)
    for mix, alone in ((0.0, student), (1.0, teacher)):
        mixed, stats = sample_mixed_rollouts(student, teacher, tokenizer, prompts, greedy, 1, 2, teacher_mix=mix)
        reference, _ = generate(alone, tokenizer, prompts, greedy, 1, 2)
        assert [[r.text for r in group] for group in mixed] == reference and stats["tokens"] > 0
    sampled, _ = sample_mixed_rollouts(student, teacher, tokenizer, prompts, GenerationConfig(max_new_tokens=8), 3, 8)
    assert [len(group) for group in sampled] == [3, 3, 3]
    # each rollout keeps the student's own log π of the tokens the mixture drew (MiniLLM's π_old)
    rollout = sampled[0][0]
    ids = tokenizer(prompts[0], add_special_tokens=False)["input_ids"] + rollout.token_ids
    with torch.no_grad():
        logits = student(input_ids=torch.tensor([ids])).logits[0, -len(rollout.token_ids) - 1 : -1]
    expected = logits.log_softmax(-1).gather(-1, torch.tensor(rollout.token_ids)[:, None]).squeeze(-1)
    assert rollout.logprobs[: len(rollout.token_ids)] == pytest.approx(expected.tolist(), abs=1e-4)


def test_minillm_config_runs_two_on_policy_epochs(tmp_path):
    root = tmp_path / "run"
    run_cli("fit", *tiny_args(root, *TINY_TEACHER, f"--model.teacher.cache_dir={root}/cache", "--trainer.max_epochs=2",
                              "--model.objective.lm_coef=0.5", config="configs/baselines/minillm.yaml"))
    logged = scalars(root)
    for tag in ("student/long_term", "student/single_step_rkl", "student/importance_weight", "student/clip_frac",
                "student/lm_loss", "eval/reversal_score", "eval/distinct_2", "eval/self_bleu"):
        assert tag in logged, tag
    assert all(0 < w <= 1 / 0.8 + 1e-4 for w in logged["student/importance_weight"])
    assert (root / "buffer" / "iter_0001.jsonl").exists()  # a second iteration of samples


# ---------------------------------------------------------------------------- diversity
def test_diversity_of_identical_and_of_different_samples():
    one = "the cat sat on the mat"
    assert distinct_n([one], 2) == 1.0
    assert distinct_n([one] * 4, 2) == pytest.approx(distinct_n([one], 2) / 4)  # same n-grams, four times over
    assert self_bleu([one] * 4) == pytest.approx(1.0)
    assert self_bleu(["ab", "ab", "ab"]) == pytest.approx(1.0)  # one-word samples still count as identical
    assert self_bleu(["a b c d", "e f g h"]) == 0.0
    assert distinct_n(["a b", "c d"], 2) == 1.0
    metrics = diversity([["a b", "a b"], ["a b", "c d"], ["only one"]])  # a lone sample has no diversity
    assert metrics["distinct_2"] == pytest.approx((0.5 + 1.0) / 2)
    assert metrics["self_bleu"] == pytest.approx((1.0 + 0.0) / 2)
