"""Owns what one dataset row may hold: the dataset kinds, per-row checks, splits, and stored previews."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from tuneforge.rules.datasets import SPLIT_COLUMN, DatasetKind, Split, kind_of_columns, split_of

FileFormat = Literal["csv", "jsonl", "json", "parquet"]

MESSAGE_ROLES = ("system", "user", "assistant", "tool")
_EXPECTED_COLUMNS = (
    "expected 'prompt' and 'completion' (instruction tuning), 'messages' (chat), "
    "or 'text' (continued pretraining)"
)

# The deepest legitimate row (a chat whose tool calls carry JSON arguments) nests under ten levels;
# 64 leaves room for metadata columns while keeping every parser far below Python's recursion
# limit (about 1000), which a hostile file would otherwise reach.
MAX_NESTING = 64
# The longest context a supported base model trains on is about 128k tokens (~512 KiB of text);
# 8 MiB leaves room for JSON escaping and extra columns, and bounds what one row can make a
# validator hold in memory.
MAX_ROW_BYTES = 8 * 1024 * 1024
# A training row uses at most five columns (prompt, completion, messages, text, split); the column
# list is stored with the dataset and shown in the UI, so a file with thousands is refused.
MAX_COLUMNS = 256

_PREVIEW_MAX_CHARS = 500
_PREVIEW_MAX_ITEMS = 20  # items of a list or keys of an object kept in a preview
_LISTED_ROWS = 5  # how many offending rows an error message names before summarising
_QUOTED_MAX_CHARS = 80  # how much of a user's value an error message repeats


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


def json_type(value: object) -> str:
    if value is None:
        return "null"
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array"}
    return names.get(type(value), "an object" if isinstance(value, dict) else type(value).__name__)


def quoted(value: object) -> str:
    """`repr(value)`, cut short: error messages name a user's value without repeating a megabyte of it."""
    text = repr(value)
    return text if len(text) <= _QUOTED_MAX_CHARS else text[: _QUOTED_MAX_CHARS - 1] + "…"


def too_deep(value: object, limit: int = MAX_NESTING) -> bool:
    """Whether lists/objects nest past `limit` levels (the value itself is level 1); no recursion."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, list | dict))
    return False


def loads_bounded(text: str, where: str, what: str = "") -> Any:
    """`json.loads` that ends in a DatasetFormatError naming `where` for every way a value can be hostile.

    `what` names the value inside the row (e.g. "'messages'") when it is not the row itself.
    """
    subject = f"{where}: {what}" if what else where
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        problem = f"({exc.msg}, column {exc.colno})" if what else f"{exc.msg} (column {exc.colno})"
        raise DatasetFormatError(
            f"{subject} is not valid JSON {problem}" if what else f"{subject}: invalid JSON: {problem}"
        ) from None
    except RecursionError:
        raise DatasetFormatError(f"{subject}: JSON nested more than {MAX_NESTING} levels deep") from None
    except ValueError as exc:  # an integer past Python's digit limit for int()
        raise DatasetFormatError(f"{subject}: invalid JSON: {exc}") from None
    if too_deep(value):
        raise DatasetFormatError(f"{subject}: JSON nested more than {MAX_NESTING} levels deep")
    return value


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


class RowChecker:
    """Folds rows into a profile; the first row decides the dataset kind."""

    def __init__(self, preview_rows: int) -> None:
        self._preview_rows = preview_rows
        self.kind: DatasetKind | None = None
        self.has_split = False
        self.columns: dict[str, None] = {}  # ordered union of keys seen
        self.row_count = 0
        self.split_counts = {Split.TRAIN.value: 0, Split.EVALUATION.value: 0}
        self.preview: list[dict[str, Any]] = []
        self.offenders: dict[_Problem, _Offenders] = {}

    def add(self, where: str, values: dict[str, Any]) -> None:
        if self.kind is None:
            self.kind = _detect_kind(list(values))
            self.has_split = SPLIT_COLUMN in values
        self._add_columns(where, values)
        self.row_count += 1
        problem = _ROW_CHECKS[self.kind](where, values)
        if problem:
            self.offenders.setdefault(problem, _Offenders()).add(where)
        self.split_counts[_split_of(where, values.get(SPLIT_COLUMN)) if self.has_split else Split.TRAIN] += 1
        if len(self.preview) < self._preview_rows:
            self.preview.append({str(key): previewable(value) for key, value in values.items()})

    def _add_columns(self, where: str, values: dict[str, Any]) -> None:
        if len(self.columns) + len(values) > MAX_COLUMNS:  # cheap bound first; exact check below
            new = [key for key in values if key not in self.columns]
            if len(self.columns) + len(new) > MAX_COLUMNS:
                raise DatasetFormatError(
                    f"{where}: the file has more than {MAX_COLUMNS} distinct columns (keys); a training "
                    "row needs only prompt/completion, messages or text (plus an optional split)"
                )
        self.columns.update(dict.fromkeys(values))

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
    kind = kind_of_columns(columns)
    if kind is not None:
        return kind
    present = set(columns)
    for have, lacking in (("prompt", "completion"), ("completion", "prompt")):
        if have in present:
            raise DatasetFormatError(
                f"found columns {_column_list(columns)}: there is a {have!r} column but no {lacking!r} "
                "column; instruction tuning needs both 'prompt' and 'completion'"
            )
    hint = ""
    if {"prompt", "completion", "messages", "text"} & {str(c).strip().lower() for c in columns}:
        hint = " (column names are case-sensitive: use lower case)"
    raise DatasetFormatError(f"found columns {_column_list(columns)}; {_EXPECTED_COLUMNS}{hint}")


def _column_list(columns: list[str]) -> str:
    shown = [quoted(column) for column in columns[: _LISTED_ROWS * 2]]
    more = f", and {len(columns) - len(shown)} more" if len(columns) > len(shown) else ""
    return f"[{', '.join(shown)}{more}]"


def _string_field(where: str, values: dict[str, Any], column: str) -> str:
    value = values.get(column)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DatasetFormatError(f"{where}: {column!r} must be a string, found {json_type(value)}")
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
            value = loads_bounded(value, where, "'messages'")
        except DatasetFormatError as exc:
            raise DatasetFormatError(
                f'{exc}; it must be a JSON list like [{{"role": "user", "content": "..."}}, ...]'
            ) from None
    if not isinstance(value, list) or not value:
        found = "an empty list" if isinstance(value, list) else json_type(value)
        raise DatasetFormatError(
            f"{where}: 'messages' must be a non-empty list of {{role, content}} objects, found {found}"
        )
    for turn, message in enumerate(value, start=1):
        _check_message(where, turn, message)
    return value


def _check_message(where: str, turn: int, message: object) -> None:
    if not isinstance(message, dict):
        raise DatasetFormatError(
            f"{where}: message {turn} must be an object with 'role' and 'content', found {json_type(message)}"
        )
    role, content = message.get("role"), message.get("content")
    if role is None:
        raise DatasetFormatError(f"{where}: message {turn} has no 'role'")
    if not isinstance(role, str) or role not in MESSAGE_ROLES:
        raise DatasetFormatError(
            f"{where}: message {turn} has role {quoted(role)}; use one of {', '.join(MESSAGE_ROLES)}"
        )
    if content is None:
        raise DatasetFormatError(f"{where}: message {turn} ({role}) has no 'content'")
    if not isinstance(content, str):
        raise DatasetFormatError(
            f"{where}: message {turn} ({role}) 'content' must be a string, found {json_type(content)}"
        )


def _split_of(where: str, value: object) -> str:
    split = split_of(value)
    if split is None:
        raise DatasetFormatError(
            f"{where}: split is {quoted(value)}; use 'train' or 'evaluation' "
            "('eval', 'validation' and 'test' also mean evaluation)"
        )
    return split


def previewable(value: object) -> Any:
    """JSON-safe and short: previews are stored in the database and shown in the UI."""
    if isinstance(value, str):
        text = value if len(value) <= _PREVIEW_MAX_CHARS else value[:_PREVIEW_MAX_CHARS] + "…"
        # Lone surrogates (legal in JSON escapes) cannot be stored as UTF-8 text.
        return text.encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**63:
        # Past what a database's JSON column or a browser holds exactly; str() may refuse it too.
        return f"<an integer of about {int(value.bit_length() * 0.30103) + 1} digits>"
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, list | tuple):
        return [previewable(item) for item in value[:_PREVIEW_MAX_ITEMS]]
    if isinstance(value, dict):
        items = list(value.items())[:_PREVIEW_MAX_ITEMS]
        return {str(previewable(str(key))): previewable(item) for key, item in items}
    return previewable(str(value))  # dates, decimals, bytes from Parquet
