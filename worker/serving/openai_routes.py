"""vLLM/OpenAI-compatible endpoints: `/v1/completions`, `/v1/chat/completions` (SSE if streamed), models."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import replace
from typing import Annotated, Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from worker.serving.chat_prompt import ChatMessage, chat_prompt_ids
from worker.serving.chat_tools import ChatTools
from worker.serving.constraints import openai_constraint
from worker.serving.errors import InvalidParameterError, ServingError
from worker.serving.http_common import (
    EventStreamResponse,
    Generation,
    RequestContext,
    completion_text,
    error_code,
    finish_reason_of,
    openai_error_body,
    sse,
)
from worker.serving.logprobs_format import ReplyLogprobs, echo_text
from worker.serving.outputs import FinishReason, SpeculationStats, TokenOutput
from worker.serving.params import (
    MAX_ABS_PENALTY,
    MAX_CHOICES,
    MAX_LOGPROBS,
    MAX_MESSAGES,
    MAX_NAME_LENGTH,
    MAX_PROMPT_CHARS,
    MAX_PROMPT_TOKEN_IDS,
    MAX_REGEX_CHARS,
    MAX_REPETITION_PENALTY,
    MAX_STOP_LENGTH,
    MAX_STOP_SEQUENCES,
    MAX_TEMPERATURE,
    MAX_TOKEN_ID,
    MAX_TOKENS_LIMIT,
    MAX_TOOLS,
    MAX_TOP_K,
    MIN_REPETITION_PENALTY,
    SEED_MAX,
    SEED_MIN,
    SamplingParams,
)

router = APIRouter(prefix="/v1")

# OpenAI's default for the legacy completions endpoint; chat defaults to the rest of the context.
DEFAULT_COMPLETION_TOKENS = 16


# Every field is bounded where it is parsed; NaN and infinities (which Python's json accepts) are refused.
_BOUNDED = ConfigDict(extra="ignore", allow_inf_nan=False)
Tokens = Annotated[int, Field(ge=1, le=MAX_TOKENS_LIMIT)]
StopString = Annotated[str, Field(max_length=MAX_STOP_LENGTH)]
TokenId = Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]
TokenIds = Annotated[list[TokenId], Field(max_length=MAX_PROMPT_TOKEN_IDS)]
PromptText = Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]
Penalty = Annotated[float, Field(ge=-MAX_ABS_PENALTY, le=MAX_ABS_PENALTY)]


class StreamOptions(BaseModel):
    model_config = _BOUNDED

    include_usage: bool = False
    continuous_usage_stats: bool = False


class _GenerationRequest(BaseModel):
    """Fields both endpoints take. Unknown fields are ignored, as vLLM does; unsupported ones refused."""

    model_config = _BOUNDED

    model: str = Field(default="", max_length=MAX_NAME_LENGTH)
    max_tokens: Tokens | None = None
    temperature: float | None = Field(default=None, ge=0, le=MAX_TEMPERATURE)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: Annotated[dict[str, Penalty], Field(max_length=MAX_CHOICES)] | None = None
    # vLLM's extras
    top_k: int | None = Field(default=None, ge=-1, le=MAX_TOP_K)
    repetition_penalty: float | None = Field(
        default=None, ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY
    )
    ignore_eos: bool = False
    min_tokens: int | None = Field(default=None, ge=0, le=MAX_TOKENS_LIMIT)
    # Output constraints (constraints.py bounds the schemas): OpenAI's, and vLLM's guided_* extras.
    response_format: dict[str, Any] | None = None
    guided_regex: str | None = Field(default=None, max_length=MAX_REGEX_CHARS)
    guided_json: dict[str, Any] | None = None

    def sampling(self, max_tokens: int) -> SamplingParams:
        self._refuse_unsupported()
        constraint = openai_constraint(self.response_format, self.guided_regex, self.guided_json)
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=max(self.top_k or 0, 0) if self.top_k != -1 else 0,  # vLLM spells "off" -1
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            seed=self.seed,
            stop=stop,
            ignore_eos=self.ignore_eos,
            constraint=constraint,
            **self.logprob_params(),
        )

    def logprob_params(self) -> dict[str, Any]:
        """SamplingParams' `logprobs` / `prompt_logprobs` for what the request asks (none here)."""
        return {}

    def _refuse_unsupported(self) -> None:
        _refuse(self.n != 1, "n", "only n=1 is supported; send one request per completion")
        _refuse(bool(self.presence_penalty), "presence_penalty", "is not supported; use repetition_penalty")
        _refuse(bool(self.frequency_penalty), "frequency_penalty", "is not supported; use repetition_penalty")
        _refuse(bool(self.logit_bias), "logit_bias", "is not supported")
        _refuse(bool(self.min_tokens), "min_tokens", "is not supported")
        _refuse(self.top_k is not None and self.top_k < -1, "top_k", "must be >= 1, or 0 / -1 for off")

    @property
    def usage_options(self) -> StreamOptions:
        return self.stream_options or StreamOptions()


class CompletionRequest(_GenerationRequest):
    prompt: (
        PromptText
        | Annotated[list[PromptText], Field(max_length=MAX_CHOICES)]
        | TokenIds
        | Annotated[list[TokenIds], Field(max_length=MAX_CHOICES)]
    )
    best_of: int | None = Field(default=None, ge=1, le=MAX_CHOICES)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    suffix: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)

    def logprob_params(self) -> dict[str, Any]:
        # An echoed prompt comes with its own entries when logprobs are asked.
        scored = self.echo and self.logprobs is not None
        return {"logprobs": self.logprobs or 0, "prompt_logprobs": self.logprobs if scored else None}

    def _refuse_unsupported(self) -> None:
        super()._refuse_unsupported()
        _refuse(self.best_of not in (None, 1), "best_of", "only best_of=1 is supported")
        _refuse(self.suffix is not None, "suffix", "is not supported")


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: Tokens | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    tools: Annotated[list[dict[str, Any]], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    def logprob_params(self) -> dict[str, Any]:
        return {"logprobs": (self.top_logprobs or 0) if self.logprobs else 0}

    def _refuse_unsupported(self) -> None:
        super()._refuse_unsupported()
        _refuse(
            self.top_logprobs is not None and not self.logprobs,
            "top_logprobs",
            "needs logprobs: true (OpenAI's rule)",
        )

    def chat_sampling(self, max_tokens: int, tools: ChatTools) -> SamplingParams:
        """The sampling parameters, constrained to a tool call's JSON when one is forced."""
        params = self.sampling(max_tokens)
        forced = tools.constraint()
        if forced is None:
            return params
        _refuse(
            params.constraint is not None,
            "tool_choice",
            "forcing a call cannot be combined with response_format",
        )
        return replace(params, constraint=forced)


def _refuse(condition: bool, field: str, message: str) -> None:
    if condition:
        raise InvalidParameterError(f"{field} {message}", field=field)


# --- routes ---------------------------------------------------------------------------------------


@router.post("/completions", response_model=None)
async def create_completion(body: CompletionRequest, request: Request) -> Response | dict[str, Any]:
    ctx = RequestContext.of(request)
    prompt_ids = await run_in_threadpool(_prompt_ids, ctx, body.prompt)  # tokenizing is CPU work
    budget = ctx.max_tokens(len(prompt_ids), body.max_tokens, DEFAULT_COMPLETION_TOKENS, "max_tokens")
    params = body.sampling(budget)
    tokenizer = ctx.engine.tokenizer
    echoed = await run_in_threadpool(echo_text, tokenizer, body.prompt, prompt_ids) if body.echo else None
    generation = await ctx.generate(prompt_ids, params, body.model)
    reply = _Reply(
        "cmpl", "text_completion", body.model or ctx.engine.model_name, len(prompt_ids), chat=False
    )
    if body.logprobs is not None or body.echo:
        wanted = body.logprobs is not None
        reply.extras = ReplyLogprobs(tokenizer, prompt_ids, chat=False, wanted=wanted, echo_text=echoed)
    return await _answer(reply, generation, body, request)


@router.post("/chat/completions", response_model=None)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response | dict[str, Any]:
    ctx = RequestContext.of(request)
    tools = ChatTools.of(body.tools, body.tool_choice, body.parallel_tool_calls)
    prompt_ids = await run_in_threadpool(chat_prompt_ids, ctx, body.messages, tools)
    field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    requested = body.max_completion_tokens or body.max_tokens
    params = body.chat_sampling(ctx.max_tokens(len(prompt_ids), requested, None, field), tools)
    generation = await ctx.generate(prompt_ids, params, body.model)
    model = body.model or ctx.engine.model_name
    reply = _Reply("chatcmpl", "chat.completion", model, len(prompt_ids), chat=True, tools=tools)
    if body.logprobs:
        reply.extras = ReplyLogprobs(ctx.engine.tokenizer, prompt_ids, chat=True, wanted=True, echo_text=None)
    return await _answer(reply, generation, body, request)


async def _answer(
    reply: _Reply, generation: Generation, body: _GenerationRequest, request: Request
) -> Response | dict[str, Any]:
    if body.stream:
        return EventStreamResponse(reply.stream(generation, body.usage_options))
    outputs = await generation.collect(request)
    if reply.extras is not None:  # decoding every token and alternative is tokenizer work
        return await run_in_threadpool(reply.whole, outputs)
    return reply.whole(outputs)


@router.get("/models")
async def list_models(request: Request) -> dict[str, Any]:
    """The base model and the tenant's adapters; `loaded` says which are in memory now."""
    ctx = RequestContext.of(request)
    loaded = set(ctx.engine.loaded_adapters(ctx.tenant))
    available = await run_in_threadpool(ctx.engine.source.list_available, ctx.tenant)
    created = int(request.app.state.started_at)
    base = ctx.engine.model_name
    data = [_model_card(base, created, parent=None, loaded=True)]
    data += [_model_card(a, created, parent=base, loaded=a in loaded) for a in sorted(set(available))]
    return {"object": "list", "data": data}


def _model_card(name: str, created: int, *, parent: str | None, loaded: bool) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "tuneforge",
        "root": name,
        "parent": parent,
        "loaded": loaded,
    }


# --- prompts --------------------------------------------------------------------------------------


def _prompt_ids(ctx: RequestContext, prompt: str | list[str] | list[int] | list[list[int]]) -> list[int]:
    """A string, one-element list of strings, list of token ids, or one-element list of such lists."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        _refuse(
            len(prompt) != 1, "prompt", "takes one prompt per request (a list of several is not supported)"
        )
        prompt = prompt[0]  # type: ignore[assignment]
    if isinstance(prompt, str):
        ids = list(ctx.engine.tokenizer(prompt)["input_ids"]) if prompt else []
    else:
        ids = list(prompt)  # type: ignore[arg-type]
        vocab = len(ctx.engine.tokenizer)
        bad = [token for token in ids if not 0 <= token < vocab]
        _refuse(bool(bad), "prompt", f"token ids must be in [0, {vocab}); got {bad[:5]}")
    _refuse(not ids, "prompt", "must not be empty")
    return ids


# --- responses ------------------------------------------------------------------------------------


def openai_finish_reason(reason: FinishReason) -> str:
    if reason == FinishReason.LENGTH:
        return "length"
    return "abort" if reason == FinishReason.ABORTED else "stop"


class _Reply:
    """Renders one generation as OpenAI's whole response or as its stream of chunks."""

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
        # With tools in play, a chat reply's text is read for tool calls once it is complete.
        self.tools = tools if tools is not None and tools.active else None
        self.kind, self.model, self.prompt_tokens, self.chat = kind, model, prompt_tokens, chat
        self.created = int(time.time())
        self.extras: ReplyLogprobs | None = None  # logprobs and echo, when the request asks

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

    def whole(self, outputs: list[TokenOutput]) -> dict[str, Any]:
        text, reason = completion_text(outputs), openai_finish_reason(finish_reason_of(outputs))
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": reason}
        if self.extras is not None:
            prefix, choice["logprobs"] = self.extras.whole(outputs)
            text = prefix + text
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
            if self.tools is not None:
                content, calls = self.tools.calls(text)
                if calls:
                    choice["message"] = {"role": "assistant", "content": content, "tool_calls": calls}
                    choice["finish_reason"] = "tool_calls" if reason == "stop" else reason
        else:
            choice["text"] = text
        usage = self.usage(outputs[-1].index + 1, outputs[-1].speculation)
        return self._envelope(self.kind, [choice]) | {"usage": usage}

    async def stream(self, generation: Generation, options: StreamOptions) -> AsyncGenerator[str, None]:
        """Chunks ending in `[DONE]`; with `include_usage` every chunk has `usage` (null, or the
        running counts with vLLM's `continuous_usage_stats`) and a last chunk without choices has it."""
        kind = f"{self.kind}.chunk" if self.chat else self.kind
        generated = 0
        speculation: SpeculationStats | None = None

        def chunk(choices: list[dict[str, Any]]) -> str:
            if not options.include_usage:
                return sse(self._envelope(kind, choices))
            usage = self.usage(generated, speculation) if options.continuous_usage_stats else None
            return sse(self._envelope(kind, choices) | {"usage": usage})

        try:
            if self.chat:
                yield chunk([self._chunk_choice({"role": "assistant", "content": ""})])
            held: list[TokenOutput] = []
            async for output in generation.outputs():
                generated, speculation = output.index + 1, output.speculation
                if self.tools is not None:  # tool calls are known only at the end: sent whole then
                    held.append(output)
                    if output.finished:
                        yield chunk([self._tool_choice(held)])
                    continue
                for choice in self._chunk_choices(output):
                    yield chunk([choice])
        except ServingError as exc:
            yield sse(openai_error_body(exc.status_code, exc.message, exc.field, error_code(exc)))
        if options.include_usage:
            yield sse(self._envelope(kind, []) | {"usage": self.usage(generated, speculation)})
        yield sse("[DONE]")

    def _tool_choice(self, outputs: list[TokenOutput]) -> dict[str, Any]:
        """The held-back reply as one delta: tool calls (each with its index) or the content."""
        assert self.tools is not None
        whole = self.whole(outputs)["choices"][0]
        message, reason = whole["message"], whole["finish_reason"]
        delta: dict[str, Any] = {"content": message["content"]}
        if "tool_calls" in message:
            delta["tool_calls"] = [call | {"index": i} for i, call in enumerate(message["tool_calls"])]
        return self._chunk_choice(delta, reason)

    def _chunk_choices(self, output: TokenOutput) -> list[dict[str, Any]]:
        reason = openai_finish_reason(output.finish_reason) if output.finish_reason else None
        text, logprobs = output.text, None
        if self.extras is not None:  # every token gets its chunk, with its logprobs
            prefix, logprobs = self.extras.chunk(output)
            text = prefix + text
        if not self.chat:
            if not (text or reason or logprobs):
                return []
            return [self._chunk_choice(text, reason) | {"logprobs": logprobs}]
        choices = [self._chunk_choice({"content": text}) | {"logprobs": logprobs}] if text or logprobs else []
        if reason is not None:
            choices.append(self._chunk_choice({}, reason))
        return choices

    def _chunk_choice(self, content: str | dict[str, Any], reason: str | None = None) -> dict[str, Any]:
        key = "delta" if self.chat else "text"
        return {"index": 0, key: content, "logprobs": None, "finish_reason": reason}

    def _envelope(self, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
