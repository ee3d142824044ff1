"""The prompt-file formats users have, each read into the data module's prompt records.

A prompt record is ``{"prompt", "reference", "task"}`` (and, from a preference file, ``"rejected"``: a list, one text
per pair the file gives the prompt): the prompt a
text or a :data:`~pbkd_lightning.sequences.Conversation`; the reference what the default teacher
(:class:`~pbkd_lightning.data.teachers.TaskProgramTeacher`) answers and what the held-out score compares with. Every
format is read from JSONL, Parquet or a ``datasets`` folder (:func:`~pbkd_lightning.data.records.read_values`).
"""

from typing import Literal, Optional

from pbkd_lightning.data.records import DataError, EmptyFields, EmptyPolicy, kind_of, check_fields, check_text, read_values
from pbkd_lightning.tasks import TASKS

Format = Literal["auto", "prompt", "gsm8k", "chat", "completion", "preference"]
ROLES = ("system", "developer", "user", "assistant", "tool")
SHAPES = {  # what each format's records look like, for the error that names them
    "prompt": '{"prompt", "reference"?, "task"?}',
    "gsm8k": '{"question", "answer"}',
    "chat": '{"messages": [{"role", "content"}, ...]}',
    "completion": '{"prompt", "completion"}',
    "preference": '{"prompt", "chosen", "rejected"}',
}
TEXT_OR_TURNS = (str, list)


def detect_format(where: str, record) -> str:
    """The format a record is in, from its fields (the file's first record decides for the file)."""
    if isinstance(record, dict):
        if "chosen" in record and "rejected" in record:  # before chat: UltraFeedback's pairs carry "messages" too
            return "preference"
        if "messages" in record:
            return "chat"
        if "completion" in record:
            return "completion"
        if "question" in record and "prompt" not in record:
            return "gsm8k"
        if "prompt" in record:
            return "prompt"
        fields = f"fields {', '.join(map(repr, record))}" if record else "no fields"
    else:
        check_fields(where, record, {})  # not an object: says so
    raise DataError(f"{where}: fits no prompt format ({fields}); expected one of "
                    f"{'; '.join(f'{name} {shape}' for name, shape in SHAPES.items())} (or set `data.format`)")


def read_prompts(path: str, format: Format = "auto", empty: EmptyPolicy = "error", dropped: Optional[list] = None,
                 with_places: bool = False, needs_response: str = "") -> list:
    """The prompt records of a file in one of :data:`SHAPES`' formats (``auto``: detected from its first record).

    - ``prompt``: ``{"prompt", "reference"?, "task"?}``, the project's own.
    - ``gsm8k``: GSM8K's ``{"question", "answer"}``, an arithmetic task.
    - ``chat``: ``{"messages": [...]}``: the last turn, when the assistant's, is the teacher's response and every turn
      before it the prompt (one user turn: its text; more: a conversation, rendered through the tokenizer's chat
      template); a conversation that ends with another turn is a prompt for a teacher that answers.
    - ``completion``: ``{"prompt", "completion"}``, each a text or (TRL's conversational form) a list of turns.
    - ``preference``: ``{"prompt", "chosen", "rejected"}`` (each a text or turns; without ``prompt``, the turns
      ``chosen`` and ``rejected`` share before their last): the chosen response is the teacher's, the rejected one
      is kept for black-box PbKD's reward model.

    Responses are the records' ``reference`` (task ``text``: scored by ROUGE-L); a prompt given twice must have the
    same response (a preference file may pair it with several rejected ones). The prompt and a given response must
    not be empty or whitespace (``empty``, ``dropped`` as in :func:`~pbkd_lightning.data.records.read_jsonl`).
    ``with_places``: ``[(place, record), ...]``, the place ``path:line`` (``path:row n`` in a table).
    ``needs_response``: why a response is needed (who answers or scores with it), making a record without one an
    error that says so; empty: a record may have none.

    Raises:
        DataError: naming the file, the line and the field, for anything a record of the format may not hold.
    """
    values = read_values(path)
    if not values:
        raise DataError(f"{path}: no records (the file is empty)")
    if format == "auto":
        format = detect_format(*values[0])
    elif format not in SHAPES:
        raise DataError(f"`data.format` must be one of auto, {', '.join(SHAPES)}, got {format!r}")
    read = _READERS[format]
    blanks, records, answered, paired = EmptyFields(path, empty, dropped), [], {}, {}
    for where, value in values:
        record = read(where, value)
        if needs_response and record["reference"] is None:
            what = ("the conversation does not end with an assistant turn" if format == "chat"
                    else "missing field 'reference'")
            raise DataError(f"{where}: {what} ({needs_response})")
        prompt = record["prompt"] if isinstance(record["prompt"], str) else _last_user(record["prompt"])
        texts = [(_PROMPT_FIELD[format], prompt), (_RESPONSE_FIELD[format], record["reference"]),
                 ("rejected", record.get("rejected", [None])[0])]
        if not blanks.keep(where, texts):
            continue
        if record["reference"] is not None:  # one teacher response per prompt (several pairs may share it)
            earlier = answered.setdefault(record["prompt"], (record["reference"], where))
            if earlier[0] != record["reference"]:
                raise DataError(f"{where}: field {_PROMPT_FIELD[format]!r}: {str(prompt)[:60]!r} already has a different "
                                f"{_RESPONSE_FIELD[format]!r} at {earlier[1]}; keep one of the two records")
            if "rejected" in record and record["prompt"] in paired:  # another pair of the same prompt: one record
                rejected = paired[record["prompt"]]["rejected"]
                rejected += [r for r in record["rejected"] if r.strip() not in {x.strip() for x in rejected}]
                continue
        if "rejected" in record:
            paired[record["prompt"]] = record
        records.append((where, record))
    records = blanks.finish(records)
    return records if with_places else [r for _, r in records]


def _prompt_record(where: str, value) -> dict:
    check_fields(where, value, {"prompt": TEXT_OR_TURNS}, {"reference": str, "task": str}, choices={"task": TASKS})
    # TRL's prompt-only conversational form too: a list of turns
    return {"prompt": _given_prompt(where, value["prompt"]), "reference": value.get("reference"),
            "task": value.get("task", "text")}


def _gsm8k_record(where: str, value) -> dict:
    check_fields(where, value, {"question": str, "answer": str})
    return {"prompt": value["question"] + "\n", "reference": value["answer"], "task": "arithmetic"}


def _chat_record(where: str, value) -> dict:
    check_fields(where, value, {"messages": list})
    turns = _turns(where, "messages", value["messages"])
    if turns[-1][0] == "assistant":
        context, response = turns[:-1], turns[-1][1]
    else:
        context, response = turns, None
    return {"prompt": _prompt_of(where, "messages", context), "reference": response, "task": "text"}


def _completion_record(where: str, value) -> dict:
    check_fields(where, value, {"prompt": TEXT_OR_TURNS, "completion": TEXT_OR_TURNS})
    if "label" in value:  # TRL's unpaired (KTO) form: a completion labelled bad must not be taught
        raise DataError(f"{where}: field 'label': unpaired preference records (KTO's prompt, completion, label) are not "
                        "read; give pairs {\"prompt\", \"chosen\", \"rejected\"}, or good completions without a label")
    return {"prompt": _given_prompt(where, value["prompt"]), "reference": _answer(where, "completion", value["completion"]),
            "task": "text"}


def _preference_record(where: str, value) -> dict:
    check_fields(where, value, {"chosen": TEXT_OR_TURNS, "rejected": TEXT_OR_TURNS}, {"prompt": TEXT_OR_TURNS})
    chosen, rejected = value["chosen"], value["rejected"]
    if "prompt" in value:
        prompt = _given_prompt(where, value["prompt"])
    else:  # TRL's implicit prompt: the turns the two conversations share before their answers
        if not (isinstance(chosen, list) and isinstance(rejected, list)):
            raise DataError(f"{where}: missing field 'prompt' (without one, 'chosen' and 'rejected' must be "
                            "conversations that share their turns before the answer)")
        context, other = _turns(where, "chosen", chosen)[:-1], _turns(where, "rejected", rejected)[:-1]
        if context != other:
            raise DataError(f"{where}: missing field 'prompt', and 'chosen' and 'rejected' differ before their last turn")
        prompt = _prompt_of(where, "chosen", context)
        chosen, rejected = chosen[-1:], rejected[-1:]
    return {"prompt": prompt, "reference": _answer(where, "chosen", chosen), "task": "text",
            "rejected": [_answer(where, "rejected", rejected)]}


_READERS = {"prompt": _prompt_record, "gsm8k": _gsm8k_record, "chat": _chat_record, "completion": _completion_record,
            "preference": _preference_record}
_PROMPT_FIELD = {"prompt": "prompt", "gsm8k": "question", "chat": "messages", "completion": "prompt", "preference": "prompt"}
_RESPONSE_FIELD = {"prompt": "reference", "gsm8k": "answer", "chat": "messages", "completion": "completion",
                   "preference": "chosen"}


def _turns(where: str, field: str, messages: list) -> list[tuple[str, str]]:
    """``[(role, content), ...]`` of a list of chat messages, each checked."""
    if not messages:
        raise DataError(f"{where}: field {field!r} holds no messages")
    turns = []
    for index, message in enumerate(messages):
        place = f"{where}: field {field!r} entry {index}"
        if not isinstance(message, dict):
            raise DataError(f"{place}: a message must be an object with 'role' and 'content', got {kind_of(message)}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DataError(f"{place}: 'role' must be one of {', '.join(ROLES)}, got {role!r}")
        if isinstance(content, list):  # OpenAI-style content parts: only text ones
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise DataError(f"{place}: 'content' parts must all be text ({{\"type\": \"text\", \"text\": ...}})")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise DataError(f"{place}: 'content' must be str, got {kind_of(content)}")
        check_text(place, "content", content)
        turns.append((role, content))
    return turns


def _prompt_of(where: str, field: str, context: list[tuple[str, str]]):
    """The prompt of the turns before an answer: one user turn's text as it is, more turns a conversation."""
    if not any(role == "user" for role, _ in context):
        raise DataError(f"{where}: field {field!r}: no user turn before the answer")
    if len(context) == 1:
        return context[0][1]  # the same prompt as a plain-text record's
    return tuple(context)


def _given_prompt(where: str, prompt):
    return prompt if isinstance(prompt, str) else _prompt_of(where, "prompt", _turns(where, "prompt", prompt))


def _answer(where: str, field: str, value) -> str:
    """A response given as a text, or as turns that end with the assistant's (the answer; the turns before it repeat
    the prompt, as UltraFeedback's pairs do)."""
    if isinstance(value, str):
        return value
    turns = _turns(where, field, value)
    if turns[-1][0] != "assistant":
        raise DataError(f"{where}: field {field!r} must be a text or turns that end with the assistant's answer, got "
                        f"{len(turns)} turns ({', '.join(role for role, _ in turns)})")
    return turns[-1][1]


def _last_user(conversation) -> str:
    """The text a conversation asks (its last user turn): what must not be empty."""
    return next(content for role, content in reversed(conversation) if role == "user")
