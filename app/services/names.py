"""Checks user-chosen names (datasets, repos) by the shared name rule, saying which part a name breaks."""

from __future__ import annotations

import re

from tuneforge.rules.names import MAX_NAME_LENGTH, is_valid_name

from app.errors import InvalidInputError


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
    if not is_valid_name(value):
        raise InvalidInputError(
            f"{field}: {value!r} may contain only letters, digits, '.', '_' and '-', "
            "and must start with a letter or digit"
        )
    return value
