"""The sequence layer: layout, truncation without a fake eos, typed batches and their micro-batches."""

import pytest
import torch

from pbkd_lightning.models.tokenizer import build_char_tokenizer
from pbkd_lightning.sequences import Encoder, PairBatch, Rollout, StudentBatch, gather_logprobs, scatter_logprobs


def test_encoder_layout_and_truncation():
    tokenizer = build_char_tokenizer()
    encoder = Encoder(tokenizer, max_prompt_tokens=4, max_response_tokens=3)
    batch = encoder.batch(["abcdef", "xy", "pq"], ["12345", "9", "abc"])
    # prompt keeps its end ("cdef"), a long response its start ("123") and NO eos: it did not end there
    assert tokenizer.decode(batch.input_ids[0], skip_special_tokens=False).replace("<pad>", "") == "cdef123"
    assert batch.loss_mask[0].tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert batch.ended.tolist() == [False, True, True]
    # a response that fits ends with eos, which is scored
    assert batch.attention_mask[1].tolist() == [1, 1, 1, 1, 0, 0, 0]
    assert batch.loss_mask[1].tolist() == [0, 0, 1, 1, 0, 0, 0]
    assert batch.input_ids[1, 3].item() == tokenizer.eos_token_id
    # exactly at the limit is whole: the eos follows
    assert batch.input_ids[2, 5].item() == tokenizer.eos_token_id and batch.loss_mask[2].sum() == 4
    assert encoder.truncated == 1


def test_a_truncated_teacher_response_never_teaches_eos():
    """Defect 2 of the rollouts issue: the cut response's last scored target is its last kept token, not eos."""
    tokenizer = build_char_tokenizer()
    batch = Encoder(tokenizer, 16, 5).batch(["q"], ["a long answer"])
    assert tokenizer.eos_token_id not in batch.scored_actions.tolist()
    assert tokenizer.decode(batch.scored_actions) == "a lon"


def test_rollouts_are_encoded_as_sampled_with_eos_only_when_they_ended():
    tokenizer = build_char_tokenizer()
    encoder = Encoder(tokenizer, 8, 4)
    ids = tokenizer("ab", add_special_tokens=False)["input_ids"]
    ended = Rollout("ab", ids, [-0.1, -0.2, -0.3], True)
    cut = Rollout("abab", ids + ids, [-0.5] * 4, False)
    batch = encoder.batch(["p", "p"], [ended, cut])
    assert batch.scored_actions.tolist() == ids + [tokenizer.eos_token_id] + ids + ids
    old = scatter_logprobs([ended.logprobs, cut.logprobs], batch)
    gathered = gather_logprobs(old, batch)
    assert [pytest.approx(row) for row in gathered] == [ended.logprobs, cut.logprobs]


def test_old_logprobs_scatter_and_gather_are_inverse():
    tokenizer = build_char_tokenizer()
    batch = Encoder(tokenizer, 8, 8).batch(["a", "bb"], ["x", "yz"])
    values = [[-1.0, -2.0], [-4.0, -3.0, -5.0]]
    placed = scatter_logprobs(values, batch)
    assert placed.shape == (2, batch.input_ids.shape[1] - 1)
    assert gather_logprobs(placed, batch) == values


def test_micro_batches_keep_groups_and_their_old_logprobs_together():
    tokenizer = build_char_tokenizer()
    encoder = Encoder(tokenizer, 8, 8)
    prompts = ["a", "b", "c"]
    teacher = encoder.batch(prompts, ["1", "22", "333"])
    texts = ["x", "yy", "zzz", "w", "vv", "u"]
    rollouts = [Rollout(t, tokenizer(t, add_special_tokens=False)["input_ids"], [-float(i)] * (len(t) + 1), True)
                for i, t in enumerate(texts)]
    samples = encoder.batch([p for p in prompts for _ in range(2)], rollouts)
    batch = StudentBatch(prompts, teacher, samples, scatter_logprobs([r.logprobs for r in rollouts], samples), 2)
    piece = batch.select([1])
    assert piece.prompts == ["b"] and len(piece.samples) == 2
    assert tokenizer.decode(piece.samples.scored_actions, skip_special_tokens=True) == "zzzw"  # samples 2 and 3
    assert gather_logprobs(piece.old_logprobs, piece.samples) == [[-2.0] * 4, [-3.0] * 2]
    pairs = PairBatch(teacher, samples.select([0, 2, 4]), torch.tensor([1, -1, 0]), torch.tensor([True, True, False]))
    assert pairs.select([2]).teacher_pair.tolist() == [False] and len(pairs.select([0, 1])) == 2


def test_a_batch_already_on_its_device_is_not_copied_and_one_elsewhere_is_moved_whole():
    """Lightning moves every training batch (its own ``to``), on CPU too: there it must cost nothing."""
    batch = Encoder(build_char_tokenizer(), 8, 4).batch(["ab", "c"], ["1", "23"])
    assert batch.to("cpu") is batch and batch.to(torch.device("cpu")) is batch
    moved = batch.to("meta")
    assert moved is not batch and {moved.input_ids.device.type, moved.attention_mask.device.type,
                                   moved.loss_mask.device.type, moved.ended.device.type} == {"meta"}
    assert batch.input_ids.device.type == "cpu"  # the original is left as it was
