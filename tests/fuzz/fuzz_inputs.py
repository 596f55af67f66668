"""What schema-driven generation rarely reaches: extreme numbers, hostile strings, undeclared headers.

Every choice goes through `Choices`, so the same mutations serve Hypothesis-generated cases (drawn
from the test's data, reproducible and derandomized) and Schemathesis's deterministic coverage cases
(drawn from a seeded generator).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, Protocol, TypeVar

from hypothesis import strategies as st
from schemathesis.generation.case import Case

T = TypeVar("T")

# Numbers a schema without bounds lets through and that break code assuming a machine integer or a
# sane float (a sampler seed, a token count, a tensor size).
EXTREME_NUMBERS: list[int | float] = [
    2**31,
    2**53 + 1,
    2**63 - 1,
    2**63,
    2**64,
    -(2**63) - 1,
    10**30,
    1e308,
    -1e308,
    5e-324,
    -0.0,
]
# Strings that break code assuming printable text: NUL (PostgreSQL refuses it in text), a lone
# surrogate (not encodable as UTF-8), non-ASCII beside ASCII-only comparisons, path tricks, size.
HOSTILE_STRINGS = [
    "\x00",
    "a\x00b",
    "\ud800",
    "é.é",  # dotted like a signed token, non-ASCII on both sides
    "\u202e",
    "../../etc/passwd",
    "%00",
    "{{7*7}}",
    "x" * 70_000,
]
# Headers every server receives whatever its schema says; values are latin-1, as on the wire.
ODD_HEADERS = {
    "Content-Type": [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data",
        "application/json; charset=utf-16",
        "\x7f",
    ],
    "Content-Encoding": ["gzip", "br"],
    "Accept": ["text/event-stream", "*/*", "application/xml"],
    "Range": ["bytes=0-0", "bytes=-1", "bytes=99999999999999999999-"],
}


class Choices(Protocol):
    def pick(self, options: Sequence[T], label: str) -> T: ...

    def one_in(self, n: int, label: str) -> bool: ...


class DrawnChoices:
    """Choices drawn from a Hypothesis test's data."""

    def __init__(self, data: st.DataObject) -> None:
        self._data = data

    def pick(self, options: Sequence[T], label: str) -> T:
        return self._data.draw(st.sampled_from(options), label=label)

    def one_in(self, n: int, label: str) -> bool:
        return self._data.draw(st.integers(0, n - 1), label=label) == 0


class SeededChoices:
    """Choices from a seeded generator, for cases Hypothesis did not draw."""

    def __init__(self, seed: int) -> None:
        self._random = random.Random(seed)

    def pick(self, options: Sequence[T], label: str) -> T:
        return options[self._random.randrange(len(options))]

    def one_in(self, n: int, label: str) -> bool:
        return self._random.randrange(n) == 0


class PlainChoices:
    """No chance taken: a request goes as it was built (its names, the tenant's token, no mutation)."""

    def pick(self, options: Sequence[T], label: str) -> T:
        return options[0]

    def one_in(self, n: int, label: str) -> bool:
        return False


def number_paths(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Where `value` holds numbers (not booleans), as key/index paths."""
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in number_paths(v, (*path, k))]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in number_paths(v, (*path, i))]
    return [path] if isinstance(value, int | float) and not isinstance(value, bool) else []


def sweep_paths(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Numbers and nulls (an optional field left out, often a number) in `value`, as paths."""
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in sweep_paths(v, (*path, k))]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in sweep_paths(v, (*path, i))]
    return [path] if value is None or (isinstance(value, int | float) and not isinstance(value, bool)) else []


def _replace_one(case: Case, where: Any, values: Sequence[Any], choices: Choices) -> None:
    """One leaf that `where` finds in the body, path or query parameters, replaced by one of `values`."""
    places = [
        (container, path)
        for container in (case.body, case.path_parameters, case.query)
        if isinstance(container, dict | list)
        for path in where(container)
    ]
    if places:
        container, path = choices.pick(places, "leaf")
        set_at(container, path, choices.pick(values, "value"))


def string_paths(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in string_paths(v, (*path, k))]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in string_paths(v, (*path, i))]
    return [path] if isinstance(value, str) else []


def set_at(body: Any, path: tuple[Any, ...], value: Any) -> None:
    *parents, last = path
    for key in parents:
        body = body[key]
    body[last] = value


def mutate(case: Case, choices: Choices) -> None:
    """The rest as generated, but: in one case in three a number made extreme, in one in four a
    string made hostile (body, path or query), in one in five an undeclared header."""
    if choices.one_in(3, "extreme number"):
        _replace_one(case, number_paths, EXTREME_NUMBERS, choices)
    if choices.one_in(4, "hostile string"):
        _replace_one(case, string_paths, HOSTILE_STRINGS, choices)
    if choices.one_in(5, "odd headers"):
        name = choices.pick(sorted(ODD_HEADERS), "odd header")
        case.headers = dict(case.headers or {}) | {name: choices.pick(ODD_HEADERS[name], name)}
