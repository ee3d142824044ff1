"""Data (pbkd_lightning/data/ and tasks/): record files, tasks and their scores, the teachers that answer in text,
the labelers and sample-vs-sample pairs, and the datamodule's held-out split."""

import json
import warnings

import pytest

from conftest import tiny_modules

from pbkd_lightning.data.labelers import label_pair, sample_pairs
from pbkd_lightning.data.records import DataError, read_prompts, read_responses, write_jsonl_atomic
from pbkd_lightning.data.teachers import HFModelTeacher, ResponseFileTeacher, TaskProgramTeacher
from pbkd_lightning.models.loading import ModelSpec, load_causal_lm
from pbkd_lightning.models.tokenizer import build_char_tokenizer
from pbkd_lightning.tasks import get_task
from pbkd_lightning.tasks.arithmetic import extract_answer


def write(path, text):
    path.write_text(text)
    return str(path)


# ---------------------------------------------------------------------------- records
@pytest.mark.parametrize(
    "content, expected",
    [
        ('{"prompt": "a"}\n{"prompt": \n', ":2: invalid JSON"),
        ('{"prompt": "a"}\n{"reference": "b"}\n', ":2: missing field 'prompt'"),
        ('{"prompt": "a"}\n\n{"prompt": 3}\n', ":3: field 'prompt' must be str, got int"),
        ('[1, 2]\n', ":1: expected a JSON object"),
        ("", ": no records (the file is empty)"),
    ],
)
def test_malformed_prompt_files_name_file_line_and_field(tmp_path, content, expected):
    path = write(tmp_path / "prompts.jsonl", content)
    with pytest.raises(DataError) as error:
        read_prompts(path)
    assert str(error.value).startswith(path) and expected in str(error.value)


def test_unknown_task_is_named(tmp_path):
    path = write(tmp_path / "p.jsonl", '{"prompt": "a", "task": "text"}\n\n{"prompt": "b", "task": "poetry"}\n')
    with pytest.raises(DataError, match=":3: field 'task' must be one of .* got 'poetry'"):
        read_prompts(path)


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_prompts(str(tmp_path / "nope.jsonl"))


def test_gsm8k_format_is_read_as_arithmetic(tmp_path):
    path = write(tmp_path / "gsm8k.jsonl", json.dumps({"question": "1+1?", "answer": "1+1=2\n#### 2"}) + "\n")
    [record] = read_prompts(path)
    assert record == {"prompt": "1+1?\n", "reference": "1+1=2\n#### 2", "task": "arithmetic"}


def test_atomic_write_leaves_no_partial_file_on_error(tmp_path):
    path = tmp_path / "out.jsonl"
    write_jsonl_atomic(str(path), [{"a": 1}])

    def broken():
        yield {"a": 2}
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        write_jsonl_atomic(str(path), broken())
    assert path.read_text() == '{"a": 1}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


# ---------------------------------------------------------------------------- tasks
def test_tasks_are_deterministic_and_the_teacher_scores_perfectly():
    for name in ("arithmetic", "reversal"):
        task = get_task(name)
        records = task.generate(20, seed=5)
        assert records == task.generate(20, seed=5) and records != task.generate(20, seed=6)
        assert all(task.score(r["reference"], r["reference"]) == 1.0 for r in records)
        assert TaskProgramTeacher().respond(records) == [r["reference"] for r in records]


def test_arithmetic_chain_of_thought_is_consistent():
    for record in get_task("arithmetic").generate(200, seed=0):
        steps = record["reference"].split("\n")[0].rstrip(".").split(". ")
        for step in steps:
            expression, result = step.split("=")
            assert eval(expression) == int(result) >= 0  # noqa: S307 - digits and +/- only
        assert extract_answer(record["reference"]) == steps[-1].split("=")[1]


def test_scores_give_partial_credit_only_for_rouge():
    assert get_task("arithmetic").score("3+4=7.\n#### 8", "3+4=7.\n#### 7") == 0.0
    assert get_task("arithmetic").score("junk #### 7", "3+4=7.\n#### 7") == 1.0
    partial = get_task("reversal").score("dog cat", "dog sun cat")
    assert 0 < partial < 1
    assert get_task("reversal").score("", "dog") == 0.0


# ---------------------------------------------------------------------------- teachers
def test_response_file_teacher(tmp_path):
    path = write(tmp_path / "t.jsonl", '{"prompt": "p1", "teacher": "r1"}\n{"prompt": "p2", "response": "r2"}\n')
    assert read_responses(path) == {"p1": "r1", "p2": "r2"}
    teacher = ResponseFileTeacher(path)
    assert teacher.respond([{"prompt": "p2"}, {"prompt": "p1"}]) == ["r2", "r1"]
    with pytest.raises(DataError, match="no teacher response for prompt 'p3'"):
        teacher.respond([{"prompt": "p3"}])


def test_hf_model_teacher_generates_from_a_local_folder(tmp_path):
    model, tokenizer = load_causal_lm(ModelSpec(layers=1, hidden=16, heads=2))
    model.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    teacher = HFModelTeacher(str(tmp_path / "teacher"), max_new_tokens=5)
    responses = teacher.respond([{"prompt": "ab"}, {"prompt": "abc de"}])
    assert len(responses) == 2 and all(isinstance(r, str) and len(r) <= 5 for r in responses)
    assert responses == teacher.respond([{"prompt": "ab"}, {"prompt": "abc de"}])  # greedy: deterministic
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        HFModelTeacher(str(tmp_path / "missing")).respond([{"prompt": "x"}])


# ---------------------------------------------------------------------------- labelers
def test_labelers():
    record = {"task": "arithmetic", "reference": "#### 7"}
    assert label_pair("teacher", record, "#### 7", "#### 9") == 1
    assert label_pair("teacher", record, "#### 7", " #### 7 ") == 0  # identical texts carry no preference
    assert label_pair("verifier", record, "#### 7", "#### 9") == 1
    assert label_pair("verifier", record, "#### 9", "x #### 7") == -1
    assert label_pair("verifier", record, "#### 8", "#### 9") == 0


def test_both_labeler_lets_the_verifier_decide_and_the_teacher_break_its_ties():
    record = {"task": "arithmetic", "reference": "#### 7"}
    assert label_pair("both", record, "#### 7", "#### 9") == 1
    assert label_pair("both", record, "#### 9", "x #### 7") == -1  # a right student beats a wrong teacher
    assert label_pair("both", record, "#### 8", "#### 9") == 1  # both wrong: the paper's rule
    assert label_pair("both", record, "#### 7", "#### 7") == 0
    with pytest.raises(ValueError, match="unknown labeler"):
        label_pair("oracle", record, "a", "b")


def test_sample_pairs_rank_distinct_samples_the_verifier_tells_apart():
    record = {"task": "arithmetic", "reference": "#### 7"}
    pairs = sample_pairs(record, ["#### 9", "a #### 7", "#### 9 ", "#### 8", "b #### 7"])
    # 4 distinct texts: two right, two wrong; the right ones tie with each other, as do the wrong ones
    assert sorted(pairs) == sorted([("a #### 7", "#### 9"), ("a #### 7", "#### 8"), ("b #### 7", "#### 9"), ("b #### 7", "#### 8")])


# ---------------------------------------------------------------------------- datamodule
def test_heldout_prompts_are_never_trained_on(tmp_path):
    train = tmp_path / "train.jsonl"
    val = tmp_path / "val.jsonl"
    train.write_text("".join(f'{{"prompt": "p{i}", "reference": "r{i}"}}\n' for i in range(6)))
    val.write_text('{"prompt": "p1", "reference": "r1"}\n{"prompt": "q", "reference": "r"}\n')
    module, datamodule = tiny_modules(tmp_path, train_file=str(train), val_file=str(val))
    datamodule.setup("fit")
    assert [r["prompt"] for r in datamodule.val_records] == ["q"]
    module, datamodule = tiny_modules(tmp_path)
    datamodule.setup("fit")
    assert not {r["prompt"] for r in datamodule.train_records} & {r["prompt"] for r in datamodule.val_records}


def test_teacher_responses_longer_than_the_limit_are_counted_with_one_warning():
    """data/truncated_responses counts every response cut at `data.generation.max_new_tokens` (it gets no eos), and
    one warning names the key that raises the limit."""
    from pbkd_lightning.data import GenerationConfig, PreferenceDataModule
    from pbkd_lightning.data.datamodule import DataConnection

    data = PreferenceDataModule(train_size=8, val_size=4, generation=GenerationConfig(max_new_tokens=12))
    data.setup("fit")
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        data.connect(DataConnection(tokenizer=build_char_tokenizer()))
    expected = sum(len(r["teacher"]) > 12 for r in data.train_records)
    assert expected > 0 and data.stats["data/truncated_responses"] == expected == data.stats["data/truncated_teacher_responses"]
    assert len([w for w in warned if "`data.generation.max_new_tokens` (12" in str(w.message)]) == 1
