"""Models (pbkd_lightning/models/): the character tokenizer, loading (quantized frozen models, shared vocabularies,
LoRA), and a reward model initialised from the teacher model."""

import pytest
import torch

from conftest import run_cli, tiny_args

from pbkd_lightning.data.teachers import HFModelTeacher
from pbkd_lightning.models.loading import ModelSpec, load_causal_lm
from pbkd_lightning.models.tokenizer import build_char_tokenizer


def test_char_tokenizer_round_trips_text():
    tokenizer = build_char_tokenizer()
    text = "Ann has 3 pens, gets 4.\n#### 7"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tokenizer.decode(ids) == text
    assert tokenizer.pad_token_id == 0 and tokenizer.eos_token_id == 2


# ---------------------------------------------------------------------------- loading
@pytest.mark.parametrize("quantization, layer", [("nf4", "Linear4bit"), ("int8", "Linear8bitLt")])
def test_quantized_teacher_loads_smaller_and_generates(tmp_path, quantization, layer):
    from pbkd_lightning.models.loading import load_frozen_model

    model, tokenizer = load_causal_lm(ModelSpec(layers=1, hidden=64, heads=2))
    model.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    quantized = load_frozen_model(str(tmp_path / "teacher"), quantization)
    assert type(quantized.model.layers[0].mlp.up_proj).__name__ == layer
    assert quantized.get_memory_footprint() < 0.5 * model.get_memory_footprint()
    ids = tokenizer("Reverse: cat dog\n", return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        drift = (quantized(ids).logits - model(ids).logits).abs().max().item()
    assert drift < 0.5  # close to the full-precision model, not identical
    teacher = HFModelTeacher(str(tmp_path / "teacher"), max_new_tokens=4, quantization=quantization)
    assert all(isinstance(r, str) for r in teacher.respond([{"prompt": "ab"}, {"prompt": "cd"}]))


def test_unknown_quantization_is_refused(tmp_path):
    from pbkd_lightning.models.loading import load_frozen_model

    (tmp_path / "m").mkdir()
    with pytest.raises(ValueError, match="`quantization` must be one of"):
        load_frozen_model(str(tmp_path / "m"), "int4")


def test_vocabulary_rows_padded_past_the_tokenizer_are_cropped(caplog):
    from pbkd_lightning.models.loading import shared_vocabulary_size

    tokenizer = build_char_tokenizer()
    size = len(tokenizer)
    with caplog.at_level("INFO"):
        assert shared_vocabulary_size(tokenizer, build_char_tokenizer(), size + 28, size) == size
    assert [r.message for r in caplog.records] == [f"vocabulary: teacher {size + 28} and student {size} logit rows, both cropped to the tokenizer's {size}"]
    assert shared_vocabulary_size(tokenizer, tokenizer, size, size) == size


def test_a_real_vocabulary_mismatch_names_both_tokenizers():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from pbkd_lightning.models.loading import shared_vocabulary_size

    student = build_char_tokenizer()
    vocab = dict(student.get_vocab())
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]  # same tokens, two ids swapped
    teacher = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>")),
                                      unk_token="<unk>", name_or_path="teacher-tok")
    with pytest.raises(ValueError, match="teacher 'teacher-tok', student .* differ .*'a'"):
        shared_vocabulary_size(teacher, student, len(vocab), len(vocab))
    with pytest.raises(ValueError, match="fewer logit rows"):
        shared_vocabulary_size(student, build_char_tokenizer(), len(student) - 1, len(student))


def test_lora_without_peft_names_the_extra(monkeypatch):
    import sys

    from pbkd_lightning.models.loading import LoraSpec, ModelSpec, load_causal_lm

    monkeypatch.setitem(sys.modules, "peft", None)  # as if the extra were not installed
    with pytest.raises(ImportError, match=r"pip install -e '\.\[lora\]'"):
        load_causal_lm(ModelSpec(layers=1, hidden=32, heads=2, lora=LoraSpec(r=4)))


# ---------------------------------------------------------------------------- critic
# a teacher of five SFT steps, not conftest's twenty: enough to start a reward model from
TINY_TEACHER = ["--model.teacher.layers=1", "--model.teacher.hidden=64", "--model.teacher.heads=2", "--model.teacher.train_steps=5"]


@pytest.mark.slow
def test_reward_model_initialised_from_the_teacher_model(tmp_path):
    root = tmp_path / "run"
    cli = run_cli("fit", *tiny_args(root, *TINY_TEACHER, f"--model.teacher.cache_dir={root}/cache", "--model.critic.init=teacher",
                                    "--model.objective.critic_warmup_steps=0", "--trainer.max_steps=1", "--trainer.limit_val_batches=0"))
    module = cli.model
    assert module.reference is None  # the implicit reward's reference is the frozen teacher, not a student copy
    assert module.critic.lm.config.hidden_size == 64 and module.student.config.hidden_size == 32
    assert module.critic.lm.config.num_hidden_layers == 1 and module.critic_tokenizer is module.teacher_tokenizer
    teacher_weights = dict(module.teacher.named_parameters())
    moved = [n for n, p in module.critic.lm.named_parameters() if not torch.equal(p, teacher_weights[n])]
    assert moved and all(p.requires_grad for p in module.critic.lm.parameters())  # a trained copy; the teacher is untouched
    assert not any(p.requires_grad for p in module.teacher.parameters())
    with pytest.raises(ValueError, match="critic.init: teacher"):  # no teacher model to start from
        run_cli("fit", *tiny_args(tmp_path / "none", "--model.critic.init=teacher"))
