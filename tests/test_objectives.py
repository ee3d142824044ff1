"""Every objective on tiny models and typed batches, without a Trainer: its terms, and exact gradients under
micro-batching and data parallelism (every mean over the whole batch's tokens or pairs)."""

import os
from dataclasses import replace

import pytest
import torch
import torch.multiprocessing as mp

from objective_helpers import OBJECTIVES, pair_batch, step_gradient, student_batch, tiny_players

from pbkd_lightning.data.generation import GenerationConfig
from pbkd_lightning.objectives import BlackBoxPbKD, DivergenceKD, MiniLLM, SeqKD, WhiteBoxPbKD, XKD
from pbkd_lightning.objectives.base import Share

STEPS = [("seqkd", "student"), ("forward_kl", "student"), ("gkd_on_policy", "student"), ("blackbox_pbkd", "student"),
         ("blackbox_pbkd", "critic"), ("minillm", "student"), ("whitebox_pbkd", "student"), ("whitebox_pbkd", "critic"),
         ("xkd", "student"), ("xkd", "critic")]


def _close(gradient, reference):
    assert gradient.abs().sum() > 0, "the step has no gradient to compare"
    assert (gradient - reference).abs().max() <= 1e-5 * reference.abs().max()


@pytest.mark.parametrize("name, role", STEPS)
def test_micro_batches_give_the_whole_batch_gradient(name, role):
    whole = step_gradient(name, role, None)
    for size in (1, 2):
        _close(step_gradient(name, role, size), whole)


DATA_PARALLEL_STEPS = [("seqkd", "student"), ("forward_kl", "student"), ("blackbox_pbkd", "student"),
                       ("blackbox_pbkd", "critic"), ("minillm", "student")]


def _rank(rank, folder, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)

    def reduce_sum(tensor):
        tensor = tensor.clone()
        torch.distributed.all_reduce(tensor)
        return tensor

    try:
        for name, role in DATA_PARALLEL_STEPS:  # one pair of processes for every case: starting them is the cost
            items = 6 if role == "critic" else 2  # pairs or prompts on each rank
            grad = step_gradient(name, role, 1, range(rank * items, (rank + 1) * items), reduce_sum, world_size=2)
            torch.distributed.all_reduce(grad)  # what DDP does: average the ranks' gradients
            torch.save(grad / 2, os.path.join(folder, f"{name}-{role}-rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_data_parallel_processes_give_the_one_process_gradient(tmp_path):
    """Each of two gloo processes takes half of the batch in micro-batches of one, the shares' totals are summed over
    both, and their gradients averaged: the result is one process's gradient on the whole batch (SeqKD, forward KL,
    black-box PbKD's student and critic, MiniLLM)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(str(tmp_path), port), nprocs=2, join=True)
    for name, role in DATA_PARALLEL_STEPS:
        whole = step_gradient(name, role, None)
        for rank in (0, 1):
            _close(torch.load(tmp_path / f"{name}-{role}-rank{rank}.pt"), whole)


# ---------------------------------------------------------------------------- each objective's own terms
def test_seqkd_is_the_teacher_nll():
    objective = SeqKD()
    players = tiny_players(objective)
    batch = student_batch(players, objective)
    terms = objective.student_loss(players, batch, Share.whole(batch))
    _, logits = players.rows(batch.teacher)
    expected = torch.nn.functional.cross_entropy(logits, batch.teacher.scored_actions)
    assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_blackbox_critic_gap_is_taken_over_teacher_pairs_only():
    objective = BlackBoxPbKD()
    players = tiny_players(objective)
    batch = pair_batch(players)
    with torch.no_grad():
        terms = objective.critic_loss(players, batch, Share.whole(batch))
        chosen, rejected = players.reward_model_score(batch.chosen), players.reward_model_score(batch.rejected)
    teacher = batch.teacher_pair
    assert 0 < teacher.sum() < len(batch)
    assert terms["reward_gap"].item() == pytest.approx((chosen[teacher] - rejected[teacher]).mean().item(), rel=1e-5, abs=1e-7)


def test_blackbox_student_starts_with_ratio_one_and_an_untrusted_critic_leaves_the_nll_anchor():
    objective = BlackBoxPbKD(critic_trust="gate", trust_threshold=0.9)
    players = tiny_players(objective, GenerationConfig(max_new_tokens=8, temperature=0.7, top_p=0.9, top_k=20))
    batch = student_batch(players, objective)
    players.student.eval()
    trusted = objective.student_loss(players, batch, Share.whole(batch), critic_trust=0.95)
    assert trusted["clip_frac"].item() == 0.0 and trusted["critic_trust"].item() == 1.0
    untrusted = objective.student_loss(players, batch, Share.whole(batch), critic_trust=0.6)
    assert "pg_loss" not in untrusted and untrusted["loss"].item() == pytest.approx(untrusted["nll_teacher"].item())


def test_trust_gates_or_scales_the_surrogate_by_held_out_accuracy():
    assert BlackBoxPbKD().trust(None) == 1.0 and BlackBoxPbKD().trust(0.3) == 1.0
    gate = BlackBoxPbKD(critic_trust="gate", trust_threshold=0.8)
    assert [gate.trust(a) for a in (None, 0.79, 0.8, 0.95)] == [0.0, 0.0, 1.0, 1.0]
    scale = BlackBoxPbKD(critic_trust="scale", trust_threshold=0.9)
    assert [scale.trust(a) for a in (None, 0.4, 0.7, 0.9, 0.99)] == pytest.approx([0.0, 0.0, 0.5, 1.0, 1.0])
    with pytest.raises(ValueError, match="trust_threshold"):
        BlackBoxPbKD(trust_threshold=0.5)
    with pytest.raises(ValueError, match="critic_trust"):
        BlackBoxPbKD(critic_trust="sometimes")


def test_divergence_on_policy_batches_are_fresh_student_samples():
    objective = DivergenceKD("reverse_kl", on_policy_fraction=1.0)
    players = tiny_players(objective)
    batch = student_batch(players, objective)
    assert batch.samples is not None and len(batch.samples) == len(batch)
    terms = objective.student_loss(players, batch, Share.whole(batch))
    assert terms["on_policy"].item() == 1.0 and terms["scored_tokens"].item() == batch.samples.num_scored.item()


@pytest.mark.parametrize("divergence", ["forward_kl", "generalized_jsd", "skew_reverse_kl", "total_variation"])
def test_the_fused_divergence_gives_the_unfused_loss_and_gradient_and_projects_no_logits_in_the_model(divergence):
    """fused=True: the student's and teacher's heads see no row in their forward (the loss projects a chunk at a
    time), yet the loss and the student's gradient are the unfused ones to 1e-5."""
    from objective_helpers import gradient

    results = {}
    for fused in (False, True):
        objective = DivergenceKD(divergence, fused=fused, temperature=1.5)
        players = tiny_players(objective)
        batch = student_batch(players, objective)
        projected = []
        hooks = [model.get_output_embeddings().register_forward_hook(lambda head, args, out: projected.append(out.shape[-2]))
                 for model in (players.student, players.teacher)]
        compute = lambda piece, share: objective.student_loss(players, piece, share)  # noqa: E731
        results[fused] = (objective.student_loss(players, batch, Share.whole(batch))["loss"].item(),
                          gradient(players.student, compute, batch, None), projected)
        for hook in hooks:
            hook.remove()
    (loss, grad, projected), (fused_loss, fused_grad, fused_projected) = results[False], results[True]
    assert fused_loss == pytest.approx(loss, rel=1e-5, abs=1e-6)
    torch.testing.assert_close(fused_grad, grad, rtol=1e-5, atol=1e-6)
    assert min(projected) > 0 and len(projected) == 4
    # the first call checks each head once against its model's real forward, then no head projects a row
    assert [rows > 0 for rows in fused_projected] == [True, False, True, False, False, False]


def test_the_fused_divergence_falls_back_where_the_logits_are_not_the_heads_projection():
    """A model whose forward rescales its logits (as soft-capping models do) is scored unfused, with its real logits."""
    objective = DivergenceKD("forward_kl")
    players = tiny_players(objective)
    batch = student_batch(players, objective)
    players.student.get_output_embeddings().register_forward_hook(lambda head, args, out: out * 2.0)
    assert players.head_rows(batch.teacher) is None
    assert players.head_rows(replace(batch.teacher)) is None  # the check's result is kept
    loss = objective.student_loss(players, batch, Share.whole(batch))["loss"]
    unfused = DivergenceKD("forward_kl", fused=False).student_loss(players, batch, Share.whole(batch))["loss"]
    assert loss.item() == unfused.item()
    plain = tiny_players(objective)
    rows = plain.head_rows(batch.teacher)
    hidden, logits = plain.rows(batch.teacher)
    torch.testing.assert_close(rows.hidden, hidden)
    torch.testing.assert_close(rows.logits(), logits, rtol=1e-5, atol=1e-5)


def test_minillm_refuses_truncated_sampling_and_weights_by_the_mixture():
    with pytest.raises(ValueError, match="top_p"):
        MiniLLM().check_sampling(GenerationConfig(top_p=0.9))
    objective = MiniLLM()
    players = tiny_players(objective)
    batch = student_batch(players, objective)
    terms = objective.student_loss(players, batch, Share.whole(batch))
    assert 0 < terms["importance_weight"].item() <= 1 / (1 - objective.teacher_mix) + 1e-5
    assert torch.isfinite(terms["loss"])


def test_whitebox_critic_raises_the_gap_and_the_student_lowers_its_value_term():
    objective = WhiteBoxPbKD(critic_warmup_steps=0, beta=0.0, q_l2=0.0)  # the loss is then −G, linear in Q
    players = tiny_players(objective)
    pairs = pair_batch(players)
    pairs = pairs.select([i for i in range(len(pairs)) if bool(pairs.teacher_pair[i])])
    optimizer = torch.optim.SGD(players.critic.parameters(), lr=0.1)
    before = objective.critic_loss(players, pairs, Share.whole(pairs))
    optimizer.zero_grad()
    before["loss"].backward()
    optimizer.step()
    after = objective.critic_loss(players, pairs, Share.whole(pairs))
    assert after["gap"].item() > before["gap"].item()
    batch = student_batch(players, objective)
    terms = objective.student_loss(players, batch, Share.whole(batch))
    assert {"policy_value_off", "pg_loss", "nll_teacher"} <= set(terms) and terms["clip_frac"].item() == 0.0


def test_xkd_terms_reach_head_and_student():
    objective = XKD()
    players = tiny_players(objective)
    batch = student_batch(players, objective)
    terms = objective.student_loss(players, batch, Share.whole(batch))
    terms["loss"].backward()
    assert players.student.get_input_embeddings().weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in players.critic.parameters())



def test_logged_terms_are_the_whole_batch_means_under_micro_batching():
    """A micro-batch with no teacher pair adds nothing to `critic/reward_gap`: each logged term is combined over its
    own unit (teacher pairs, decided pairs, tokens), so micro-batches of 1 log what the whole batch logs."""
    from pbkd_lightning.objectives.base import accumulate_gradients

    objective = BlackBoxPbKD()
    players = tiny_players(objective)
    batch = pair_batch(players)
    compute = lambda piece, share: objective.critic_loss(players, piece, share)  # noqa: E731
    logged = {}
    for size in (None, 1, 3):
        players._reference_logprobs.clear()  # log π_ref as each micro-batch computes it, as log π_φ is (same rounding)
        _, logged[size] = accumulate_gradients(compute, batch, size, lambda loss: None, term_units=objective.term_units())
    for name in ("reward_gap", "bt", "l2", "pref_acc"):
        assert logged[1][name].item() == pytest.approx(logged[None][name].item(), rel=1e-5, abs=1e-7), name
        assert logged[3][name].item() == pytest.approx(logged[None][name].item(), rel=1e-5, abs=1e-7), name
