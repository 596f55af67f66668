"""Dataset kinds (which columns a row trains on), which kinds each training task takes, and the `split`
column's names and spellings."""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum
from typing import Literal

DatasetKind = Literal["prompt_completion", "messages", "text", "preference", "classification", "prompt"]

PROMPT_COLUMN, COMPLETION_COLUMN = "prompt", "completion"
MESSAGES_COLUMN, TEXT_COLUMN = "messages", "text"
SPLIT_COLUMN = "split"
# Preference pairs (DPO): a prompt (`prompt` text or `messages` turns) with a better and a worse answer.
CHOSEN_COLUMN, REJECTED_COLUMN = "chosen", "rejected"
# OpenAI's DPO JSONL: `input` {messages: [...]} with `preferred_output` / `non_preferred_output`, each a
# list of assistant messages.
OPENAI_INPUT_COLUMN = "input"
OPENAI_PREFERRED_COLUMN, OPENAI_NON_PREFERRED_COLUMN = "preferred_output", "non_preferred_output"
# Classification: a text and its label (a string or an integer class).
LABEL_COLUMN = "label"

# The kinds each training task accepts. DPO learns from preference pairs only; GRPO needs prompts (the
# rest of the row reaches the reward functions as `example`); classification needs text + label.
TASK_DATASET_KINDS: dict[str, tuple[DatasetKind, ...]] = {
    # A text + label file is also text: next-token tasks learn its text and leave the label.
    "sft": ("prompt_completion", "messages", "text", "classification"),
    "continued_pretraining": ("prompt_completion", "messages", "text", "classification"),
    "dpo": ("preference",),
    "grpo": ("prompt", "prompt_completion", "messages"),
    "classification": ("classification",),
}


# Each kind and the columns its rows are read from, in precedence: the first whose columns a row has
# decides. Preference pairs (chosen + rejected beside a prompt, or beside messages, or OpenAI's input +
# preferred_output + non_preferred_output), prompt + completion (instruction tuning), messages (chat),
# text + label (classification), text (continued pretraining), then a prompt alone (prompts for GRPO).
_FORMATS: tuple[tuple[DatasetKind, frozenset[str]], ...] = (
    ("preference", frozenset({PROMPT_COLUMN, CHOSEN_COLUMN, REJECTED_COLUMN})),
    ("preference", frozenset({MESSAGES_COLUMN, CHOSEN_COLUMN, REJECTED_COLUMN})),
    ("preference", frozenset({OPENAI_INPUT_COLUMN, OPENAI_PREFERRED_COLUMN, OPENAI_NON_PREFERRED_COLUMN})),
    ("prompt_completion", frozenset({PROMPT_COLUMN, COMPLETION_COLUMN})),
    ("messages", frozenset({MESSAGES_COLUMN})),
    ("classification", frozenset({TEXT_COLUMN, LABEL_COLUMN})),
    ("text", frozenset({TEXT_COLUMN})),
    ("prompt", frozenset({PROMPT_COLUMN})),
)


def _format_of(columns: Iterable[str]) -> tuple[DatasetKind, frozenset[str]] | None:
    present = set(columns)
    return next(((kind, read) for kind, read in _FORMATS if read <= present), None)


def kind_of_columns(columns: Iterable[str]) -> DatasetKind | None:
    """The kind the columns make (see _FORMATS for the precedence); None when none of them is there."""
    found = _format_of(columns)
    return found[0] if found is not None else None


def format_columns(columns: Iterable[str]) -> frozenset[str]:
    """The columns the rows' format is read from (empty when none); two files a run reads as one,
    training and held-out rows, must agree on these."""
    found = _format_of(columns)
    return found[1] if found is not None else frozenset()


def task_takes_kind(task: str, kind: str) -> bool:
    """Whether a job of `task` can train on a dataset of `kind`."""
    return kind in TASK_DATASET_KINDS.get(task, ())


def kinds_for_task_message(task: str) -> str:
    """The columns a `task` job needs, for an error message."""
    needs = {
        "sft": "'prompt' + 'completion', 'messages', or 'text'",
        "continued_pretraining": "'text' (or prompt/completion or messages rows, learned whole)",
        "dpo": "'prompt' (or 'messages') + 'chosen' + 'rejected', or OpenAI's 'input' + 'preferred_output' "
        "+ 'non_preferred_output'",
        "grpo": "'prompt' (other columns reach the reward functions), or 'messages'",
        "classification": "'text' + 'label'",
    }
    return needs.get(task, "a known task")


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
