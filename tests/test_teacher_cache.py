"""The teacher's top-k logit cache (pbkd_lightning/data/teacher_cache.py): written, resumed and read directly, and in
white-box fits that train from it without a teacher."""

from dataclasses import replace
import json
import os

import pytest
import torch

from conftest import TINY_TEACHER, run_cli, scalars, tiny_args, whitebox_fit

import pbkd_lightning.data.teacher_cache as cache_code
from pbkd_lightning.sequences import Encoder
from pbkd_lightning.data.teacher_cache import TeacherCache, write_teacher_cache
from pbkd_lightning.losses import forward_kl
from pbkd_lightning.models.loading import ModelSpec, load_causal_lm

SEQUENCES = [(f"Reverse: cat dog {i}\n", "dog cat" + " x" * (i % 3)) for i in range(7)]


@pytest.fixture(scope="module")
def teacher():
    model, tokenizer = load_causal_lm(ModelSpec(layers=1, hidden=16, heads=2, init_seed=3))
    return model, Encoder(tokenizer, max_prompt_tokens=32, max_response_tokens=16)


def direct_top_k(model, encoder, k):
    batch = encoder.batch([p for p, _ in SEQUENCES], [r for _, r in SEQUENCES])
    with torch.no_grad():
        logprobs = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].log_softmax(-1)
    return batch, logprobs, logprobs.topk(k, dim=-1)


def test_cache_round_trip_and_size(teacher, tmp_path):
    model, encoder = teacher
    projected = []  # the head's input: the scored rows only, never every position
    hook = model.get_output_embeddings().register_forward_hook(lambda head, args, out: projected.append(args[0].dim()))
    index = write_teacher_cache(model, encoder, SEQUENCES, str(tmp_path / "c"), k=8, shard_size=3, batch_size=2)
    hook.remove()
    assert projected and set(projected) == {2}  # (R, H) rows, not (N, T, H)
    assert [s["count"] for s in index["shards"]] == [3, 3, 1]
    batch, _, (top, ids) = direct_top_k(model, encoder, 8)
    cache = TeacherCache(str(tmp_path / "c"))
    sparse = cache.batch(list(range(7)), batch.loss_mask)
    mask = batch.loss_mask[:, 1:].bool()
    torch.testing.assert_close(sparse.logprobs[mask], top[mask].half().float())
    assert torch.equal(sparse.indices[mask], ids[mask])
    torch.testing.assert_close(sparse.leftover[mask], 1 - top[mask].exp().sum(-1), atol=1e-6, rtol=1e-5)
    assert 6 * 8 + 4 <= index["bytes_per_token"] < 6 * 8 + 4 + 60  # payload plus per-shard headers
    assert json.loads((tmp_path / "c" / "index.json").read_text())["bytes_per_token"] == index["bytes_per_token"]


def test_an_interrupted_pass_resumes_at_the_first_missing_shard(teacher, tmp_path, monkeypatch):
    model, encoder = teacher
    real_save, saved = cache_code.save_file, []

    def crash_on_second_shard(tensors, path):
        if len(saved) == 1:
            raise KeyboardInterrupt("killed")
        saved.append(path)
        real_save(tensors, path)

    monkeypatch.setattr(cache_code, "save_file", crash_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        write_teacher_cache(model, encoder, SEQUENCES, str(tmp_path / "c"), k=4, shard_size=3)
    assert not any(p.name.startswith(".tmp-") for p in (tmp_path / "c").iterdir())  # no half-written shard stays
    with pytest.raises(ValueError, match="incomplete"):
        TeacherCache(str(tmp_path / "c"))

    monkeypatch.setattr(cache_code, "save_file", real_save)
    calls = []
    original_forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **kw: calls.append(1) or original_forward(*a, **kw))
    write_teacher_cache(model, encoder, SEQUENCES, str(tmp_path / "c"), k=4, shard_size=3, batch_size=16)
    assert len(calls) == 2  # shards 2 and 3 only
    monkeypatch.setattr(model, "forward", original_forward)
    write_teacher_cache(model, encoder, SEQUENCES, str(tmp_path / "fresh"), k=4, shard_size=3)
    resumed, fresh = TeacherCache(str(tmp_path / "c")), TeacherCache(str(tmp_path / "fresh"))
    for sequence in range(7):
        assert all(torch.equal(a, b) for a, b in zip(resumed.rows(sequence), fresh.rows(sequence)))


def test_a_folder_made_for_other_sequences_is_refused(teacher, tmp_path):
    model, encoder = teacher
    write_teacher_cache(model, encoder, SEQUENCES, str(tmp_path / "c"), k=4, shard_size=3)
    with pytest.raises(ValueError, match="other sequences or settings"):
        write_teacher_cache(model, encoder, SEQUENCES[:3], str(tmp_path / "c"), k=4, shard_size=3)


def test_a_full_vocabulary_cache_gives_the_dense_loss(teacher, tmp_path):
    model, encoder = teacher
    vocabulary = model.config.vocab_size
    write_teacher_cache(model, encoder, SEQUENCES, str(tmp_path / "c"), k=vocabulary, shard_size=4)
    batch, logprobs, _ = direct_top_k(model, encoder, 1)
    student = torch.randn(*logprobs.shape)
    labels = torch.where(batch.loss_mask[:, 1:].bool(), batch.input_ids[:, 1:], -100)
    sparse = TeacherCache(str(tmp_path / "c")).batch(list(range(7)), batch.loss_mask)
    torch.testing.assert_close(forward_kl(student, sparse, labels), forward_kl(student, logprobs, labels), atol=2e-3, rtol=1e-3)


# ---------------------------------------------------------------------------- in white-box fits
@pytest.mark.slow
def test_teacher_logit_cache_is_written_once_then_trained_from_without_a_teacher(tmp_path, caplog):
    cache = tmp_path / "topk"
    whitebox_fit(tmp_path / "first", f"--data.teacher_cache={cache}", "--data.teacher_cache_k=8",
                 config="configs/baselines/fkl.yaml")
    index = json.loads((cache / "index.json").read_text())
    assert index["k"] == 8 and index["sequences"] == 16
    written = os.path.getmtime(cache / "index.json")
    with caplog.at_level("INFO"):
        cli = whitebox_fit(tmp_path / "second", f"--data.teacher_cache={cache}", "--data.teacher_cache_k=8",
                           config="configs/baselines/fkl.yaml")
    assert os.path.getmtime(cache / "index.json") == written  # read, not rewritten
    assert cli.model.teacher is None
    assert not list((tmp_path / "second" / "cache").glob("teacher-sft-*"))  # the embedded teacher was never even built
    assert "student/divergence" in scalars(tmp_path / "second")
    # another k is another cache: the folder refuses it rather than serving the wrong one
    with pytest.raises(ValueError, match="other sequences"):
        whitebox_fit(tmp_path / "third", f"--data.teacher_cache={cache}", "--data.teacher_cache_k=4",
                     config="configs/baselines/fkl.yaml")


@pytest.mark.slow
def test_forward_kl_from_the_cache_equals_the_dense_teacher_at_full_k(tmp_path):
    from pbkd_lightning.objectives.divergence import divergence_loss

    cache = tmp_path / "topk"
    cli = whitebox_fit(tmp_path / "run", f"--data.teacher_cache={cache}", "--data.teacher_cache_k=200", config="configs/baselines/fkl.yaml")
    module, data = cli.model, cli.datamodule
    batch = next(iter(data.train_dataloader()))
    from pbkd_lightning.models.teacher import load_teacher

    teacher, _ = load_teacher(module.teacher_config, data.train_records, 96, data.generation.max_new_tokens)
    module.players.teacher = teacher
    with torch.no_grad():
        _, logits = module.players.rows(batch.teacher)
        cached = divergence_loss("forward_kl", logits, batch.teacher.teacher_topk, 0.5, 0.1, 1.0, False)
        dense = divergence_loss("forward_kl", logits, module.players.teacher_rows(replace(batch.teacher, teacher_topk=None)), 0.5, 0.1, 1.0, False)
    assert cached.item() == pytest.approx(dense.item(), rel=2e-3)  # float16 log-probabilities in the cache
