"""Owns what a training dataset file may contain: detects its format and validates it from a byte stream."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import IO, Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

FileFormat = Literal["csv", "jsonl", "json", "parquet"]
DatasetKind = Literal["prompt_completion", "messages", "text"]

_EXTENSION_FORMATS: dict[str, FileFormat] = {
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".pq": "parquet",
}
SUPPORTED_EXTENSIONS: frozenset[str] = frozenset(_EXTENSION_FORMATS)
_MIME_FORMATS: dict[str, FileFormat] = {
    "text/csv": "csv",
    "application/jsonl": "jsonl",
    "application/x-ndjson": "jsonl",
    "application/x-jsonlines": "jsonl",
    "application/json": "json",
    "application/vnd.apache.parquet": "parquet",
    "application/x-parquet": "parquet",
}
_CONTENT_FORMATS: dict[bytes, FileFormat] = {b"[": "json", b"{": "jsonl"}  # by first non-space byte

MESSAGE_ROLES = ("system", "user", "assistant", "tool")
_SPLIT_NAMES = {
    "train": "train",
    "evaluation": "evaluation",
    "eval": "evaluation",
    "validation": "evaluation",
    "test": "evaluation",
}
_EXPECTED_COLUMNS = (
    "expected 'prompt' and 'completion' (instruction tuning), 'messages' (chat), "
    "or 'text' (continued pretraining)"
)

# Small uploads stay in memory; anything larger spills to a temporary file on disk.
_SPOOL_MAX_BYTES = 4 * 1024 * 1024
_SNIFF_BYTES = 64 * 1024
_PARQUET_MAGIC = b"PAR1"
_UTF8_BOM = b"\xef\xbb\xbf"
_PREVIEW_MAX_CHARS = 500
_LISTED_ROWS = 5  # how many offending rows an error message names before summarising
_PARQUET_BATCH_ROWS = 1024


class DatasetFormatError(ValueError):
    """The file cannot be trained on; the message says where and how to fix it."""


@dataclass(frozen=True)
class DatasetProfile:
    file_format: FileFormat
    format: DatasetKind
    row_count: int
    columns: list[str]
    split_counts: dict[str, int]
    preview: list[dict[str, Any]]
    size_bytes: int
    sha256: str


def profile_dataset(
    chunks: Iterable[bytes], file_name: str, *, preview_rows: int = 5, mime_type: str | None = None
) -> DatasetProfile:
    """Validate a dataset streamed as byte chunks and describe it; raises DatasetFormatError."""
    name = PurePosixPath(file_name or "dataset").name
    with tempfile.SpooledTemporaryFile(max_size=_SPOOL_MAX_BYTES) as spool:
        size, sha256, blank = _spool(chunks, spool)
        if size == 0:
            raise DatasetFormatError(f"{name} is empty (0 bytes); upload a file with data rows")
        if blank:
            raise DatasetFormatError(f"{name} is empty: it holds only whitespace")
        file_format = _detect_file_format(spool, name, mime_type)
        checker = _RowChecker(preview_rows)
        for where, values in _READERS[file_format](spool, name):
            checker.add(where, values)
        return checker.finish(name, file_format, size, sha256)


def read_rows(
    chunks: Iterable[bytes], file_name: str, *, mime_type: str | None = None
) -> list[dict[str, Any]]:
    """The rows of a file `profile_dataset` accepted, read with the very same format detection."""
    return list(iter_rows(chunks, file_name, mime_type=mime_type))


def iter_rows(
    chunks: Iterable[bytes], file_name: str, *, mime_type: str | None = None
) -> Iterator[dict[str, Any]]:
    """`read_rows` one row at a time, for callers that need not hold a large file's rows at once."""
    name = PurePosixPath(file_name or "dataset").name
    with tempfile.SpooledTemporaryFile(max_size=_SPOOL_MAX_BYTES) as spool:
        _spool(chunks, spool)
        file_format = _detect_file_format(spool, name, mime_type)
        for _, values in _READERS[file_format](spool, name):
            yield values


def _spool(chunks: Iterable[bytes], spool: IO[bytes]) -> tuple[int, str, bool]:
    digest = hashlib.sha256()
    size = 0
    blank = True
    for chunk in chunks:
        digest.update(chunk)
        spool.write(chunk)
        size += len(chunk)
        blank = blank and not chunk.strip()
    return size, digest.hexdigest(), blank


def _detect_file_format(spool: IO[bytes], name: str, mime_type: str | None) -> FileFormat:
    spool.seek(0)
    head = spool.read(_SNIFF_BYTES)
    spool.seek(0)
    if head.startswith(_PARQUET_MAGIC):  # unambiguous, whatever the file is called
        return "parquet"
    by_name = _EXTENSION_FORMATS.get(PurePosixPath(name).suffix.lower())
    by_mime = _MIME_FORMATS.get((mime_type or "").split(";")[0].strip().lower())
    first = head.removeprefix(_UTF8_BOM).lstrip()[:1]
    by_content = _CONTENT_FORMATS.get(first, "csv")
    file_format = by_name or by_mime or by_content
    # JSON Lines saved as .json is common; one object per line reads correctly as JSONL.
    if file_format == "json" and first == b"{" and _first_line_is_object(spool):
        return "jsonl"
    return file_format


def _first_line_is_object(spool: IO[bytes]) -> bool:
    try:
        for raw in spool:
            if raw.strip():
                return isinstance(json.loads(raw.removeprefix(_UTF8_BOM)), dict)
        return False
    except (ValueError, UnicodeDecodeError):
        return False
    finally:
        spool.seek(0)


# --- readers: each yields (where, row) with `where` naming the row as the user sees it ---------

Row = tuple[str, dict[str, Any]]


def _decoded_lines(spool: IO[bytes], name: str) -> Iterator[tuple[int, str]]:
    """Decode line by line so memory stays flat and a bad byte is reported with its position."""
    offset = 0
    for line_no, raw in enumerate(spool, start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DatasetFormatError(
                f"{name} is not UTF-8 text: byte 0x{raw[exc.start]:02x} at offset {offset + exc.start} "
                f"(line {line_no}) cannot be decoded; re-save the file as UTF-8"
            ) from None
        offset += len(raw)
        yield line_no, text.removeprefix("\ufeff") if line_no == 1 else text


def _read_csv(spool: IO[bytes], name: str) -> Iterator[Row]:
    reader = csv.reader((text for _, text in _decoded_lines(spool, name)), strict=True)
    header: list[str] | None = None
    data_rows, record_end = 0, 0
    try:
        for record in reader:
            record_start, record_end = record_end + 1, reader.line_num
            if not record:  # blank line
                continue
            if header is None:
                header = _csv_header(record)
                continue
            if len(record) != len(header):
                raise DatasetFormatError(
                    f"row {data_rows + 1} (line {record_start}) has {len(record)} fields but the header "
                    f"has {len(header)}; quote fields that contain commas, quotes or line breaks"
                )
            data_rows += 1
            yield f"row {data_rows} (line {record_start})", dict(zip(header, record, strict=True))
    except csv.Error as exc:
        # The bad record starts after the last good one; an unclosed quote runs on to the end.
        start = record_end + 1
        span = f"line {start}" if reader.line_num <= start else f"lines {start}-{reader.line_num}"
        raise DatasetFormatError(f"{span}: unreadable CSV: {_csv_problem(str(exc))}") from None


def _csv_problem(reason: str) -> str:
    """The csv module's reason, restated as what to change in the file."""
    if "field limit" in reason:
        return "a field is over 131072 characters; use JSONL or Parquet for long texts"
    if "new-line character" in reason:
        return "a bare carriage return (\\r) inside a field; save the file with \\n or \\r\\n line endings"
    return f'{reason}; check for an unclosed or stray double quote (quotes inside a field are doubled: "")'


def _csv_header(record: list[str]) -> list[str]:
    header = [column.strip() for column in record]
    for column in header:
        if column and header.count(column) > 1:
            raise DatasetFormatError(f"the CSV header names column {column!r} more than once")
    return header


def _read_jsonl(spool: IO[bytes], name: str) -> Iterator[Row]:
    for line_no, text in _decoded_lines(spool, name):
        if not text.strip():
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DatasetFormatError(
                f"line {line_no}: invalid JSON: {exc.msg} (column {exc.colno}); "
                "each line must be one complete JSON object"
            ) from None
        if not isinstance(value, dict):
            raise DatasetFormatError(
                f'line {line_no}: expected a JSON object like {{"prompt": ..., "completion": ...}}, '
                f"found {_json_type(value)}"
            )
        yield f"line {line_no}", value


def _read_json(spool: IO[bytes], name: str) -> Iterator[Row]:
    raw = spool.read()
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        line_no = raw.count(b"\n", 0, exc.start) + 1
        raise DatasetFormatError(
            f"{name} is not UTF-8 text: byte 0x{raw[exc.start]:02x} at offset {exc.start} "
            f"(line {line_no}) cannot be decoded; re-save the file as UTF-8"
        ) from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetFormatError(
            f"{name}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from None
    if not isinstance(document, list):
        raise DatasetFormatError(
            f"{name} holds {_json_type(document)}, not an array of objects; use "
            '[{"prompt": ..., "completion": ...}, ...] or one object per line in a .jsonl file'
        )
    for index, value in enumerate(document, start=1):
        if not isinstance(value, dict):
            raise DatasetFormatError(f"row {index}: expected a JSON object, found {_json_type(value)}")
        yield f"row {index}", value


def _read_parquet(spool: IO[bytes], name: str) -> Iterator[Row]:
    index = 0
    try:
        for batch in pq.ParquetFile(spool).iter_batches(batch_size=_PARQUET_BATCH_ROWS):
            for values in batch.to_pylist():
                index += 1
                yield f"row {index}", values
    except (pa.ArrowException, OSError) as exc:
        raise DatasetFormatError(
            f"{name} is not a readable Parquet file ({exc}); "
            "re-export it, e.g. with pandas.DataFrame.to_parquet"
        ) from None


_READERS: dict[FileFormat, Callable[[IO[bytes], str], Iterator[Row]]] = {
    "csv": _read_csv,
    "jsonl": _read_jsonl,
    "json": _read_json,
    "parquet": _read_parquet,
}


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array"}
    return names.get(type(value), "an object" if isinstance(value, dict) else type(value).__name__)


# --- row checks --------------------------------------------------------------------------------


_Problem = tuple[str, str]  # (what is wrong, how to fix it)


@dataclass
class _Offenders:
    """Rows sharing one fixable problem, reported together so one re-upload fixes them all."""

    count: int = 0
    where: list[str] = field(default_factory=list)

    def add(self, where: str) -> None:
        self.count += 1
        if len(self.where) < _LISTED_ROWS:
            self.where.append(where)

    def describe(self, problem: _Problem) -> str:
        what, fix = problem
        more = f", and {self.count - len(self.where)} more" if self.count > len(self.where) else ""
        rows = "1 row has" if self.count == 1 else f"{self.count} rows have"
        return f"{rows} {what} ({', '.join(self.where)}{more}); {fix}"


_EMPTY_COMPLETION = ("an empty 'completion'", "every row needs the target output the model should learn")
_EMPTY_TEXT = ("an empty 'text'", "remove those rows or fill them in")
_NO_ASSISTANT = ("no assistant turn in 'messages'", "the assistant turns are what the model learns")


class _RowChecker:
    """Folds rows into a profile; the first row decides the dataset kind."""

    def __init__(self, preview_rows: int) -> None:
        self._preview_rows = preview_rows
        self.kind: DatasetKind | None = None
        self.has_split = False
        self.columns: dict[str, None] = {}  # ordered union of keys seen
        self.row_count = 0
        self.split_counts = {"train": 0, "evaluation": 0}
        self.preview: list[dict[str, Any]] = []
        self.offenders: dict[_Problem, _Offenders] = {}

    def add(self, where: str, values: dict[str, Any]) -> None:
        if self.kind is None:
            self.kind = _detect_kind(list(values))
            self.has_split = "split" in values
        self.columns.update(dict.fromkeys(values))
        self.row_count += 1
        problem = _ROW_CHECKS[self.kind](where, values)
        if problem:
            self.offenders.setdefault(problem, _Offenders()).add(where)
        self.split_counts[_split_of(where, values.get("split")) if self.has_split else "train"] += 1
        if len(self.preview) < self._preview_rows:
            self.preview.append({str(key): _previewable(value) for key, value in values.items()})

    def finish(self, name: str, file_format: FileFormat, size: int, sha256: str) -> DatasetProfile:
        if self.kind is None:
            raise DatasetFormatError(f"{name} is empty: it has no data rows")
        if self.offenders:
            raise DatasetFormatError("; ".join(o.describe(p) for p, o in self.offenders.items()))
        if self.split_counts["train"] == 0:
            raise DatasetFormatError("no row has split 'train'; at least one training row is needed")
        return DatasetProfile(
            file_format=file_format,
            format=self.kind,
            row_count=self.row_count,
            columns=list(self.columns),
            split_counts={split: n for split, n in self.split_counts.items() if n or split == "train"},
            preview=self.preview,
            size_bytes=size,
            sha256=sha256,
        )


def _detect_kind(columns: list[str]) -> DatasetKind:
    present = set(columns)
    if {"prompt", "completion"} <= present:
        return "prompt_completion"
    if "messages" in present:
        return "messages"
    if "text" in present:
        return "text"
    for have, lacking in (("prompt", "completion"), ("completion", "prompt")):
        if have in present:
            raise DatasetFormatError(
                f"found columns {columns}: there is a {have!r} column but no {lacking!r} column; "
                f"instruction tuning needs both 'prompt' and 'completion'"
            )
    hint = ""
    if {"prompt", "completion", "messages", "text"} & {c.strip().lower() for c in columns}:
        hint = " (column names are case-sensitive: use lower case)"
    raise DatasetFormatError(f"found columns {columns}; {_EXPECTED_COLUMNS}{hint}")


def _string_field(where: str, values: dict[str, Any], column: str) -> str:
    value = values.get(column)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DatasetFormatError(f"{where}: {column!r} must be a string, found {_json_type(value)}")
    return value


def _check_prompt_completion(where: str, values: dict[str, Any]) -> _Problem | None:
    _string_field(where, values, "prompt")  # an empty prompt is allowed: unconditional generation
    return None if _string_field(where, values, "completion").strip() else _EMPTY_COMPLETION


def _check_text(where: str, values: dict[str, Any]) -> _Problem | None:
    return None if _string_field(where, values, "text").strip() else _EMPTY_TEXT


def _check_messages(where: str, values: dict[str, Any]) -> _Problem | None:
    messages = parse_messages(where, values.get("messages"))
    return None if any(m["role"] == "assistant" for m in messages) else _NO_ASSISTANT


_ROW_CHECKS: dict[DatasetKind, Callable[[str, dict[str, Any]], _Problem | None]] = {
    "prompt_completion": _check_prompt_completion,
    "messages": _check_messages,
    "text": _check_text,
}


def parse_messages(where: str, value: object) -> list[dict[str, Any]]:
    """A row's `messages` as a list of {role, content}; CSV cells hold it as a JSON string."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise DatasetFormatError(
                f"{where}: 'messages' is not valid JSON ({exc.msg}, column {exc.colno}); "
                'it must be a JSON list like [{"role": "user", "content": "..."}, ...]'
            ) from None
    if not isinstance(value, list) or not value:
        found = "an empty list" if isinstance(value, list) else _json_type(value)
        raise DatasetFormatError(
            f"{where}: 'messages' must be a non-empty list of {{role, content}} objects, found {found}"
        )
    for turn, message in enumerate(value, start=1):
        _check_message(where, turn, message)
    return value


def _check_message(where: str, turn: int, message: object) -> None:
    if not isinstance(message, dict):
        raise DatasetFormatError(
            f"{where}: message {turn} must be an object with 'role' and 'content', "
            f"found {_json_type(message)}"
        )
    role, content = message.get("role"), message.get("content")
    if role is None:
        raise DatasetFormatError(f"{where}: message {turn} has no 'role'")
    if role not in MESSAGE_ROLES:
        raise DatasetFormatError(
            f"{where}: message {turn} has role {role!r}; use one of {', '.join(MESSAGE_ROLES)}"
        )
    if content is None:
        raise DatasetFormatError(f"{where}: message {turn} ({role}) has no 'content'")
    if not isinstance(content, str):
        raise DatasetFormatError(
            f"{where}: message {turn} ({role}) 'content' must be a string, found {_json_type(content)}"
        )


def _split_of(where: str, value: object) -> str:
    split = _SPLIT_NAMES.get(value.strip().lower()) if isinstance(value, str) else None
    if split is None:
        raise DatasetFormatError(
            f"{where}: split is {value!r}; use 'train' or 'evaluation' "
            "('eval', 'validation' and 'test' also mean evaluation)"
        )
    return split


def _previewable(value: object) -> Any:
    """JSON-safe and short: previews are stored in the database and shown in the UI."""
    if isinstance(value, str):
        return value if len(value) <= _PREVIEW_MAX_CHARS else value[:_PREVIEW_MAX_CHARS] + "…"
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, list | tuple):
        return [_previewable(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _previewable(item) for key, item in value.items()}
    return _previewable(str(value))  # dates, decimals, bytes from Parquet
