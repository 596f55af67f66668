"""Owns what one dataset row may hold: its values (JSON, messages), the next-token kinds' checks, previews.

The next-token kinds are prompt + completion, messages and text; `task_rows` checks the kinds of the
tasks beyond SFT, and `checker` folds a file's rows into its profile.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any, Literal

from tuneforge.rules.datasets import COMPLETION_COLUMN, MESSAGES_COLUMN, PROMPT_COLUMN, TEXT_COLUMN

FileFormat = Literal["csv", "jsonl", "json", "parquet"]

MESSAGE_ROLES = ("system", "user", "assistant", "tool")

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
_QUOTED_MAX_CHARS = 80  # how much of a user's value an error message repeats


class DatasetFormatError(ValueError):
    """The file cannot be trained on; the message says where and how to fix it."""


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


Problem = tuple[str, str]  # (what is wrong, how to fix it): rows sharing one are reported together
RowCheck = Callable[[str, dict[str, Any]], Problem | None]

EMPTY_TEXT = ("an empty 'text'", "remove those rows or fill them in")
_EMPTY_COMPLETION = ("an empty 'completion'", "every row needs the target output the model should learn")
_NO_ASSISTANT = ("no assistant turn in 'messages'", "the assistant turns are what the model learns")


def string_field(where: str, values: dict[str, Any], column: str) -> str:
    value = values.get(column)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DatasetFormatError(f"{where}: {column!r} must be a string, found {json_type(value)}")
    return value


def check_prompt_completion(where: str, values: dict[str, Any]) -> Problem | None:
    string_field(where, values, PROMPT_COLUMN)  # an empty prompt is allowed: unconditional generation
    return None if string_field(where, values, COMPLETION_COLUMN).strip() else _EMPTY_COMPLETION


def check_text(where: str, values: dict[str, Any]) -> Problem | None:
    return None if string_field(where, values, TEXT_COLUMN).strip() else EMPTY_TEXT


def check_messages(where: str, values: dict[str, Any]) -> Problem | None:
    messages = parse_messages(where, values.get(MESSAGES_COLUMN))
    return None if any(m["role"] == "assistant" for m in messages) else _NO_ASSISTANT


def json_cell(where: str, value: object, column: str, shape: str) -> object:
    """A nested value as given; CSV cells hold one as a JSON string, parsed here (`shape` describes it)."""
    if not isinstance(value, str):
        return value
    try:
        return loads_bounded(value, where, column)
    except DatasetFormatError as exc:
        raise DatasetFormatError(f"{exc}; it must be {shape}") from None


def parse_messages(where: str, value: object, column: str = "'messages'") -> list[dict[str, Any]]:
    """A row's `messages` (or the turns under another `column`) as a list of {role, content}."""
    value = json_cell(where, value, column, 'a JSON list like [{"role": "user", "content": "..."}, ...]')
    if not isinstance(value, list) or not value:
        found = "an empty list" if isinstance(value, list) else json_type(value)
        raise DatasetFormatError(
            f"{where}: {column} must be a non-empty list of {{role, content}} objects, found {found}"
        )
    inside = where if column == "'messages'" else f"{where}, in {column}"
    for turn, message in enumerate(value, start=1):
        _check_message(inside, turn, message)
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
