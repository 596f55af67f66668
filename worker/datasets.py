"""Reads a stored dataset file back into rows for training (validation lives in the API's profiler)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from pathlib import PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from worker.training.data import TrainingDataError

_PARQUET_MAGIC = b"PAR1"


def read_rows(chunks: Iterable[bytes], file_name: str) -> list[dict[str, Any]]:
    """Rows of a CSV, JSON Lines, JSON array or Parquet file, by content first and then by name."""
    raw = b"".join(chunks)
    if raw.startswith(_PARQUET_MAGIC):
        try:
            return list(pq.read_table(pa.BufferReader(raw)).to_pylist())
        except (pa.ArrowException, OSError) as exc:
            raise TrainingDataError(f"{file_name} is not a readable Parquet file ({exc})") from None
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError:
        raise TrainingDataError(f"{file_name} is not UTF-8 text; re-upload it as UTF-8") from None
    suffix = PurePosixPath(file_name).suffix.lower()
    first = text.lstrip()[:1]
    try:
        if first == "[":
            rows = json.loads(text)
        elif first == "{" or suffix in (".jsonl", ".ndjson"):
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            rows = list(csv.DictReader(io.StringIO(text), strict=True))
    except (ValueError, csv.Error) as exc:
        raise TrainingDataError(f"{file_name} cannot be read as {suffix or 'data'} ({exc})") from None
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise TrainingDataError(f"{file_name} must hold one JSON object per row")
    return rows
