"""What a user-chosen name (dataset, repo, tenant, user) may be: safe in URLs, storage keys and shells."""

from __future__ import annotations

import re

MAX_NAME_LENGTH = 64
# Letters, digits, '.', '_' and '-', starting with a letter or digit (so never '.' or '..' alone).
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_NAME = re.compile(NAME_PATTERN)


def is_valid_name(value: str) -> bool:
    """The whole rule; the server's validation says which part of it a bad name breaks."""
    return len(value) <= MAX_NAME_LENGTH and ".." not in value and _NAME.fullmatch(value) is not None
