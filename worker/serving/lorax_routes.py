"""LoRAX-compatible endpoints: `POST /generate`, `/generate_stream` (SSE), `/` (a one-item list, or SSE)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncGenerator
from typing import Annotated, Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from worker.serving.constraints import lorax_constraint
from worker.serving.errors import InvalidParameterError, ServingError
from worker.serving.http_common import (
    EventStreamResponse,
    Generation,
    RequestContext,
    completion_text,
    finish_reason_of,
    lorax_error_body,
    sse,
)
from worker.serving.logprobs_format import lorax_alternatives, lorax_prefill, lorax_top_tokens
from worker.serving.outputs import FinishReason, TokenOutput
from worker.serving.params import (
    MAX_CHOICES,
    MAX_LOGPROBS,
    MAX_NAME_LENGTH,
    MAX_PROMPT_CHARS,
    MAX_PROMPT_TOKEN_IDS,
    MAX_REPETITION_PENALTY,
    MAX_STOP_LENGTH,
    MAX_STOP_SEQUENCES,
    MAX_TEMPERATURE,
    MAX_TOKENS_LIMIT,
    MAX_TOP_K,
    MIN_REPETITION_PENALTY,
    SEED_MAX,
    SamplingParams,
)

router = APIRouter()

# Text Generation Inference's default, which LoRAX clients expect when max_new_tokens is unset.
DEFAULT_MAX_NEW_TOKENS = 100
# Where LoRAX may look an adapter up; this server always resolves ids through its own source.
ADAPTER_SOURCES = (None, "hub", "local", "s3", "pbase")


class Parameters(BaseModel):
    """LoRAX's `parameters`; lorax-client sends every field, most of them null. Each is bounded here,
    and NaN or infinite numbers (which Python's json accepts) are refused."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    adapter_id: str | None = Field(default=None, max_length=MAX_NAME_LENGTH)
    adapter_source: str | None = Field(default=None, max_length=MAX_NAME_LENGTH)
    merged_adapters: dict[str, Any] | None = None
    api_token: str | None = Field(default=None, max_length=MAX_NAME_LENGTH)
    do_sample: bool = False
    max_new_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    ignore_eos_token: bool = False
    repetition_penalty: float | None = Field(
        default=None, ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY
    )
    return_full_text: bool = False
    stop: list[Annotated[str, Field(max_length=MAX_STOP_LENGTH)]] = Field(
        default_factory=list, max_length=MAX_STOP_SEQUENCES
    )
    seed: int | None = Field(default=None, ge=0, le=SEED_MAX)
    temperature: float | None = Field(default=None, ge=0, le=MAX_TEMPERATURE)
    top_k: int | None = Field(default=None, le=MAX_TOP_K)
    top_p: float | None = Field(default=None, gt=0, le=1)
    truncate: int | None = Field(default=None, ge=1, le=MAX_PROMPT_TOKEN_IDS)
    typical_p: float | None = Field(default=None, gt=0, le=1)
    best_of: int | None = Field(default=None, ge=1, le=MAX_CHOICES)
    watermark: bool = False
    details: bool = False
    decoder_input_details: bool = False
    # Alternatives of each generated token: lorax-client's `alternative_tokens`, TGI's `top_tokens`.
    return_k_alternatives: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    top_n_tokens: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    response_format: dict[str, Any] | None = None

    def sampling(self, max_new_tokens: int, *, streamed: bool = False) -> SamplingParams:
        """Sampling is on with `do_sample` or any warper set (as in TGI); a sampled run without a seed
        gets a random one, which the details report so that the output can be reproduced."""
        self._refuse_unsupported()
        sampling = self.do_sample or any(
            value is not None for value in (self.temperature, self.top_k, self.top_p)
        )
        seed = self.seed if self.seed is not None or not sampling else secrets.randbelow(2**63)
        return SamplingParams(
            max_tokens=max_new_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            seed=seed,
            stop=tuple(self.stop),
            ignore_eos=self.ignore_eos_token,
            do_sample=sampling,
            constraint=lorax_constraint(self.response_format),
            # What only details show is computed only when they are sent (a stream has no prefill).
            logprobs=max(self.return_k_alternatives or 0, self.top_n_tokens or 0)
            if streamed or self.details
            else 0,
            prompt_logprobs=0 if self.details and self.decoder_input_details and not streamed else None,
        )

    def _refuse_unsupported(self) -> None:
        _refuse(
            self.adapter_source not in ADAPTER_SOURCES,
            "adapter_source",
            f"must be one of {ADAPTER_SOURCES[1:]}",
        )
        _refuse(self.merged_adapters is not None, "merged_adapters", "is not supported; pass one adapter_id")
        _refuse(self.best_of not in (None, 1), "best_of", "only best_of=1 is supported")
        _refuse(self.typical_p is not None, "typical_p", "is not supported; use top_p or top_k")
        _refuse(self.watermark, "watermark", "is not supported")
        _refuse(self.top_k is not None and self.top_k < 1, "top_k", "must be >= 1")


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    inputs: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    parameters: Parameters = Field(default_factory=Parameters)
    stream: bool = False


def _refuse(condition: bool, field: str, message: str) -> None:
    if condition:
        raise InvalidParameterError(f"{field} {message}", field=field)


# --- routes ---------------------------------------------------------------------------------------


@router.post("/generate", response_model=None)
async def generate(body: GenerateRequest, request: Request) -> dict[str, Any]:
    reply = await _start(body, request, streamed=False)
    return await reply.whole(request)


@router.post("/generate_stream", response_model=None)
async def generate_stream(body: GenerateRequest, request: Request) -> Response:
    return EventStreamResponse((await _start(body, request, streamed=True)).stream())


@router.post("/", response_model=None)
async def generate_or_stream(body: GenerateRequest, request: Request) -> Response | list[dict[str, Any]]:
    """The Predibase serving URL itself: a one-element list, or with `stream: true` the SSE stream."""
    reply = await _start(body, request, streamed=body.stream)
    return EventStreamResponse(reply.stream()) if body.stream else [await reply.whole(request)]


async def _start(body: GenerateRequest, request: Request, *, streamed: bool) -> _Reply:
    ctx = RequestContext.of(request)
    parameters = body.parameters
    # Tokenizing is CPU work: on the event loop it would stall every other request's stream.
    prompt_ids = await run_in_threadpool(_prompt_ids, ctx, body.inputs, parameters.truncate)
    budget = ctx.max_tokens(
        len(prompt_ids), parameters.max_new_tokens, DEFAULT_MAX_NEW_TOKENS, "max_new_tokens"
    )
    params = parameters.sampling(budget, streamed=streamed)
    generation = await ctx.generate(prompt_ids, params, parameters.adapter_id)
    return _Reply(ctx, body, prompt_ids, params, generation)


def _prompt_ids(ctx: RequestContext, inputs: str, truncate: int | None) -> list[int]:
    """The prompt's token ids, keeping only the last `truncate` when asked (LoRAX's truncation side)."""
    prompt_ids = list(ctx.engine.tokenizer(inputs)["input_ids"])
    return prompt_ids[-truncate:] if truncate is not None else prompt_ids


# --- responses ------------------------------------------------------------------------------------


class _Reply:
    """Renders one generation as LoRAX's response (with `details` when asked) or its token stream."""

    def __init__(
        self,
        ctx: RequestContext,
        body: GenerateRequest,
        prompt_ids: list[int],
        params: SamplingParams,
        generation: Generation,
    ) -> None:
        self.ctx, self.body, self.prompt_ids, self.params = ctx, body, prompt_ids, params
        self.generation = generation

    async def whole(self, request: Request) -> dict[str, Any]:
        outputs = await self.generation.collect(request)
        reply: dict[str, Any] = {"generated_text": self._full_text(completion_text(outputs))}
        if self.body.parameters.details:
            # Decoding every prompt token is tokenizer work: off the event loop, like tokenizing.
            reply["details"] = await run_in_threadpool(self._whole_details, outputs)
        return reply

    def _whole_details(self, outputs: list[TokenOutput]) -> dict[str, Any]:
        """Decoding every prompt token and alternative is tokenizer work: called off the event loop."""
        parameters, tokenizer = self.body.parameters, self.ctx.engine.tokenizer
        scored = outputs[0].prompt_logprobs
        details = self._details(outputs) | {
            "prefill": lorax_prefill(tokenizer, self.prompt_ids, scored)
            if parameters.decoder_input_details
            else [],
            "tokens": [self._token(output) for output in outputs],
            "best_of_sequences": None,
        }
        if parameters.top_n_tokens:
            details["top_tokens"] = [self._top_tokens(output) for output in outputs]
        return details

    async def stream(self) -> AsyncGenerator[str, None]:
        outputs: list[TokenOutput] = []
        try:
            async for output in self.generation.outputs():
                outputs.append(output)
                event: dict[str, Any] = {
                    "token": self._token(output),
                    "generated_text": None,
                    "details": None,
                }
                if self.body.parameters.top_n_tokens:
                    event["top_tokens"] = self._top_tokens(output)
                if output.finished:
                    event["generated_text"] = self._full_text(completion_text(outputs))
                    if self.body.parameters.details:
                        event["details"] = self._details(outputs)
                yield sse(event)
        except ServingError as exc:
            yield sse(lorax_error_body(exc.status_code, exc.message))

    def _full_text(self, generated: str) -> str:
        if not self.body.parameters.return_full_text:
            return generated
        return self.body.inputs + generated

    def _details(self, outputs: list[TokenOutput]) -> dict[str, Any]:
        details: dict[str, Any] = {
            "finish_reason": lorax_finish_reason(finish_reason_of(outputs)),
            "prompt_tokens": len(self.prompt_ids),
            "generated_tokens": outputs[-1].index + 1,
            "seed": self.params.seed if not self.params.greedy else None,
        }
        speculation = outputs[-1].speculation
        if speculation is not None:  # a Turbo adapter: tuneforge's addition (LoRAX's clients ignore it)
            details["speculation"] = speculation.as_dict()
        return details

    def _token(self, output: TokenOutput) -> dict[str, Any]:
        token = _token(output)
        k = self.body.parameters.return_k_alternatives
        if k:
            token["alternative_tokens"] = lorax_alternatives(
                self.ctx.engine.tokenizer, output.top_logprobs[:k]
            )
        return token

    def _top_tokens(self, output: TokenOutput) -> list[dict[str, Any]]:
        n = self.body.parameters.top_n_tokens or 0
        return lorax_top_tokens(self.ctx.engine.tokenizer, output.top_logprobs[:n])


def _token(output: TokenOutput) -> dict[str, Any]:
    return {"id": output.token_id, "text": output.text, "logprob": output.logprob, "special": output.special}


def lorax_finish_reason(reason: FinishReason) -> str:
    # LoRAX knows length / eos_token / stop_sequence; an aborted request has no client left to read it.
    return str(reason) if reason != FinishReason.ABORTED else str(FinishReason.LENGTH)
