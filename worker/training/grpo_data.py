"""GRPO's rows as prompts: the token ids the policy continues, the prompt text and the `example` dict the
reward functions receive."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tuneforge.rules.datasets import (
    MESSAGES_COLUMN,
    PROMPT_COLUMN,
    SPLIT_COLUMN,
    kinds_for_task_message,
    task_takes_kind,
)

from worker.training.config import TrainingConfig
from worker.training.data import DataStats, PreparedData, TrainingDataError, detect_kind, split_rows

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class PromptExample:
    """One GRPO prompt."""

    prompt_ids: list[int]  # what the policy continues (the chat template's generation prompt included)
    prompt: str  # the reward functions' `prompt`: the row's prompt column, or a chat rendered as text
    example: dict[str, Any]  # the reward functions' `example`: the row's other columns, JSON values


def prepare_prompts(
    rows: Sequence[Mapping[str, Any]], tokenizer: PreTrainedTokenizerBase, config: TrainingConfig
) -> PreparedData:
    """Split the rows (as next-token tasks do) and encode each prompt; a prompt that leaves no room for
    `sampling_params.max_tokens` within max_seq_length is refused, naming the row."""
    if not rows:
        raise TrainingDataError("the dataset has no rows")
    kind = detect_kind(rows[0])
    if not task_takes_kind("grpo", kind):
        raise TrainingDataError(
            f"task 'grpo' cannot train on '{kind}' rows; it needs {kinds_for_task_message('grpo')}"
        )
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if kind == "messages" and not has_template:
        raise TrainingDataError(
            f"base model {config.base_model!r} has no chat template, which 'messages' rows need; "
            "use 'prompt' rows or a model with a chat template"
        )
    if config.apply_chat_template and not has_template:
        raise TrainingDataError(
            f"apply_chat_template is true but base model {config.base_model!r} has no chat template"
        )
    use_template = kind == "messages" or (has_template and config.apply_chat_template is not False)
    assert config.max_seq_length is not None  # resolved for the base model before data is prepared
    room = config.max_seq_length - config.sampling_params.max_tokens
    train_rows, eval_rows = split_rows(rows, config)

    def encode_all(part: list[tuple[int, Mapping[str, Any]]]) -> list[PromptExample]:
        examples = [_encode(index, row, tokenizer, use_template) for index, row in part]
        for (index, _), example in zip(part, examples, strict=True):
            if len(example.prompt_ids) > room:
                raise TrainingDataError(
                    f"row {index + 1}: its prompt is {len(example.prompt_ids)} tokens, which with "
                    f"sampling_params.max_tokens {config.sampling_params.max_tokens} exceeds max_seq_length "
                    f"{config.max_seq_length}; shorten the prompt, lower max_tokens or raise max_seq_length"
                )
        return examples

    train, evaluation = encode_all(train_rows), encode_all(eval_rows)
    stats = DataStats(
        kind=kind,
        train_rows=len(train),
        eval_rows=len(evaluation),
        truncated_rows=0,
        truncated_row_numbers=(),
        max_seq_length=config.max_seq_length,
        rows_without_targets=0,
        train_tokens=sum(len(e.prompt_ids) for e in train),
    )
    return PreparedData(train, evaluation, stats)  # type: ignore[arg-type]  # the task's own examples


def _encode(
    index: int, row: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase, use_template: bool
) -> PromptExample:
    if MESSAGES_COLUMN in row and PROMPT_COLUMN not in row:
        messages = _prompt_messages(index, row[MESSAGES_COLUMN])
        text = str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return PromptExample(ids, text, _example_of(row, MESSAGES_COLUMN))
    prompt = str(row.get(PROMPT_COLUMN) or "")
    if use_template:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(str(rendered), add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(prompt)["input_ids"]
    return PromptExample(ids, prompt, _example_of(row, PROMPT_COLUMN))


def _prompt_messages(index: int, messages: Any) -> list[dict[str, str]]:
    """The conversation up to the reply the policy writes: a trailing assistant turn is dropped."""
    if isinstance(messages, str):  # CSV cells hold the list as a JSON string
        messages = json.loads(messages)
    if not isinstance(messages, list) or not messages:
        raise TrainingDataError(f"row {index + 1}: 'messages' must be a non-empty list of {{role, content}}")
    turns = [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
    if turns[-1]["role"] == "assistant":
        turns = turns[:-1]
    if not turns:
        raise TrainingDataError(f"row {index + 1}: 'messages' holds no turn before the assistant's reply")
    return turns


def _example_of(row: Mapping[str, Any], prompt_column: str) -> dict[str, Any]:
    """The row's other columns (a prompt_completion row's completion among them), as JSON values: the
    reward functions run in another process."""
    rest = {k: v for k, v in row.items() if k not in (prompt_column, SPLIT_COLUMN)}
    return dict(json.loads(json.dumps(rest, default=str)))
