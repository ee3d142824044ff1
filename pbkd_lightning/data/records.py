"""JSONL records: reading with file:line:field errors, and atomic writing."""

import glob
import json
import os
import tempfile
import warnings
from contextlib import contextmanager
from typing import Callable, Iterable, Literal, Optional

EmptyPolicy = Literal["error", "drop"]
_BOM = "\ufeff"


class DataError(ValueError):
    """Bad input data; the message names the file, the line and the field."""


def _text_lines(path: str) -> Iterable[tuple[int, str]]:
    """``(line number, text)`` of a UTF-8 file (a leading byte-order mark allowed; LF, CRLF or CR line ends).

    Raises:
        DataError: on a missing file, or one that is not UTF-8 text (UTF-16, binary data), naming the line.
    """
    if os.path.isdir(path):
        raise DataError(f"{path}: a folder, not a JSONL file")
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as error:
        raise DataError(f"{path}: cannot be read ({error.strerror or error})") from None
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(f"{path}: not UTF-8 text: the file is UTF-16 (as some Windows tools save it); save it as UTF-8")
    if data.startswith(b"\x1f\x8b"):
        raise DataError(f"{path}: not UTF-8 text: the file is gzip-compressed; decompress it first")
    # A JSON string never holds a raw CR or LF, so splitting at every ASCII line end is safe.
    for line_no, raw in enumerate(data.splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise DataError(
                f"{path}:{line_no}: not UTF-8 text (byte 0x{raw[error.start]:02x} at column {error.start + 1}); "
                "save the file as UTF-8"
            ) from None
        if "\x00" in line:
            raise DataError(f"{path}:{line_no}: not UTF-8 text (a NUL byte: UTF-16 without a byte-order mark, or "
                            "binary data); save the file as UTF-8")
        yield line_no, line.lstrip(_BOM)  # an editor's byte-order mark (also at the start of a concatenated file)


def _kind(value) -> str:
    return "null" if value is None else type(value).__name__


def _is_blank(value) -> bool:
    return isinstance(value, str) and not value.strip()


def _warn_dropped(path: str, blank: list, dropped: Optional[list]) -> None:
    if dropped is not None:
        dropped.extend(blank)
    elif blank:
        warnings.warn(f"{path}: dropped {len(blank)} records with an empty field ({', '.join(blank[:3])}"
                      f"{', ...' if len(blank) > 3 else ''})")


def read_jsonl_lines(
    path: str,
    required: dict[str, type],
    optional: dict[str, type] | None = None,
    choices: dict | None = None,
    nonempty: Iterable[str] = (),
    empty: EmptyPolicy = "error",
    dropped: Optional[list] = None,
    check: Optional[Callable[[dict], Optional[str]]] = None,
) -> list[tuple[int, dict]]:
    """:func:`read_jsonl`, each record with its line number: ``[(line, record), ...]``."""
    optional = optional or {}
    fields = {**required, **optional}
    records, blank = [], []
    for line_no, line in _text_lines(path):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: invalid JSON ({error.msg})") from None
        except RecursionError:
            raise DataError(f"{where}: invalid JSON (nested too deeply)") from None
        except ValueError as error:  # e.g. an integer over Python's digit limit
            raise DataError(f"{where}: invalid JSON ({error})") from None
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {_kind(record)}")
        for field, kind in fields.items():
            if field not in record:
                if field in required:
                    raise DataError(f"{where}: missing field {field!r}")
                continue
            value = record[field]
            if not isinstance(value, kind) or (kind in (int, float) and isinstance(value, bool)):
                raise DataError(f"{where}: field {field!r} must be {kind.__name__}, got {_kind(value)}")
            if isinstance(value, str):
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError as error:
                    raise DataError(f"{where}: field {field!r} holds an unpaired surrogate escape "
                                    f"(\\u{ord(value[error.start]):04x}), which is not text") from None
        for field, allowed in (choices or {}).items():
            if field in record and record[field] not in allowed:
                raise DataError(f"{where}: field {field!r} must be one of {sorted(allowed)}, got {record[field]!r}")
        if check is not None:
            problem = check(record)
            if problem:
                raise DataError(f"{where}: {problem}")
        empty_field = next((f for f in nonempty if _is_blank(record.get(f))), None)
        if empty_field is not None:
            if empty != "drop":
                raise DataError(f"{where}: field {empty_field!r} is empty; fill it in, remove the line, or set "
                                "`data.empty: drop` to skip such records")
            blank.append(f"{where}:{empty_field}")
            continue
        records.append((line_no, record))
    _warn_dropped(path, blank, dropped)
    if not records:
        if blank:
            raise DataError(f"{path}: no records left: all {len(blank)} have an empty field ({blank[0]}, ...)")
        raise DataError(f"{path}: no records (the file is empty)")
    return records


def read_jsonl(
    path: str,
    required: dict[str, type],
    optional: dict[str, type] | None = None,
    choices: dict | None = None,
    nonempty: Iterable[str] = (),
    empty: EmptyPolicy = "error",
    dropped: Optional[list] = None,
    check: Optional[Callable[[dict], Optional[str]]] = None,
) -> list[dict]:
    """Read a JSONL file, checking each line's fields, types and, for fields in ``choices``, values.

    UTF-8 (a leading byte-order mark allowed), LF or CRLF line ends; blank lines are skipped.

    Args:
        nonempty: string fields that must hold more than whitespace.
        empty: a record with such a field empty: ``error``, or ``drop`` it (its ``path:line:field`` appended to
            ``dropped``; with no ``dropped`` list, one warning per file says how many).
        check: ``check(record)`` returns a problem (named with the file and line) or None.

    Raises:
        DataError: on a missing file, a file that is not UTF-8 text, an empty file, bad JSON, a missing field, a
            wrong type, an empty field (unless dropped) or a problem ``check`` finds, naming file:line and field.
    """
    return [r for _, r in read_jsonl_lines(path, required, optional, choices, nonempty, empty, dropped, check)]


def _first_record(path: str) -> Optional[dict]:
    for _, line in _text_lines(path):
        if line.strip():
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):
                return None
            return record if isinstance(record, dict) else None
    return None


def read_prompts(path: str, empty: EmptyPolicy = "error", dropped: Optional[list] = None,
                 with_lines: bool = False) -> list:
    """Prompt records ``{"prompt", "reference"?, "task"?}``; GSM8K's ``{"question", "answer"}`` is accepted too.

    The prompt (``question``) and a given reference (``answer``) must not be empty or whitespace: ``empty``,
    ``dropped`` as in :func:`read_jsonl`. ``with_lines``: ``[(line, record), ...]``.
    """
    first = _first_record(path)
    if first is not None and "question" in first and "prompt" not in first:
        rows = read_jsonl_lines(path, {"question": str, "answer": str}, nonempty=("question", "answer"), empty=empty,
                                dropped=dropped)
        records = [(n, {"prompt": r["question"] + "\n", "reference": r["answer"], "task": "arithmetic"}) for n, r in rows]
    else:
        from pbkd_lightning.tasks import TASKS  # here, not at the top: tasks import torchmetrics, records stay light

        rows = read_jsonl_lines(path, {"prompt": str}, {"reference": str, "task": str}, choices={"task": TASKS},
                                nonempty=("prompt", "reference"), empty=empty, dropped=dropped)
        records = [(n, {"prompt": r["prompt"], "reference": r.get("reference"), "task": r.get("task", "text")})
                   for n, r in rows]
    return records if with_lines else [r for _, r in records]


def read_responses(path: str, empty: EmptyPolicy = "error", dropped: Optional[list] = None,
                   empty_prompts: Optional[set] = None) -> dict[str, str]:
    """Teacher responses ``{"prompt", "teacher"}`` (``"response"`` also accepted), keyed by prompt.

    An empty or whitespace prompt or response is an error, or with ``empty="drop"`` left out (its ``path:line:field``
    appended to ``dropped``, and, for an empty response, its prompt added to ``empty_prompts``). A prompt given twice
    with different responses is an error naming both lines; the same response twice is kept once.
    """
    unanswered = set()

    def check(record: dict) -> Optional[str]:
        if "teacher" not in record and "response" not in record:
            return "missing field 'teacher' (or 'response')"
        if "teacher" in record and "response" in record and record["teacher"] != record["response"]:
            return "fields 'teacher' and 'response' differ; give one"
        if _is_blank(record.get("teacher", record.get("response"))):
            unanswered.add(record["prompt"])
        return None

    rows = read_jsonl_lines(path, {"prompt": str}, {"teacher": str, "response": str}, check=check,
                            nonempty=("prompt", "teacher", "response"), empty=empty, dropped=dropped)
    responses, lines = {}, {}
    for line_no, row in rows:
        text, prompt = row.get("teacher", row.get("response")), row["prompt"]
        if prompt in responses and responses[prompt] != text:
            raise DataError(f"{path}:{line_no}: field 'prompt': {prompt[:60]!r} already has a different teacher response "
                            f"at {path}:{lines[prompt]}; keep one of the two lines")
        responses.setdefault(prompt, text)
        lines.setdefault(prompt, line_no)
    if empty_prompts is not None:
        empty_prompts.update(unanswered - set(responses))  # only empty responses: the data module drops the prompt
    return responses


@contextmanager
def atomic_output(path: str):
    """Yield a temporary path in ``path``'s folder; on success it is renamed to ``path``, on any
    error removed. A crash never leaves half a file under the final name."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp makes it private; these are ordinary outputs
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def remove_partial_outputs(folder: str) -> int:
    """Delete what :func:`atomic_output` left in ``folder`` when a process was killed mid-write (its ``.tmp-*``
    files: never read, as nothing looks under those names); returns how many. Call only where no other writer runs."""
    partial = glob.glob(os.path.join(glob.escape(folder), ".tmp-*"))
    for path in partial:
        os.unlink(path)
    return len(partial)


def write_jsonl_atomic(path: str, records: Iterable[dict]) -> None:
    """Write JSONL through :func:`atomic_output`, flushed to disk before the rename."""
    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
