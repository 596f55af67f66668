"""Reads a spooled dataset file row by row (CSV, JSON Lines, JSON array, Parquet) with bounded memory.

Each reader yields `(where, row)`, `where` naming the row as the user sees it, and ends in a
DatasetFormatError naming the row for anything it cannot read: undecodable bytes, invalid JSON,
rows nested deeper than MAX_NESTING or larger than MAX_ROW_BYTES. Lines are read with a length
bound and JSON arrays are parsed streaming (ijson), so no single row or line is ever held whole
past those bounds, and no parser recurses deeply enough to exhaust the stack.
"""

from __future__ import annotations

import codecs
import csv
from collections.abc import Callable, Iterator
from typing import IO, Any

import ijson
import pyarrow as pa
import pyarrow.parquet as pq

from app.services.dataset_files.rows import (
    MAX_COLUMNS,
    MAX_NESTING,
    MAX_ROW_BYTES,
    DatasetFormatError,
    FileFormat,
    json_type,
    loads_bounded,
    quoted,
)

Row = tuple[str, dict[str, Any]]

UTF8_BOM = b"\xef\xbb\xbf"
# Other Unicode encodings' byte-order marks: named in the error instead of a puzzling decode failure.
_FOREIGN_BOMS = (
    (b"\xff\xfe\x00\x00", "UTF-32"),
    (b"\x00\x00\xfe\xff", "UTF-32"),
    (b"\xff\xfe", "UTF-16"),
    (b"\xfe\xff", "UTF-16"),
)
# Parquet batches are decoded whole; a few rows at a time keeps a batch of MAX_ROW_BYTES-sized rows small.
_PARQUET_BATCH_ROWS = 64
_DECODE_CHUNK = 1024 * 1024


def refuse_foreign_encoding(head: bytes, name: str) -> None:
    for bom, encoding in _FOREIGN_BOMS:
        if head.startswith(bom):
            raise DatasetFormatError(f"{name} is {encoding} text; re-save the file as UTF-8")


def _bounded_lines(spool: IO[bytes]) -> Iterator[tuple[int, int, bytes]]:
    """(line number, byte offset, raw line), refusing a line past MAX_ROW_BYTES before reading more of it."""
    offset = 0
    line_no = 0
    while raw := spool.readline(MAX_ROW_BYTES + 1):
        line_no += 1
        if len(raw) > MAX_ROW_BYTES and not raw.endswith(b"\n"):
            raise DatasetFormatError(
                f"line {line_no} is longer than {MAX_ROW_BYTES} bytes; one row may hold at most that much"
            )
        yield line_no, offset, raw
        offset += len(raw)


def _decoded_lines(spool: IO[bytes], name: str) -> Iterator[tuple[int, str]]:
    """Decode line by line so memory stays flat and a bad byte is reported with its position."""
    for line_no, offset, raw in _bounded_lines(spool):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DatasetFormatError(
                f"{name} is not UTF-8 text: byte 0x{raw[exc.start]:02x} at offset {offset + exc.start} "
                f"(line {line_no}) cannot be decoded; re-save the file as UTF-8"
            ) from None
        yield line_no, text.removeprefix("\ufeff") if line_no == 1 else text


def first_line_is_object(spool: IO[bytes]) -> bool:
    try:
        for _, _, raw in _bounded_lines(spool):
            if raw.strip():
                text = raw.removeprefix(UTF8_BOM).decode("utf-8")
                return isinstance(loads_bounded(text, "line 1"), dict)
        return False
    except (DatasetFormatError, UnicodeDecodeError):
        return False
    finally:
        spool.seek(0)


# --- CSV ---------------------------------------------------------------------------------------


def read_csv(spool: IO[bytes], name: str) -> Iterator[Row]:
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
    if "NUL" in reason:
        return "a NUL byte; the file is binary or UTF-16 text, re-save it as UTF-8 CSV"
    return f'{reason}; check for an unclosed or stray double quote (quotes inside a field are doubled: "")'


def _csv_header(record: list[str]) -> list[str]:
    if len(record) > MAX_COLUMNS:
        raise DatasetFormatError(
            f"the CSV header has {len(record)} columns; at most {MAX_COLUMNS} are accepted "
            "(a training row needs prompt/completion, messages or text)"
        )
    header = [column.strip() for column in record]
    seen: set[str] = set()
    for column in header:
        if column and column in seen:
            raise DatasetFormatError(f"the CSV header names column {quoted(column)} more than once")
        seen.add(column)
    return header


# --- JSON Lines ----------------------------------------------------------------------------------


def read_jsonl(spool: IO[bytes], name: str) -> Iterator[Row]:
    for line_no, text in _decoded_lines(spool, name):
        if not text.strip():
            continue
        try:
            value = loads_bounded(text, f"line {line_no}")
        except DatasetFormatError as exc:
            raise DatasetFormatError(f"{exc}; each line must be one complete JSON object") from None
        if not isinstance(value, dict):
            raise DatasetFormatError(
                f'line {line_no}: expected a JSON object like {{"prompt": ..., "completion": ...}}, '
                f"found {json_type(value)}"
            )
        yield f"line {line_no}", value


# --- JSON array (streaming) ----------------------------------------------------------------------


def read_json(spool: IO[bytes], name: str) -> Iterator[Row]:
    _check_utf8(spool, name)
    if spool.read(len(UTF8_BOM)) != UTF8_BOM:
        spool.seek(0)
    builder = _RowBuilder(name)
    try:
        for event, value in ijson.basic_parse(spool, use_float=True):
            row = builder.feed(event, value)
            if row is not None:
                yield f"row {builder.rows}", row
    except DatasetFormatError:
        raise
    except ijson.JSONError as exc:
        raise DatasetFormatError(f"{builder.where()}: invalid JSON: {_yajl_problem(exc)}") from None
    except ValueError as exc:  # a number ijson could parse but Python cannot hold (int digit limit)
        raise DatasetFormatError(f"{builder.where()}: invalid JSON: {exc}") from None
    builder.finish()


def _check_utf8(spool: IO[bytes], name: str) -> None:
    """One streaming pass, so an undecodable byte is reported with its offset and line like other formats."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, lines, chunk = 0, 0, b""
    try:
        while chunk := spool.read(_DECODE_CHUNK):
            decoder.decode(chunk)
            offset += len(chunk)
            lines += chunk.count(b"\n")
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as exc:
        # `exc.object` is the decoder's pending bytes (at most 3, from the last chunk) plus this chunk.
        pending = len(exc.object) - len(chunk)
        line = lines + chunk.count(b"\n", 0, max(0, exc.start - pending)) + 1
        raise DatasetFormatError(
            f"{name} is not UTF-8 text: byte 0x{exc.object[exc.start]:02x} at offset "
            f"{offset - pending + exc.start} (line {line}) cannot be decoded; re-save the file as UTF-8"
        ) from None
    finally:
        spool.seek(0)


def _yajl_problem(exc: Exception) -> str:
    """yajl's message is 'kind\\n   snippet\\n   (right here) ---^': keep the kind and the snippet."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    kind = lines[0].removeprefix("parse error: ").removeprefix("lexical error: ") if lines else "unreadable"
    snippet = lines[1] if len(lines) > 2 else ""
    return f"{kind.rstrip('.')} near {quoted(snippet)}" if snippet else kind


class _RowBuilder:
    """Builds each element of the top-level array from ijson's events, bounding depth and size as it goes."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.rows = 0  # rows completed
        self._started = False
        self._ended = False
        self._stack: list[Any] = []  # containers of the row being built
        self._keys: list[str] = []
        self._size = 0

    def where(self) -> str:
        return f"row {self.rows + 1}" if self._started and not self._ended else self.name

    def feed(self, event: str, value: Any) -> dict[str, Any] | None:
        if not self._started:
            self._start(event, value)
            return None
        if event == "map_key":
            self._keys.append(value)
            self._grow(len(value))
            return None
        if event in ("start_map", "start_array"):
            if len(self._stack) >= MAX_NESTING:
                raise DatasetFormatError(
                    f"row {self.rows + 1}: JSON nested more than {MAX_NESTING} levels deep"
                )
            self._stack.append({} if event == "start_map" else [])
            self._grow(1)
            return None
        if event in ("end_map", "end_array"):
            if not self._stack:  # the end of the top-level array
                self._ended = True
                return None
            value = self._stack.pop()
        elif isinstance(value, str):
            self._grow(len(value))
        else:
            self._grow(8)
        return self._attach(value)

    def _start(self, event: str, value: Any) -> None:
        if event != "start_array":
            found = "an object" if event == "start_map" else json_type(value)
            raise DatasetFormatError(
                f"{self.name} holds {found}, not an array of objects; use "
                '[{"prompt": ..., "completion": ...}, ...] or one object per line in a .jsonl file'
            )
        self._started = True

    def _attach(self, value: Any) -> dict[str, Any] | None:
        if self._stack:
            parent = self._stack[-1]
            if isinstance(parent, dict):
                parent[self._keys.pop()] = value
            else:
                parent.append(value)
            return None
        self.rows += 1
        self._size = 0
        if not isinstance(value, dict):
            raise DatasetFormatError(f"row {self.rows}: expected a JSON object, found {json_type(value)}")
        return value

    def _grow(self, size: int) -> None:
        self._size += size
        if self._size > MAX_ROW_BYTES:
            raise DatasetFormatError(
                f"row {self.rows + 1} is larger than {MAX_ROW_BYTES} bytes; "
                "one row may hold at most that much"
            )

    def finish(self) -> None:
        if not self._ended:  # ijson reports truncation itself; this guards an empty stream
            raise DatasetFormatError(f"{self.name}: invalid JSON: the array is not closed")


# --- Parquet -------------------------------------------------------------------------------------


def read_parquet(spool: IO[bytes], name: str) -> Iterator[Row]:
    index = 0
    try:
        parquet = pq.ParquetFile(spool)
        _check_schema(parquet.schema_arrow, name)
        for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS):
            for values in batch.to_pylist():
                index += 1
                yield f"row {index}", values
    except (DatasetFormatError, MemoryError, RecursionError):
        raise  # ours, or the validator's memory cap: reported as such, not as a broken file
    except Exception as exc:  # pyarrow raises ArrowException, OSError, ValueError, ... for bad files
        raise DatasetFormatError(
            f"{name} is not a readable Parquet file ({type(exc).__name__}: {quoted(str(exc))}); "
            "re-export it, e.g. with pandas.DataFrame.to_parquet"
        ) from None


def _check_schema(schema: pa.Schema, name: str) -> None:
    if len(schema) > MAX_COLUMNS:
        raise DatasetFormatError(f"{name} has {len(schema)} columns; at most {MAX_COLUMNS} are accepted")
    pending = [(field.type, 2) for field in schema]  # a row is level 1, its columns level 2
    while pending:
        kind, depth = pending.pop()
        if depth > MAX_NESTING:
            raise DatasetFormatError(f"{name}: a column nests more than {MAX_NESTING} levels deep")
        pending.extend((kind.field(i).type, depth + 1) for i in range(kind.num_fields))


READERS: dict[FileFormat, Callable[[IO[bytes], str], Iterator[Row]]] = {
    "csv": read_csv,
    "jsonl": read_jsonl,
    "json": read_json,
    "parquet": read_parquet,
}
