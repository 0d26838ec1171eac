"""Load personalized preference records from JSONL, JSON, CSV, Parquet or a `datasets` directory.

Every format is read by a small generator yielding `(location, row)` pairs; one shared validator,
`_record_from_row`, turns each row into a `PreferenceRecord` or raises a one-line `DataError`.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prlhf.data.schema import DataError, Messages, PreferenceRecord, PromptLike

ROLES = ("system", "user", "assistant", "tool")
REQUIRED_FIELDS = ("user_id", "prompt", "chosen", "rejected")
SUPPORTED = ".jsonl, .json, .csv, .parquet, or a directory saved with datasets' save_to_disk (DIR or DIR::SPLIT)"

Rows = Iterator[tuple[str, Any]]


def load_records(path: str | os.PathLike) -> list[PreferenceRecord]:
    """Read and validate every record in `path`; raise `DataError` on the first problem."""
    source = os.fspath(path)
    records = [_record_from_row(source, location, row) for location, row in _rows(source)]
    if not records:
        raise DataError(source, "no records found; expected at least one (user_id, prompt, chosen, rejected) record")
    return records


# ----------------------------------------------------------------------------------------------------------
# Format readers


def _rows(source: str) -> Rows:
    """Pick the reader for `source` (a file path, a datasets directory, or `DIR::SPLIT`)."""
    base, split = source, None
    if "::" in source and not os.path.exists(source):
        base, split = source.rsplit("::", 1)
    if not os.path.exists(base):
        raise DataError(source, "file not found")
    if os.path.isdir(base):
        return _datasets_rows(source, base, split)
    if split is not None:
        raise DataError(source, "'::SPLIT' only applies to a directory saved with datasets' save_to_disk")
    suffix = Path(base).suffix.lower()
    reader = _READERS.get(suffix)
    if reader is None:
        raise DataError(source, f"unsupported format {suffix or '(no file extension)'!r}; supported: {SUPPORTED}")
    return reader(source, base)


def _jsonl_rows(source: str, path: str) -> Rows:
    """One JSON value per physical line; blank lines are skipped."""
    data = _strip_bom(Path(path).read_bytes())
    for number, raw in enumerate(data.split(b"\n"), start=1):
        location = f"line {number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(source, _utf8_message(raw, err.start), location) from None
        if not line.strip():
            continue
        try:
            yield location, json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(source, f"invalid JSON ({err.msg} at column {err.colno})", location) from None


def _json_rows(source: str, path: str) -> Rows:
    """A JSON array of objects (locations are `row N`), otherwise JSON lines."""
    data = _strip_bom(Path(path).read_bytes())
    text = _decode(source, data)
    try:
        document = json.loads(text)
    except json.JSONDecodeError as err:
        if text.lstrip().startswith("["):
            raise DataError(source, f"invalid JSON ({err.msg} at column {err.colno})", f"line {err.lineno}") from None
        # Not a single JSON document: most likely JSON lines, which reports the exact bad line.
        yield from _jsonl_rows(source, path)
        return
    if isinstance(document, list):
        for number, row in enumerate(document, start=1):
            yield f"row {number}", row
    elif isinstance(document, dict) and len([ln for ln in text.splitlines() if ln.strip()]) > 1:
        message = "expected a JSON array of objects or one JSON object per line, found one multi-line object"
        raise DataError(source, message)
    else:
        yield from _jsonl_rows(source, path)


def _csv_rows(source: str, path: str) -> Rows:
    """A header line naming the columns, then one record per row (quoted fields may span lines)."""
    text = _decode(source, _strip_bom(Path(path).read_bytes()))
    # Long responses easily exceed csv's default 128 KiB field limit.
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    start = 1  # physical line where the next row begins
    try:
        for fields in reader:
            location, start = f"line {start}", reader.line_num + 1
            if not fields or (len(fields) == 1 and not fields[0].strip()):
                continue
            if header is None:
                header = [name.strip() for name in fields]
                _check_csv_header(source, header)
                continue
            if len(fields) != len(header):
                message = f"expected {len(header)} fields (as in the header), found {len(fields)}"
                raise DataError(source, message, location)
            yield location, dict(zip(header, fields))
    except csv.Error as err:
        raise DataError(source, f"malformed CSV ({_one_line(str(err))})", f"line {reader.line_num}") from None


def _check_csv_header(source: str, header: list[str]) -> None:
    missing = [name for name in REQUIRED_FIELDS if name not in header]
    if missing:
        found = ", ".join(repr(name) for name in header)
        message = f"header is missing required column(s) {', '.join(map(repr, missing))} (found columns: {found})"
        raise DataError(source, _shorten(message, 200), "line 1")


def _parquet_rows(source: str, path: str) -> Rows:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(source, f"not a readable Parquet file ({_one_line(str(err))})") from None
    number = 0
    for batch in parquet.iter_batches():
        for row in batch.to_pylist():
            number += 1
            yield f"row {number}", row


def _datasets_rows(source: str, directory: str, split: str | None) -> Rows:
    """A `Dataset` or `DatasetDict` saved with `save_to_disk`; a DatasetDict defaults to split 'train'."""
    import datasets

    try:
        loaded = datasets.load_from_disk(directory)
    except FileNotFoundError:
        message = f"directory is not a dataset saved with datasets' save_to_disk; supported: {SUPPORTED}"
        raise DataError(source, message) from None
    if isinstance(loaded, datasets.DatasetDict):
        name = split or "train"
        if name not in loaded:
            available = ", ".join(repr(s) for s in loaded)
            hint = "" if split else " (no split given, so 'train' was used; pick one with DIR::SPLIT)"
            raise DataError(source, f"split {name!r} not found{hint}; available splits: {available}")
        loaded = loaded[name]
    elif split is not None:
        raise DataError(source, f"is a single Dataset, not a DatasetDict; drop '::{split}'")
    for number, row in enumerate(loaded, start=1):
        yield f"row {number}", row


_READERS: dict[str, Callable[[str, str], Rows]] = {
    ".jsonl": _jsonl_rows,
    ".json": _json_rows,
    ".csv": _csv_rows,
    ".parquet": _parquet_rows,
}


def _strip_bom(data: bytes) -> bytes:
    return data[3:] if data.startswith(b"\xef\xbb\xbf") else data


def _decode(source: str, data: bytes) -> str:
    """Decode a whole file, naming the line of the first invalid byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line_start = data.rfind(b"\n", 0, err.start) + 1
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(source, _utf8_message(data[line_start:], err.start - line_start), f"line {line}") from None


def _utf8_message(line: bytes, offset: int) -> str:
    return f"not valid UTF-8 (byte 0x{line[offset]:02x} at column {offset + 1}); save the file as UTF-8"


# ----------------------------------------------------------------------------------------------------------
# Row validation


@dataclass(frozen=True)
class _Where:
    """Where a row came from, so every check can raise a fully located error."""

    source: str
    location: str

    def error(self, field: str | None, message: str) -> DataError:
        return DataError(self.source, message, self.location, field)


def _record_from_row(source: str, location: str, row: Any) -> PreferenceRecord:
    """Validate one raw row (any format) and build the record; TRL's implicit-prompt format is split here."""
    where = _Where(source, location)
    if not isinstance(row, dict):
        expected = f"an object with fields {', '.join(REQUIRED_FIELDS)}"
        raise where.error(None, f"expected {expected}, found {_found(row)}")
    user_id = _user_id(where, row)
    if "prompt" in row:
        prompt = _text_or_messages(where, "prompt", row["prompt"])
        chosen = _text_or_messages(where, "chosen", _required(where, row, "chosen"))
        rejected = _text_or_messages(where, "rejected", _required(where, row, "rejected"))
        if isinstance(prompt, str):
            for name, value in (("chosen", chosen), ("rejected", rejected)):
                if isinstance(value, list):
                    message = "expected plain text because 'prompt' is plain text, found a list of messages"
                    raise where.error(name, message)
        _check_different(where, chosen, rejected)
    else:
        prompt, chosen, rejected = _implicit_prompt(where, row)
    return PreferenceRecord(user_id, prompt, chosen, rejected, _user_text(where, row))


def _required(where: _Where, row: dict, field: str) -> Any:
    if field not in row:
        found = ", ".join(repr(name) for name in row) or "none"
        raise where.error(field, _shorten(f"missing required field (found fields: {found})", 200))
    return row[field]


def _user_id(where: _Where, row: dict) -> str:
    value = _required(where, row, "user_id")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        hint = f'quote the id (e.g. "{value}") or store the column as strings'
        raise where.error("user_id", f"expected a string, found {_found(value)}; {hint}")
    if not isinstance(value, str):
        raise where.error("user_id", f"expected a string, found {_found(value)}")
    if not value.strip():
        raise where.error("user_id", f"expected a non-empty string, found {_found(value)}")
    return value


def _text_or_messages(where: _Where, field: str, value: Any) -> PromptLike:
    if isinstance(value, str):
        if not value.strip():
            raise where.error(field, f"expected non-empty text, found {_found(value)}")
        return value
    if isinstance(value, list):
        return _messages(where, field, value)
    raise where.error(field, f"expected a string or a list of {{role, content}} messages, found {_found(value)}")


def _messages(where: _Where, field: str, value: list) -> Messages:
    """Validate a conversation; None-valued keys (Arrow fills them in for absent struct fields) are dropped."""
    if not value:
        raise where.error(field, "expected a non-empty list of messages, found []")
    messages = []
    for number, message in enumerate(value, start=1):
        prefix = f"message {number}: "
        if not isinstance(message, dict):
            expected = "an object with 'role' and 'content'"
            raise where.error(field, f"{prefix}expected {expected}, found {_found(message)}")
        role, content = message.get("role"), message.get("content")
        if "from" in message and "role" not in message:
            found = "ShareGPT-style 'from'/'value'; rename them"
            raise where.error(field, f"{prefix}expected 'role'/'content' keys, found {found}")
        if not isinstance(role, str) or role not in ROLES:
            expected = f"'role' to be one of {', '.join(ROLES)}"
            raise where.error(field, f"{prefix}expected {expected}, found {_found(role)}")
        if not isinstance(content, str):
            raise where.error(field, f"{prefix}expected 'content' to be a string, found {_found(content)}")
        messages.append({key: item for key, item in message.items() if item is not None})
    if not any(message["content"].strip() for message in messages):
        raise where.error(field, "expected non-empty text, found only empty message contents")
    return messages


def _implicit_prompt(where: _Where, row: dict) -> tuple[Messages, Messages, Messages]:
    """TRL's implicit-prompt format: the prompt is the longest common prefix of the two conversations."""
    chosen = _text_or_messages(where, "chosen", _required(where, row, "chosen"))
    rejected = _text_or_messages(where, "rejected", _required(where, row, "rejected"))
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        found = ", ".join(repr(name) for name in row)
        message = (f"missing required field (found fields: {found}); without it, 'chosen' and 'rejected' "
                   "must be full conversations that share the prompt messages")
        raise where.error("prompt", _shorten(message, 240))
    _check_different(where, chosen, rejected)
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        message = "missing, and 'chosen' and 'rejected' share no leading messages to use as the prompt"
        raise where.error("prompt", message)
    for name, conversation in (("chosen", chosen), ("rejected", rejected)):
        if len(conversation) == shared:
            expected = f"at least one message after the {shared} prompt message(s) shared with the other response"
            raise where.error(name, f"expected {expected}, found none")
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _check_different(where: _Where, chosen: PromptLike, rejected: PromptLike) -> None:
    if _normalised(chosen) == _normalised(rejected):
        message = f"identical to 'chosen' ({_found(chosen)}); a preference pair needs two different responses"
        raise where.error("rejected", message)


def _normalised(value: PromptLike) -> object:
    if isinstance(value, str):
        return value.strip()
    return tuple((message["role"], message["content"].strip()) for message in value)


def _user_text(where: _Where, row: dict) -> str | None:
    value = row.get("user_text")
    if value is None:
        return None
    if not isinstance(value, str):
        raise where.error("user_text", f"expected a string or null, found {_found(value)}")
    return value if value.strip() else None


# ----------------------------------------------------------------------------------------------------------
# Message helpers

_TYPE_NAMES = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "object"}


def _found(value: Any) -> str:
    """A short, one-line description of a value for error messages, e.g. `integer 7` or `null`."""
    if value is None:
        return "null"
    name = _TYPE_NAMES.get(type(value), type(value).__name__)
    return f"{name} {_shorten(repr(value), 40)}"


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _one_line(text: str, limit: int = 160) -> str:
    return _shorten(" ".join(text.split()), limit)
