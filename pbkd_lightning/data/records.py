"""Records: read from JSONL, Parquet or a `datasets` folder with file:line:field errors, and written atomically."""

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


def kind_of(value) -> str:
    return "null" if value is None else type(value).__name__


def _is_blank(value) -> bool:
    return isinstance(value, str) and not value.strip()


def _warn_dropped(path: str, blank: list, dropped: Optional[list]) -> None:
    if dropped is not None:
        dropped.extend(blank)
    elif blank:
        warnings.warn(f"{path}: dropped {len(blank)} records with an empty field ({', '.join(blank[:3])}"
                      f"{', ...' if len(blank) > 3 else ''})")


def _jsonl_values(path: str) -> list[tuple[str, object]]:
    """``(place, value)`` of each non-blank line of a JSONL file, the place ``path:line``."""
    values = []
    for line_no, line in _text_lines(path):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            values.append((where, json.loads(line)))
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: invalid JSON ({error.msg})") from None
        except RecursionError:
            raise DataError(f"{where}: invalid JSON (nested too deeply)") from None
        except ValueError as error:  # e.g. an integer over Python's digit limit
            raise DataError(f"{where}: invalid JSON ({error})") from None
    return values


def is_table(path: str) -> bool:
    """A Parquet file or a folder saved by ``datasets`` (read through ``datasets``), not a JSONL file."""
    return os.path.isdir(path) or path.lower().endswith(".parquet")


def _table_values(path: str) -> list[tuple[str, dict]]:
    """``(place, row)`` of a Parquet file or a ``datasets`` folder (``save_to_disk``), the place ``path:row n``.

    A column-oriented file has every column in every row, so a null is read as a field the row does not have.
    """
    import datasets  # here: the heavy import only when a table is read

    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory(prefix="pbkd-datasets-") as cache:  # datasets' own cache: nothing left behind
        try:
            if os.path.isdir(path):
                table = datasets.load_from_disk(path, keep_in_memory=True)
            elif not os.path.isfile(path):
                raise DataError(f"{path}: file not found")
            else:
                table = datasets.Dataset.from_parquet(path, keep_in_memory=True, cache_dir=cache)
        except DataError:
            raise
        except FileNotFoundError:
            raise DataError(f"{path}: a folder, but not a JSONL file nor one `datasets` saved with save_to_disk "
                            "(no dataset_info.json, state.json)") from None
        except Exception as error:  # pyarrow's errors for a file that is not Parquet (ArrowInvalid, OSError, ...)
            what = "a `datasets` folder that cannot be read" if os.path.isdir(path) else "not a readable Parquet file"
            raise DataError(f"{path}: {what} ({type(error).__name__}: {' '.join(str(error).split())[:200]})") from None
        if isinstance(table, datasets.DatasetDict):
            if not table:
                raise DataError(f"{path}: no records (a DatasetDict without splits)")
            if len(table) != 1:
                raise DataError(f"{path}: a DatasetDict with the splits {', '.join(table)}; name one of them as the "
                                f"file, e.g. {os.path.join(path, next(iter(table)))}")
            table = next(iter(table.values()))
        return [(f"{path}:row {n}", {k: v for k, v in row.items() if v is not None})
                for n, row in enumerate(table.to_list(), start=1)]


def read_values(path: str) -> list[tuple[str, object]]:
    """``(place, value)`` of every record of a JSONL file, a Parquet file or a ``datasets`` folder."""
    return _table_values(path) if is_table(path) else _jsonl_values(path)


def check_fields(where: str, record, required: dict, optional: dict | None = None, choices: dict | None = None) -> None:
    """Raise :class:`DataError` naming ``where`` and the field unless ``record`` is an object whose fields have their
    types (a tuple of types allowed) and, for fields in ``choices``, one of their values."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {kind_of(record)}")
    for field, kind in {**required, **(optional or {})}.items():
        if field not in record:
            if field in required:
                raise DataError(f"{where}: missing field {field!r}")
            continue
        value, kinds = record[field], kind if isinstance(kind, tuple) else (kind,)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            names = " or ".join("list" if k is list else k.__name__ for k in kinds)
            raise DataError(f"{where}: field {field!r} must be {names}, got {kind_of(value)}")
        if isinstance(value, str):
            check_text(where, field, value)
    for field, allowed in (choices or {}).items():
        if field in record and record[field] not in allowed:
            raise DataError(f"{where}: field {field!r} must be one of {sorted(allowed)}, got {record[field]!r}")


def check_text(where: str, field: str, value: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise DataError(f"{where}: field {field!r} holds an unpaired surrogate escape "
                        f"(\\u{ord(value[error.start]):04x}), which is not text") from None


class EmptyFields:
    """What to do with records whose text fields are empty or whitespace: stop naming the first (``error``), or leave
    them out (``drop``) and say how many once (:meth:`finish`)."""

    def __init__(self, path: str, empty: EmptyPolicy = "error", dropped: Optional[list] = None):
        self.path, self.empty, self.dropped, self.blank = path, empty, dropped, []

    def keep(self, where: str, fields: Iterable[tuple[str, object]]) -> bool:
        """False when one of ``fields`` (``(name, value)`` pairs) is blank and the record is dropped; raises under
        ``error``."""
        field = next((f for f, value in fields if _is_blank(value)), None)
        if field is None:
            return True
        if self.empty != "drop":
            raise DataError(f"{where}: field {field!r} is empty; fill it in, remove the line, or set "
                            "`data.empty: drop` to skip such records")
        self.blank.append(f"{where}:{field}")
        return False

    def finish(self, records: list) -> list:
        """``records``, checked not to be none; the dropped ones counted."""
        _warn_dropped(self.path, self.blank, self.dropped)
        if not records:
            if self.blank:
                raise DataError(f"{self.path}: no records left: all {len(self.blank)} have an empty field "
                                f"({self.blank[0]}, ...)")
            raise DataError(f"{self.path}: no records (the file is empty)")
        return records


def read_rows(
    path: str,
    required: dict[str, type],
    optional: dict[str, type] | None = None,
    choices: dict | None = None,
    nonempty: Iterable[str] = (),
    empty: EmptyPolicy = "error",
    dropped: Optional[list] = None,
    check: Optional[Callable[[dict], Optional[str]]] = None,
) -> list[tuple[str, dict]]:
    """:func:`read_jsonl`, each record with its place (``path:line``, or ``path:row n`` in a table):
    ``[(place, record), ...]``."""
    records, blanks = [], EmptyFields(path, empty, dropped)
    for where, record in read_values(path):
        check_fields(where, record, required, optional, choices)
        if check is not None:
            problem = check(record)
            if problem:
                raise DataError(f"{where}: {problem}")
        if blanks.keep(where, [(f, record.get(f)) for f in nonempty]):
            records.append((where, record))
    return blanks.finish(records)


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
    """Read a JSONL file (or a Parquet file, or a ``datasets`` folder), checking each record's fields, types and,
    for fields in ``choices``, values.

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
    return [r for _, r in read_rows(path, required, optional, choices, nonempty, empty, dropped, check)]


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

    rows = read_rows(path, {"prompt": str}, {"teacher": str, "response": str}, check=check,
                     nonempty=("prompt", "teacher", "response"), empty=empty, dropped=dropped)
    responses, places = {}, {}
    for where, row in rows:
        text, prompt = row.get("teacher", row.get("response")), row["prompt"]
        if prompt in responses and responses[prompt] != text:
            raise DataError(f"{where}: field 'prompt': {prompt[:60]!r} already has a different teacher response "
                            f"at {places[prompt]}; keep one of the two lines")
        responses.setdefault(prompt, text)
        places.setdefault(prompt, where)
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
