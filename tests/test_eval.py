"""Evaluation (pbkd_lightning/eval/): diversity of samples, and the reward model's held-out ranking accuracy."""

import pytest
import torch

from conftest import tiny_modules, tiny_trainer

from pbkd_lightning.data.labelers import sample_pairs
from pbkd_lightning.eval.diversity import distinct_n, diversity, self_bleu


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


@pytest.mark.slow
def test_held_out_ranking_accuracy_orders_a_prompts_samples_as_the_verifier(tmp_path):
    """The student's advantages compare a prompt's samples with each other: is the reward model's order the verifier's?"""
    module, datamodule = tiny_modules(tmp_path)
    tiny_trainer(tmp_path / "run", max_steps=1, limit_val_batches=0).fit(module, datamodule)
    records = datamodule.val_records[:4]
    samples = [[r["teacher"], "zz", r["teacher"] + "9"] for r in records]  # right, wrong, (almost always) wrong
    module.heldout.update(records, samples, "teacher", lambda texts: module.score_texts(records, texts))
    encoder = datamodule.encoder(module.critic_tokenizer)
    with torch.no_grad():
        expected = []
        for record, group in zip(records, samples):
            for better, worse in sample_pairs(record, group):
                scores = module.objective.sequence_reward(module.players, encoder.batch([record["prompt"]] * 2, [better, worse]).to(module.device))
                expected.append(float(scores[0] > scores[1]))
    assert len(expected) >= 2 * len(records)
    assert float(module.heldout.ranking.compute()) == pytest.approx(sum(expected) / len(expected))
