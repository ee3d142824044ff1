"""Data (pbkd_lightning/data/ and tasks/): record files, tasks and their scores, the teachers that answer in text,
the labelers and sample-vs-sample pairs, and the datamodule's held-out split."""

import json
import warnings

import pytest

from conftest import scalars, tiny_modules

from pbkd_lightning.data.labelers import label_pair, sample_pairs
from pbkd_lightning.data.formats import read_prompts
from pbkd_lightning.data.records import DataError, read_responses, write_jsonl_atomic
from pbkd_lightning.data.teachers import HFModelTeacher, ResponseFileTeacher, TaskProgramTeacher
from pbkd_lightning.models.loading import ModelSpec, load_causal_lm
from pbkd_lightning.models.tokenizer import build_char_tokenizer
from pbkd_lightning.sequences import PromptError, render_prompt
from pbkd_lightning.tasks import BUILT_IN, get_task, split_prompts
from pbkd_lightning.tasks.arithmetic import extract_answer
from pbkd_lightning.tasks.distinct import _question


def write(path, text):
    path.write_text(text)
    return str(path)


# ---------------------------------------------------------------------------- records
@pytest.mark.parametrize(
    "content, expected",
    [
        ('{"prompt": "a"}\n{"prompt": \n', ":2: invalid JSON"),
        ('{"prompt": "a"}\n{"reference": "b"}\n', ":2: missing field 'prompt'"),
        ('{"prompt": "a"}\n\n{"prompt": 3}\n', ":3: field 'prompt' must be str or list, got int"),
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


# A corpus of broken and odd files, as users have them. Each broken one is a single line naming the file, the line
# (when there is one) and the field; each odd but well-formed one is read as if it were plain.
GOOD = '{"prompt": "1+1?", "reference": "#### 2"}\n{"prompt": "Reverse: ça 日本 🐍\\n", "reference": "🐍 日本 ça"}\n'
BROKEN_PROMPTS = {
    "utf16_with_bom": (GOOD.encode("utf-16"), ": not UTF-8 text: the file is UTF-16"),
    "utf16_big_endian": (b"\xfe\xff" + GOOD.encode("utf-16-be"), ": not UTF-8 text: the file is UTF-16"),
    "utf16_without_bom": (GOOD.encode("utf-16-le"), ":1: not UTF-8 text (a NUL byte"),
    "latin1": ('{"prompt": "café", "reference": "x"}\n'.encode("latin-1"), ":1: not UTF-8 text (byte 0xe9 at column 16)"),
    "latin1_second_line": (b'{"prompt": "a", "reference": "x"}\n{"prompt": "caf\xe9"}\n', ":2: not UTF-8 text"),
    "binary_junk": (bytes(range(256)) * 8, ":1: not UTF-8 text"),
    "binary_no_nul": (bytes(range(128, 256)) * 8, ":1: not UTF-8 text (byte 0x80"),
    "gzip": (b"\x1f\x8b\x08\x00" + bytes(range(1, 64)), ": not UTF-8 text: the file is gzip-compressed"),
    "empty_prompt": (b'{"prompt": "a", "reference": "x"}\n{"prompt": "", "reference": "x"}\n', ":2: field 'prompt' is empty"),
    "whitespace_prompt": (b'{"prompt": " \\t\\n\\r ", "reference": "x"}\n', ":1: field 'prompt' is empty"),
    "empty_reference": (b'{"prompt": "a", "reference": "  "}\n', ":1: field 'reference' is empty"),
    "gsm8k_empty_question": (b'{"question": "", "answer": "#### 1"}\n', ":1: field 'question' is empty"),
    "gsm8k_empty_answer": (b'{"question": "1+0?", "answer": "#### 1"}\n{"question": "2?", "answer": "\\n"}\n',
                           ":2: field 'answer' is empty"),
    "gsm8k_utf16": ('{"question": "1+0?", "answer": "#### 1"}\n'.encode("utf-16"), ": not UTF-8 text"),
    "null_prompt": (b'{"prompt": null}\n', ":1: field 'prompt' must be str or list, got null"),
    "lone_surrogate": (b'{"prompt": "a\\ud800b"}\n', ":1: field 'prompt' holds an unpaired surrogate escape"),
    "truncated_last_line": (b'{"prompt": "a"}\n{"prompt": "b', ":2: invalid JSON"),
    "nested_too_deeply": (b"[" * 100_000 + b"\n", ":1: invalid JSON"),
    "huge_integer": (b'{"prompt": ' + b"9" * 5000 + b"}\n", ":1: invalid JSON"),
    "bom_only": (b"\xef\xbb\xbf\r\n", ": no records (the file is empty)"),
    "blank_lines_only": (b"\n \r\n\t\n", ": no records (the file is empty)"),
}
ODD_PROMPTS = {
    "bom": b"\xef\xbb\xbf" + GOOD.encode(),
    "crlf": GOOD.replace("\n", "\r\n").encode(),
    "bom_and_crlf": b"\xef\xbb\xbf" + GOOD.replace("\n", "\r\n").encode(),
    "old_mac_cr": GOOD.replace("\n", "\r").encode(),
    "blank_and_whitespace_lines": ("\n  \n" + GOOD.replace("\n", "\n\t \r\n\n") + "\n\n").encode(),
    "no_final_newline": GOOD.rstrip("\n").encode(),
    "escaped_unicode": GOOD.replace("ça", "\\u00e7a").replace("🐍", "\\ud83d\\udc0d").encode(),
}


@pytest.mark.parametrize("content, expected", BROKEN_PROMPTS.values(), ids=BROKEN_PROMPTS.keys())
def test_broken_prompt_files_are_one_line_naming_file_line_and_field(tmp_path, content, expected):
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError) as error:
        read_prompts(str(path))
    message = str(error.value)
    assert message.startswith(str(path)) and expected in message and "\n" not in message


@pytest.mark.parametrize("content", ODD_PROMPTS.values(), ids=ODD_PROMPTS.keys())
def test_odd_but_well_formed_prompt_files_are_read_as_plain_ones(tmp_path, content):
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(content)
    plain = [{"prompt": "1+1?", "reference": "#### 2", "task": "text"},
             {"prompt": "Reverse: ça 日本 🐍\n", "reference": "🐍 日本 ça", "task": "text"}]
    assert read_prompts(str(path)) == plain


def test_gsm8k_file_with_a_bom_and_crlf_is_read(tmp_path):
    path = tmp_path / "gsm8k.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\r\n").encode())
    assert read_prompts(str(path)) == [{"prompt": "1+1?\n", "reference": "#### 2", "task": "arithmetic"}]


def test_a_folder_or_an_unreadable_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="a folder, but not a JSONL file nor one `datasets` saved with save_to_disk"):
        read_prompts(str(tmp_path))


# ---------------------------------------------------------------------------- the formats users have
def jsonl(tmp_path, *records, name="data.jsonl"):
    return write(tmp_path / name, "".join(json.dumps(r) + "\n" for r in records))


def test_chat_records_give_the_turns_before_the_last_assistant_turn_as_prompt_and_that_turn_as_response(tmp_path):
    path = jsonl(tmp_path,
                 {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
                 {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                               {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye?"},
                               {"role": "assistant", "content": [{"type": "text", "text": "Bye"}, {"type": "text", "text": "!"}]}]},
                 {"messages": [{"role": "user", "content": "open question"}]})
    single, several, unanswered = read_prompts(path)
    assert single == {"prompt": "2+2?", "reference": "4", "task": "text"}  # one user turn: as a plain prompt record
    assert several == {"prompt": (("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello"), ("user", "Bye?")),
                       "reference": "Bye!", "task": "text"}
    assert unanswered == {"prompt": "open question", "reference": None, "task": "text"}  # for a teacher that answers
    with pytest.raises(DataError, match=r"data\.jsonl:3: the conversation does not end with an assistant turn \(the default"):
        read_prompts(path, needs_response="the default teacher answers with it")


def test_prompt_completion_and_preference_records_in_text_and_conversational_form(tmp_path):
    turn = lambda role, text: [{"role": role, "content": text}]  # noqa: E731
    completions = jsonl(tmp_path, {"prompt": "1+1?", "completion": "2"},
                        {"prompt": turn("user", "3+3?"), "completion": turn("assistant", "6")})
    assert read_prompts(completions) == [{"prompt": "1+1?", "reference": "2", "task": "text"},
                                         {"prompt": "3+3?", "reference": "6", "task": "text"}]
    preferences = jsonl(tmp_path, {"prompt": "1+1?", "chosen": "2", "rejected": "3"},
                        {"chosen": turn("user", "Hi") + turn("assistant", "Hello"),  # TRL's implicit prompt
                         "rejected": turn("user", "Hi") + turn("assistant", "Go away")}, name="prefs.jsonl")
    assert read_prompts(preferences) == [{"prompt": "1+1?", "reference": "2", "task": "text", "rejected": ["3"]},
                                         {"prompt": "Hi", "reference": "Hello", "task": "text", "rejected": ["Go away"]}]
    # UltraFeedback-binarized: the prompt, whole conversations as chosen and rejected, and "messages" beside them
    ultrafeedback = jsonl(tmp_path, {"prompt": "Hi", "chosen": turn("user", "Hi") + turn("assistant", "Hello"),
                                     "rejected": turn("user", "Hi") + turn("assistant", "Go away"),
                                     "messages": turn("user", "Hi") + turn("assistant", "Hello")}, name="uf.jsonl")
    assert read_prompts(ultrafeedback) == [{"prompt": "Hi", "reference": "Hello", "task": "text", "rejected": ["Go away"]}]
    # several pairs of one prompt: one record (the student trains on the prompt once), every rejected response kept
    pairs = jsonl(tmp_path, {"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "r", "chosen": "c", "rejected": "d"},
                  {"prompt": "q", "chosen": "a", "rejected": "e"}, {"prompt": "q", "chosen": "a", "rejected": "b"}, name="pairs.jsonl")
    assert read_prompts(pairs) == [{"prompt": "q", "reference": "a", "task": "text", "rejected": ["b", "e"]},
                                   {"prompt": "r", "reference": "c", "task": "text", "rejected": ["d"]}]
    # TRL's prompt-only conversational records
    prompt_only = jsonl(tmp_path, {"prompt": turn("system", "Be brief.") + turn("user", "Hi")}, name="po.jsonl")
    assert read_prompts(prompt_only) == [{"prompt": (("system", "Be brief."), ("user", "Hi")), "reference": None,
                                          "task": "text"}]


BROKEN_FORMATS = {
    "no_format": ({"text": "a"}, ":1: fits no prompt format (fields 'text'); expected one of prompt"),
    "messages_not_a_list": ({"messages": "hi"}, ":1: field 'messages' must be list, got str"),
    "no_messages": ({"messages": []}, ":1: field 'messages' holds no messages"),
    "bad_role": ({"messages": [{"role": "bot", "content": "x"}]}, ":1: field 'messages' entry 0: 'role' must be one of"),
    "null_content": ({"messages": [{"role": "user", "content": None}]}, "entry 0: 'content' must be str, got null"),
    "image_part": ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
                   "entry 0: 'content' parts must all be text"),
    "no_user_turn": ({"messages": [{"role": "system", "content": "x"}, {"role": "assistant", "content": "y"}]},
                     ":1: field 'messages': no user turn before the answer"),
    "empty_answer": ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]},
                     ":1: field 'messages' is empty"),
    "empty_question": ({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "a"}]},
                       ":1: field 'messages' is empty"),
    "empty_completion": ({"prompt": "q", "completion": ""}, ":1: field 'completion' is empty"),
    "completion_of_two_turns": ({"prompt": "q", "completion": [{"role": "assistant", "content": "a"},
                                                               {"role": "user", "content": "b"}]},
                                ":1: field 'completion' must be a text or turns that end with the assistant's answer, got 2"),
    "kto_label": ({"prompt": "q", "completion": "a", "label": False}, ":1: field 'label': unpaired preference records (KTO"),
    "null_message": ({"messages": [None]}, ":1: field 'messages' entry 0: a message must be an object with 'role' and "
                                           "'content', got null"),
    "empty_rejected": ({"prompt": "q", "chosen": "a", "rejected": "\t"}, ":1: field 'rejected' is empty"),
    "rejected_a_number": ({"prompt": "q", "chosen": "a", "rejected": 3}, ":1: field 'rejected' must be str or list, got int"),
    "conflicting_references": ([{"prompt": "q", "completion": "a"}, {"prompt": "r", "completion": "b"},
                                {"prompt": "q", "completion": "c"}],
                               ":3: field 'prompt': 'q' already has a different 'completion' at {path}:1; keep one"),
    "conflicting_chosen": ([{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "a", "rejected": "c"},
                            {"prompt": "q", "chosen": "d", "rejected": "b"}],
                           ":3: field 'prompt': 'q' already has a different 'chosen' at {path}:1"),
    "conflicting_gsm8k": ([{"question": "1+1?", "answer": "#### 2"}, {"question": "1+1?", "answer": "#### 3"}],
                          ":2: field 'question': '1+1?\\n' already has a different 'answer' at {path}:1"),
    "implicit_prompt_mismatch": ({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                                  "rejected": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]},
                                 ":1: missing field 'prompt', and 'chosen' and 'rejected' differ before their last turn"),
}


@pytest.mark.parametrize("record, expected", BROKEN_FORMATS.values(), ids=BROKEN_FORMATS.keys())
def test_broken_records_of_every_format_are_one_line_naming_file_line_and_field(tmp_path, record, expected):
    path = jsonl(tmp_path, *(record if isinstance(record, list) else [record]))
    with pytest.raises(DataError) as error:
        read_prompts(path)
    message = str(error.value)
    assert message.startswith(path) and expected.format(path=path) in message and "\n" not in message


def test_a_named_format_reads_every_record_as_that_format(tmp_path):
    path = jsonl(tmp_path, {"prompt": "q", "completion": "a"}, {"prompt": "r", "reference": "b"})
    with pytest.raises(DataError, match=r"data\.jsonl:2: missing field 'completion'"):
        read_prompts(path)  # detected from the first record
    assert read_prompts(path, format="prompt") == [{"prompt": "q", "reference": None, "task": "text"},
                                                   {"prompt": "r", "reference": "b", "task": "text"}]
    with pytest.raises(DataError, match=r"`data.format` must be one of auto, prompt, gsm8k, chat, completion, preference"):
        read_prompts(path, format="sharegpt")


def test_parquet_files_and_datasets_folders_are_read_through_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"prompt": "1+1?", "completion": "2"}, {"prompt": "2+2?", "completion": "4"}]
    table = datasets.Dataset.from_list(rows)
    table.to_parquet(str(tmp_path / "data.parquet"))
    table.save_to_disk(str(tmp_path / "folder"))
    datasets.DatasetDict({"train": table, "test": table}).save_to_disk(str(tmp_path / "splits"))
    expected = [{"prompt": r["prompt"], "reference": r["completion"], "task": "text"} for r in rows]
    assert read_prompts(str(tmp_path / "data.parquet")) == expected
    assert read_prompts(str(tmp_path / "folder")) == expected
    assert read_prompts(str(tmp_path / "splits" / "train")) == expected
    with pytest.raises(DataError, match=r"splits: a DatasetDict with the splits train, test; name one of them"):
        read_prompts(str(tmp_path / "splits"))
    # a null in a column is a field the row does not have: named with its row
    datasets.Dataset.from_list([{"prompt": "q", "reference": "a"}, {"prompt": None, "reference": "b"}]).to_parquet(
        str(tmp_path / "nulls.parquet"))
    with pytest.raises(DataError, match=r"nulls\.parquet:row 2: missing field 'prompt'"):
        read_prompts(str(tmp_path / "nulls.parquet"))
    write(tmp_path / "fake.parquet", "not parquet")
    with pytest.raises(DataError, match=r"fake\.parquet: not a readable Parquet file \(ArrowInvalid"):
        read_prompts(str(tmp_path / "fake.parquet"))
    assert not list((tmp_path).glob("**/*.lock"))  # datasets' cache went to a temporary folder


BROKEN_RESPONSES = {
    "conflicting_duplicate": ('{"prompt": "a", "teacher": "x"}\n{"prompt": "b", "teacher": "y"}\n{"prompt": "a", "teacher": "z"}\n',
                              ":3: field 'prompt': 'a' already has a different teacher response at {path}:1"),
    "empty_teacher": ('{"prompt": "a", "teacher": "x"}\n{"prompt": "b", "teacher": ""}\n', ":2: field 'teacher' is empty"),
    "whitespace_response": ('{"prompt": "a", "response": " \\n"}\n', ":1: field 'response' is empty"),
    "empty_prompt": ('{"prompt": "", "teacher": "x"}\n', ":1: field 'prompt' is empty"),
    "no_response_field": ('{"prompt": "a", "teacher": "x"}\n{"prompt": "b"}\n', ":2: missing field 'teacher'"),
    "teacher_and_response_differ": ('{"prompt": "a", "teacher": "x", "response": "y"}\n', ":1: fields 'teacher' and 'response' differ"),
    "wrong_type": ('{"prompt": "a", "teacher": ["x"]}\n', ":1: field 'teacher' must be str, got list"),
}


@pytest.mark.parametrize("content, expected", BROKEN_RESPONSES.values(), ids=BROKEN_RESPONSES.keys())
def test_broken_teacher_response_files_name_file_line_and_field(tmp_path, content, expected):
    path = write(tmp_path / "responses.jsonl", content)
    with pytest.raises(DataError) as error:
        ResponseFileTeacher(path).respond([{"prompt": "a"}])
    message = str(error.value)
    assert message.startswith(path) and expected.format(path=path) in message and "\n" not in message


def test_teacher_response_files_in_utf16_or_binary_are_data_errors(tmp_path):
    for content in ('{"prompt": "a", "teacher": "x"}\n'.encode("utf-16"), bytes(range(256))):
        path = tmp_path / "responses.jsonl"
        path.write_bytes(content)
        with pytest.raises(DataError, match=r"responses\.jsonl(:1)?: not UTF-8 text"):
            read_responses(str(path))


def test_odd_teacher_response_files_are_read(tmp_path):
    path = tmp_path / "responses.jsonl"
    text = '{"prompt": "a", "teacher": "x"}\r\n\r\n{"prompt": "日本 🐍", "response": "ça"}\r\n{"prompt": "a", "teacher": "x"}\r\n'
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert read_responses(str(path)) == {"a": "x", "日本 🐍": "ça"}  # the same response twice is kept once


# ---------------------------------------------------------------------------- the datamodule's reading (no model)
def data_files(tmp_path, train, val='{"prompt": "q", "reference": "r"}\n'):
    return write(tmp_path / "train.jsonl", train), write(tmp_path / "val.jsonl", val)


def test_bad_files_stop_the_data_module_when_it_is_built(tmp_path):
    """Read in the constructor, before the trainer (and its logger) writes anything."""
    from pbkd_lightning.data import PreferenceDataModule

    train, val = data_files(tmp_path, '{"prompt": "a", "reference": "x"}\n{"prompt": "\\t", "reference": "y"}\n')
    with pytest.raises(DataError, match=r"train\.jsonl:2: field 'prompt' is empty; .*`data.empty: drop`"):
        PreferenceDataModule(train_file=train, val_file=val)
    train, val = data_files(tmp_path, '{"prompt": "a", "reference": "x"}\n{"prompt": "b"}\n')
    with pytest.raises(DataError, match=r"train\.jsonl:2: missing field 'reference' \(the default teacher"):
        PreferenceDataModule(train_file=train, val_file=val)
    train, val = data_files(tmp_path, '{"prompt": "q", "reference": "r"}\n')
    with pytest.raises(DataError, match=r"val\.jsonl: no held-out prompt is left"):
        PreferenceDataModule(train_file=train, val_file=val)
    responses = write(tmp_path / "responses.jsonl", '{"prompt": "a", "teacher": "x"}\n{"prompt": "q", "teacher": "r"}\n')
    train, val = data_files(tmp_path, '{"prompt": "a"}\n\n{"prompt": "b"}\n')
    with pytest.raises(DataError, match=r"train\.jsonl:3: no teacher response for this prompt \('b'\) in .*responses\.jsonl"):
        PreferenceDataModule(train_file=train, val_file=val, teacher=ResponseFileTeacher(responses))
    responses = write(tmp_path / "responses.jsonl", '{"prompt": "a", "teacher": "x"}\n{"prompt": "a", "teacher": "y"}\n')
    with pytest.raises(DataError, match=r"responses\.jsonl:2: .* different teacher response at .*responses\.jsonl:1"):
        PreferenceDataModule(train_file=train, val_file=val, teacher=ResponseFileTeacher(responses))


def test_empty_drop_leaves_out_empty_records_and_their_prompts_with_one_warning(tmp_path):
    from pbkd_lightning.data import PreferenceDataModule

    train, val = data_files(tmp_path, '{"prompt": "a"}\n{"prompt": " "}\n{"prompt": "b"}\n{"prompt": "c"}\n',
                            '{"prompt": "q"}\n{"prompt": ""}\n')
    responses = write(tmp_path / "responses.jsonl",
                      '{"prompt": "a", "teacher": "x"}\n{"prompt": "b", "teacher": "\\n"}\n{"prompt": "c", "teacher": "z"}\n'
                      '{"prompt": "q", "teacher": "r"}\n{"prompt": "", "teacher": "r"}\n')
    with pytest.raises(DataError, match=r"responses\.jsonl:2: field 'teacher' is empty"):
        PreferenceDataModule(train_file=train, val_file=val, teacher=ResponseFileTeacher(responses))
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        data = PreferenceDataModule(train_file=train, val_file=val, teacher=ResponseFileTeacher(responses), empty="drop")
    [warning] = [w for w in warned if "dropped" in str(w.message)]
    assert "dropped 5 records" in str(warning.message) and "`data.empty: drop`" in str(warning.message)
    assert sorted(d.rsplit("/", 1)[1] for d in data.dropped) == [
        "responses.jsonl:2:teacher", "responses.jsonl:5:prompt", "train.jsonl:2:prompt", "train.jsonl:3:prompt",
        "val.jsonl:2:prompt"]
    data.setup("fit")
    assert [(r["prompt"], r["teacher"]) for r in data.train_records] == [("a", "x"), ("c", "z")]
    assert [r["prompt"] for r in data.val_records] == ["q"]
    only_empty = write(tmp_path / "train.jsonl", '{"prompt": " ", "reference": "x"}\n')
    with pytest.raises(DataError, match=r"train\.jsonl: no records left: all 1 have an empty field"):
        PreferenceDataModule(train_file=only_empty, val_file=val, empty="drop")


def buffer_line(**changes):
    line = {"prompt": "p", "teacher": "t", "reference": "t", "task": "text", "row": 0, "iteration": 0,
            "samples": ["ab", "abc"], "sample_ids": [[1, 2], [1, 2, 3]], "old_logprobs": [[-0.1, -0.2, -0.3], [-1.0, -1.0, -1.0]],
            "ended": [True, False], "preferences": [1, 0]}
    line.update(changes)
    return json.dumps(line, ensure_ascii=False) + "\n"


BROKEN_BUFFERS = {
    "half_written_line": (buffer_line() + buffer_line()[:40], ":2: invalid JSON"),
    "not_utf8": ((buffer_line() + "\udcff").encode("utf-8", "surrogateescape"), ":2: not UTF-8 text"),
    "nul_bytes": (buffer_line() + "\x00" * 32, ":2: not UTF-8 text"),
    "missing_field": (buffer_line().replace('"old_logprobs"', '"old"'), ":1: missing field 'old_logprobs'"),
    "wrong_type": (buffer_line(samples="ab"), ":1: field 'samples' must be list, got str"),
    "lengths_disagree": (buffer_line(ended=[True]), ":1: field 'ended' has 1 entries for 2 samples"),
    "bad_token_ids": (buffer_line(sample_ids=[[1, "x"], [1, 2, 3]]), ":1: field 'sample_ids' entry 0 must be a list of token ids"),
    "logprobs_per_token": (buffer_line(old_logprobs=[[-0.1], [-1.0, -1.0, -1.0]]), ":1: field 'old_logprobs' entry 0 must be a list of 3"),
    "bad_preference": (buffer_line(preferences=[1, 2]), ":1: field 'preferences' entry 1 must be -1, 0 or 1, got 2"),
    "bad_ended": (buffer_line(ended=[True, "no"]), ":1: field 'ended' entry 1 must be bool, got str"),
    "empty_file": ("", ": no records (the file is empty)"),
}


@pytest.mark.parametrize("content, expected", BROKEN_BUFFERS.values(), ids=BROKEN_BUFFERS.keys())
def test_a_corrupt_buffer_file_read_back_on_resume_names_file_and_line(tmp_path, content, expected):
    from types import SimpleNamespace

    from pbkd_lightning.data import PreferenceDataModule

    data = PreferenceDataModule()
    data.trainer = SimpleNamespace(default_root_dir=str(tmp_path))  # all the buffer needs of the trainer
    path = tmp_path / "buffer" / "iter_0003.jsonl"
    path.parent.mkdir()
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    with pytest.raises(DataError) as error:
        data._load_iteration(3)
    message = str(error.value)
    assert message.startswith(str(path)) and expected in message and "\n" not in message


def test_a_well_formed_buffer_file_reads_back_as_written(tmp_path):
    from types import SimpleNamespace

    from pbkd_lightning.data import PreferenceDataModule

    data = PreferenceDataModule()
    data.trainer = SimpleNamespace(default_root_dir=str(tmp_path))
    path = tmp_path / "buffer" / "iter_0000.jsonl"
    path.parent.mkdir()
    path.write_bytes((buffer_line(samples=["日本 🐍", "abc"], eos=[7, None]) + "\n").replace("\n", "\r\n").encode())
    [group] = data._load_iteration(0)
    assert [(r.text, r.token_ids, r.ended, r.eos_token_id) for r in group["rollouts"]] == [
        ("日本 🐍", [1, 2], True, 7), ("abc", [1, 2, 3], False, None)]
    assert group["preferences"] == [1, 0] and group["teacher"] == "t"


# ---------------------------------------------------------------------------- tasks
def test_tasks_are_deterministic_and_the_teacher_scores_perfectly():
    for name in BUILT_IN:
        task = get_task(name)
        records = task.generate(20, seed=5)
        assert records == task.generate(20, seed=5) and records != task.generate(20, seed=6)
        assert all(task.score(r["reference"], r) == 1.0 and task.check(r) is None for r in records)
        assert TaskProgramTeacher().respond(records) == [r["reference"] for r in records]


@pytest.mark.parametrize("name", BUILT_IN)
def test_every_task_has_a_training_pool_of_20000_prompts_disjoint_from_500_held_out(name):
    train, held_out = split_prompts(get_task(name), 20_000, 500, seed=1234)
    prompts = [r["prompt"] for r in train]
    assert len(set(prompts)) == 20_000 and len({r["prompt"] for r in held_out}) == 500
    assert not set(prompts) & {r["prompt"] for r in held_out}
    assert split_prompts(get_task(name), 20_000, 500, seed=1234) == (train, held_out)


def test_a_task_without_enough_distinct_prompts_says_so():
    class ThreePrompts:
        name = "three"

        def record(self, rng):
            return {"task": self.name, "prompt": f"q{rng.randint(1, 3)}", "reference": "a"}

    train, held_out = split_prompts(ThreePrompts(), 2, 1, seed=0)
    assert len(train) == 2 and not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}
    with pytest.raises(ValueError, match="too few distinct prompts"):
        split_prompts(ThreePrompts(), 3, 1, seed=0)


def test_distinct_scores_validity_and_distinctness_and_its_teacher_spreads_over_right_answers():
    task = get_task("distinct")
    record = {"prompt": "List 3 different odd numbers from 12 to 40.\n", "reference": "13 15 17"}
    assert task.score("39 21 13", record) == 1.0
    assert task.score("21 21 13", record) == pytest.approx(2 / 3)  # a repeat fills one slot
    assert task.score("21 22 13", record) == pytest.approx(2 / 3)  # 22 is even
    assert task.score("11 21 13", record) == pytest.approx(2 / 3)  # 11 is out of range
    assert task.score("21 13 15 17", record) == pytest.approx(3 / 4)  # a fourth number counts against
    assert task.score("21 x", record) == pytest.approx(1 / 3) and task.score("", record) == 0.0
    assert task.score("21 ² 13", record) == pytest.approx(2 / 3)  # a digit-like character is no number
    # the teacher's answer is a uniform draw among the right ones (in ascending order), not the k smallest
    records = task.generate(2000, seed=1)
    smallest = 0
    for r in records:
        k, test, low, high = _question(r["prompt"])
        answer = [int(n) for n in r["reference"].split()]
        assert answer == sorted(answer) and len(set(answer)) == k
        smallest += answer == [n for n in range(low, high + 1) if test(n)][:k]
    assert smallest / len(records) < 0.05
    assert task.check({"prompt": "Name three numbers\n"}) and "List <k> different" in task.check({"prompt": "x"})


def test_arithmetic_chain_of_thought_is_consistent():
    for record in get_task("arithmetic").generate(200, seed=0):
        steps = record["reference"].split("\n")[0].rstrip(".").split(". ")
        for step in steps:
            expression, result = step.split("=")
            assert eval(expression) == int(result) >= 0  # noqa: S307 - digits and +/- only
        assert extract_answer(record["reference"]) == steps[-1].split("=")[1]


def test_scores_give_partial_credit_only_for_rouge():
    assert get_task("arithmetic").score("3+4=7.\n#### 8", {"reference": "3+4=7.\n#### 7"}) == 0.0
    assert get_task("arithmetic").score("junk #### 7", {"reference": "3+4=7.\n#### 7"}) == 1.0
    partial = get_task("reversal").score("dog cat", {"reference": "dog sun cat"})
    assert 0 < partial < 1
    assert get_task("reversal").score("", {"reference": "dog"}) == 0.0


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
    conversation = (("system", "x"), ("user", "ab"), ("assistant", "ba"), ("user", "abc"))
    [answer] = teacher.respond([{"prompt": conversation}])  # no chat template: as 'role: content' lines
    assert isinstance(answer, str) and len(answer) <= 5
    assert render_prompt(tokenizer, conversation) == "system: x\nuser: ab\nassistant: ba\nuser: abc\nassistant: "
    assert render_prompt(tokenizer, "ab") == "ab"  # a text as it is, as before conversations
    # a template that refuses the conversation (as Gemma's refuses system turns): one line naming it
    tokenizer.chat_template = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}" + CHAT_TEMPLATE
    tokenizer.save_pretrained(tmp_path / "teacher")
    with pytest.raises(PromptError, match=r"chat template refuses the prompt 'system: x\\nuser: ab.*System role not supported"):
        teacher.respond([{"prompt": conversation}])
    [answer] = teacher.respond([{"prompt": conversation[1:]}])
    assert isinstance(answer, str)


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


def test_a_corrupt_teacher_response_cache_in_the_run_folder_names_file_and_line(tmp_path):
    from types import SimpleNamespace

    from pbkd_lightning.data import PreferenceDataModule

    responses = write(tmp_path / "responses.jsonl", '{"prompt": "a", "teacher": "x"}\n{"prompt": "b", "teacher": "y"}\n')
    data = PreferenceDataModule(teacher=ResponseFileTeacher(responses))
    data.trainer = SimpleNamespace(default_root_dir=str(tmp_path / "run"), world_size=1)
    records = [{"prompt": "a"}, {"prompt": "b"}]
    assert data._teacher_responses(records) == (["x", "y"], [True, True])
    [cache] = (tmp_path / "run" / "teacher").iterdir()
    lines = cache.read_text().splitlines(keepends=True)
    cache.write_text(lines[0] + lines[1][:10])
    with pytest.raises(DataError, match=rf"^{cache}:2: invalid JSON"):
        data._teacher_responses(records)
    cache.write_text(lines[0])
    with pytest.raises(DataError, match=rf"^{cache}: 1 cached teacher responses for 2 prompts; remove the file"):
        data._teacher_responses(records)


# ---------------------------------------------------------------------------- the formats in a fit
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")


def chat_tokenizer(tmp_path):
    """The tiny student's character tokenizer with a chat template, saved as a folder for `model.student.tokenizer`."""
    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(tmp_path / "tokenizer"))
    return str(tmp_path / "tokenizer")


def chat_record(i):
    turns = [{"role": "user", "content": f"{i}+1?"}, {"role": "assistant", "content": f"{i + 1}"}]
    if i % 2:  # every other one a conversation of several turns before the answer
        turns = [{"role": "system", "content": "Answer with a number."}, {"role": "user", "content": "Ready?"},
                 {"role": "assistant", "content": "Yes."}] + turns
    return {"messages": turns}


def test_a_chat_file_a_parquet_file_and_a_datasets_folder_each_run_a_short_fit_and_a_preference_file_trains_the_critic(tmp_path):
    datasets = pytest.importorskip("datasets")
    from conftest import run_cli, tiny_args

    tokenizer = ["--model.student.tokenizer=" + chat_tokenizer(tmp_path)]
    # chat (JSONL), black-box PbKD: conversations are sampled from, buffered and read back
    train, val = (jsonl(tmp_path, *map(chat_record, range(start, start + n)), name=name)
                  for start, n, name in ((0, 8, "chat.jsonl"), (100, 4, "chat-val.jsonl")))
    cli = run_cli("fit", *tiny_args(tmp_path / "chat", *tokenizer, f"--data.train_file={train}", f"--data.val_file={val}",
                                    "--model.objective.critic_warmup_steps=0"))
    data = cli.datamodule
    conversations = [r["prompt"] for r in data.train_records if not isinstance(r["prompt"], str)]
    assert len(conversations) == 4 and conversations[0][-1] == ("user", "1+1?")
    assert {r["teacher"] for r in data.train_records} == {str(i + 1) for i in range(8)}  # the last assistant turns
    buffered = data._load_iteration(0)  # the buffer's JSON, read back as on resume
    assert sorted(map(repr, (g["prompt"] for g in buffered))) == sorted(repr(r["prompt"]) for r in data.train_records)
    rendered = data.encoder(cli.model.tokenizer).prompt_ids(conversations[0])
    assert cli.model.tokenizer.decode(rendered) == "system: Answer with a number.\nuser: Ready?\nassistant: Yes.\nuser: 1+1?\nassistant: "
    assert (tmp_path / "chat" / "summary.json").exists()

    # chat records in Parquet (turns as a list of structs), SeqKD with the default tiny models, whose tokenizer has no
    # chat template: conversations become 'role: content' lines, with a warning
    datasets.Dataset.from_list(list(map(chat_record, range(8)))).to_parquet(str(tmp_path / "train.parquet"))
    datasets.Dataset.from_list(list(map(chat_record, range(100, 104)))).to_parquet(str(tmp_path / "val.parquet"))
    with pytest.warns(UserWarning, match="6 prompts are conversations of several turns and the student's tokenizer has no chat"):
        cli = run_cli("fit", *tiny_args(tmp_path / "parquet", f"--data.train_file={tmp_path}/train.parquet",
                                        f"--data.val_file={tmp_path}/val.parquet", config="configs/baselines/seqkd.yaml"))
    records = cli.datamodule.train_records
    assert [r["teacher"] for r in records] == [str(i + 1) for i in range(8)] and records[1]["prompt"][0][0] == "system"
    assert cli.model.tokenizer.decode(cli.datamodule.encoder(cli.model.tokenizer).prompt_ids(records[1]["prompt"])) == \
        "system: Answer with a number.\nuser: Ready?\nassistant: Yes.\nuser: 1+1?\nassistant: "
    assert (tmp_path / "parquet" / "summary.json").exists()

    # preferences in a datasets folder: the chosen responses teach the student, every pair the reward model
    prefs = [{"prompt": f"{i}+{i}?", "chosen": f"{2 * i}", "rejected": f"{2 * i + 1}"} for i in range(12)]
    datasets.Dataset.from_list(prefs[:8]).save_to_disk(str(tmp_path / "prefs"))
    datasets.Dataset.from_list(prefs[8:]).save_to_disk(str(tmp_path / "prefs-val"))
    cli = run_cli("fit", *tiny_args(tmp_path / "prefs-run", f"--data.train_file={tmp_path}/prefs",
                                    f"--data.val_file={tmp_path}/prefs-val", "--model.objective.critic_warmup_steps=0"))
    data = cli.datamodule
    assert data.stats["data/file_pairs"] == 8 and data.stats["data/buffer_pairs"] > 8  # and the teacher-vs-sample pairs
    pairs = data.critic_pairs(0)
    assert {(p["chosen"], p["rejected"]) for p in pairs if isinstance(p["rejected"], str)} == \
        {(r["chosen"], r["rejected"]) for r in prefs[:8]}
    assert scalars(tmp_path / "prefs-run")["critic/bt"]  # the reward model took Bradley-Terry steps on them
