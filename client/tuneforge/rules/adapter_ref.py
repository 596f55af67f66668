"""The adapter reference `repo/N[@step]`: one pattern, one parse, one error, for every plane."""

from __future__ import annotations

import re
from dataclasses import dataclass

from tuneforge.rules.names import MAX_NAME_LENGTH, NAME_PATTERN, is_valid_name

MAX_NUMBER_DIGITS = 9
# The repo is a name by the one name rule (its length is checked apart); version numbers and checkpoint
# steps are bounded so they always fit a database integer.
_DIGITS = rf"[0-9]{{1,{MAX_NUMBER_DIGITS}}}"
_PATTERN = re.compile(rf"(?P<repo>{NAME_PATTERN})/(?P<number>{_DIGITS})(?:@(?P<step>{_DIGITS}))?")
EXPECTED_SHAPE = (
    f"repo/N or, for a checkpoint, repo/N@step (repo: 1-{MAX_NAME_LENGTH} letters, digits, '.', '_' or '-' "
    f"starting with a letter or digit; N: a version number from 1; N and step at most {MAX_NUMBER_DIGITS} "
    "digits)"
)


class AdapterRefError(ValueError):
    """Text that is not an adapter reference; the message names the expected shape and its bounds."""

    def __init__(self, text: str) -> None:
        self.text = text
        super().__init__(f"{text[:80]!r} is not an adapter reference; expected {EXPECTED_SHAPE}")


@dataclass(frozen=True)
class AdapterRef:
    """Version `number` of adapter repo `repo`, or its job's checkpoint at `step` when one is named."""

    repo: str
    number: int
    step: int | None = None

    @classmethod
    def parse(cls, text: str) -> AdapterRef:
        """`"repo/3"` or `"repo/3@40"`, exactly (no surrounding spaces), or AdapterRefError."""
        match = _PATTERN.fullmatch(text)
        if match is None or int(match["number"]) < 1 or not is_valid_name(match["repo"]):
            raise AdapterRefError(text)
        step = match["step"]
        return cls(match["repo"], int(match["number"]), None if step is None else int(step))

    @property
    def version(self) -> AdapterRef:
        """The version itself, without a checkpoint step."""
        return AdapterRef(self.repo, self.number)

    def __str__(self) -> str:
        return f"{self.repo}/{self.number}" + ("" if self.step is None else f"@{self.step}")
