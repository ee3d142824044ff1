"""The players (pbkd_lightning/players.py): the student's scored rows."""

import pytest
import torch


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
