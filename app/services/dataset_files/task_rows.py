"""Owns what a row of the kinds beyond next-token training may hold, and a classification file's labels.

The kinds are preference pairs (DPO), labelled texts (classification) and prompts alone (GRPO).
"""

from __future__ import annotations

from typing import Any

from tuneforge.rules.datasets import (
    CHOSEN_COLUMN,
    LABEL_COLUMN,
    MESSAGES_COLUMN,
    OPENAI_INPUT_COLUMN,
    OPENAI_NON_PREFERRED_COLUMN,
    OPENAI_PREFERRED_COLUMN,
    PROMPT_COLUMN,
    REJECTED_COLUMN,
    TEXT_COLUMN,
    Split,
)

from app.services.dataset_files.rows import (
    EMPTY_TEXT,
    DatasetFormatError,
    Problem,
    RowCheck,
    json_cell,
    json_type,
    parse_messages,
    quoted,
    string_field,
)

# A classifier's head has one output per class; past a thousand classes a label is more likely an id or
# a free-text answer in the wrong column, and the tally of labels a validator holds stays small.
MAX_LABELS = 1000
# A label names a class; a long one is text in the wrong column (and every label is held in memory).
MAX_LABEL_CHARS = 200
# Integer classes are ids: non-negative (Hugging Face datasets mark unlabelled rows -1) and 32-bit.
MAX_INT_LABEL = 2**31 - 1
_LISTED_LABELS = 5

_NO_PROMPT = (
    "no prompt (an empty 'prompt' and no 'messages')",
    "each preference pair needs the prompt its answers reply to",
)
_TWO_PROMPTS = (
    "both a 'prompt' and 'messages'",
    "give each row its prompt once: as 'prompt' text or as 'messages' turns",
)
_EMPTY_PROMPT = ("an empty 'prompt'", "GRPO answers each prompt: fill them in or remove those rows")
_NO_LABEL = ("no 'label'", "every row needs its class: a string or a whole number")
_EMPTY_LABEL = ("an empty 'label'", "every row needs its class: a string or a whole number")
_LONG_LABEL = (
    f"a 'label' longer than {MAX_LABEL_CHARS} characters",
    "a label names a class: use a short name or an integer id",
)
_BAD_INT_LABEL = (
    f"an integer 'label' outside 0..{MAX_INT_LABEL}",
    "integer classes are ids from 0 (-1 usually marks an unlabelled row: remove those rows)",
)
_ASSISTANT_TURNS = 'a JSON list like [{"role": "assistant", "content": "..."}]'


def check_for(kind: str, columns: list[str]) -> RowCheck | None:
    """The row check of a kind this module owns, for a file whose first row has `columns`; else None."""
    if kind == "preference":
        # The first row decides the shape, as it decides the kind: one file is one shape.
        openai = not ({CHOSEN_COLUMN, REJECTED_COLUMN} <= set(columns))
        return _check_openai_preference if openai else _check_preference
    return {"classification": _check_classification, "prompt": _check_prompt}.get(kind)


def half_a_pair(columns: list[str]) -> str | None:
    """What a file that names only part of a preference pair lacks: caught here, or it would be taken
    for another kind (prompt + chosen reads as a prompts-only dataset) and its pairs silently lost."""
    present = set(columns)
    pair = (CHOSEN_COLUMN, REJECTED_COLUMN)
    openai = (OPENAI_INPUT_COLUMN, OPENAI_PREFERRED_COLUMN, OPENAI_NON_PREFERRED_COLUMN)
    if (present & set(pair)) and not set(pair) <= present:
        missing = REJECTED_COLUMN if CHOSEN_COLUMN in present else CHOSEN_COLUMN
        return f"there is no {missing!r} column; a preference pair needs 'chosen' and 'rejected'"
    if set(pair) <= present and not present & {PROMPT_COLUMN, MESSAGES_COLUMN}:
        return "there are 'chosen' and 'rejected' columns but no 'prompt' or 'messages' for them to answer"
    if (present & set(openai[1:])) and not set(openai) <= present and not set(pair) <= present:
        missing = next(column for column in openai if column not in present)
        needs = ", ".join(map(repr, openai))
        return f"there is no {missing!r} column; OpenAI's preference format needs {needs}"
    return None


# --- preference pairs --------------------------------------------------------------------------


def _check_preference(where: str, values: dict[str, Any]) -> Problem | None:
    """`prompt` text or `messages` turns, answered by a better `chosen` and a worse `rejected`."""
    prompt = string_field(where, values, PROMPT_COLUMN).strip()
    messages = values.get(MESSAGES_COLUMN)
    if messages is not None and messages != "":
        parse_messages(where, messages)
        if prompt:
            return _TWO_PROMPTS
    elif not prompt:
        return _NO_PROMPT
    return _check_answers(where, values, CHOSEN_COLUMN, REJECTED_COLUMN, text_allowed=True)


def _check_openai_preference(where: str, values: dict[str, Any]) -> Problem | None:
    """OpenAI's DPO row: `input` {messages: [...]}, `preferred_output` and `non_preferred_output`."""
    shape = 'a JSON object like {"messages": [...]}'
    given = json_cell(where, values.get(OPENAI_INPUT_COLUMN), "'input'", shape)
    if not isinstance(given, dict):
        raise DatasetFormatError(
            f"{where}: 'input' must be an object with a 'messages' list, found {json_type(given)}"
        )
    parse_messages(where, given.get("messages"), "'input.messages'")
    better, worse = OPENAI_PREFERRED_COLUMN, OPENAI_NON_PREFERRED_COLUMN
    return _check_answers(where, values, better, worse, text_allowed=False)


def _check_answers(
    where: str, values: dict[str, Any], better: str, worse: str, *, text_allowed: bool
) -> Problem | None:
    answers = [_answer(where, column, values.get(column), text_allowed) for column in (better, worse)]
    for column, answer in zip((better, worse), answers, strict=True):
        if not answer.strip():
            return (f"an empty {column!r}", "every preference pair needs both answers")
    if answers[0] == answers[1]:
        return (
            f"the same answer as {better!r} and {worse!r}",
            "a pair teaches only through the difference between its answers: fix or remove those rows",
        )
    return None


def _answer(where: str, column: str, value: object, text_allowed: bool) -> str:
    """An answer's text: a string (where allowed) or the contents of a list of assistant messages."""
    if value is None or (text_allowed and isinstance(value, str)):
        return value or ""
    turns = json_cell(where, value, repr(column), _ASSISTANT_TURNS)
    shape = "a string or a list of assistant messages" if text_allowed else "a list of assistant messages"
    if not isinstance(turns, list):
        raise DatasetFormatError(f"{where}: {column!r} must be {shape}, found {json_type(turns)}")
    if not turns:
        return ""
    for turn, message in enumerate(parse_messages(where, turns, repr(column)), start=1):
        if message["role"] != "assistant":
            raise DatasetFormatError(
                f"{where}, in {column!r}: message {turn} has role {quoted(message['role'])}; an answer holds "
                "only assistant messages (the conversation before it belongs in the prompt)"
            )
    return "\n".join(message["content"] for message in turns)


# --- classification and prompts ----------------------------------------------------------------


def _check_classification(where: str, values: dict[str, Any]) -> Problem | None:
    if not string_field(where, values, TEXT_COLUMN).strip():
        return EMPTY_TEXT
    return label_problem(values.get(LABEL_COLUMN))


def label_problem(label: object) -> Problem | None:
    """What is wrong with one row's label; None for a string or an integer class."""
    if label is None:
        return _NO_LABEL
    if isinstance(label, str):
        return _EMPTY_LABEL if not label.strip() else _LONG_LABEL if len(label) > MAX_LABEL_CHARS else None
    if isinstance(label, int) and not isinstance(label, bool):
        return None if 0 <= label <= MAX_INT_LABEL else _BAD_INT_LABEL
    return (
        f"a 'label' that is {json_type(label)}",
        "a label is a class: a string or a whole number (1, not 1.0)",
    )


def _check_prompt(where: str, values: dict[str, Any]) -> Problem | None:
    return None if string_field(where, values, PROMPT_COLUMN).strip() else _EMPTY_PROMPT


class LabelTally:
    """The distinct labels of a classification file's training and evaluation rows (at most MAX_LABELS)."""

    def __init__(self) -> None:
        self.every: dict[str | int, None] = {}  # ordered: messages name labels in the file's order
        self.train: dict[str | int, None] = {}
        self.evaluation: dict[str | int, None] = {}

    def add(self, where: str, label: str | int, split: str) -> None:
        if label not in self.every and len(self.every) == MAX_LABELS:
            raise DatasetFormatError(
                f"{where}: label {quoted(label)} is past the {MAX_LABELS} distinct labels a classification "
                "dataset may have; is 'label' the class, or an id or free text in the wrong column?"
            )
        self.every[label] = None
        (self.train if split == Split.TRAIN else self.evaluation)[label] = None

    def finish(self) -> None:
        """Refuse a file a classifier cannot learn from: one class, mixed label types, unseen classes."""
        every = list(self.every)
        kinds = {type(label) for label in every}
        if len(kinds) > 1:
            number = next(label for label in every if isinstance(label, int))
            name = next(label for label in every if isinstance(label, str))
            raise DatasetFormatError(
                f"the labels mix integers (such as {number}) and strings (such as {quoted(name)}); use one "
                "type for every row, or 1 and '1' count as two classes"
            )
        if len(self.train) == 1:
            raise DatasetFormatError(
                f"every training row has label {quoted(next(iter(self.train)))}; a classifier needs at least "
                "two classes: add training rows of the other classes"
            )
        unseen = [label for label in self.evaluation if label not in self.train]
        if unseen:
            shown = ", ".join(quoted(label) for label in unseen[:_LISTED_LABELS])
            more = f", and {len(unseen) - _LISTED_LABELS} more" if len(unseen) > _LISTED_LABELS else ""
            raise DatasetFormatError(
                f"evaluation rows have labels no training row has ({shown}{more}); a classifier learns only "
                "the training rows' classes: add training rows of them or drop those evaluation rows"
            )
