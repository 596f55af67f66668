"""Dataset kinds (which columns a row trains on) and the `split` column's names and spellings."""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum
from typing import Literal

DatasetKind = Literal["prompt_completion", "messages", "text"]

PROMPT_COLUMN, COMPLETION_COLUMN = "prompt", "completion"
MESSAGES_COLUMN, TEXT_COLUMN = "messages", "text"
SPLIT_COLUMN = "split"


def kind_of_columns(columns: Iterable[str]) -> DatasetKind | None:
    """The kind the columns make, in this precedence: prompt + completion (instruction tuning), then
    messages (chat), then text (continued pretraining); None when none of them is there."""
    present = set(columns)
    if {PROMPT_COLUMN, COMPLETION_COLUMN} <= present:
        return "prompt_completion"
    if MESSAGES_COLUMN in present:
        return "messages"
    if TEXT_COLUMN in present:
        return "text"
    return None


class Split(StrEnum):
    """Which part of a dataset a row belongs to."""

    TRAIN = "train"
    EVALUATION = "evaluation"


# What a `split` column may say (matched stripped and case-insensitively).
SPLIT_SPELLINGS = {
    "train": Split.TRAIN,
    "evaluation": Split.EVALUATION,
    "eval": Split.EVALUATION,
    "validation": Split.EVALUATION,
    "test": Split.EVALUATION,
}


def split_of(value: object) -> Split | None:
    """The split a `split` cell names; None for anything else (not a string, or an unknown name)."""
    return SPLIT_SPELLINGS.get(value.strip().lower()) if isinstance(value, str) else None
