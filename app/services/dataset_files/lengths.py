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


def row_text(row: dict[str, Any]) -> str:
    """What a row trains on, as one string: prompt + completion, every message's content, or text."""
    if "messages" in row:
        messages = row["messages"]
        if isinstance(messages, str):
            messages = json.loads(messages)
        return "\n".join(str(m.get("content") or "") for m in messages if isinstance(m, dict))
    if "prompt" in row:
        return f"{row.get('prompt') or ''}\n{row.get('completion') or ''}"
    return str(row.get("text") or "")


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
        return summarise([approximate_tokens(row_text(row)) for row in rows])  # one int per row held
    except ChecksumMismatchError:
        raise ConflictError(
            f"dataset {dataset.name!r}: the stored file no longer matches the sha256 recorded when it was "
            "registered; upload it again"
        ) from None
