"""The one rule for user-chosen names (datasets, repos): safe in URLs, storage keys and shells."""

from __future__ import annotations

import re

from app.errors import InvalidInputError

MAX_NAME_LENGTH = 64
_ALLOWED = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def validate_name(value: str | None, field: str) -> str:
    """Return `value` unchanged or raise a 422 that names the field and how to fix it."""
    if value is None or value == "":
        raise InvalidInputError(f"{field}: must not be empty; use letters, digits, '.', '_' or '-'")
    if len(value) > MAX_NAME_LENGTH:
        raise InvalidInputError(f"{field}: at most {MAX_NAME_LENGTH} characters (got {len(value)})")
    if "/" in value or "\\" in value:
        raise InvalidInputError(f"{field}: must not contain path separators ('/' or '\\'): {value!r}")
    if ".." in value:
        raise InvalidInputError(f"{field}: must not contain '..': {value!r}")
    if any(ch.isspace() for ch in value):
        suggestion = re.sub(r"\s+", "-", value.strip())
        raise InvalidInputError(f"{field}: must not contain spaces; try {suggestion!r}")
    if not _ALLOWED.match(value):
        raise InvalidInputError(
            f"{field}: {value!r} may contain only letters, digits, '.', '_' and '-', "
            "and must start with a letter or digit"
        )
    return value
