"""Models (pbkd_lightning/models/): the character tokenizer, the warm-up cache, loading (quantized frozen models,
shared vocabularies, LoRA), and a reward model initialised from the teacher model."""

import os

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


# ---------------------------------------------------------------------------- tokenizers
WORDS = ["<pad>", "<eos>", "<unk>", *"the cat sat on a mat and dog ran far".split()]
TEXT = "the cat sat on a mat and the dog ran far"


def wordlevel_qwen2_folder(folder):
    """A WordLevel tokenizer saved next to a tiny Qwen2 model: transformers 5 loads such a folder's tokenizer as a BPE
    ``Qwen2Tokenizer`` (it overrides the class for model type qwen2), which turns every word into unknown pieces."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>").save_pretrained(folder)
    config = Qwen2Config(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=64)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    return str(folder)


def test_a_wordlevel_tokenizer_in_a_qwen2_folder_tokenizes_as_its_tokenizer_json(tmp_path, caplog):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from pbkd_lightning.models.loading import load_tokenizer

    folder = wordlevel_qwen2_folder(tmp_path / "qwen2")
    expected = Tokenizer.from_file(str(tmp_path / "qwen2" / "tokenizer.json")).encode(TEXT).ids
    assert 2 not in expected  # every word is in the vocabulary
    assert AutoTokenizer.from_pretrained(folder)(TEXT)["input_ids"] != expected  # the silent loss this guards against
    tokenizer = load_tokenizer(ModelSpec(path=folder))
    assert tokenizer(TEXT)["input_ids"] == expected
    assert (tokenizer.pad_token, tokenizer.eos_token, tokenizer.unk_token) == ("<pad>", "<eos>", "<unk>")
    assert "tokenizer.json describes a WordLevel model" in caplog.text
    model, loaded = load_causal_lm(ModelSpec(path=folder))
    assert type(model).__name__ == "Qwen2ForCausalLM" and loaded(TEXT)["input_ids"] == expected
    teacher = HFModelTeacher(folder, max_new_tokens=2)  # the black-box teacher model loads its tokenizer the same way
    assert all(isinstance(r, str) for r in teacher.respond([{"prompt": "the cat"}]))


def test_a_tokenizer_that_cannot_be_loaded_as_its_file_describes_stops_the_run(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from pbkd_lightning.models import loading
    from pbkd_lightning.models.loading import load_tokenizer

    folder = wordlevel_qwen2_folder(tmp_path / "qwen2")

    class Overridden:  # as if the generic class rebuilt the tokenizer wrongly too
        from_pretrained = staticmethod(AutoTokenizer.from_pretrained)

    monkeypatch.setattr(loading, "PreTrainedTokenizerFast", Overridden)
    with pytest.raises(ValueError, match=r"transformers loaded Qwen2Tokenizer \(BPE model.*describes a WordLevel model"
                                         r".*without config.json.*model\.student\.tokenizer"):
        load_tokenizer(ModelSpec(path=folder))


def test_the_tokenizer_setting_loads_another_folders_tokenizer_for_student_and_teacher(tmp_path):
    from tokenizers import Tokenizer

    from pbkd_lightning.models.teacher import TeacherModel, teacher_vocabulary

    folder = wordlevel_qwen2_folder(tmp_path / "words")
    expected = Tokenizer.from_file(str(tmp_path / "words" / "tokenizer.json")).encode(TEXT).ids
    model, chars = load_causal_lm(ModelSpec(layers=1, hidden=32, heads=2))
    model.save_pretrained(tmp_path / "chars")
    chars.save_pretrained(tmp_path / "chars")
    _, tokenizer = load_causal_lm(ModelSpec(path=str(tmp_path / "chars"), tokenizer=folder))  # a model, another's tokenizer
    assert tokenizer(TEXT)["input_ids"] == expected
    tiny, tokenizer = load_causal_lm(ModelSpec(layers=1, hidden=32, heads=2, tokenizer=folder))  # the tiny model, sized to it
    assert tiny.config.vocab_size == len(WORDS) and tokenizer(TEXT)["input_ids"] == expected
    tokenizer, rows = teacher_vocabulary(TeacherModel(path=str(tmp_path / "chars"), tokenizer=folder))
    assert tokenizer(TEXT)["input_ids"] == expected and rows == len(chars)
    tokenizer, rows = teacher_vocabulary(TeacherModel(tokenizer=folder))
    assert tokenizer(TEXT)["input_ids"] == expected and rows == len(WORDS)
    assert "tokenizer" in TeacherModel(tokenizer=folder).describe() and "tokenizer" not in TeacherModel().describe()
    with pytest.raises(FileNotFoundError, match="tokenizer directory"):
        load_causal_lm(ModelSpec(tokenizer=str(tmp_path / "none")))


def test_a_warm_up_is_found_again_under_another_spelling_of_its_cache_folder(tmp_path, monkeypatch):
    """The cache key is the settings, not where the cache lives: a relative ``cache_dir`` and its absolute path find
    the same model (the bench runs with absolute paths, a user with ``runs/cache``), and a model cached under the
    earlier key (which hashed the folder's spelling too) is adopted, not trained again."""
    from dataclasses import asdict, replace

    from pbkd_lightning.models import warmup
    from pbkd_lightning.sequences import Encoder

    monkeypatch.chdir(tmp_path)
    model, tokenizer = load_causal_lm(ModelSpec(layers=1, hidden=32, heads=2))
    encoder, records = Encoder(tokenizer, 16, 8), [{"prompt": "1+1", "teacher": "2"}, {"prompt": "2+2", "teacher": "4"}]
    relative = warmup.WarmupConfig(steps=2, batch_size=2, cache_dir="cache")
    trained = warmup.warm_start(model, encoder, records, relative, 0, ["key"])
    monkeypatch.setattr(warmup, "_train", lambda *args, **kwargs: pytest.fail("trained again"))
    absolute = replace(relative, cache_dir=str(tmp_path / "cache"))
    again = warmup.warm_start(load_causal_lm(ModelSpec(layers=1, hidden=32, heads=2))[0], encoder, records, absolute, 0, ["key"])
    assert warmup.sft_folder(absolute, 0, ["key"]) == str(tmp_path / warmup.sft_folder(relative, 0, ["key"]))
    assert all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(), again.state_dict().values()))

    other = replace(relative, steps=3)  # as cached before the key left the folder out
    earlier = tmp_path / "cache" / f"student-sft-{warmup.cache_key(asdict(other), 0, ['key'])}"
    trained.save_pretrained(earlier)
    adopted = warmup.warm_start(load_causal_lm(ModelSpec(layers=1, hidden=32, heads=2))[0], encoder, records, other, 0, ["key"])
    assert not earlier.exists() and os.path.isfile(os.path.join(warmup.sft_folder(other, 0, ["key"]), "config.json"))
    assert all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(), adopted.state_dict().values()))
