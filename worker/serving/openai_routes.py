"""vLLM/OpenAI-compatible endpoints: `/v1/completions`, `/v1/chat/completions` (SSE if streamed), models."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Annotated, Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from worker.serving.chat_prompt import ChatMessage, chat_prompt_ids
from worker.serving.chat_tools import ChatTools
from worker.serving.choices import Choices, Generations, best_of
from worker.serving.constraints import openai_constraint
from worker.serving.errors import InvalidParameterError
from worker.serving.http_common import (
    EventStreamResponse,
    RequestContext,
)
from worker.serving.logprobs_format import ReplyLogprobs, echo_text
from worker.serving.openai_replies import Reply, StreamOptions
from worker.serving.params import (
    MAX_ABS_LOGIT_BIAS,
    MAX_ABS_PENALTY,
    MAX_CHOICES,
    MAX_LOGIT_BIAS_ENTRIES,
    MAX_LOGPROBS,
    MAX_MESSAGES,
    MAX_NAME_LENGTH,
    MAX_PROMPT_CHARS,
    MAX_PROMPT_TOKEN_IDS,
    MAX_PROMPTS,
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
LogitBias = Annotated[float, Field(ge=-MAX_ABS_LOGIT_BIAS, le=MAX_ABS_LOGIT_BIAS)]


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
    logit_bias: Annotated[dict[str, LogitBias], Field(max_length=MAX_LOGIT_BIAS_ENTRIES)] | None = None
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

    def sampling(self, max_tokens: int, choices: int = 1) -> SamplingParams:
        """The engine's parameters for one prompt generated with `choices` choices (n, or best_of)."""
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
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            logit_bias=self._token_biases(),
            n=choices,
        )

    def _token_biases(self) -> tuple[tuple[int, float], ...]:
        """OpenAI's logit_bias keys are token ids written as strings; the engine checks the vocabulary."""
        biases: dict[int, float] = {}
        for key, bias in (self.logit_bias or {}).items():
            try:
                token = int(key)
            except ValueError:
                token = -1
            _refuse(
                token < 0, "logit_bias", f"keys must be token ids (non-negative integers); got {key[:20]!r}"
            )
            biases[token] = bias
        return tuple(sorted(biases.items()))

    @property
    def choices_per_prompt(self) -> int:
        """How many choices the engine generates per prompt (best_of, else n)."""
        return self.n

    def logprob_params(self) -> dict[str, Any]:
        """SamplingParams' `logprobs` / `prompt_logprobs` for what the request asks (none here)."""
        return {}

    def _refuse_unsupported(self) -> None:
        _refuse(bool(self.min_tokens), "min_tokens", "is not supported")
        _refuse(self.top_k is not None and self.top_k < -1, "top_k", "must be >= 1, or 0 / -1 for off")

    @property
    def usage_options(self) -> StreamOptions:
        return self.stream_options or StreamOptions()


class CompletionRequest(_GenerationRequest):
    prompt: (
        PromptText
        | Annotated[list[PromptText], Field(max_length=MAX_PROMPTS)]
        | TokenIds
        | Annotated[list[TokenIds], Field(max_length=MAX_PROMPTS)]
    )
    best_of: int | None = Field(default=None, ge=1, le=MAX_CHOICES)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    suffix: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)

    def logprob_params(self) -> dict[str, Any]:
        # An echoed prompt comes with its own entries when logprobs are asked.
        scored = self.echo and self.logprobs is not None
        return {"logprobs": self.logprobs or 0, "prompt_logprobs": self.logprobs if scored else None}

    @property
    def choices_per_prompt(self) -> int:
        return self.best_of or self.n

    def _refuse_unsupported(self) -> None:
        super()._refuse_unsupported()
        _refuse(
            self.best_of is not None and self.best_of < self.n,
            "best_of",
            f"must be at least n ({self.n}): the n best of best_of choices are returned",
        )
        _refuse(
            self.stream and self.choices_per_prompt > self.n,
            "best_of",
            "cannot be streamed (the best choices are known only at the end); leave it unset or equal to n",
        )
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
        params = self.sampling(max_tokens, self.n)
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
    prompts = await run_in_threadpool(_prompts, ctx, body.prompt)  # tokenizing is CPU work
    width = body.choices_per_prompt
    _refuse(
        len(prompts) * width > MAX_CHOICES,
        "n",
        f"{len(prompts)} prompts x {width} choices each is more than {MAX_CHOICES} choices in one request",
    )
    params = [
        body.sampling(ctx.max_tokens(len(p), body.max_tokens, DEFAULT_COMPLETION_TOKENS, "max_tokens"), width)
        for p in prompts
    ]
    tokenizer = ctx.engine.tokenizer
    echoed: list[str | None] = [None] * len(prompts)
    if body.echo:
        echoed = list(await run_in_threadpool(_echo_texts, tokenizer, body.prompt, prompts))
    generations = await _start(ctx, prompts, params, body.model, width)
    model = body.model or ctx.engine.model_name
    reply = Reply("cmpl", "text_completion", model, sum(map(len, prompts)), chat=False)
    if body.logprobs is not None or body.echo:
        wanted = body.logprobs is not None

        def extras(index: int) -> ReplyLogprobs:
            prompt = index // width
            return ReplyLogprobs(
                tokenizer, prompts[prompt], chat=False, wanted=wanted, echo_text=echoed[prompt]
            )

        reply.extras = extras
    if body.stream:
        return EventStreamResponse(reply.stream(generations, body.usage_options))
    generated = await generations.collect(request)
    chosen = best_of(generated, len(prompts), width, body.n) if width > body.n else generated
    return await _whole(reply, chosen, generated)


@router.post("/chat/completions", response_model=None)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response | dict[str, Any]:
    ctx = RequestContext.of(request)
    tools = ChatTools.of(body.tools, body.tool_choice, body.parallel_tool_calls)
    prompt_ids = await run_in_threadpool(chat_prompt_ids, ctx, body.messages, tools)
    field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    requested = body.max_completion_tokens or body.max_tokens
    params = body.chat_sampling(ctx.max_tokens(len(prompt_ids), requested, None, field), tools)
    generations = await _start(ctx, [prompt_ids], [params], body.model, body.n)
    model = body.model or ctx.engine.model_name
    reply = Reply("chatcmpl", "chat.completion", model, len(prompt_ids), chat=True, tools=tools)
    if body.logprobs:
        tokenizer = ctx.engine.tokenizer
        reply.extras = lambda _: ReplyLogprobs(tokenizer, prompt_ids, chat=True, wanted=True, echo_text=None)
    if body.stream:
        return EventStreamResponse(reply.stream(generations, body.usage_options))
    generated = await generations.collect(request)
    return await _whole(reply, generated, generated)


async def _whole(reply: Reply, chosen: Choices, generated: Choices) -> dict[str, Any]:
    if reply.extras is not None:  # decoding every token and alternative is tokenizer work
        return await run_in_threadpool(reply.whole, chosen, generated)
    return reply.whole(chosen, generated)


async def _start(
    ctx: RequestContext, prompts: list[list[int]], params: list[SamplingParams], model: str, width: int
) -> Generations:
    """One engine request per prompt, side by side; if one fails, the others are aborted."""
    started = await asyncio.gather(
        *(ctx.generate(p, s, model) for p, s in zip(prompts, params, strict=True)), return_exceptions=True
    )
    failed = [r for r in started if isinstance(r, BaseException)]
    if failed:
        for result in started:
            if not isinstance(result, BaseException):
                await result.aclose()
        raise failed[0]
    return Generations([r for r in started if not isinstance(r, BaseException)], width)


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


def _sent_prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """The prompts as sent: a string or a list of token ids is one prompt, a list of strings or of
    token-id lists one per item."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        return list(prompt)  # type: ignore[arg-type]
    return [prompt]  # type: ignore[list-item]


def _prompts(ctx: RequestContext, prompt: str | list[str] | list[int] | list[list[int]]) -> list[list[int]]:
    """Each prompt's token ids, in `_sent_prompts`' order."""
    return [_prompt_ids(ctx, item) for item in _sent_prompts(prompt)]


def _echo_texts(
    tokenizer: Any, prompt: str | list[str] | list[int] | list[list[int]], prompts: list[list[int]]
) -> list[str]:
    """Each prompt as `echo` returns it (as sent, or for token ids their text), in `_prompts`' order."""
    return [echo_text(tokenizer, item, ids) for item, ids in zip(_sent_prompts(prompt), prompts, strict=True)]


def _prompt_ids(ctx: RequestContext, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        ids = list(ctx.engine.tokenizer(prompt)["input_ids"]) if prompt else []
    else:
        ids = list(prompt)  # type: ignore[arg-type]
        vocab = len(ctx.engine.tokenizer)
        bad = [token for token in ids if not 0 <= token < vocab]
        _refuse(bool(bad), "prompt", f"token ids must be in [0, {vocab}); got {bad[:5]}")
    _refuse(not ids, "prompt", "must not be empty")
    return ids
