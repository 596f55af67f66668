"""Owns what a training dataset file may contain: detects its format and validates it from a byte stream.

The readers (`readers`) turn the file into rows with bounded memory; the row checks
(`rows`) decide the dataset kind and what is wrong with which rows. Everything a file can
do wrong ends in a DatasetFormatError whose message names the row and the fix; only the
validator's own resource limits (MemoryError) and storage errors pass through.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import PurePosixPath
from typing import IO, Any

from tuneforge.rules.datasets import DatasetKind

from app.services.dataset_files.checker import DatasetProfile, RowChecker
from app.services.dataset_files.readers import (
    READERS,
    UTF8_BOM,
    first_line_is_object,
    refuse_foreign_encoding,
)
from app.services.dataset_files.rows import (
    MAX_COLUMNS,
    MAX_NESTING,
    MAX_ROW_BYTES,
    MESSAGE_ROLES,
    DatasetFormatError,
    FileFormat,
    parse_messages,
)

__all__ = [
    "MAX_COLUMNS",
    "MAX_NESTING",
    "MAX_ROW_BYTES",
    "MESSAGE_ROLES",
    "SUPPORTED_EXTENSIONS",
    "DatasetFormatError",
    "DatasetKind",
    "DatasetProfile",
    "FileFormat",
    "iter_rows",
    "parse_messages",
    "profile_dataset",
    "read_rows",
]

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

# Small uploads stay in memory; anything larger spills to a temporary file on disk.
_SPOOL_MAX_BYTES = 4 * 1024 * 1024
_SNIFF_BYTES = 64 * 1024
_PARQUET_MAGIC = b"PAR1"


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
        checker = RowChecker(preview_rows)
        for where, values in READERS[file_format](spool, name):
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
        for _, values in READERS[file_format](spool, name):
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
    spool.seek(0)
    return size, digest.hexdigest(), blank


def _detect_file_format(spool: IO[bytes], name: str, mime_type: str | None) -> FileFormat:
    spool.seek(0)
    head = spool.read(_SNIFF_BYTES)
    spool.seek(0)
    if head.startswith(_PARQUET_MAGIC):  # unambiguous, whatever the file is called
        return "parquet"
    by_name = _EXTENSION_FORMATS.get(PurePosixPath(name).suffix.lower())
    by_mime = _MIME_FORMATS.get((mime_type or "").split(";")[0].strip().lower())
    first = head.removeprefix(UTF8_BOM).lstrip()[:1]
    by_content = _CONTENT_FORMATS.get(first, "csv")
    file_format = by_name or by_mime or by_content
    if file_format != "parquet":
        refuse_foreign_encoding(head, name)
    # JSON Lines saved as .json is common; one object per line reads correctly as JSONL.
    if file_format == "json" and first == b"{" and first_line_is_object(spool):
        return "jsonl"
    return file_format
