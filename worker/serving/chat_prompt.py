"""Chat prompts: the messages of a chat request (tool calls and tool results included) through the base
model's chat template, with the request's tools (chat_tools.py)."""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from worker.serving.chat_tools import ChatTools, template_messages
from worker.serving.errors import GrammarError, InvalidParameterError
from worker.serving.http_common import RequestContext
from worker.serving.params import MAX_CHOICES, MAX_CONTENT_PARTS, MAX_NAME_LENGTH, MAX_PROMPT_CHARS

PromptText = Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    role: str = Field(max_length=MAX_NAME_LENGTH)
    content: PromptText | Annotated[list[dict[str, Any]], Field(max_length=MAX_CONTENT_PARTS)] | None = None


def chat_prompt_ids(ctx: RequestContext, messages: list[ChatMessage], tools: ChatTools) -> list[int]:
    """The base model's chat template over the messages (and tools), ending in the assistant's turn."""
    conversation = [_turn(m, i) for i, m in enumerate(messages)]
    characters = sum(len(json.dumps(turn)) for turn in conversation)
    _refuse(
        characters > MAX_PROMPT_CHARS,
        "messages",
        f"hold {characters} characters; at most {MAX_PROMPT_CHARS} are accepted",
    )
    tokenizer = ctx.engine.tokenizer
    _refuse(tokenizer.chat_template is None, "messages", f"{ctx.engine.model_name} has no chat template")
    try:
        declared = [t.as_openai() for t in tools.tools] if tools.active else None
        plain = tokenizer.apply_chat_template(
            template_messages(conversation, tools, False), add_generation_prompt=True, tokenize=False
        )
        text = plain
        if declared:  # a template that renders tools itself differs once they are given
            rendered = tokenizer.apply_chat_template(
                template_messages(conversation, tools, True),
                tools=declared,
                add_generation_prompt=True,
                tokenize=False,
            )
            unaware = tokenizer.apply_chat_template(
                template_messages(conversation, tools, True), add_generation_prompt=True, tokenize=False
            )
            text = rendered if rendered != unaware else plain
    except GrammarError:
        raise
    except Exception as exc:  # jinja's TemplateError: the template refused these messages
        raise InvalidParameterError(
            f"messages: the chat template refused them: {exc}", field="messages"
        ) from None
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _turn(message: ChatMessage, index: int) -> dict[str, Any]:
    """A message as the chat template gets it, with an assistant's tool calls and a tool's call id."""
    turn: dict[str, Any] = {"role": message.role, "content": _message_text(message, index)}
    extra = message.model_extra or {}
    calls = extra.get("tool_calls")
    if calls:
        _refuse(
            not isinstance(calls, list) or len(calls) > MAX_CHOICES,
            f"messages[{index}].tool_calls",
            f"must be a list of at most {MAX_CHOICES} calls",
        )
        turn["tool_calls"] = calls
    if isinstance(extra.get("tool_call_id"), str):
        turn["tool_call_id"] = extra["tool_call_id"]
    return turn


def _message_text(message: ChatMessage, index: int) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    parts = []
    for part in message.content:
        _refuse(part.get("type") != "text", f"messages[{index}].content", "only text parts are supported")
        parts.append(str(part.get("text", "")))
    return "".join(parts)


def _refuse(condition: bool, field: str, message: str) -> None:
    if condition:
        raise InvalidParameterError(f"{field} {message}", field=field)
