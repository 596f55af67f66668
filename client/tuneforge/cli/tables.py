"""How the remote commands print: aligned tables and `field  value` blocks for people, JSON for scripts."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, TextIO

from pydantic import BaseModel

# A cell longer than this is cut with an ellipsis, so one long description cannot wreck a table.
MAX_CELL_CHARS = 60
EMPTY = "-"


def cell(value: object, max_chars: int | None = MAX_CELL_CHARS) -> str:
    """One value as a table shows it: `-` for nothing, dates to the minute, text on one line, shortened
    to `max_chars` (None: kept whole)."""
    if value is None or value == "":
        return EMPTY
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M")
    if isinstance(value, float):
        return f"{value:.4g}"
    text = " ".join(str(value).split())
    return text if max_chars is None or len(text) <= max_chars else text[: max_chars - 1] + "…"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned columns under upper-case headers; an empty table says so instead."""
    if not rows:
        return "(none)"
    cells = [[cell(value) for value in row] for row in rows]
    widths = [max(len(header), *(len(row[i]) for row in cells)) for i, header in enumerate(headers)]
    lines = [[header.upper() for header in headers], *cells]
    return "\n".join(
        "  ".join(text.ljust(width) for text, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def fields(pairs: Sequence[tuple[str, object]]) -> str:
    """`name  value` lines, names aligned, values whole; pairs whose value is None are left out."""
    shown = [(name, cell(value, None)) for name, value in pairs if value is not None]
    width = max((len(name) for name, _ in shown), default=0)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in shown)


def to_json(value: Any) -> Any:
    """Models (and lists or dicts of them) as plain JSON values, snake_case as the client names them."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list | tuple):
        return [to_json(item) for item in value]
    if isinstance(value, dict):
        return {key: to_json(item) for key, item in value.items()}
    return value


def emit(as_json: bool, value: Any, human: Callable[[], str], out: TextIO | None = None) -> int:
    """Print `value` as JSON when asked, else what `human()` renders; returns exit code 0."""
    stream = out or sys.stdout
    if as_json:
        json.dump(to_json(value), stream, indent=2, default=str)
        stream.write("\n")
    else:
        stream.write(human() + "\n")
    stream.flush()
    return 0
