"""JSONL records: reading with file:line:field errors, and atomic writing."""

import json
import os
import tempfile
from contextlib import contextmanager
from typing import Iterable


class DataError(ValueError):
    """Bad input data; the message names the file, the line and the field."""


def read_jsonl(
    path: str, required: dict[str, type], optional: dict[str, type] | None = None, choices: dict | None = None
) -> list[dict]:
    """Read a JSONL file, checking each line's fields, types and, for fields in ``choices``, values.

    Raises:
        DataError: on a missing file, an empty file, bad JSON, a missing field or a wrong type.
    """
    optional = optional or {}
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    records = []
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{line_no}: invalid JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
            for field, kind in {**required, **optional}.items():
                if field not in record:
                    if field in required:
                        raise DataError(f"{path}:{line_no}: missing field {field!r}")
                    continue
                if not isinstance(record[field], kind):
                    raise DataError(
                        f"{path}:{line_no}: field {field!r} must be {kind.__name__}, got {type(record[field]).__name__}"
                    )
            for field, allowed in (choices or {}).items():
                if field in record and record[field] not in allowed:
                    raise DataError(f"{path}:{line_no}: field {field!r} must be one of {sorted(allowed)}, got {record[field]!r}")
            records.append(record)
    if not records:
        raise DataError(f"{path}: no records (the file is empty)")
    return records


def read_prompts(path: str) -> list[dict]:
    """Prompt records ``{"prompt", "reference"?, "task"?}``; GSM8K's ``{"question", "answer"}`` is accepted too."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    with open(path, encoding="utf-8") as handle:
        first = next((line for line in handle if line.strip()), "")
    if '"question"' in first and '"prompt"' not in first:
        rows = read_jsonl(path, {"question": str, "answer": str})
        return [{"prompt": r["question"] + "\n", "reference": r["answer"], "task": "arithmetic"} for r in rows]
    from pbkd_lightning.tasks import TASKS  # here, not at the top: tasks import torchmetrics, records stay light

    rows = read_jsonl(path, {"prompt": str}, {"reference": str, "task": str}, choices={"task": TASKS})
    return [{"prompt": r["prompt"], "reference": r.get("reference"), "task": r.get("task", "text")} for r in rows]


def read_responses(path: str) -> dict[str, str]:
    """Teacher responses ``{"prompt", "teacher"}`` (``"response"`` also accepted), keyed by prompt."""
    rows = read_jsonl(path, {"prompt": str}, {"teacher": str, "response": str})
    responses = {}
    for line_no, row in enumerate(rows, start=1):
        text = row.get("teacher", row.get("response"))
        if text is None:
            raise DataError(f"{path}: record {line_no}: missing field 'teacher'")
        responses[row["prompt"]] = text
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


def write_jsonl_atomic(path: str, records: Iterable[dict]) -> None:
    """Write JSONL through :func:`atomic_output`, flushed to disk before the rename."""
    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
