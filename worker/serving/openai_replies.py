"""OpenAI's response shapes for `/v1/completions` and `/v1/chat/completions`: a request's choices
(each with its index) as one whole response, or as a stream of chunks."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator, Callable
from typing import Any

from pydantic import BaseModel, ConfigDict

from worker.serving.chat_tools import ChatTools
from worker.serving.choices import Choices, Generations, total_speculation
from worker.serving.errors import ServingError
from worker.serving.http_common import completion_text, error_code, finish_reason_of, openai_error_body, sse
from worker.serving.logprobs_format import ReplyLogprobs
from worker.serving.outputs import FinishReason, SpeculationStats, TokenOutput


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    include_usage: bool = False
    continuous_usage_stats: bool = False


# --- responses ------------------------------------------------------------------------------------


def openai_finish_reason(reason: FinishReason) -> str:
    if reason == FinishReason.LENGTH:
        return "length"
    return "abort" if reason == FinishReason.ABORTED else "stop"


class Reply:
    """Renders a request's choices as OpenAI's whole response or as its stream of chunks."""

    def __init__(
        self,
        id_prefix: str,
        kind: str,
        model: str,
        prompt_tokens: int,
        *,
        chat: bool,
        tools: ChatTools | None = None,
    ) -> None:
        self.id = f"{id_prefix}-{uuid.uuid4().hex}"
        self.kind, self.model, self.prompt_tokens, self.chat = kind, model, prompt_tokens, chat
        self.created = int(time.time())
        # With tools in play, a chat choice's text is read for tool calls once it is complete.
        self.tools = tools if tools is not None and tools.active else None
        # Logprobs and echo, when the request asks: one renderer per choice index (each keeps its offsets).
        self.extras: Callable[[int], ReplyLogprobs] | None = None
        self._extras: dict[int, ReplyLogprobs] = {}

    def _extra(self, index: int) -> ReplyLogprobs | None:
        if self.extras is None:
            return None
        if index not in self._extras:
            self._extras[index] = self.extras(index)
        return self._extras[index]

    def usage(self, completion_tokens: int, speculation: SpeculationStats | None = None) -> dict[str, Any]:
        total = self.prompt_tokens + completion_tokens
        usage: dict[str, Any] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": total,
        }
        if speculation is not None:
            # OpenAI's own fields for drafts checked against the model (Predicted Outputs), and the
            # Turbo adapter's acceptance under tuneforge's name.
            usage["completion_tokens_details"] = {
                "accepted_prediction_tokens": speculation.accepted,
                "rejected_prediction_tokens": speculation.drafted - speculation.accepted,
            }
            usage["speculation"] = speculation.as_dict()
        return usage

    def whole(self, choices: Choices, generated: Choices) -> dict[str, Any]:
        """`choices` by index; the usage counts every choice `generated` (best_of's unreturned ones too)."""
        rendered = []
        for index in sorted(choices):
            outputs = choices[index]
            rendered.append(self._whole_choice(index, outputs))
        finals = [outputs[-1] for outputs in generated.values()]
        usage = self.usage(sum(o.index + 1 for o in finals), total_speculation(o.speculation for o in finals))
        return self._envelope(self.kind, rendered) | {"usage": usage}

    def _whole_choice(self, index: int, outputs: list[TokenOutput]) -> dict[str, Any]:
        text, reason = completion_text(outputs), openai_finish_reason(finish_reason_of(outputs))
        choice: dict[str, Any] = {"index": index, "logprobs": None, "finish_reason": reason}
        if (extra := self._extra(index)) is not None:
            prefix, choice["logprobs"] = extra.whole(outputs)
            text = prefix + text
        if not self.chat:
            choice["text"] = text
            return choice
        choice["message"] = {"role": "assistant", "content": text}
        if self.tools is not None:
            content, calls = self.tools.calls(text)
            if calls:
                choice["message"] = {"role": "assistant", "content": content, "tool_calls": calls}
                choice["finish_reason"] = "tool_calls" if reason == "stop" else reason
        return choice

    async def stream(self, generations: Generations, options: StreamOptions) -> AsyncGenerator[str, None]:
        """Chunks of every choice (each names its index) ending in `[DONE]`; with `include_usage`
        every chunk has `usage` (null, or the running counts with vLLM's `continuous_usage_stats`)
        and a last chunk without choices has it."""
        kind = f"{self.kind}.chunk" if self.chat else self.kind
        generated: dict[int, int] = {}
        speculation: dict[int, SpeculationStats | None] = {}

        def chunk(choices: list[dict[str, Any]]) -> str:
            if not options.include_usage:
                return sse(self._envelope(kind, choices))
            running = self.usage(sum(generated.values()), total_speculation(speculation.values()))
            return sse(
                self._envelope(kind, choices) | {"usage": running if options.continuous_usage_stats else None}
            )

        try:
            if self.chat:
                for index in range(len(generations.items) * generations.width):
                    yield chunk([self._chunk_choice(index, {"role": "assistant", "content": ""})])
            held: dict[int, list[TokenOutput]] = {}
            async for index, output in generations.outputs():
                generated[index], speculation[index] = output.index + 1, output.speculation
                if self.tools is not None:  # tool calls are known only at the end: sent whole then
                    held.setdefault(index, []).append(output)
                    if output.finished:
                        yield chunk([self._tool_choice(index, held.pop(index))])
                    continue
                for choice in self._chunk_choices(index, output):
                    yield chunk([choice])
        except ServingError as exc:
            yield sse(openai_error_body(exc.status_code, exc.message, exc.field, error_code(exc)))
        if options.include_usage:
            usage = self.usage(sum(generated.values()), total_speculation(speculation.values()))
            yield sse(self._envelope(kind, []) | {"usage": usage})
        yield sse("[DONE]")

    def _tool_choice(self, index: int, outputs: list[TokenOutput]) -> dict[str, Any]:
        """A choice's held-back reply as one delta: tool calls (each with its index) or the content."""
        whole = self._whole_choice(index, outputs)
        message, reason = whole["message"], whole["finish_reason"]
        delta: dict[str, Any] = {"content": message["content"]}
        if "tool_calls" in message:
            delta["tool_calls"] = [call | {"index": i} for i, call in enumerate(message["tool_calls"])]
        return self._chunk_choice(index, delta, reason) | {"logprobs": whole["logprobs"]}

    def _chunk_choices(self, index: int, output: TokenOutput) -> list[dict[str, Any]]:
        reason = openai_finish_reason(output.finish_reason) if output.finish_reason else None
        text, logprobs = output.text, None
        if (extra := self._extra(index)) is not None:  # every token gets its chunk, with its logprobs
            prefix, logprobs = extra.chunk(output)
            text = prefix + text
        if not self.chat:
            if not (text or reason or logprobs):
                return []
            return [self._chunk_choice(index, text, reason) | {"logprobs": logprobs}]
        choices = (
            [self._chunk_choice(index, {"content": text}) | {"logprobs": logprobs}]
            if text or logprobs
            else []
        )
        if reason is not None:
            choices.append(self._chunk_choice(index, {}, reason))
        return choices

    def _chunk_choice(
        self, index: int, content: str | dict[str, Any], reason: str | None = None
    ) -> dict[str, Any]:
        key = "delta" if self.chat else "text"
        return {"index": index, key: content, "logprobs": None, "finish_reason": reason}

    def _envelope(self, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
