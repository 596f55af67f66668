"""Owns turning dataset rows into training examples: split, tokenise, mask labels, truncate, pad."""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tuneforge.rules.datasets import (
    SPLIT_COLUMN,
    DatasetKind,
    Split,
    kind_of_columns,
    kinds_for_task_message,
    split_of,
)

from worker.training.config import TrainingConfig

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # the label cross-entropy skips: prompt, non-assistant and padding tokens


class TrainingDataError(ValueError):
    """Rows that cannot be trained on with this tokenizer; the message says which and why."""


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # same length; IGNORE_INDEX where no loss is taken


@dataclass(frozen=True)
class DataStats:
    kind: DatasetKind
    train_rows: int
    eval_rows: int
    truncated_rows: int  # rows cut to max_seq_length (kept, never dropped)
    truncated_row_numbers: tuple[int, ...]  # their 1-based row numbers in the dataset
    max_seq_length: int  # the length they were cut to
    rows_without_targets: int  # rows left with no loss token, e.g. a prompt longer than max_seq_length
    train_tokens: int


@dataclass(frozen=True)
class PreparedData:
    train: list[Example]
    eval: list[Example]
    stats: DataStats
    labels: tuple[str, ...] | None = None  # task classification: class index -> label (the head's rows)


def prepare_data(
    rows: Sequence[Mapping[str, Any]], tokenizer: PreTrainedTokenizerBase, config: TrainingConfig
) -> PreparedData:
    """Split rows into train/eval (seeded), then tokenise each with the loss mask its format needs."""
    if not rows:
        raise TrainingDataError("the dataset has no rows")
    kind = detect_kind(rows[0])
    if kind == "classification":  # text + label: a next-token task learns the text
        kind = "text"
    if kind not in ("prompt_completion", "messages", "text"):
        raise TrainingDataError(
            f"task '{config.task}' cannot train on a '{kind}' dataset; "
            f"it needs {kinds_for_task_message(config.task)}"
        )
    train_rows, eval_rows = split_rows(rows, config)
    use_template = _use_chat_template(kind, tokenizer, config)
    counts = {"no_targets": 0}
    truncated: list[int] = []
    max_length = _max_length(config)

    def encode_all(part: list[tuple[int, Mapping[str, Any]]]) -> list[Example]:
        examples = []
        for index, row in part:
            ids, labels = _encode_row(index, row, kind, tokenizer, config, use_template)
            if len(ids) > max_length:
                truncated.append(index + 1)
                ids, labels = ids[:max_length], labels[:max_length]
            counts["no_targets"] += all(label == IGNORE_INDEX for label in labels)
            examples.append(Example(ids, labels))
        return examples

    train, evaluation = encode_all(train_rows), encode_all(eval_rows)
    stats = DataStats(
        kind=kind,
        train_rows=len(train),
        eval_rows=len(evaluation),
        truncated_rows=len(truncated),
        truncated_row_numbers=tuple(sorted(truncated)),
        max_seq_length=max_length,
        rows_without_targets=counts["no_targets"],
        train_tokens=sum(len(e.input_ids) for e in train),
    )
    return PreparedData(train, evaluation, stats)


def _max_length(config: TrainingConfig) -> int:
    if config.max_seq_length is None:
        raise ValueError("max_seq_length must be resolved for the base model before tokenising")
    return config.max_seq_length


def detect_kind(row: Mapping[str, Any]) -> DatasetKind:
    """The first row decides the format, with the dataset service's precedence."""
    kind = kind_of_columns(row)
    if kind is not None:
        return kind
    raise TrainingDataError(
        f"rows have columns {sorted(row)}; expected 'prompt' and 'completion', 'messages', or 'text'"
    )


def split_rows(
    rows: Sequence[Mapping[str, Any]], config: TrainingConfig
) -> tuple[list[tuple[int, Mapping[str, Any]]], list[tuple[int, Mapping[str, Any]]]]:
    """(index, row) pairs for train and eval: the `split` column if any, else a seeded holdout."""
    indexed = list(enumerate(rows))
    if SPLIT_COLUMN in rows[0]:
        split = {i: _split_name(i, row.get(SPLIT_COLUMN)) for i, row in indexed}
        train = [(i, row) for i, row in indexed if split[i] == Split.TRAIN]
        held_out = [(i, row) for i, row in indexed if split[i] == Split.EVALUATION]
    else:
        # A private Random: the split must not depend on, or disturb, anyone else's RNG.
        random.Random(config.seed).shuffle(indexed)
        n_eval = max(1, round(len(indexed) * config.eval_fraction)) if config.eval_fraction else 0
        n_eval = min(n_eval, len(indexed) - 1)  # always keep at least one training row
        held_out, train = sorted(indexed[:n_eval], key=_index), sorted(indexed[n_eval:], key=_index)
    if not train:
        raise TrainingDataError("no row has split 'train'; at least one training row is needed")
    return train, held_out[: config.max_eval_samples]


def _index(pair: tuple[int, Mapping[str, Any]]) -> int:
    return pair[0]


def _split_name(index: int, value: object) -> Split:
    name = split_of(value)
    if name is None:
        raise TrainingDataError(f"row {index + 1}: split is {value!r}; use 'train' or 'evaluation'")
    return name


def _use_chat_template(kind: DatasetKind, tokenizer: PreTrainedTokenizerBase, config: TrainingConfig) -> bool:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if kind == "messages" and not has_template:
        raise TrainingDataError(
            f"base model {config.base_model!r} has no chat template, which 'messages' rows need; "
            "use prompt/completion rows or a model with a chat template"
        )
    if kind != "prompt_completion":
        return kind == "messages"
    if config.apply_chat_template and not has_template:
        raise TrainingDataError(
            f"apply_chat_template is true but base model {config.base_model!r} has no chat template"
        )
    return has_template if config.apply_chat_template is None else config.apply_chat_template


def _encode_row(
    index: int,
    row: Mapping[str, Any],
    kind: DatasetKind,
    tokenizer: PreTrainedTokenizerBase,
    config: TrainingConfig,
    use_template: bool,
) -> tuple[list[int], list[int]]:
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if kind == "text":
        ids = tokenizer(str(row.get("text") or ""))["input_ids"] + eos
        labels = list(ids)
    elif use_template:
        messages = _messages_of(index, row, kind)
        ids, labels = _encode_chat(index, messages, tokenizer)
    else:
        prompt = tokenizer(str(row.get("prompt") or ""))["input_ids"]
        completion = tokenizer(str(row.get("completion") or ""), add_special_tokens=False)["input_ids"] + eos
        ids, labels = prompt + completion, [IGNORE_INDEX] * len(prompt) + completion
    # Continued pretraining learns every token of whatever it is given.
    return ids, (list(ids) if config.task == "continued_pretraining" else labels)


def _messages_of(index: int, row: Mapping[str, Any], kind: DatasetKind) -> list[dict[str, str]]:
    if kind == "prompt_completion":
        return [
            {"role": "user", "content": str(row.get("prompt") or "")},
            {"role": "assistant", "content": str(row.get("completion") or "")},
        ]
    messages = row["messages"]
    if isinstance(messages, str):  # CSV cells hold the list as a JSON string
        messages = json.loads(messages)
    if not isinstance(messages, list) or not messages:
        raise TrainingDataError(f"row {index + 1}: 'messages' must be a non-empty list of {{role, content}}")
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]


def _encode_chat(
    index: int, messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase
) -> tuple[list[int], list[int]]:
    """Render the whole chat once; label the tokens whose characters belong to assistant turns.

    Templates rarely mark assistant spans (`{% generation %}`), so a turn's span is found by
    rendering the chat up to it: [len(render(before, generation prompt)), len(render(through))).
    """
    full = str(tokenizer.apply_chat_template(messages, tokenize=False))
    spans = []
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = str(
            tokenizer.apply_chat_template(messages[:turn], tokenize=False, add_generation_prompt=True)
        )
        through = str(tokenizer.apply_chat_template(messages[: turn + 1], tokenize=False))
        if not (full.startswith(through) and through.startswith(before)):
            raise TrainingDataError(
                f"row {index + 1}: the chat template does not render turn {turn + 1} as a prefix of the "
                "whole chat, so assistant tokens cannot be told apart"
            )
        spans.append((len(before), len(through)))
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = encoded["input_ids"]
    labels = [
        token if any(lo <= start < hi for lo, hi in spans) else IGNORE_INDEX
        for token, (start, _end) in zip(ids, encoded["offset_mapping"], strict=True)
    ]
    return ids, labels
