"""The players (pbkd_lightning/players.py): the student's scored rows."""

import pytest
import torch


def full_forward_logprobs(lm, sequences):
    """The naive formula: every position's logits, log-softmax, the next token's entry: ``(N, T-1)``."""
    logits = lm(input_ids=sequences.input_ids, attention_mask=sequences.attention_mask).logits[:, :-1].double()
    return logits.log_softmax(-1).gather(-1, sequences.input_ids[:, 1:, None]).squeeze(-1)


@pytest.mark.slow
def test_scored_rows_are_the_full_forward_at_response_positions(tmp_path):
    """The head sees only scored rows, yet the rows are exactly the full model's (one forward through the root
    module, as FSDP2 needs), and gradients reach the tied embedding through both of its uses."""
    from conftest import tiny_modules, tiny_trainer

    module, datamodule = tiny_modules(tmp_path)
    tiny_trainer(tmp_path / "run", max_steps=1, limit_val_batches=0).fit(module, datamodule)
    batch = next(iter(datamodule.train_dataloader()["student"])).teacher
    hidden, logits = module.players.rows(batch)
    full = module.student(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
    positions = batch.scored_positions
    assert logits.shape == (int(positions.sum()), module.student.config.vocab_size)
    assert torch.allclose(logits, full.logits[:, :-1][positions], atol=1e-5)
    assert torch.allclose(hidden, full.hidden_states[-1][:, :-1][positions], atol=1e-5)
    logits.logsumexp(-1).sum().backward()
    assert module.student.get_input_embeddings().weight.grad.abs().sum() > 0


def test_the_teacher_projects_only_the_scored_rows_and_gives_the_full_forwards_logits_there():
    """No ``N × T × V`` teacher logits: its head is fed the scored rows alone, which are the full forward's rows."""
    from pbkd_lightning.models import ModelSpec, load_causal_lm
    from pbkd_lightning.players import Players
    from pbkd_lightning.sequences import Encoder

    torch.manual_seed(0)
    teacher, tokenizer = load_causal_lm(ModelSpec(layers=1, hidden=32, heads=2))
    student, _ = load_causal_lm(ModelSpec(layers=1, hidden=16, heads=2))
    batch = Encoder(tokenizer, 32, 16).batch(["1+1?", "Reverse: ab cd\n"], ["#### 2", "cd ab"])
    seen = []
    teacher.get_output_embeddings().register_forward_hook(lambda head, args, out: seen.append(tuple(args[0].shape)))
    from pbkd_lightning.data import GenerationConfig

    players = Players(student=student, tokenizer=tokenizer, sampling=GenerationConfig(), encoder=Encoder(tokenizer, 32, 16),
                      teacher=teacher)
    rows = players.teacher_rows(batch)
    scored = int(batch.scored_positions.sum())
    assert seen == [(scored, 32)] and rows.shape == (scored, teacher.config.vocab_size)
    with torch.no_grad():
        full = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert seen[1:] == [tuple(full.shape[:2]) + (32,)]  # the plain forward, for comparison, projects every position
    assert torch.allclose(rows, full[:, :-1][batch.scored_positions], atol=1e-5)



def test_the_implicit_rewards_reference_log_probs_are_computed_once_per_sequence_and_equal_a_fresh_forward():
    """π_ref is frozen: a sequence scored again (in another batch, with other padding) costs no forward, and the kept
    log-probabilities are the naive formula's at the scored positions (0 elsewhere)."""
    from objective_helpers import pair_batch, tiny_players

    from pbkd_lightning.objectives import BlackBoxPbKD

    players = tiny_players(BlackBoxPbKD())
    pairs = pair_batch(players)
    forwards = []
    players.implicit_reference.register_forward_hook(lambda module, args, out: forwards.append(1))
    first = players.reference_logprobs(pairs.chosen)
    with torch.no_grad():
        expected = full_forward_logprobs(players.implicit_reference, pairs.chosen)
    scored = pairs.chosen.scored_positions
    assert torch.allclose(first[scored], expected[scored].float(), atol=1e-6) and (first[~scored] == 0).all()
    forwards.clear()
    again = players.reference_logprobs(pairs.chosen)  # every sequence known: no forward
    both = players.reference_logprobs(pairs.rejected)  # only the rejected ones not seen yet go through the reference
    assert forwards == [1] and torch.equal(again, first)
    with torch.no_grad():
        expected = full_forward_logprobs(players.implicit_reference, pairs.rejected)
    scored = pairs.rejected.scored_positions
    assert torch.allclose(both[scored], expected[scored].float(), atol=1e-6) and (both[~scored] == 0).all()


def test_the_implicit_reward_projects_only_response_rows_and_gives_the_full_forwards_reward_and_gradients():
    """The reward model's head (and the warm-up's, through the same log-probabilities) sees the scored rows alone, and
    the reward and its gradient are those of the naive formula over every position's logits."""
    from objective_helpers import pair_batch, tiny_players

    from pbkd_lightning.objectives import BlackBoxPbKD

    players = tiny_players(BlackBoxPbKD())
    pairs = pair_batch(players)
    seen = []
    lm = players.critic.lm
    with torch.no_grad():  # the critic a trained copy of the reference: rewards away from 0
        for parameter in lm.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    hook = lm.get_output_embeddings().register_forward_hook(lambda head, args, out: seen.append(tuple(args[0].shape)))
    sequences = pairs.rejected  # the samples: their lengths differ, so padding is scored nowhere
    reward = players.reward_model_score(sequences)
    hook.remove()
    scored = sequences.scored_positions
    assert seen == [(int(scored.sum()), lm.config.hidden_size)]  # one projection, of R rows: no N x T x V logits
    reward.sum().backward()
    mine = [p.grad.clone() for p in lm.parameters()]
    lm.zero_grad(set_to_none=True)

    reference = full_forward_logprobs(players.implicit_reference, sequences).detach()
    mask = sequences.loss_mask[:, 1:].double()
    expected = players.critic.scale * ((full_forward_logprobs(lm, sequences) - reference) * mask).sum(1) / mask.sum(1)
    assert torch.allclose(reward.double(), expected, atol=1e-5) and expected.abs().min() > 1e-3
    expected.sum().backward()
    assert all(torch.allclose(a, b.float(), atol=1e-5) for a, b in zip(mine, (p.grad for p in lm.parameters())))


def test_kept_reference_log_probs_are_not_served_to_the_same_tokens_scored_elsewhere():
    """A sequence is kept with the positions it was scored at: the same tokens with another prompt/response split get
    their own forward, with their own scored tokens' log-probabilities."""
    from dataclasses import replace

    from objective_helpers import pair_batch, tiny_players

    from pbkd_lightning.objectives import BlackBoxPbKD

    players = tiny_players(BlackBoxPbKD())
    sequences = pair_batch(players).chosen
    first = players.reference_logprobs(sequences)
    moved = sequences.loss_mask.clone()
    starts = moved.argmax(1)
    moved[torch.arange(len(moved)), starts - 1] = 1  # one more prompt token scored
    other = replace(sequences, loss_mask=moved)
    second = players.reference_logprobs(other)
    with torch.no_grad():
        expected = full_forward_logprobs(players.implicit_reference, other)
    scored = other.scored_positions
    assert torch.allclose(second[scored], expected[scored].float(), atol=1e-6) and (second[~scored] == 0).all()
    assert not torch.equal(first, second)


def test_a_sequence_with_no_scored_token_gets_a_zero_reward_and_no_error():
    """An empty response cut at the length limit has no scored token: its reward is 0, in a chunk of its own too."""
    from dataclasses import replace

    from objective_helpers import pair_batch, tiny_players

    from pbkd_lightning.objectives import BlackBoxPbKD

    players = tiny_players(BlackBoxPbKD())
    sequences = pair_batch(players).rejected.select([0])
    empty = replace(sequences, loss_mask=torch.zeros_like(sequences.loss_mask))
    reward = players.reward_model_score(empty)
    assert reward.shape == (1,) and reward.item() == 0.0


def test_a_full_reference_cache_is_emptied_and_the_batch_still_gets_every_rows_log_probs(monkeypatch):
    """When a batch's new sequences overflow the kept log-probs, the cache is emptied - also of the batch's own rows
    that were kept - and every row still gets its values (they raised a KeyError once)."""
    from objective_helpers import pair_batch, tiny_players

    import pbkd_lightning.players as players_module
    from pbkd_lightning.objectives import BlackBoxPbKD

    players = tiny_players(BlackBoxPbKD())
    pairs = pair_batch(players)
    chosen, rejected = pairs.chosen, pairs.rejected
    distinct = len(set(players_module._sequence_keys(chosen.input_ids, chosen.loss_mask, chosen.attention_mask.sum(1).tolist())))
    monkeypatch.setattr(players_module, "REFERENCE_CACHE_SEQUENCES", distinct - 1)
    players.reference_logprobs(chosen.select([0]))  # one row kept
    both = players.reference_logprobs(chosen)  # its other rows overflow: emptied, the kept row with them
    with torch.no_grad():
        expected = full_forward_logprobs(players.implicit_reference, chosen)
    scored = chosen.scored_positions
    assert torch.allclose(both[scored], expected[scored].float(), atol=1e-6) and (both[~scored] == 0).all()
    assert len(players._reference_logprobs) == distinct
    assert torch.allclose(players.reference_logprobs(rejected)[rejected.scored_positions],
                          full_forward_logprobs(players.implicit_reference, rejected)[rejected.scored_positions].float(), atol=1e-6)
