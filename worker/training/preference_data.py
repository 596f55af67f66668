"""Owns turning preference rows (DPO) into token pairs: a prompt with a chosen and a rejected reply, split,
chat-templated and truncated as SFT rows are.

Row shapes: `prompt` (text, or TRL's list of messages) or `messages` (the conversation so far), with
`chosen` / `rejected` each a reply (text, or a list of one assistant message); or OpenAI's DPO JSONL,
`input` {messages, tools?} with `preferred_output` / `non_preferred_output` (a list of one assistant message).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tuneforge.rules.datasets import (
    CHOSEN_COLUMN,
    MESSAGES_COLUMN,
    OPENAI_INPUT_COLUMN,
    OPENAI_NON_PREFERRED_COLUMN,
    OPENAI_PREFERRED_COLUMN,
    PROMPT_COLUMN,
    REJECTED_COLUMN,
    kinds_for_task_message,
)

from worker.training.config import TrainingConfig
from worker.training.data import (
    IGNORE_INDEX,
    DataStats,
    Example,
    PreparedData,
    TrainingDataError,
    detect_kind,
    split_rows,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Message keys passed on to the chat template besides role and content (tool use in OpenAI's format).
_MESSAGE_EXTRAS = ("name", "tool_calls", "tool_call_id")


@dataclass(frozen=True)
class PreferencePair:
    row: int  # 1-based row number in the dataset: the key of the pair's reference log-probs
    prompt: list[int]  # shared by both sequences
    chosen: list[int]  # the reply's tokens, its end-of-turn / eos included
    rejected: list[int]

    def sequences(self) -> tuple[Example, Example]:
        """(chosen, rejected) as next-token examples whose labels are the reply's tokens only."""
        hidden = [IGNORE_INDEX] * len(self.prompt)
        return (
            Example(self.prompt + self.chosen, hidden + self.chosen),
            Example(self.prompt + self.rejected, hidden + self.rejected),
        )


@dataclass(frozen=True)
class _Columns:
    """Where a dataset's rows keep the prompt and the two replies (decided by the first row)."""

    prompt: str
    chosen: str
    rejected: str


def prepare_preferences(
    rows: Sequence[Mapping[str, Any]], tokenizer: PreTrainedTokenizerBase, config: TrainingConfig
) -> PreparedData:
    """Split rows into train/eval as SFT does (seeded, or the `split` column), then encode each pair."""
    if not rows:
        raise TrainingDataError("the dataset has no rows")
    if detect_kind(rows[0]) != "preference":
        raise TrainingDataError(
            f"task 'dpo' needs preference rows: {kinds_for_task_message('dpo')}; the rows have columns "
            f"{sorted(rows[0])}"
        )
    columns = _columns_of(rows[0])
    if config.max_seq_length is None:
        raise ValueError("max_seq_length must be resolved for the base model before tokenising")
    max_length = config.max_seq_length
    train_rows, eval_rows = split_rows(rows, config)
    truncated: list[int] = []
    indistinct = 0

    def encode_all(part: list[tuple[int, Mapping[str, Any]]]) -> list[PreferencePair]:
        nonlocal indistinct
        pairs = []
        for index, row in part:
            pair = _encode_row(index, row, columns, tokenizer, config)
            cut = _truncate(pair, max_length)
            if cut is not pair:
                truncated.append(index + 1)
                indistinct += cut.chosen == cut.rejected  # the replies differed only past the cut
            pairs.append(cut)
        return pairs

    train, evaluation = encode_all(train_rows), encode_all(eval_rows)
    stats = DataStats(
        kind="preference",
        train_rows=len(train),
        eval_rows=len(evaluation),
        truncated_rows=len(truncated),
        truncated_row_numbers=tuple(sorted(truncated)),
        max_seq_length=max_length,
        rows_without_targets=indistinct,  # pairs left with nothing to tell apart
        train_tokens=sum(2 * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in train),
    )
    return PreparedData(train, evaluation, stats)  # type: ignore[arg-type]  # the task's example type


def _columns_of(row: Mapping[str, Any]) -> _Columns:
    if {CHOSEN_COLUMN, REJECTED_COLUMN} <= row.keys():
        prompt = PROMPT_COLUMN if PROMPT_COLUMN in row else MESSAGES_COLUMN
        return _Columns(prompt, CHOSEN_COLUMN, REJECTED_COLUMN)
    return _Columns(OPENAI_INPUT_COLUMN, OPENAI_PREFERRED_COLUMN, OPENAI_NON_PREFERRED_COLUMN)


def _truncate(pair: PreferencePair, max_length: int) -> PreferencePair:
    """Fit prompt + the longer reply into max_length: the prompt loses its start first (its end leads into
    the replies), keeping at least half the window; then both replies are cut to the same budget."""
    longest = max(len(pair.chosen), len(pair.rejected))
    if len(pair.prompt) + longest <= max_length:
        return pair
    keep = min(len(pair.prompt), max(max_length - longest, max_length // 2))
    budget = max_length - keep
    prompt = pair.prompt[len(pair.prompt) - keep :]
    return PreferencePair(pair.row, prompt, pair.chosen[:budget], pair.rejected[:budget])


def _encode_row(
    index: int,
    row: Mapping[str, Any],
    columns: _Columns,
    tokenizer: PreTrainedTokenizerBase,
    config: TrainingConfig,
) -> PreferencePair:
    for name in (columns.prompt, columns.chosen, columns.rejected):
        if row.get(name) is None:
            raise TrainingDataError(f"row {index + 1}: '{name}' is missing")
    chosen = _reply(index, columns.chosen, row[columns.chosen])
    rejected = _reply(index, columns.rejected, row[columns.rejected])
    if chosen == rejected:
        raise TrainingDataError(
            f"row {index + 1}: '{columns.chosen}' and '{columns.rejected}' are the same reply, so the pair "
            "teaches no preference; remove the row or give it a worse rejected reply"
        )
    prompt, tools = _prompt(index, columns.prompt, row[columns.prompt])
    if isinstance(prompt, str) and not _templated(tokenizer, config):
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        ids = tokenizer(prompt)["input_ids"]
        replies = [
            tokenizer(text, add_special_tokens=False)["input_ids"] + eos for text in (chosen, rejected)
        ]
        return PreferencePair(index + 1, ids, replies[0], replies[1])
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    elif not getattr(tokenizer, "chat_template", None):
        raise TrainingDataError(
            f"base model {config.base_model!r} has no chat template, which conversational preference rows "
            f"need; give '{PROMPT_COLUMN}' as text or use a model with a chat template"
        )
    ids, replies = _encode_chat(index, prompt, (chosen, rejected), tools, tokenizer)
    return PreferencePair(index + 1, ids, replies[0], replies[1])


def _templated(tokenizer: PreTrainedTokenizerBase, config: TrainingConfig) -> bool:
    """Whether a text prompt is rendered with the chat template (SFT's rule for prompt/completion rows)."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if config.apply_chat_template and not has_template:
        raise TrainingDataError(
            f"apply_chat_template is true but base model {config.base_model!r} has no chat template"
        )
    return has_template if config.apply_chat_template is None else config.apply_chat_template


def _encode_chat(
    index: int,
    messages: list[dict[str, Any]],
    replies: tuple[str, str],
    tools: Any,
    tokenizer: PreTrainedTokenizerBase,
) -> tuple[list[int], list[list[int]]]:
    """The prompt rendered up to the assistant's turn, and each reply as the rest of the rendered chat
    (its end-of-turn tokens included); tokenised apart, so both replies follow the very same prompt."""
    extra = {"tools": tools} if tools else {}
    prefix = str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra))
    encoded = []
    for reply in replies:
        turn = {"role": "assistant", "content": reply}
        full = str(tokenizer.apply_chat_template([*messages, turn], tokenize=False, **extra))
        if not full.startswith(prefix):
            raise TrainingDataError(
                f"row {index + 1}: the chat template does not render the reply after the prompt's "
                "generation prompt, so the reply's tokens cannot be told apart"
            )
        encoded.append(tokenizer(full[len(prefix) :], add_special_tokens=False)["input_ids"])
    return tokenizer(prefix, add_special_tokens=False)["input_ids"], encoded


def _prompt(index: int, field: str, value: Any) -> tuple[str | list[dict[str, Any]], Any]:
    """(the prompt as text or as messages, the tools OpenAI's `input` offers the model)."""
    tools = None
    if field == OPENAI_INPUT_COLUMN:
        value = _json_cell(value)
        if not isinstance(value, Mapping) or MESSAGES_COLUMN not in value:
            raise TrainingDataError(f"row {index + 1}: '{field}' must be an object {{messages: [...]}}")
        tools, value, field = value.get("tools"), value[MESSAGES_COLUMN], f"{field}.messages"
    elif field == PROMPT_COLUMN and isinstance(value, str):
        # Text, unless a CSV cell holds TRL's list of messages as JSON.
        value = _json_cell(value) if value.lstrip().startswith("[{") else value
        if isinstance(value, str):
            if not value.strip():
                raise TrainingDataError(f"row {index + 1}: '{field}' is empty")
            return value, None
    value = _json_cell(value)
    if not isinstance(value, list) or not value:
        raise TrainingDataError(f"row {index + 1}: '{field}' must be a non-empty list of {{role, content}}")
    return [_message(index, field, message) for message in value], tools


def _reply(index: int, field: str, value: Any) -> str:
    """A reply's text: given as text, or as a list of one assistant message."""
    if isinstance(value, str) and value.lstrip().startswith("[{"):
        value = _json_cell(value)  # CSV cells hold a list of messages as JSON; other text stays text
    if isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], Mapping) or value[0].get("role") != "assistant":
            raise TrainingDataError(
                f"row {index + 1}: '{field}' must be the reply's text or a list of one assistant message "
                '[{"role": "assistant", "content": "..."}]'
            )
        value = _message(index, field, value[0])["content"]
    if not isinstance(value, str):
        raise TrainingDataError(f"row {index + 1}: '{field}' must be text, not {type(value).__name__}")
    if not value.strip():
        raise TrainingDataError(f"row {index + 1}: '{field}' is empty")
    return value


def _message(index: int, field: str, message: Any) -> dict[str, Any]:
    if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
        raise TrainingDataError(f"row {index + 1}: every message of '{field}' needs a 'role' and a 'content'")
    content = message.get("content")
    if isinstance(content, list):  # OpenAI's content parts: only text is trained on
        texts = [part.get("text") for part in content if isinstance(part, Mapping)]
        if len(texts) != len(content) or not all(isinstance(text, str) for text in texts):
            raise TrainingDataError(f"row {index + 1}: '{field}' has a content part that is not text")
        content = "".join(texts)  # type: ignore[arg-type]  # checked to be strings just above
    if content is None and message.get("tool_calls"):
        content = ""
    if not isinstance(content, str):
        raise TrainingDataError(f"row {index + 1}: a message of '{field}' has no text 'content'")
    extras = {key: message[key] for key in _MESSAGE_EXTRAS if message.get(key) is not None}
    return {"role": message["role"], "content": content, **extras}


def _json_cell(value: Any) -> Any:
    """CSV cells hold lists and objects as JSON strings."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value
