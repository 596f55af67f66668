"""How long a dataset's rows are: an approximate token count per row, summarised as a histogram.

The control plane has no tokenizer (it never loads the model stack), so a row's length is counted
in word and punctuation pieces, which tracks a BPE token count closely enough to spot outliers
and pick a sequence length; the summary says so in `tokenizer`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from tuneforge.rules.datasets import (
    CHOSEN_COLUMN,
    COMPLETION_COLUMN,
    MESSAGES_COLUMN,
    OPENAI_INPUT_COLUMN,
    OPENAI_NON_PREFERRED_COLUMN,
    OPENAI_PREFERRED_COLUMN,
    PROMPT_COLUMN,
    REJECTED_COLUMN,
    TEXT_COLUMN,
    kind_of_columns,
)

from app.context import AppContext
from app.db import Dataset, DatasetStatus
from app.errors import ConflictError
from app.services.dataset_files.formats import iter_rows
from app.storage import ChecksumMismatchError

TOKENIZER = "approximate: words and punctuation marks"
_PIECE = re.compile(r"\w+|[^\w\s]")
BINS = 12


@dataclass(frozen=True)
class LengthBin:
    start: int  # inclusive
    end: int  # exclusive
    count: int


@dataclass(frozen=True)
class LengthSummary:
    rows: int
    min: int
    max: int
    mean: float
    p50: int
    p95: int
    bins: list[LengthBin]
    tokenizer: str = TOKENIZER


def row_text(row: dict[str, Any], kind: str | None = None) -> str:
    """What a row trains on, as one string: prompt + completion, every message's content, text, a
    preference pair's prompt + its longer answer (the longer of the pair's two sequences), or a prompt.

    `kind` is the dataset's (a row of a JSONL file may lack some of its columns); else the row's own.
    """
    kind = kind or kind_of_columns(row)
    if kind == "preference":
        if OPENAI_INPUT_COLUMN in row:
            given = _nested(row.get(OPENAI_INPUT_COLUMN))
            prompt = _contents(given.get("messages") if isinstance(given, dict) else None)
            answers = [
                _contents(row.get(OPENAI_PREFERRED_COLUMN)),
                _contents(row.get(OPENAI_NON_PREFERRED_COLUMN)),
            ]
        else:
            prompt = (
                _contents(row.get(MESSAGES_COLUMN)) if row.get(MESSAGES_COLUMN) else _text(row, PROMPT_COLUMN)
            )
            answers = [_answer(row.get(CHOSEN_COLUMN)), _answer(row.get(REJECTED_COLUMN))]
        return f"{prompt}\n{max(answers, key=len)}"
    if kind == "messages":
        return _contents(row.get(MESSAGES_COLUMN))
    if kind == "prompt_completion":
        return f"{_text(row, PROMPT_COLUMN)}\n{_text(row, COMPLETION_COLUMN)}"
    if kind == "prompt":
        return _text(row, PROMPT_COLUMN)
    return _text(row, TEXT_COLUMN)


def _text(row: dict[str, Any], column: str) -> str:
    return str(row.get(column) or "")


def _nested(value: object) -> object:
    """A nested value; CSV cells hold it as a JSON string (validation has parsed it once already)."""
    return json.loads(value) if isinstance(value, str) else value


def _contents(messages: object) -> str:
    turns = _nested(messages)
    if not isinstance(turns, list):
        return ""
    return "\n".join(str(m.get("content") or "") for m in turns if isinstance(m, dict))


def _answer(value: object) -> str:
    """A preference answer: text, or a list of assistant messages."""
    return value if isinstance(value, str) else _contents(value)


def approximate_tokens(text: str) -> int:
    return len(_PIECE.findall(text))


def summarise(lengths: list[int], bins: int = BINS) -> LengthSummary:
    """Equal-width bins from 0 to the longest row (the last bin holds it)."""
    if not lengths:
        return LengthSummary(rows=0, min=0, max=0, mean=0.0, p50=0, p95=0, bins=[])
    ordered = sorted(lengths)
    width = max(1, math.ceil((ordered[-1] + 1) / bins))
    counts = [0] * math.ceil((ordered[-1] + 1) / width)
    for length in ordered:
        counts[length // width] += 1
    return LengthSummary(
        rows=len(ordered),
        min=ordered[0],
        max=ordered[-1],
        mean=round(sum(ordered) / len(ordered), 2),
        p50=_percentile(ordered, 0.50),
        p95=_percentile(ordered, 0.95),
        bins=[LengthBin(i * width, (i + 1) * width, n) for i, n in enumerate(counts)],
    )


def _percentile(ordered: list[int], q: float) -> int:
    """Nearest-rank percentile of a sorted, non-empty list."""
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def lengths_of(ctx: AppContext, dataset: Dataset) -> LengthSummary:
    """Reads the stored file again (only validated datasets: their rows are known to parse)."""
    if dataset.status != DatasetStatus.CONNECTED:
        raise ConflictError(
            f"dataset {dataset.name!r} is {dataset.status}; row lengths exist once it is connected"
        )
    chunks = ctx.store.iter_chunks(dataset.blob_key, expected_sha256=dataset.sha256)
    rows = iter_rows(chunks, dataset.file_name, mime_type=dataset.mime_type)
    try:
        return summarise(
            [approximate_tokens(row_text(row, dataset.format)) for row in rows]
        )  # one int per row held
    except ChecksumMismatchError:
        raise ConflictError(
            f"dataset {dataset.name!r}: the stored file no longer matches the sha256 recorded when it was "
            "registered; upload it again"
        ) from None
